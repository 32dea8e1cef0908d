"""`omnilite quantize`: an unquantized bundle -> a quantized bundle with an accuracy report.

The new bundle is built in a temporary directory next to OUT and renamed into place only once
every stage is written and every stage meets its tolerance (unless `allow_fail`), so a failure
leaves nothing behind. Stages whose precision does not change are hard-linked (or copied) unchanged.

Requantization policy (never a silent quality loss):
* A bundle that is itself the output of `omnilite quantize` is refused by default; the message
  names the unquantized bundle it was made from, which is what should be quantized instead.
* With `allow_requantize`, llama.cpp requantizes GGUF stages (it dequantizes, then quantizes
  again: both errors add up) and the accuracy report is measured against the *unquantized*
  bundle (`reference`, or the recorded source if it is still there unchanged), so the report
  shows the total error. ONNX stages cannot be requantized (onnxruntime's quantizers read float
  graphs); a stage can never go up in precision (the lost bits do not come back).
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from omnilite import __version__
from omnilite.runtime.bundle import MANIFEST, Bundle, load_bundle, sha256_file
from omnilite.runtime.errors import BundleError, OmniliteError
from omnilite.runtime.llm import default_flash_attn

from omnilite.export.bundle_dir import building_dir, target_lock

from .accuracy import AccuracyOptions, measure_accuracy
from .presets import FAMILY_ROLES, FIXED_STAGES, UNQUANTIZED, bits, plan_for, table_precision

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuantizeOptions:
    preset: str = "balanced"
    overrides: dict[str, str | None] = field(default_factory=dict)  # role -> precision
    # A stage outside its tolerance raises QuantizationFailed and writes nothing, unless this is set
    # (then the bundle is written with the failure in its report).
    allow_fail: bool = False
    overwrite: bool = False
    allow_requantize: bool = False
    reference: str | Path | None = None  # the unquantized bundle (needed when requantizing)
    tolerances: dict[str, float] = field(default_factory=dict)  # {"role.metric": value}
    report: bool = True  # measure accuracy (minutes for an 8B model on a laptop CPU)
    report_tokens: int = 32
    threads: int | None = None
    progress: bool = True
    # False when the source is a temporary export that is removed afterwards (export --preset).
    record_source: bool = True


class QuantizationFailed(OmniliteError):
    """A stage missed its tolerance (and `allow_fail` was not set); `report` holds the measurements."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


@dataclass
class QuantizeResult:
    path: Path
    manifest: dict

    @property
    def report(self) -> dict | None:
        return self.manifest["quantization"].get("accuracy")


def stage_roles(family: str) -> dict[str, str]:
    """Bundle stage name -> role, for a family."""
    return {stage: role for role, stages in FAMILY_ROLES[family].items() for stage in stages}


def is_derived(bundle: Bundle) -> bool:
    """Made by `omnilite quantize`, or holding any reduced-precision stage."""
    return "quantization" in bundle.manifest or any(s.precision not in UNQUANTIZED for s in bundle.stages.values())


def _describe(bundle: Bundle) -> str:
    q = bundle.manifest.get("quantization", {})
    precisions = ", ".join(f"{s.name} {s.precision}" for s in bundle.stages.values())
    return (f"preset {q['preset']}: " if "preset" in q else "") + precisions


def _bytes(bundle_dir: Path, stage: dict) -> int:
    return sum((bundle_dir / f).stat().st_size for f in [stage["file"], *stage.get("extra_files", {})])


def _find_reference(source: Bundle, options: QuantizeOptions) -> Bundle:
    """The unquantized bundle a requantization is measured against."""
    if options.reference:
        ref = load_bundle(options.reference)
        if is_derived(ref):
            raise OmniliteError(f"--reference {ref.path} is itself quantized ({_describe(ref)}); pass the unquantized bundle.")
        return ref
    recorded = source.manifest.get("quantization", {}).get("source", {})
    path = recorded.get("path")
    if path and Path(path, MANIFEST).is_file():
        ref = load_bundle(path)
        if {s.name: s.sha256 for s in ref.stages.values()} == recorded.get("sha256"):
            return ref
    raise OmniliteError(
        f"requantizing {source.path} needs the unquantized bundle to measure the total error against, and its "
        f"recorded source ({path or 'unknown'}) is gone or changed; pass --reference UNQUANTIZED_BUNDLE."
    )


