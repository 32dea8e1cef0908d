"""Fun-Audio-Chat latency benchmark: omnilite (torch-free runtime) vs the PyTorch reference, same run.

For one bundle (and the checkpoint it came from, for the baseline) and a spoken question:

* omnilite: one pipeline with the device profile's threads; a warm-up turn, then ``--runs`` turns in
  each streaming schedule (chunk-aligned, the bundle default, and the web demo's official hop 15 + 3)
  and each driver (sequential, overlapped), interleaved. Each reply is ``--steps`` LLM steps long
  (``ignore_eos``; 5 speech codes per step after the forced ``<|audio_bos|>``). Per turn: TTFT, TTFA,
  wall RTF (reply time / audio), what a speaker playing the chunks as they come would do (underruns
  and their total stall), per-stage busy time, the waterfall to the first sample; peak RSS (taken
  before torch is imported);
* then, in the same process, the PyTorch reference answering the same question in streaming order up
  to its first audio sample, as the official code runs it: LLM, audio towers and speech head in bf16
  (the release's dtype, where this CPU runs bf16 natively; fp32 otherwise, if it fits in memory), the
  official generate loop (``reference.s2m_steps``), then the web demo's first token2wav call
  (hop 15 + 3 lookahead tokens, full attention, CosyVoice3 flow + causal HiFT in fp32);
* the CPU model and its features (present and absent), versions, machine load.

Random weights: greedy text ids never end the reply (``ignore_eos``), and each step's 5 codes are
whatever the random head writes (codes >= 6561 are dropped as the runtime drops them), so both sides
do the work of a trained model's reply of the same length.

    python -m omnilite.benchmarks.fun_audio_chat_bench BUNDLE --checkpoint CKPT --name real-small

Results: ``benchmarks/results/fun-audio-chat-<name>.json`` and ``.md`` (text after the ``<!-- notes -->``
line of an existing markdown file is kept); ``--from-json`` re-renders the markdown of a finished run;
``--torch-only`` reruns only the baseline into an existing result.
"""

from __future__ import annotations

import gc
import logging
import time
from pathlib import Path

import numpy as np

from omnilite.devices.host import describe_cpu

from .memory import peak_rss_bytes, reset_peak_rss
from .family_bench import arguments, run
from .turn_stats import busy_before, first_last, percentile, stats

log = logging.getLogger(__name__)

SCHEMA = "omnilite.bench.fun_audio_chat/1"
FAMILY = "fun-audio-chat"
STAGES = ("mel", "encoder", "llm_prefill", "llm_decode", "speech_generator", "vocoder")
MODES = ("sequential", "overlapped")


def playback(chunks: list[tuple[float, int]], rate: int) -> dict:
    """A speaker that starts with the first chunk and plays the rest as they arrive: how often it ran
    dry and for how long. `chunks`: (arrival seconds, samples)."""
    if not chunks:
        return {"underruns": 0, "stall_s": 0.0}
    end = chunks[0][0] + chunks[0][1] / rate
    underruns, stall = 0, 0.0
    for at, n in chunks[1:]:
        if at > end:
            underruns, stall, end = underruns + 1, stall + at - end, at
        end += n / rate
    return {"underruns": underruns, "stall_s": stall}


# --- omnilite ----------------------------------------------------------------------------------

