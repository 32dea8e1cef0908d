"""`omnilite bench`: per-stage and user-visible latency of a bundle on this host, per device profile.

Warm-up, then N turns on one question with a forced reply length (random-weight models would
otherwise stop at arbitrary points). Stage times come from the sequential mode, where stages run
one after another so their busy times add up to the wall time; TTFT/TTFA are reported for both the
sequential and the overlapped (default) mode, measured alternately in the same run. `--baseline
torch` runs the PyTorch reference pipeline on the same checkpoint and thread count in the same run
and reports omnilite / baseline ratios. The baseline runs in PyTorch's fastest precision on this host:
fp32, plus bf16 where the CPU computes bf16 natively; the ratios use the faster (see baseline.py).
Every result records the CPU model, its features (present and absent) and the thread counts.
Writes bench.json, bench.md and a waterfall PNG of one turn.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from omnilite import __version__
from omnilite.devices.host import describe_cpu, detect_host
from omnilite.devices.profiles import builtin_profiles, choose_profile, get_profile, pipeline_settings, resolve_providers
from omnilite.devices.tune import tuned_settings
from omnilite.runtime.audio import atomic_write_bytes, prepare_speech, read_wav
from omnilite.runtime.bundle import load_bundle
from omnilite.runtime.errors import OmniliteError
from omnilite.runtime.events import Done
from omnilite.runtime.pipeline import STAGES, Pipeline, PipelineConfig

from .baseline import BaselinePlan, baseline_result, baseline_sentence, plan_baseline, torch_bf16_view
from .cost import Figures, estimate, host_figures, measure_work, share_before_first_audio
from .memory import peak_rss_bytes, reset_peak_rss

log = logging.getLogger(__name__)

SCHEMA = "omnilite.bench/1"


@dataclass(frozen=True)
class BenchConfig:
    bundle: Path
    input: Path
    out_dir: Path
    runs: int = 5
    warmup: int = 1
    max_new_tokens: int = 64
    max_tts_tokens: int | None = None  # LLaMA-Omni2: speech tokens after the text (None: the bundle's cap, 1024)
    profile: str | None = None
    baseline: str | None = None  # "torch"
    encoder_mode: str = "exact"
    progress: bool = True
    estimate: tuple[str, ...] = ()  # profiles to estimate for ("all": every built-in one)


def _pct(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64) * 1000.0
    return {"p50_ms": float(np.percentile(a, 50)), "p95_ms": float(np.percentile(a, 95)), "n": len(values)}


def _versions() -> dict[str, str]:
    import llama_cpp
    import onnxruntime

    return {"omnilite": __version__, "python": platform.python_version(), "numpy": np.__version__,
            "onnxruntime": onnxruntime.__version__, "llama_cpp_python": llama_cpp.__version__}


def _turn(pipe: Pipeline, audio: np.ndarray, rate: int, mode: str) -> Done:
    done = None
    for event in pipe.respond(audio, rate, mode=mode):
        if isinstance(event, Done):
            done = event
    assert done is not None
    return done


def run_bench(cfg: BenchConfig) -> dict:
    from tqdm import tqdm

    host = detect_host()
    profile, reason = choose_profile(cfg.profile, host)
    providers, provider_warnings = resolve_providers(profile, host.ort_providers)
    threads = profile.threads_for("llm", host)
    bundle = load_bundle(cfg.bundle)
    raw, rate = read_wav(cfg.input)
    speech_seconds = len(prepare_speech(raw, rate, 16000)) / 16000
    settings = pipeline_settings(profile, host, bundle.family)
    write = settings.pop("write", None)
    tuned = tuned_settings(bundle.manifest, host, str(bundle.path))
    if tuned and not cfg.profile:  # the threads `omnilite tune` measured on this host (bench runs both modes anyway)
        if tuned.matches:
            settings["stage_threads"] = {**settings["stage_threads"], **tuned.stage_threads}
        else:
            log.warning("%s was tuned on another host (%s); using the device profile %s (run `omnilite tune` on this host).",
                        bundle.path, tuned.tuned_on, profile.name)

    def config(mode: str) -> PipelineConfig:
        c = PipelineConfig(encoder_mode=cfg.encoder_mode, max_new_tokens=cfg.max_new_tokens, ignore_eos=True,
                           mode=mode, verify_bundle=False, **settings)
        if bundle.family == "llama-omni2":
            from omnilite.runtime.omni2.pipeline import as_omni2_config

            c = replace(as_omni2_config(c), write=write, max_tts_tokens=cfg.max_tts_tokens)
        return c

    if cfg.baseline not in (None, "torch"):
        raise OmniliteError(f"baseline {cfg.baseline!r} is unknown; use --baseline torch.")
    # The baseline runs first, in a process that holds nothing else yet: the PyTorch reference of an
    # 8B model needs most of the machine's memory.
    baseline = None
    if cfg.baseline == "torch":
        plan = plan_baseline(host, _torch_view())
        baseline = _torch_baselines(cfg, bundle, threads, plan, config("sequential"))
    gc.collect()  # hand the reference's memory back before omnilite loads

    reset_peak_rss()  # from here the peak is omnilite's, not the baseline's
    t = time.perf_counter()
    # One pipeline, both modes (a per-call option): peak RSS is one pipeline's, as in an application.
    pipe = Pipeline.load(cfg.bundle, config("overlapped"))
    load_seconds = time.perf_counter() - t
    results: dict[str, list[Done]] = {"sequential": [], "overlapped": []}
    total_steps = (cfg.warmup + cfg.runs) * 2
    with pipe, tqdm(total=total_steps, desc="bench", unit="turn", disable=not cfg.progress) as bar:
        for i in range(cfg.warmup + cfg.runs):
            for mode in ("sequential", "overlapped"):  # alternate: same machine load
                done = _turn(pipe, raw, rate, mode)
                if i >= cfg.warmup:
                    results[mode].append(done)
                bar.update()
    del pipe  # free its ONNX Runtime sessions before the next pipeline or the torch baseline loads
    gc.collect()
    silent = sum(len(d.audio) == 0 for done in results.values() for d in done)
    if silent:  # no first audio sample: no TTFA or RTF to report
        raise OmniliteError(f"{silent} of the benchmark's replies of {cfg.max_new_tokens} forced tokens gave no audio "
                            f"({bundle.family}: too few speech tokens for the first vocoder chunk); raise -n/--max-new-tokens.")
    report = _report(cfg, host, profile, reason, providers, provider_warnings, threads, bundle, results,
                     load_seconds, speech_seconds)
    report["threads"] = {"stages": settings["stage_threads"], "llm": threads}
    if baseline is not None:
        report["threads"]["torch_baseline"] = threads
    if cfg.estimate:
        report["estimates"] = _estimates(cfg, profile, config("sequential"), raw, rate, report)
    if baseline is not None:
        report["baseline"] = _with_ratios(baseline, report)
    write_outputs(report, results["sequential"][-1], cfg.out_dir)
    return report


def _report(cfg, host, profile, reason, providers, warnings, threads, bundle, results, load_seconds, speech_seconds) -> dict:
    seq = results["sequential"]
    stages = {s: _pct([d.timings.get(s, 0.0) for d in seq]) for s in STAGES if any(s in d.timings for d in seq)}
    wall = [d.timings["total"] for d in seq]
    stage_sum = [sum(d.timings.get(s, 0.0) for s in STAGES) for d in seq]
    audio_seconds = [len(d.audio) / d.sample_rate for d in seq]
    latency = {
        mode: {k: _pct([d.timings[k] for d in done]) for k in ("ttft", "ttfa", "total") if all(k in d.timings for d in done)}
        for mode, done in results.items()
    }
    for mode, done in results.items():
        latency[mode]["rtf"] = float(np.median([d.timings.get("rtf", float("nan")) for d in done]))
    files = [bundle.path / s.file for s in bundle.stages.values()] + [
        bundle.path / f for s in bundle.stages.values() for f in s.extra_files]
    return {
        "schema": SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": _versions(),
        "host": host.to_dict(),
        "cpu": host.cpu_record(),
        "profile": {"name": profile.name, "reason": reason, "providers": providers, "provider_warnings": warnings,
                    "threads": threads, "n_gpu_layers": profile.n_gpu_layers, "omega": profile.omega},
        "bundle": {"path": str(bundle.path), "family": bundle.family,
                   "precisions": {s.name: s.precision for s in bundle.stages.values()},
                   "size_bytes": sum(f.stat().st_size for f in files), "load_seconds": load_seconds},
        "input": {"file": str(cfg.input), "speech_seconds": speech_seconds, "encoder_mode": cfg.encoder_mode},
        "runs": cfg.runs, "warmup": cfg.warmup, "forced_tokens": cfg.max_new_tokens,
        "stages": stages,
        "latency": latency,
        "reply_audio_seconds": float(np.median(audio_seconds)),
        "wall_seconds_sequential": _pct(wall),
        "stage_sum_over_wall": float(np.median(np.asarray(stage_sum) / np.asarray(wall))),
        "overlap_ttfa_ratio": latency["overlapped"]["ttfa"]["p50_ms"] / latency["sequential"]["ttfa"]["p50_ms"],
        "peak_rss_bytes": peak_rss_bytes(),
    }


def _estimates(cfg: BenchConfig, profile, config: PipelineConfig, raw: np.ndarray, rate: int, report: dict) -> dict:
    """Work per stage from one profiled turn; estimates for the asked profiles; and the model checked
    on this host: predicted (from this host's measured figures) vs measured sequential times."""
    work, done = measure_work(cfg.bundle, config, raw, rate)
    share = share_before_first_audio(done)
    measured = {s: v["p50_ms"] for s, v in report["stages"].items()}
    unmodelled = {s: ms for s, ms in measured.items() if s not in work}
    here = host_figures(profile.peak_gflops["int8"] / profile.peak_gflops["fp32"])
    check = estimate(work, here, share, unmodelled)
    measured_ttfa = report["latency"]["sequential"]["ttfa"]["p50_ms"]
    check.update(measured_ttfa_ms=measured_ttfa, ttfa_error=check["ttfa_ms"] / measured_ttfa - 1,
                 measured_stages_ms=measured,
                 stage_error={s: check["stages_ms"][s] / ms - 1 for s, ms in measured.items() if ms > 0 and s in check["stages_ms"]})
    names = list(builtin_profiles()) if "all" in cfg.estimate else list(cfg.estimate)

    def for_profile(p) -> dict:
        figures = Figures.of_profile(p)
        return estimate(work, figures, share, unmodelled, scale=here.fp32_gflops / figures.fp32_gflops)

    # The profile chosen for this host describes its hardware class, not this exact machine: its
    # figures' error is reported beside the model's.
    own = for_profile(profile)
    own_profile = {"name": profile.name, "ttfa_ms": own["ttfa_ms"], "ttfa_error": own["ttfa_ms"] / measured_ttfa - 1}
    return {"work": {s: asdict(w) for s, w in work.items()}, "share_before_first_audio": share,
            "check_on_this_host": check, "own_profile_check": own_profile,
            "profiles": {get_profile(n).name: for_profile(get_profile(n)) for n in names}}


def _available_memory_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def _baseline_llm_dtype(n_params: int, available: int, precision: str = "fp32"):
    """The LLM's dtype for a baseline in `precision`: for fp32, fp32 (the reference) when its weights fit
    in free memory with 10% and 1 GiB to spare (for activations and the KV cache), else bfloat16; for
    bf16, bfloat16; None (skipped) when that does not fit either."""
    import torch

    candidates = ((torch.float32, 4), (torch.bfloat16, 2)) if precision == "fp32" else ((torch.bfloat16, 2),)
    for dtype, size in candidates:
        if n_params * size < 0.9 * available - 2**30:
            return dtype
    return None


def _torch_view() -> dict:
    try:
        return torch_bf16_view()
    except ImportError:
        raise OmniliteError("--baseline torch needs the export extra; install it with `pip install 'omnilite[export]'`.") from None


def _torch_baselines(cfg: BenchConfig, bundle, threads: int, plan: BaselinePlan, config: PipelineConfig) -> dict:
    """The PyTorch reference in each precision of `plan`; the stored result names the one the ratios use."""
    if bundle.family == "llama-omni2":
        by_precision = _omni2_baseline(cfg, bundle, threads, plan.precisions, config)
        schedule = "all precisions loaded, rounds alternating between them"
    else:
        # One precision after the other: each loads its stages one at a time, so an 8B LLM fits.
        by_precision = {p: _torch_baseline(cfg, bundle, threads, p) for p in plan.precisions}
        schedule = "one precision after the other, each loading its stages one at a time"
    ttfa = {p: r["ttfa"]["p50_ms"] / 1000 for p, r in by_precision.items() if "ttfa" in r}
    return {**baseline_result(by_precision, plan, ttfa), "schedule": schedule}


def _torch_baseline(cfg: BenchConfig, bundle, threads: int, precision: str = "fp32") -> dict:
    """The LLaMA-Omni PyTorch reference on the bundle's source checkpoint: it answers offline (the whole
    reply, then units, then audio), so its first audio sample is ready when everything is, and its TTFA
    is the sum of its stages. In fp32 the LLM runs in fp32 when that fits in memory, else bfloat16;
    in bf16 the encoder, LLM and speech generator run in bfloat16 and the vocoder in fp32 (as the
    official half-precision inference keeps it); an LLM that does not fit is skipped (then there is no
    TTFA ratio)."""
    try:
        import torch

        from omnilite.export.checkpoint import LlamaOmniCheckpoint
        from omnilite.export.reference import ReferencePipeline, greedy_decode
    except ImportError:
        raise OmniliteError("--baseline torch needs the export extra; install it with `pip install 'omnilite[export]'`.") from None
    src = bundle["source"]
    try:
        ckpt = LlamaOmniCheckpoint.open(src["model_dir"], src["speech_encoder"], src["vocoder"])
    except OmniliteError as e:
        raise OmniliteError(f"the torch baseline needs the bundle's source checkpoint: {e}") from None
    torch.set_num_threads(threads)
    ref = ReferencePipeline(ckpt)
    raw, rate = read_wav(cfg.input)
    audio = prepare_speech(raw, rate, 16000)
    n = cfg.warmup + cfg.runs
    rows: list[dict] = [{} for _ in range(n)]
    bf16 = precision == "bf16"
    if bf16:
        ref.encoder.to(torch.bfloat16)
        ref.generator.to(torch.bfloat16)

    def timed(stage: str, fn):
        """Run one stage n times on the previous stage's output, then drop its weights: the stages
        wait for each other anyway (offline), and one at a time an 8B LLM fits beside nothing else.
        Autocast lets the fp32 tensors a bf16 stage makes inside (log-mel, positions) meet its weights."""
        result = None
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16 and stage != "vocoder"):
            for row in rows:
                t = time.perf_counter()
                result = fn()
                row[stage] = time.perf_counter() - t
        ref.release(stage)
        gc.collect()
        return result

    _, emb = timed("encoder", lambda: ref.speech_embeddings(audio, pad_to_30s=cfg.encoder_mode == "exact"))
    n_params, available = ckpt.llm_parameters(), _available_memory_bytes()
    dtype = _baseline_llm_dtype(n_params, available, precision)
    notes = []
    if dtype is None:
        notes.append(f"LLM not baselined in {precision}: {n_params / 1e9:.1f} B parameters need {2 * n_params / 2**30:.1f} "
                     f"GiB even in bfloat16, {available / 2**30:.1f} GiB free")
        # The later stages then run on a forced-length reply's worth of random hidden states.
        hidden = torch.randn(cfg.max_new_tokens, ckpt.config["hidden_size"], generator=torch.Generator().manual_seed(0))
    else:
        if precision == "fp32" and dtype != torch.float32:
            notes.append(f"LLM in bfloat16: the fp32 reference needs {4 * n_params / 2**30:.1f} GiB, "
                         f"{available / 2**30:.1f} GiB free")
        ref.__dict__["llm"] = ckpt.llm(dtype)  # in place of the fp32 cached property
        _, hidden = timed("llm", lambda: greedy_decode(ref.llm, ref.prompt.prefix_ids, emb, ref.prompt.suffix_ids,
                                                       cfg.max_new_tokens, ref.eos_ids, ignore_eos=True))
    units = timed("speech_generator", lambda: ref.generator.predict(hidden))
    wav = timed("vocoder", lambda: ref.vocoder(torch.tensor([units]))[0].numpy() if units else np.zeros(0))
    for row in rows:
        row["rtf"] = (row["speech_generator"] + row["vocoder"]) / max(len(wav) / 16000, 1e-9)
        if dtype is not None:
            row["ttfa"] = sum(row[k] for k in ("encoder", "llm", "speech_generator", "vocoder"))
    rows = rows[cfg.warmup:]
    out = {k: _pct([r[k] for r in rows]) for k in ("encoder", "llm", "speech_generator", "vocoder", "ttfa") if k in rows[0]}
    out["rtf"] = float(np.median([r["rtf"] for r in rows]))
    out["threads"] = threads
    out["precision"] = precision
    out["llm_dtype"] = str(dtype).removeprefix("torch.") if dtype is not None else None
    out["stage_precisions"] = {"encoder": precision, "llm": {None: "skipped", torch.float32: "fp32"}.get(dtype, "bf16"),
                               "speech_generator": precision, "vocoder": "fp32"}
    out["notes"] = notes
    return out