def _targets(source: Bundle, options: QuantizeOptions) -> tuple[dict[str, str], dict[str, str | None]]:
    """(stage -> target precision, role -> precision asked) for this source and plan."""
    if source.family not in FAMILY_ROLES:
        raise BundleError(f"{source.path} is a '{source.family}' bundle, which this omnilite cannot quantize; upgrade omnilite.")
    plan = plan_for(options.preset, options.overrides, source.family)
    roles = stage_roles(source.family)
    targets = {}
    for name, stage in source.stages.items():
        role = roles.get(name)
        asked = getattr(plan, role) if role else None
        if asked is not None and stage.format == "npy":
            asked = table_precision(asked, stage.precision)
        targets[name] = stage.precision if asked is None else asked
    return targets, plan.as_dict(source.family)


def _check_requantization(source: Bundle, targets: dict[str, str], options: QuantizeOptions) -> bool:
    """Refuse what would silently lose quality; True if this is an (allowed) requantization."""
    if not is_derived(source):
        return False
    recorded = source.manifest.get("quantization", {}).get("source", {}).get("path")
    if not options.allow_requantize:
        raise OmniliteError(
            f"{source.path} is already quantized ({_describe(source)}); quantize its unquantized source "
            f"{recorded or '(the fp32 export)'} instead, or pass --allow-requantize --reference UNQUANTIZED_BUNDLE "
            "to requantize it (errors add up)."
        )
    for name, stage in source.stages.items():
        want = targets[name]
        if want == stage.precision:
            continue
        if bits(want) > bits(stage.precision):
            raise OmniliteError(
                f"stage {name} is {stage.precision} in {source.path}; making it {want} cannot restore the lost "
                "precision; quantize the unquantized bundle instead."
            )
        if stage.format == "onnx" and stage.precision not in UNQUANTIZED:
            raise OmniliteError(
                f"stage {name} is already {stage.precision}; onnxruntime's quantizers need the float32 graph, so "
                "quantize the unquantized bundle instead (or keep this stage's precision)."
            )
    return True


def quantize_bundle(source: str | Path, out: str | Path, options: QuantizeOptions = QuantizeOptions()) -> QuantizeResult:
    out = Path(out)
    src = load_bundle(source)
    if out.resolve() == src.path.resolve():
        raise OmniliteError(f"OUT is the source bundle {src.path}; write the quantized bundle to a new directory.")
    if out.exists() and any(out.iterdir()) and not options.overwrite:
        raise OmniliteError(f"{out} already exists and is not empty; choose another directory or pass --force.")
    targets, plan = _targets(src, options)
    requantize = _check_requantization(src, targets, options)
    reference = _find_reference(src, options) if requantize else src

    with building_dir(out) as tmp:  # locked against a second writer of OUT; removed if anything fails
        manifest = _build(src, tmp, targets, plan, requantize, options)
        if options.report:
            report = measure_accuracy(load_bundle(tmp, verify=False), reference,
                                      AccuracyOptions(tokens=options.report_tokens, threads=options.threads,
                                                      tolerances=options.tolerances))
            if not options.record_source:
                report["reference"]["path"] = manifest["quantization"]["source"]["note"]
            manifest["quantization"]["accuracy"] = report
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
            if not report["ok"] and not options.allow_fail:
                raise QuantizationFailed(f"{failure_summary(report)}; no bundle was written (pass --allow-fail to keep "
                                         "it anyway, or --tolerance ROLE.METRIC=VALUE to change a limit).", report)
    return QuantizeResult(out, manifest)


