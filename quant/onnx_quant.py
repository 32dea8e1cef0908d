"""ONNX stage quantization with onnxruntime's own tools.

* ``int8``: dynamic quantization (weights int8 per output channel, 7-bit for matmuls so that no
  x86 CPU saturates, see `OnnxQuantConfig.reduce_range`; activations quantized on the fly per
  tensor). ORT fuses each quantized MatMul into ``DynamicQuantizeMatMul`` / ``MatMulIntegerToFloat``,
  which run on integer dot-product instructions (AVX-512 VNNI, AVX-VNNI, ARM dotprod). Only matmuls
  (and, for the vocoder, convolutions) with constant weights are quantized; attention's activation
  x activation products, norms and softmax stay float.
* ``int4``: block-wise weight-only quantization to ``MatMulNBits`` (4-bit weights, one fp32 scale
  per block of 32 input rows); activations stay float, the CPU kernel computes in int8
  (``accuracy_level`` 4) where supported.
* ``fp16``: weights and compute in float16 with float32 graph inputs/outputs, for providers that
  have fp16 kernels (CUDA, TensorRT, CoreML); on CPU it mainly halves the file.

Numerically sensitive pieces stay float: the Whisper front convolutions are not matmuls (never
quantized) and the encoder's first transformer block stays float (real Whisper weights need it, see
`_FLOAT_PATTERNS`); the vocoder's first and last convolutions (``conv_pre``, and ``conv_post`` which
makes the waveform) stay float in every mode. In int4 mode the projections at a stage's edges
(the adapter, the decoder's input/output projections) get int8 instead of 4 bits.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnx

from omnilite.runtime.errors import OmniliteError

log = logging.getLogger(__name__)

EXTERNAL_THRESHOLD = 1 << 30  # same rule as the exporter: weights over 1 GB go to one side file
QUANTIZED_OPS = ("MatMulInteger", "DynamicQuantizeLinear", "ConvInteger", "MatMulNBits", "DynamicQuantizeMatMul",
                 "MatMulIntegerToFloat", "QLinearConv", "QuantizeLinear", "DequantizeLinear")


@dataclass(frozen=True)
class OnnxQuantConfig:
    precision: str  # fp32 | fp16 | int8 | int4
    op_types: tuple[str, ...] = ("MatMul",)  # what int8 quantizes (int4 always MatMul)
    keep_float: tuple[str, ...] = ()  # node names left in float
    int8_nodes: tuple[str, ...] = ()  # int4 mode: matmuls quantized to int8 instead (edge layers)
    per_channel: bool = True  # int8: one scale per output channel (more accurate than per tensor)
    # int8 MatMul: 7-bit weights. x86 CPUs without VNNI (AVX2, AVX-512 without VNNI) multiply uint8
    # activations by int8 weights with vpmaddubsw, whose int16 pair sums saturate at full 8-bit
    # range; a bundle runs on whatever CPU it is copied to, so it is made safe for every one
    # (onnxruntime's quantization docs give the same advice). Tiny model on an AVX2-only EPYC,
    # 8-bit -> 7-bit: LLaMA-Omni2 flow mel error 0.052 -> 0.020 (0.013 with 8 bits on a VNNI CPU),
    # encoder rel. RMS 0.069 -> 0.028, decoder logit error 0.19 -> 0.030. Unsigned 8-bit weights
    # (U8U8) do not saturate either, but onnxruntime < 1.25 routed U8U8 through broken AMX/VNNI
    # kernels (microsoft/onnxruntime#27671) and U8U8 forgoes VNNI's U8S8 instruction.
    reduce_range: bool = True
    block_size: int = 32  # int4: input rows per scale
    symmetric: bool = False  # int4: asymmetric (with zero points) was more accurate on tiny and real weights
    accuracy_level: int = 4  # int4: 4 = int8 compute on CPU (fastest); 0 = unset (fp32 compute)
    notes: tuple[str, ...] = field(default_factory=tuple)


def role_config(role: str, precision: str, model_path: Path) -> OnnxQuantConfig:
    """The config used for a stage of `role` at `precision` (what stays float, which ops)."""
    if role == "vocoder":
        convs = conv_nodes(model_path)
        # conv_pre reads the unit embeddings, conv_post makes the waveform: both stay float.
        keep = tuple(convs[:1] + convs[-1:]) if convs else ()
        # reduce_range off: onnxruntime's ConvInteger did not saturate at full range here (AVX2-only
        # EPYC: 31.4 dB SNR with 8-bit weights, as with unsigned ones), 7 bits cost 4.5 dB.
        return OnnxQuantConfig(precision, op_types=("Conv",), keep_float=keep, reduce_range=False,
                               notes=("first and last convolution kept float",
                                      "ConvTranspose (upsampling) kept float: no dynamic int8 kernel"))
    keep = float_matmuls(role, model_path)
    notes = (f"first transformer block kept float ({len(keep)} matmuls)",) if keep else ()
    if precision == "int4":
        # The projections at a stage's edges (the encoder's adapter into the LLM, the decoder's
        # input projection from the LLM and its output projection into the unit argmax) get int8:
        # on the tiny model this raised the encoder's cosine from 0.980 to 0.991 and the decoder's
        # frame agreement from 0.61 to 0.77, for about 3% of the weights at the real shape.
        edges = tuple(e for e in edge_matmuls(role, model_path) if e not in keep)
        return OnnxQuantConfig(precision, keep_float=keep, int8_nodes=edges,
                               notes=notes + (f"edge projections int8 ({len(edges)} matmuls), the rest 4-bit",))
    return OnnxQuantConfig(precision, keep_float=keep, notes=notes)


# Real Whisper weights (Whisper-base, benchmarks/results/quant_real_weights.md): with the first
# encoder block quantized, a few positions of the 30 s padding collapse (row cosine 0.03-0.23 under
# int4 / int8); kept float, the mean row cosine over 38 utterances is 0.994 (int8) / 0.996 (int4) and
# the worst row 0.50 / 0.56, for 1/32 of Whisper-large's weights.
_FLOAT_PATTERNS = {"encoder": ("/blocks.0/",)}


def _weighted_matmuls(model_path: Path) -> list[str]:
    model = onnx.load(str(model_path), load_external_data=False)
    weights = {i.name for i in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in weights]


def float_matmuls(role: str, model_path: Path) -> tuple[str, ...]:
    """MatMuls a role keeps in float at every precision."""
    patterns = _FLOAT_PATTERNS.get(role, ())
    return tuple(n for n in _weighted_matmuls(model_path) if any(p in n for p in patterns))


_EDGE_PATTERNS = {"encoder": ("/adapter/",), "decoder": ("/input_proj/", "/output_proj/")}


def edge_matmuls(role: str, model_path: Path) -> tuple[str, ...]:
    """Names of a stage's edge MatMuls (with constant weights): by the module names the exporter
    gives them, else the first and the last."""
    mms = _weighted_matmuls(model_path)
    named = tuple(n for n in mms if any(p in n for p in _EDGE_PATTERNS.get(role, ())))
    return named or tuple(dict.fromkeys(mms[:1] + mms[-1:]))


def conv_nodes(model_path: Path) -> list[str]:
    model = onnx.load(str(model_path), load_external_data=False)
    return [n.name for n in model.graph.node if n.op_type in ("Conv", "ConvTranspose")]


@contextlib.contextmanager
def _quiet_onnxruntime_logging() -> Iterator[None]:
    """onnxruntime's quantizers log every node at INFO through the root logger and call
    logging.basicConfig(level=INFO) at import; keep both out of our output."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level

    class DropOrt(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "onnxruntime" not in record.pathname or record.levelno >= logging.ERROR

    drop = DropOrt()
    root.addFilter(drop)
    ort_logger = logging.getLogger("onnxruntime")
    ort_level = ort_logger.level
    ort_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.removeFilter(drop)
        ort_logger.setLevel(ort_level)
        # Undo an import-time basicConfig.
        for h in list(root.handlers):
            if h not in handlers:
                root.removeHandler(h)
        root.setLevel(level)


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the initializers (ModelProto.ByteSize() itself fails past protobuf's 2 GB)."""
    return sum(t.ByteSize() for t in model.graph.initializer)


def save_model(model: onnx.ModelProto, path: Path) -> list[str]:
    """Write `model` to `path`; weights over 1 GB go to one side file. Returns side files."""
    if weight_bytes(model) > EXTERNAL_THRESHOLD:
        extra = path.name + ".data"
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=extra, size_threshold=1024)
        return [extra]
    onnx.save_model(model, str(path))
    return []


def quantize_onnx(src: Path, dst: Path, config: OnnxQuantConfig) -> tuple[list[str], dict]:
    """Quantize the float ONNX graph `src` (with its external data, if any) into `dst`.

    Returns (side files written next to `dst`, details for the manifest)."""
    src, dst = Path(src), Path(dst)
    if config.precision == "fp32":
        raise ValueError("fp32 is a copy, not a quantization")
    if config.precision not in ("fp16", "int8", "int4"):
        raise OmniliteError(f"ONNX precision {config.precision!r} is unknown; use fp32, fp16, int8 or int4.")
    _check_float_graph(src)
    model = onnx.load(str(src))  # with external data
    with _quiet_onnxruntime_logging():
        if config.precision == "fp16":
            out = _fp16(model)
        elif config.precision == "int8":
            out = _int8(model, config)
        else:
            out = _int4(model, config)
    extra = save_model(out, dst)
    ops = Counter(n.op_type for n in out.graph.node)
    details = {
        "method": {"fp16": "float16 weights and compute, float32 inputs/outputs",
                   "int8": "onnxruntime quantize_dynamic: int8 weights" + (" per channel" if config.per_channel else "")
                           + (" (7-bit range)" if config.reduce_range else "")
                           + ", activations quantized per tensor at run time",
                   "int4": f"onnxruntime MatMulNBits: 4-bit block-wise weight-only ({config.block_size} rows per scale"
                           + (", symmetric" if config.symmetric else ", with zero points") + ")"}[config.precision],
        "quantized_ops": {k: v for k, v in sorted(ops.items()) if k in QUANTIZED_OPS},
        "kept_float": list(config.keep_float),
        "int8_nodes": list(config.int8_nodes),
        "config": {k: v for k, v in asdict(config).items() if k not in ("notes", "keep_float", "int8_nodes")},
        "notes": list(config.notes),
    }
    return extra, details


def _check_float_graph(path: Path) -> None:
    """onnxruntime's quantizers read float graphs; an already-quantized one would be mangled."""
    model = onnx.load(str(path), load_external_data=False)
    quantized = sorted({n.op_type for n in model.graph.node if n.op_type in QUANTIZED_OPS})
    fp16 = any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer)
    if quantized or fp16:
        what = ", ".join(quantized) if quantized else "float16 weights"
        raise OmniliteError(f"{path} is already reduced-precision ({what}); onnxruntime's quantizers need the "
                            "float32 graph, so quantize the fp32 bundle instead.")