def _omni2_baseline(cfg: BenchConfig, bundle, threads: int, precisions: tuple[str, ...], config: PipelineConfig) -> dict:
    """The LLaMA-Omni2 PyTorch reference in streaming order to its first audio sample (omni2_bench's
    baseline, same R/W and reply length as the pipeline), in the units of this report."""
    try:
        from .omni2_bench import torch_baseline
    except ImportError:
        raise OmniliteError("--baseline torch needs the export extra; install it with `pip install 'omnilite[export]'`.") from None
    from tqdm import tqdm

    src = bundle["source"]
    rw = (config.read or bundle["streaming"]["read"], config.write or bundle["streaming"]["write"])
    raw, rate = read_wav(cfg.input)
    audio = prepare_speech(raw, rate, 16000)
    tts_tail = config.max_tts_tokens or bundle["tts"]["max_tokens_final"]
    with tqdm(total=(cfg.runs + 1) * len(precisions), desc="torch baseline", unit="turn", disable=not cfg.progress) as bar:
        try:
            runs = torch_baseline(Path(src["model_dir"]), audio, rw, cfg.max_new_tokens, tts_tail, cfg.runs, threads, bar,
                                  precisions, speech_encoder=src["speech_encoder"] and Path(src["speech_encoder"]),
                                  decoder=Path(src["decoder_dir"]))
        except OmniliteError as e:
            raise OmniliteError(f"the torch baseline needs the bundle's source checkpoint: {e}") from None
    out = {}
    for p, r in runs.items():
        ms = {k: {"p50_ms": v["p50"] * 1000, "p95_ms": v["p95"] * 1000, "n": v["n"]}
              for k, v in r.items() if isinstance(v, dict) and "p50" in v}
        out[p] = {**ms, "threads": threads, "precision": p, "stage_precisions": r["stage_precisions"],
                  "read": r["read"], "write": r["write"], "notes": [r["note"] + " (one warm-up answer)"]}
    return out