def failure_summary(report: dict) -> str:
    """`quantized stage decoder misses its tolerance (decoder logit_rel_error=0.31, limit <= 0.25)`."""
    misses = []
    for role in report["failed"]:
        rep = report["stages"][role]
        for metric in rep["failed_metrics"]:
            limit = next(f"{k[len(metric):]} {v:g}" for k, v in rep["tolerance"].items() if k[:-2] == metric)
            misses.append(f"{role} {metric}={rep['metrics'][metric]:.4g}, limit {limit}")
    many = len(report["failed"]) > 1
    return (f"quantized stage{'s' if many else ''} {', '.join(report['failed'])} {'miss their' if many else 'misses its'} "
            f"tolerance ({'; '.join(misses)})")


def _build(src: Bundle, tmp: Path, targets: dict[str, str], plan: dict, requantize: bool, options: QuantizeOptions) -> dict:
    from tqdm import tqdm

    from .gguf_quant import quantize_gguf
    from .onnx_quant import copy_onnx, link_or_copy, quantize_onnx, role_config

    roles = stage_roles(src.family)
    manifest = copy.deepcopy(src.manifest)
    details: dict[str, dict] = {}
    stages = tqdm(manifest["stages"], desc="quantize", unit="stage", disable=not options.progress)
    for stage in stages:
        name, want = stage["name"], targets[stage["name"]]
        stages.set_postfix_str(f"{name} -> {want}")
        src_file, dst_file = src.path / stage["file"], tmp / stage["file"]
        source_bytes = _bytes(src.path, stage)
        if want == stage["precision"]:
            extra = copy_onnx(src_file, dst_file, list(stage.get("extra_files", {}))) if stage["format"] == "onnx" else []
            if stage["format"] != "onnx":
                link_or_copy(src_file, dst_file)
            info = {"method": FIXED_STAGES.get(name, "copied unchanged")}
        elif stage["format"] == "onnx":
            extra, info = quantize_onnx(src_file, dst_file, role_config(roles[name], want, src_file))
        elif stage["format"] == "gguf":
            extra = []
            info = quantize_gguf(src_file, dst_file, want, threads=options.threads, allow_requantize=requantize,
                                 progress=options.progress)
        elif stage["format"] == "npy" and want in ("fp16", "fp32"):
            extra, info = [], _cast_table(src_file, dst_file, want)
        else:
            raise BundleError(f"stage {name} has format {stage['format']!r}, which this omnilite cannot quantize; upgrade omnilite.")
        stage["precision"] = want
        if stage["format"] == "gguf":
            stage["flash_attn"] = default_flash_attn(want)
        stage["sha256"] = sha256_file(dst_file)
        stage["extra_files"] = {f: sha256_file(tmp / f) for f in extra}
        info.update(source_precision=src.stages[name].precision, source_bytes=source_bytes, bytes=_bytes(tmp, stage))
        info["size_ratio"] = round(info["bytes"] / max(source_bytes, 1), 4)
        details[name] = info
        log.info("quantize: %s %s -> %s (%.1f%% of the source size)", name, info["source_precision"], want, 100 * info["size_ratio"])
    stages.close()
    _refresh_padding_cache(tmp, manifest, details)

    import llama_cpp
    import onnxruntime

    manifest["created_by"] = f"omnilite {__version__} (quantize)"
    manifest["quantization"] = {
        "preset": options.preset,
        "plan": plan,
        "requantized": requantize,
        "source": {"path": str(src.path.resolve()) if options.record_source else None,
                   "sha256": {s.name: s.sha256 for s in src.stages.values()},
                   "precisions": {s.name: s.precision for s in src.stages.values()}},
        "stages": details,
        "tools": {"onnxruntime": onnxruntime.__version__, "llama_cpp_python": llama_cpp.__version__},
        "parity_note": "the 'parity' section was measured at export, on the unquantized source",
        "accuracy": None,
    }
    if not options.record_source:
        manifest["quantization"]["source"]["note"] = "unquantized export made by `omnilite export --preset`, not kept"
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def _refresh_padding_cache(tmp: Path, manifest: dict, details: dict[str, dict]) -> None:
    """A re-encoded encoder gets the padding cache of its own output (what `+fill` encoder modes
    splice in after the speech), as if the quantized encoder had run in exact mode; without it the
    runtime would recompute the cache at every load."""
    cache = manifest.get("encoder", {}).get("padding_cache")
    stage = next((s for s in manifest["stages"] if s["name"] == "encoder"), None)
    if not cache or stage is None or cache["file"] in stage["extra_files"]:
        return  # no cache in this bundle, or the encoder was copied with it
    import numpy as np

    from omnilite.runtime.encoder import SpeechEncoder, padding_mel

    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))  # SpeechEncoder reads the encoder section
    encoder = SpeechEncoder(load_bundle(tmp, verify=False))
    np.save(tmp / cache["file"], encoder.embed(padding_mel(encoder.log_mel.n_mels, encoder.max_frames)))
    stage["extra_files"][cache["file"]] = sha256_file(tmp / cache["file"])
    details["encoder"]["bytes"] = _bytes(tmp, stage)
    details["encoder"]["size_ratio"] = round(details["encoder"]["bytes"] / max(details["encoder"]["source_bytes"], 1), 4)
    details["encoder"]["notes"] = [*details["encoder"].get("notes", []), f"{cache['file']} recomputed with this encoder"]
    log.info("quantize: encoder padding cache recomputed with the %s encoder", stage["precision"])