def omnilite_turns(bundle: Path, audio: np.ndarray, steps: int, runs: int, settings: dict) -> dict:
    from omnilite.runtime import AudioChunk, Done, Pipeline
    from omnilite.runtime.fun_audio_chat.pipeline import FunAudioChatConfig
    from omnilite.runtime.fun_audio_chat.vocoder import SCHEDULES, Schedule

    gc.collect()
    reset_peak_rss()
    t = time.perf_counter()
    pipe = Pipeline.load(bundle, FunAudioChatConfig(max_new_tokens=steps, ignore_eos=True, verify_bundle=False, **settings))
    load_s = time.perf_counter() - t
    schedules = {name: Schedule.named(pipe.vocoder.voc, name) for name in SCHEDULES}
    rows: dict[str, list[dict]] = {f"{s}/{m}": [] for s in SCHEDULES for m in MODES}

    def turn(schedule: str, mode: str) -> dict:
        pipe.vocoder.schedule = schedules[schedule]
        t0 = time.perf_counter()
        chunks, done = [], None
        for e in pipe.respond(audio, 16000, t0=t0, mode=mode):
            if isinstance(e, AudioChunk):
                chunks.append((time.perf_counter() - t0, len(e.samples)))
            elif isinstance(e, Done):
                done = e
        audio_s = len(done.audio) / done.sample_rate
        ttfa = done.timings.get("ttfa", float("nan"))
        return {"ttft": done.timings.get("ttft", float("nan")), "ttfa": ttfa, "total": done.timings["total"],
                "audio_s": audio_s, "codes": len(done.units), "wall_rtf": done.timings["total"] / audio_s if audio_s else float("nan"),
                "first_chunk_s": chunks[0][1] / done.sample_rate if chunks else 0.0, "chunks": len(chunks),
                **playback(chunks, done.sample_rate), "prompt_positions": done.stats.get("prompt_tokens"),
                "busy": {s: done.timings.get(s, 0.0) for s in STAGES},
                "busy_before_first_audio": busy_before(done.spans, ttfa),
                "waterfall": {k: [round(a, 3), round(b, 3)] for k, (a, b) in
                              sorted(first_last(done.spans, ttfa).items(), key=lambda x: x[1][0])}}

    try:
        warm = turn("chunk-aligned", "sequential")
        log.info("omnilite warm-up: TTFA %.2f s, %d codes", warm["ttfa"], warm["codes"])
        for _ in range(runs):
            for schedule in SCHEDULES:
                for mode in MODES:
                    r = turn(schedule, mode)
                    log.info("omnilite %s/%s: TTFA %.2f s, wall RTF %.2f", schedule, mode, r["ttfa"], r["wall_rtf"])
                    rows[f"{schedule}/{mode}"].append(r)
        peak = peak_rss_bytes() / 2**30
        shape = pipe.llm.shape()
        hop = {name: [s.hop_tokens, s.lookahead_tokens, s.chunk_frames] for name, s in schedules.items()}
    finally:
        pipe.close()  # its memory goes when this function returns, before the baseline loads
        gc.collect()
    result: dict = {"load_s": load_s, "peak_rss_gb": peak, "llm_shape": shape, "steps": steps, "runs": runs,
                    "schedules": hop, "default_schedule": load_default_schedule(bundle), "turns": {}}
    for key, rs in rows.items():
        agg = {k: stats([r[k] for r in rs]) for k in ("ttft", "ttfa", "total", "wall_rtf", "underruns", "stall_s")}
        agg["busy_before_first_audio"] = {s: percentile([r["busy_before_first_audio"].get(s, 0.0) for r in rs], 50) for s in STAGES}
        agg["busy"] = {s: percentile([r["busy"][s] for r in rs], 50) for s in STAGES}
        agg["first"] = rs[0]
        result["turns"][key] = agg
    return result


def load_default_schedule(bundle: Path) -> str:
    from omnilite.runtime.bundle import load_bundle

    return str(load_bundle(bundle, verify=False)["vocoder"]["schedule"])


# --- PyTorch reference ---------------------------------------------------------------------------

