"""Trace reference modules to ONNX (fp32, dynamic sequence axes)."""

from __future__ import annotations

import warnings
from pathlib import Path

import onnx
import torch

OPSET = 17


def export_onnx(
    module: torch.nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    path: Path,
    inputs: dict[str, dict[int, str]],
    outputs: dict[str, dict[int, str]],
) -> None:
    """`inputs`/`outputs`: name -> {axis: symbolic name} for the dynamic axes."""
    module.eval()
    with warnings.catch_warnings(), torch.no_grad():
        # The TorchScript-based exporter handles our data-dependent slicing (adapter frame drop,
        # cache offsets) with plain dynamic axes; its deprecation warning is not actionable here.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            example_inputs,
            str(path),
            input_names=list(inputs),
            output_names=list(outputs),
            dynamic_axes={**inputs, **outputs},
            opset_version=OPSET,
            dynamo=False,
        )
    onnx.checker.check_model(str(path))


def io_shapes(path: Path) -> tuple[dict[str, list], dict[str, list]]:
    """Input and output shapes as recorded in the graph (symbolic axes by name)."""
    model = onnx.load(str(path), load_external_data=False)

    def shape(v) -> list:
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    return ({v.name: shape(v) for v in model.graph.input}, {v.name: shape(v) for v in model.graph.output})