def _cast_table(src: Path, dst: Path, precision: str) -> dict:
    """An embedding table (npy stage) in float16 or float32; the runtime reads either."""
    import numpy as np

    table = np.load(src, mmap_mode="r")
    np.save(dst, np.asarray(table, np.float16 if precision == "fp16" else np.float32))
    return {"method": f"numpy table cast to {'float16' if precision == 'fp16' else 'float32'}"}


def format_sizes(manifest: dict) -> list[str]:
    """One line per stage: precision, size and its ratio to the source; for a quantized GGUF stage,
    the tensor types llama.cpp actually wrote."""
    lines = []
    for name, d in manifest["quantization"]["stages"].items():
        lines.append(f"  {name:<17} {d['source_precision']:>5} -> {manifest_precision(manifest, name):<7}"
                     f"{d['bytes'] / 2**20:10.1f} MiB  ({100 * d['size_ratio']:5.1f}% of {d['source_bytes'] / 2**20:.1f} MiB)")
        if "tensor_types" in d:
            lines.append(f"  {'':<17} {d.get('label', manifest_precision(manifest, name))}; tensors written: "
                         + ", ".join(f"{n} {t}" for t, n in d["tensor_types"].items()))
    return lines


def manifest_precision(manifest: dict, stage: str) -> str:
    return next(s["precision"] for s in manifest["stages"] if s["name"] == stage)


def export_with_preset(export: Callable[[Path, bool], object], out: str | Path, quant_options: QuantizeOptions,
                       keep_unquantized: str | Path | None = None) -> QuantizeResult:
    """`omnilite export --preset`: `export(path, overwrite)` writes the unquantized bundle (to
    `keep_unquantized`, or to a temporary directory next to OUT that is removed afterwards), then it
    is quantized into OUT. Any family: the caller binds its exporter and options."""
    from dataclasses import replace

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not quant_options.overwrite:
        raise OmniliteError(f"{out} already exists and is not empty; choose another directory or pass --force.")
    fp32 = Path(keep_unquantized) if keep_unquantized else out.with_name(f".{out.name}.unquantized")
    with target_lock(out):  # held from the unquantized export to the quantized bundle
        try:
            # A temporary directory is always ours to replace; a kept one only with --force.
            export(fp32, quant_options.overwrite or not keep_unquantized)
            # A temporary source is about to disappear: the manifest says so instead of naming it.
            return quantize_bundle(fp32, out, replace(quant_options, record_source=bool(keep_unquantized)))
        finally:
            if not keep_unquantized:
                shutil.rmtree(fp32, ignore_errors=True)