def torch_first_audio(checkpoint: Path, bundle: Path, audio: np.ndarray, runs: int, threads: int, precision: str,
                      hop: int, lookahead: int) -> dict:
    """The reference in streaming order to the first audio sample of the web demo's schedule."""
    import torch

    from omnilite.export.fun_audio_chat.checkpoint import open_cosyvoice3, open_fun_audio_chat
    from omnilite.export.fun_audio_chat.config import N_CODES
    from omnilite.export.fun_audio_chat.parity import clip_mel
    from omnilite.export.fun_audio_chat.prompt import official_prompt_ids
    from omnilite.export.fun_audio_chat.reference import s2m_steps
    from omnilite.runtime.bundle import load_bundle

    torch.set_num_threads(threads)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    b = load_bundle(bundle, verify=False)
    system, voice = b["llm"]["prompt"]["system"], b["vocoder"]["voice"]
    gc.collect()
    reset_peak_rss()
    t = time.perf_counter()
    ckpt = open_fun_audio_chat(checkpoint)
    voc = open_cosyvoice3(checkpoint)
    model = ckpt.reference(dtype)  # the official code loads the release in bf16
    flow, hift, speaker = voc.flow(), voc.hift(), voc.speaker_embedding(voice)  # fp32, as the detokenizer loads them
    load_s = time.perf_counter() - t
    need = hop + lookahead
    wav = torch.from_numpy(np.asarray(audio, np.float32))

    def answer() -> dict:
        s: dict[str, float] = {}
        marks: dict[str, list[float]] = {}
        with torch.no_grad():
            t0 = time.perf_counter()

            def mark(name: str, a: float) -> None:
                b_ = time.perf_counter()
                s[name] = s.get(name, 0.0) + b_ - a
                marks[name] = [marks.get(name, [a - t0])[0], b_ - t0]

            a = time.perf_counter()
            mel = clip_mel(audio)
            mark("mel", a)
            a = time.perf_counter()
            rows = model.user_audio_embeddings(mel.to(dtype), len(wav))
            mark("encoder", a)
            ids = torch.tensor(official_prompt_ids(ckpt.model_dir, len(rows), system))
            codes: list[int] = []
            a = time.perf_counter()
            # Each step of s2m_steps is one LLM forward + the head's 5 sub-steps; the first is the prefill.
            for k, step in enumerate(s2m_steps(model, ids, rows)):
                mark("llm_prefill" if k == 0 else "llm_decode", a)
                if k == 1:
                    s["ttft"] = time.perf_counter() - t0  # <|audio_bos|> is forced: the first text after it
                codes += [c for c in (step.kept or []) if 0 <= c < N_CODES]
                if len(codes) >= need:
                    break
                a = time.perf_counter()
            s["steps_before_audio"] = k
            a = time.perf_counter()
            m = flow.inference(torch.tensor([codes[:need]]), speaker, finalize=False, streaming=False)
            mark("flow", a)
            a = time.perf_counter()
            first = hift.inference(m, finalize=False)[0]
            mark("hift", a)
            s["ttfa"] = time.perf_counter() - t0
        s["first_chunk_samples"] = int(first.shape[-1])
        s["prompt_positions"] = len(ids)
        s["waterfall"] = {k: [round(v[0], 3), round(v[1], 3)] for k, v in marks.items()}
        return s

    rows_: list[dict] = []
    for i in range(runs + 1):  # the first answer warms up
        r = answer()
        log.info("torch %s answer %d: TTFA %.2f s after %d steps", precision, i, r["ttfa"], r["steps_before_audio"])
        if i:
            rows_.append(r)
    keys = ("ttft", "ttfa", "mel", "encoder", "llm_prefill", "llm_decode", "flow", "hift")
    return {**{k: stats([r.get(k, float("nan")) for r in rows_]) for k in keys}, "precision": precision, "threads": threads,
            "load_s": load_s, "peak_rss_gb": peak_rss_bytes() / 2**30, "torch": torch.__version__,
            "steps_before_audio": rows_[0]["steps_before_audio"], "first_chunk_samples": rows_[0]["first_chunk_samples"],
            "prompt_positions": rows_[0]["prompt_positions"], "waterfall": rows_[0]["waterfall"], "hop": [hop, lookahead],
            "stage_precisions": {"encoder": precision, "llm": precision, "speech_head": precision, "flow": "fp32", "hift": "fp32"}}


# --- report ------------------------------------------------------------------------------------

def _cell(x) -> str:
    return f"{x:.2f}" if isinstance(x, (int, float)) and np.isfinite(x) else "-"


