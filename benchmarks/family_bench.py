"""What the per-family latency benchmarks (Step-Audio 2, Fun-Audio-Chat) share around their own turns:
the command line, the run's header (host, CPU features, versions, bundle, load), the omnilite part written
before the baseline, and the PyTorch baseline in each sensible precision that fits in memory."""

from __future__ import annotations

import argparse
import gc
import json
import logging
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from omnilite.runtime.audio import atomic_write_bytes

from .baseline import plan_baseline, torch_bf16_view
from .report import write_markdown_keeping_notes
from .turn_stats import available_gb, bundle_sizes, load_avg

log = logging.getLogger(__name__)

RESULTS = Path(__file__).parent / "results"
QUESTION = Path(__file__).parent / "data" / "speech" / "s08.wav"


def arguments(description: str, runs: int) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("bundle", type=Path, nargs="?")
    ap.add_argument("--checkpoint", type=Path, help="the release the bundle came from (for the PyTorch reference)")
    ap.add_argument("--question", type=Path, default=QUESTION,
                    help="the spoken question (default: a 3.06 s question from the committed speech set)")
    ap.add_argument("--name", default="bench")
    ap.add_argument("--runs", type=int, default=runs, help="warm omnilite turns per setting")
    ap.add_argument("--torch-runs", type=int, default=1, help="warm PyTorch answers per precision")
    ap.add_argument("--profile", default=None)
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    ap.add_argument("--from-json", type=Path)
    ap.add_argument("--torch-only", action="store_true",
                    help="keep the omnilite part of an existing result (same --name) and run only the PyTorch reference "
                         "in this fresh process (when the first one was killed for memory, or its page cache was contended)")
    return ap


def run(args, argv: list[str] | None, *, schema: str, family: str, prefix: str, markdown: Callable[[dict], str],
        omnilite: Callable[[dict, np.ndarray], dict], keep: tuple[str, ...],
        torch_answer: Callable[[str, int, np.ndarray, dict], dict]) -> int:
    """`omnilite(settings, audio)` -> the omnilite part (with ``llm_shape``); `keep`: the result keys a
    --torch-only run takes over; `torch_answer(precision, threads, audio, result)` -> one precision's
    baseline (with ``ttfa``)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.from_json:
        write_markdown_keeping_notes(args.from_json.with_suffix(".md"), markdown(json.loads(args.from_json.read_text())))
        return 0
    if args.bundle is None:
        raise SystemExit("error: a bundle is needed (or --from-json)")

    import llama_cpp
    import onnxruntime

    from omnilite import __version__
    from omnilite.devices.host import detect_host
    from omnilite.devices.profiles import choose_profile, pipeline_settings
    from omnilite.runtime.audio import prepare_speech, read_wav

    host = detect_host()
    profile, reason = choose_profile(args.profile, host)
    settings = pipeline_settings(profile, host, family)
    settings.pop("omega")  # both families hand over fixed groups of ids, not omega tokens
    wav, rate = read_wav(args.question)
    audio = prepare_speech(wav, rate, 16000)
    result: dict = {
        "schema": schema, "name": args.name, "argv": argv if argv is not None else sys.argv[1:],
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": {"omnilite": __version__, "python": platform.python_version(), "numpy": np.__version__,
                     "onnxruntime": onnxruntime.__version__, "llama_cpp_python": llama_cpp.__version__},
        "host": {"cpu": host.cpu_model, "cores": host.physical_cores, "ram_gb": host.ram_gb, "profile": profile.name,
                 "profile_reason": reason, "stage_threads": settings["stage_threads"], "cpu_record": host.cpu_record()},
        "bundle": bundle_sizes(args.bundle), "checkpoint": str(args.checkpoint) if args.checkpoint else None,
        "question": str(args.question), "question_s": len(audio) / 16000, "runs": args.runs,
        "load": {"start": load_avg()}, "not_run": [],
    }
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{prefix}-{args.name}.json", out / f"{prefix}-{args.name}.md"
    if args.torch_only:
        kept = json.loads(json_path.read_text())
        result.update({k: kept[k] for k in ("omnilite", "created", "versions", *keep)},
                      load={**kept["load"], "torch_start": load_avg()}, torch_process="a second process after the omnilite one")
    else:
        result.update(omnilite(settings, audio))
        result["load"]["after_omnilite"] = load_avg()
        # Written now, so a baseline that runs out of memory (a 7-8B bf16 model on a small host) loses nothing.
        atomic_write_bytes(json_path, (json.dumps(result, indent=2) + "\n").encode())
    if args.checkpoint:
        plan = plan_baseline(host, torch_bf16_view())  # imports torch: after omnilite
        threads = profile.threads_for("llm", host)
        result["host"]["torch_threads"] = threads
        result["torch_plan"] = plan.to_dict()
        n_params = result["omnilite"]["llm_shape"]["n_params"]
        result["host"]["available_gb_before_torch"] = available_gb()
        by_precision = {}
        for precision in plan.precisions:
            need, free = n_params * (2 if precision == "bf16" else 4) / 2**30, available_gb()
            if need > 0.9 * free - 1:
                result["not_run"].append(f"PyTorch {precision}: its LLM weights alone are {need:.1f} GB and {free:.1f} GB "
                                         "of memory was free, so it was not loaded")
                continue
            by_precision[precision] = torch_answer(precision, threads, audio, result)
            gc.collect()
        if by_precision:  # the ratios use the faster precision
            result["torch"] = min(by_precision.values(), key=lambda x: x["ttfa"]["p50"])
            result["torch_by_precision"] = by_precision
        result["load"]["after_torch"] = load_avg()
    else:
        result["not_run"].append("PyTorch reference: no --checkpoint given")
    atomic_write_bytes(json_path, (json.dumps(result, indent=2) + "\n").encode())
    write_markdown_keeping_notes(md_path, markdown(result))
    print(md_path.read_text())
    return 0