def _with_ratios(out: dict, report: dict) -> dict:
    """omnilite / baseline ratios for the precision the ratios use and for each precision run. Without
    the LLM the later stages ran on other hidden states (different units and audio), so only the
    encoder is compared stage for stage; LLaMA-Omni2's baseline stops at its first audio sample, so
    only the stages it completes (encoder, prefill) are."""
    ours, stages = report["latency"]["overlapped"], report["stages"]

    def ratios(b: dict) -> None:
        if "ttfa" in b:
            b["ratio_ttfa"] = ours["ttfa"]["p50_ms"] / b["ttfa"]["p50_ms"]
        if "ttfa" in b and "rtf" in b:
            b["ratio_rtf"] = ours["rtf"] / b["rtf"]
        if "llm_prefill" in b:  # LLaMA-Omni2
            compared = ("encoder", "llm_prefill")
        else:
            compared = ("encoder", "speech_generator", "vocoder") if "llm" in b else ("encoder",)
        b["stage_ratios"] = {s: stages[s]["p50_ms"] / b[s]["p50_ms"] for s in compared if s in stages and s in b}
        if "llm" in b and "llm_prefill" in stages:
            b["stage_ratios"]["llm"] = (stages["llm_prefill"]["p50_ms"] + stages["llm_decode"]["p50_ms"]) / b["llm"]["p50_ms"]

    for b in out["by_precision"].values():
        ratios(b)
    ratios(out)
    return out