def markdown(r: dict) -> str:
    o, t = r["omnilite"], r.get("torch")
    keys = list(o["turns"])
    lines = [f"# Fun-Audio-Chat, {r['name']}: omnilite vs PyTorch, same run", "",
             f"- created {r['created']}; omnilite {r['versions']['omnilite']}, onnxruntime {r['versions']['onnxruntime']}, "
             f"llama-cpp-python {r['versions']['llama_cpp_python']}" + (f", torch {t['torch']}" if t else ""),
             f"- CPU: {describe_cpu(r['host']['cpu_record'])}; RAM {r['host']['ram_gb']:.0f} GB; profile {r['host']['profile']} "
             f"(threads {r['host']['stage_threads']})",
             f"- load average: start {r['load']['start']['load1']:.2f}"
             + (f", after omnilite {r['load']['after_omnilite']['load1']:.2f}" if "after_omnilite" in r["load"] else "")
             + (f", after torch {r['load']['after_torch']['load1']:.2f}" if "after_torch" in r["load"] else ""),
             f"- bundle {r['bundle']['path']} (preset {r['bundle']['preset']}, {r['bundle']['gb']:.2f} GB: "
             + ", ".join(f"{k} {v['precision']} {v['gb']:.2f}" for k, v in r["bundle"]["stages"].items() if v["gb"] >= 0.01) + ")",
             f"- question {Path(r['question']).name} ({r['question_s']:.2f} s, {o['turns'][keys[0]]['first']['prompt_positions']} "
             f"prompt positions); replies of {o['steps']} LLM steps (about {o['turns'][keys[0]]['first']['audio_s']:.1f} s of "
             f"audio); {o['runs']} warm turn(s) per schedule and driver, p50",
             "- schedules (hop, lookahead tokens, attention chunk frames): "
             + "; ".join(f"{k} {v}" + (" (bundle default)" if k == o["default_schedule"] else "") for k, v in o["schedules"].items()), "",
             "| | " + " | ".join(f"omnilite {k}" for k in keys) + f" | PyTorch {t['precision'] if t else '(not run)'} |",
             "|---|" + "---:|" * (len(keys) + 1)]
    rows = [("TTFT (s)", "ttft"), ("TTFA (s)", "ttfa"), ("reply wall time (s)", "total"), ("wall RTF", "wall_rtf"),
            ("underruns", "underruns"), ("stall (s)", "stall_s")]
    for label, k in rows:
        tv = t[k]["p50"] if t and k in ("ttft", "ttfa") else float("nan")
        lines.append(f"| {label} | " + " | ".join(_cell(o["turns"][x][k]["p50"]) for x in keys) + f" | {_cell(tv)} |")
    if t:
        lines.append("| PyTorch TTFA / omnilite TTFA | " + " | ".join(f"{t['ttfa']['p50'] / o['turns'][x]['ttfa']['p50']:.2f}x"
                                                                   for x in keys) + " | |")
    lines += [f"| peak RSS (GB) | {o['peak_rss_gb']:.2f} (one pipeline, every turn) |" + " |" * (len(keys) - 1)
              + f" {_cell(t['peak_rss_gb']) if t else '-'} |",
              f"| load (s) | {o['load_s']:.1f} |" + " |" * (len(keys) - 1) + f" {_cell(t['load_s']) if t else '-'} |", ""]
    seq = "official/sequential" if "official/sequential" in o["turns"] else keys[0]
    lines += [f"## Waterfall to the first audio sample ({seq} for omnilite; seconds from the end of the question)", "",
              "| stage | omnilite start-end | omnilite busy | PyTorch start-end | PyTorch busy |", "|---|---|---:|---|---:|"]
    first = o["turns"][seq]["first"]
    names = list(STAGES) + (["flow", "hift"] if t else [])
    for st in names:
        span, busy = first["waterfall"].get(st), first["busy_before_first_audio"].get(st)
        tspan = t["waterfall"].get(st) if t else None
        lines.append(f"| {st} | {f'{span[0]:.2f}-{span[1]:.2f}' if span else '-'} | {_cell(busy) if busy is not None else '-'} | "
                     f"{f'{tspan[0]:.2f}-{tspan[1]:.2f}' if tspan else '-'} | {_cell(t[st]['p50']) if t and st in t else '-'} |")
    lines += ["", "omnilite's speech_generator is the speech head (llama.cpp) and the feedback row; its vocoder is "
                  "flow + HiFT. PyTorch's llm rows include the speech head (one forward of the generate loop each)."
              + (f" First audio after {t['steps_before_audio']} PyTorch steps ({t['hop'][0]} + {t['hop'][1]} codes)." if t else "")]
    for prec, x in (r.get("torch_by_precision") or {}).items():
        lines.append(f"\nPyTorch {prec} (LLM, audio towers and speech head {prec}; flow and HiFT fp32; {x['threads']} threads): "
                     f"TTFA {x['ttfa']['p50']:.2f} s, peak RSS {x['peak_rss_gb']:.2f} GB" + (" (the ratios' baseline: the faster)"
                                                                                             if x == t else "") + ".")
    if r.get("not_run"):
        lines += ["", "## Not measured", ""] + [f"- {x}" for x in r["not_run"]]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = arguments(__doc__.split("\n")[0], runs=1)
    ap.add_argument("--steps", type=int, default=40, help="LLM steps per reply (5 speech codes, 0.2 s of audio, each)")
    args = ap.parse_args(argv)

    def torch_answer(precision: str, threads: int, audio: np.ndarray, result: dict) -> dict:
        hop, lookahead, _ = result["omnilite"]["schedules"]["official"]
        return torch_first_audio(args.checkpoint, args.bundle, audio, args.torch_runs, threads, precision, hop, lookahead)

    return run(args, argv, schema=SCHEMA, family=FAMILY, prefix="fun-audio-chat", markdown=markdown, keep=(),
               omnilite=lambda settings, audio: {"omnilite": omnilite_turns(args.bundle, audio, args.steps, args.runs, settings)},
               torch_answer=torch_answer)


if __name__ == "__main__":
    raise SystemExit(main())