def _fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    # keep_io_types: callers keep feeding and reading float32 (the runtime is unchanged).
    return convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=weight_bytes(model) > EXTERNAL_THRESHOLD)


def _int8(model: onnx.ModelProto, config: OnnxQuantConfig, only: tuple[str, ...] = ()) -> onnx.ModelProto:
    """Dynamic int8; `only` restricts it to those nodes (int4 mode's edge layers)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="omnilite-int8-") as tmp:
        out = Path(tmp) / "model.onnx"
        quantize_dynamic(
            model, out,
            op_types_to_quantize=list(config.op_types),
            per_channel=config.per_channel,
            reduce_range=config.reduce_range,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=list(config.keep_float),
            nodes_to_quantize=list(only) or None,
            use_external_data_format=weight_bytes(model) > EXTERNAL_THRESHOLD,
            # Activation x activation matmuls (attention scores) stay float: quantizing softmax
            # probabilities to 8 bits costs accuracy and the CPU kernels gain little there.
            extra_options={"MatMulConstBOnly": True},
        )
        return onnx.load(str(out))


def _int4(model: onnx.ModelProto, config: OnnxQuantConfig) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    q = MatMulNBitsQuantizer(
        model,
        block_size=config.block_size,
        is_symmetric=config.symmetric,
        accuracy_level=config.accuracy_level,
        nodes_to_exclude=list(config.keep_float + config.int8_nodes),
    )
    q.process()
    out = q.model.model
    if config.int8_nodes:
        from dataclasses import replace

        out = _int8(out, replace(config, op_types=("MatMul",)), only=config.int8_nodes)
    return out


def copy_onnx(src: Path, dst: Path, side_files: list[str]) -> list[str]:
    """Copy a stage file and its side files unchanged (hard links where the filesystem allows)."""
    link_or_copy(src, dst)
    for name in side_files:
        link_or_copy(src.parent / name, dst.parent / name)
    return list(side_files)


def link_or_copy(src: Path, dst: Path) -> None:
    """Bundles are read-only artifacts (sha256-checked), so sharing the inode is safe and saves
    copying a 16 GB LLM."""
    try:
        dst.hardlink_to(src)
    except OSError:
        shutil.copy2(src, dst)