def write_outputs(report: dict, one_turn: Done, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_dir / "bench.json", (json.dumps(report, indent=2) + "\n").encode())
    atomic_write_bytes(out_dir / "bench.md", markdown(report).encode())
    if can_draw_waterfall():
        waterfall_png(one_turn, out_dir / "waterfall.png", report)
    else:  # a torch-free runtime install has no plotting library; the numbers are all in bench.json
        log.warning("waterfall.png not drawn: matplotlib is not installed (pip install 'omnilite[bench]').")


def can_draw_waterfall() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def markdown(r: dict) -> str:
    lines = [
        f"# omnilite bench: {Path(r['bundle']['path']).name} ({r['bundle']['family']})",
        "",
        f"CPU: {describe_cpu(r['cpu'])}",
        f"profile **{r['profile']['name']}** ({r['profile']['reason']}); threads: "
        + ", ".join(f"{k} {v}" for k, v in r["threads"]["stages"].items())
        + (f", PyTorch baseline {r['threads']['torch_baseline']}" if "torch_baseline" in r["threads"] else "")
        + f"; omnilite {r['versions']['omnilite']}, "
        f"onnxruntime {r['versions']['onnxruntime']}, llama-cpp-python {r['versions']['llama_cpp_python']}",
        f"input {r['input']['speech_seconds']:.2f} s, encoder mode {r['input']['encoder_mode']}, "
        f"{r['forced_tokens']} forced tokens, {r['runs']} runs after {r['warmup']} warm-up; "
        f"bundle {r['bundle']['size_bytes'] / 2**20:.1f} MiB ({', '.join(f'{k} {v}' for k, v in r['bundle']['precisions'].items())}), "
        f"cold load {r['bundle']['load_seconds']:.2f} s, peak RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB",
        "",
        "| stage (sequential) | p50 ms | p95 ms |",
        "|---|---:|---:|",
    ]
    lines += [f"| {k} | {v['p50_ms']:.1f} | {v['p95_ms']:.1f} |" for k, v in r["stages"].items()]
    lines += ["", "| mode | TTFT p50 | TTFT p95 | TTFA p50 | TTFA p95 | RTF |", "|---|---:|---:|---:|---:|---:|"]
    for mode, lat in r["latency"].items():
        lines.append(f"| {mode} | {lat['ttft']['p50_ms']:.1f} | {lat['ttft']['p95_ms']:.1f} | "
                     f"{lat['ttfa']['p50_ms']:.1f} | {lat['ttfa']['p95_ms']:.1f} | {lat['rtf']:.3f} |")
    lines += ["", f"overlapped / sequential TTFA: {r['overlap_ttfa_ratio']:.2f}; "
                  f"stage sum / wall (sequential): {r['stage_sum_over_wall']:.3f}"]
    if "estimates" in r:
        lines += _estimate_markdown(r["estimates"])
    if "baseline" in r:
        b = r["baseline"]
        lines += ["", "## PyTorch baseline", "", baseline_sentence(b["plan"], b["precision"], b["why"]), ""]
        for p, x in b["by_precision"].items():
            stages = ", ".join(f"{k} {v}" for k, v in x["stage_precisions"].items())
            lines.append(f"- PyTorch {p} (same checkpoint, {x['threads']} threads; {stages}): "
                         + (f"TTFA p50 {x['ttfa']['p50_ms']:.1f} ms" + (f", RTF {x['rtf']:.3f}" if "rtf" in x else "")
                            + f"; omnilite (overlapped) / torch: TTFA {x['ratio_ttfa']:.3f}"
                            + (f", RTF {x['ratio_rtf']:.3f}" if "ratio_rtf" in x else "") if "ttfa" in x else "no end-to-end figures"))
            if x.get("stage_ratios"):
                lines.append("  per stage (omnilite sequential p50 / torch p50): "
                             + ", ".join(f"{k} {v:.3f}" for k, v in x["stage_ratios"].items()))
            lines += [f"  note: {n}" for n in x.get("notes", [])]
        if len(b["by_precision"]) > 1:
            lines.append(f"- measured {b['schedule']}")
    return "\n".join(lines) + "\n"


