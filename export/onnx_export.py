"""Trace reference modules to ONNX (fp32, dynamic sequence axes)."""

from __future__ import annotations

import shutil
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
    external_threshold: int = 1 << 30,
) -> list[str]:
    """Export `module` to `path`. `inputs`/`outputs`: name -> {axis: symbolic name} of dynamic axes.

    Weights beyond `external_threshold` bytes (protobuf caps a file at 2 GB; Whisper-large in
    fp32 is 2.5 GB) go to one side file `<name>.data`. Returns the side files written.
    """
    module.eval()
    scratch = path.parent / f".{path.name}.export"
    scratch.mkdir(exist_ok=True)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            # The TorchScript-based exporter handles our data-dependent slicing (adapter frame drop,
            # cache offsets) with plain dynamic axes; its deprecation warning is not actionable here.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                example_inputs,
                str(scratch / path.name),
                input_names=list(inputs),
                output_names=list(outputs),
                dynamic_axes={**inputs, **outputs},
                opset_version=OPSET,
                dynamo=False,
            )
        model = onnx.load(str(scratch / path.name))  # pulls in any per-tensor external files
        extra = []
        # ModelProto.ByteSize() itself fails past protobuf's 2 GB limit; the initializers, each
        # under it, are what decides.
        if sum(t.ByteSize() for t in model.graph.initializer) > external_threshold:
            extra = [path.name + ".data"]
            onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=extra[0], size_threshold=1024)
        else:
            onnx.save_model(model, str(path))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    onnx.checker.check_model(str(path))
    return extra


def io_shapes(path: Path) -> tuple[dict[str, list], dict[str, list]]:
    """Input and output shapes as recorded in the graph (symbolic axes by name)."""
    model = onnx.load(str(path), load_external_data=False)

    def shape(v) -> list:
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    return ({v.name: shape(v) for v in model.graph.input}, {v.name: shape(v) for v in model.graph.output})
