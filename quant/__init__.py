"""INT8 / INT4 quantization of bundle stages and their accuracy reports.

`quantize_bundle` turns an unquantized bundle into a quantized one (onnxruntime's quantizers for
ONNX stages, llama.cpp's for GGUF stages) and records, in its manifest, an accuracy report measured
stage by stage against the unquantized bundle (`measure_accuracy`). Presets and tolerances live in
`presets`. Importing this package does not import torch.
"""

from .accuracy import AccuracyOptions, format_report, measure_accuracy
from .bundle_quant import QuantizationFailed, QuantizeOptions, QuantizeResult, export_with_preset, quantize_bundle
from .presets import PRESETS, QuantPlan, plan_for

__all__ = [
    "AccuracyOptions", "PRESETS", "QuantPlan", "QuantizationFailed", "QuantizeOptions", "QuantizeResult",
    "export_with_preset", "format_report", "measure_accuracy", "plan_for", "quantize_bundle",
]