def _estimate_markdown(e: dict) -> list[str]:
    c = e["check_on_this_host"]
    stages = list(c["stages_ms"])
    lines = ["", "## Estimates (roofline over the measured work; not measurements)", "",
             f"Checked on this host ({c['figures']['fp32_gflops']:.0f} GFLOP/s fp32, "
             f"{c['figures']['bandwidth_gbps']:.1f} GB/s, measured): predicted TTFA {c['ttfa_ms']:.1f} ms vs measured "
             f"{c['measured_ttfa_ms']:.1f} ms (sequential p50): error {c['ttfa_error']:+.1%}. With the figures of this "
             f"host's profile {e['own_profile_check']['name']} instead (its hardware class, not this machine): "
             f"{e['own_profile_check']['ttfa_ms']:.1f} ms, error {e['own_profile_check']['ttfa_error']:+.1%}.", "",
             "| stage | work GFLOP (fp32 / int8) | GB moved | predicted here ms | measured ms | error |",
             "|---|---:|---:|---:|---:|---:|"]
    for s in stages:
        w = e["work"].get(s)
        flops = f"{w['flops_fp32'] / 1e9:.2f} / {w['flops_int8'] / 1e9:.2f}" if w else "(scaled)"
        gb = f"{w['bytes'] / 1e9:.3f}" if w else "-"
        meas = c["measured_stages_ms"].get(s)
        err = c["stage_error"].get(s)
        lines.append(f"| {s} | {flops} | {gb} | {c['stages_ms'][s]:.1f} | "
                     f"{'-' if meas is None else f'{meas:.1f}'} | {'-' if err is None else f'{err:+.0%}'} |")
    if e["profiles"]:
        lines += ["", "| profile (estimate) | " + " | ".join(stages) + " | TTFA ms |",
                  "|---|" + "---:|" * (len(stages) + 1)]
        for name, est in e["profiles"].items():
            lines.append(f"| {name} | " + " | ".join(f"{est['stages_ms'].get(s, 0):.1f}" for s in stages)
                         + f" | {est['ttfa_ms']:.1f} |")
    return lines


def waterfall_png(done: Done, path: Path, report: dict) -> None:
    """Stage bars on a time axis from t0 (one sequential turn)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise OmniliteError("the waterfall plot needs matplotlib; run `pip install -e '.[bench]'`.") from None
    spans = done.spans
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(STAGES) + 1.5))
    names = [s for s in STAGES if any(n == s for n, _, _ in spans)]
    for row, name in enumerate(names):
        bars = [(a * 1000, (b - a) * 1000) for n, a, b in spans if n == name]
        ax.broken_barh(bars, (row - 0.35, 0.7))
    for key, style in (("ttft", "--"), ("ttfa", "-")):
        if key in done.timings:
            ax.axvline(done.timings[key] * 1000, linestyle=style, color="k", linewidth=1)
            ax.text(done.timings[key] * 1000, len(names) - 0.4, key.upper(), fontsize=8)
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlabel("ms since t0 (end of the question)")
    ax.set_title(f"{report['bundle']['family']} on {report['profile']['name']}: one turn")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)

