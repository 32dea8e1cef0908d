"""Step-Audio 2 mini latency benchmark: omnilite (torch-free runtime) vs the PyTorch reference, same run.

For one bundle (and the checkpoint it came from, for the baseline) and a spoken question:

* the reply is a fixed script in the release's speech format: after the prefilled ``<tts_start>``, chunks of
  1 text id + 4 ``<audio_k>`` ids (StepFun's 1:4 interleave), ``--reply`` ids long. Random weights never
  write that format (their greedy ids are < 5% audio, in no order), so both sides compute each step's logits
  and greedy pick as usual and then feed the scripted id: the work per step is the model's, the reply length
  and the position of the first speech window (28 codes = 35 ids) are those of a trained model;
* omnilite: one pipeline with the device profile's threads, a warm-up turn, then ``--runs`` turns in each of
  the sequential and overlapped modes, alternating: TTFT, TTFA, RTF, peak RSS (taken before torch is
  imported), per-stage busy time and the per-stage waterfall up to the first audio sample (the token2wav
  stage split into flow and HiFT by timers around the flow calls);
* then, in the same process, the PyTorch reference in streaming order to its first audio sample: log-mel,
  encoder + adapter and LLM in bf16 (the release's dtype; this CPU has native bf16), prefill with the speech
  rows spliced after ``<audio_start>``, the scripted reply with a KV cache until 28 codes, the official
  streaming token2wav (flow ``setup_cache`` with the voice prompt, first 25 + 3 window; HiFT) in fp32, as
  token2wav.py loads flow.pt / hift.pt. The fp32 reference runs only where its weights fit in free memory
  (a 7B LLM is 33 GB in fp32);
* the CPU model and its features (present and absent), versions, machine load.

    python -m omnilite.benchmarks.step_audio2_bench BUNDLE --checkpoint CKPT --name real-small

Results: ``benchmarks/results/step-audio2-<name>.json`` and ``.md`` (text after the ``<!-- notes -->`` line of
an existing markdown file is kept); ``--from-json`` re-renders the markdown of a finished run.
"""

from __future__ import annotations

import gc
import logging
import time
from pathlib import Path

import numpy as np

from omnilite.devices.host import describe_cpu

from .family_bench import arguments, run
from .memory import peak_rss_bytes, reset_peak_rss
from .turn_stats import busy_before as _busy_before
from .turn_stats import first_last as _first_last
from .turn_stats import percentile as _p
from .turn_stats import stats as _stats

log = logging.getLogger(__name__)

SCHEMA = "omnilite.bench.step_audio2/1"
CHUNK = 5  # ids per interleave chunk: 1 text + 4 audio
REPLY_TEXT = "Sure. Here is a short answer to your question, spoken while it is written."
OMNI_STAGES = ("mel", "encoder", "llm_prefill", "llm_decode", "flow", "hift")


def reply_script(text_ids: list[int], n: int, code_base: int, codes: int, seed: int = 0) -> list[int]:
    """`n` ids in the 1:4 interleave: a text id (cycling through `text_ids`), then 4 audio ids (seeded codes)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        out.append(text_ids[(i // CHUNK) % len(text_ids)] if i % CHUNK == 0 else code_base + int(rng.integers(0, codes)))
    return out


def ids_until_first_window(script: list[int], code_base: int, codes: int, window: int) -> int:
    """How many reply ids hold the first flow window's codes (25 + 3 lookahead)."""
    seen = 0
    for i, t in enumerate(script, 1):
        seen += code_base <= t < code_base + codes
        if seen >= window:
            return i
    return len(script)


# --- omnilite ----------------------------------------------------------------------------------

def _scripted(llm, script: list[int]):
    """`LlamaCppLLM.generate` with the greedy pick computed (its cost stays) and the script's id fed instead."""

    def generate(max_new_tokens: int, *, ignore_eos: bool = False, first):
        logits, hidden = first
        for step in range(min(max_new_tokens, len(script))):
            int(np.argmax(logits))
            yield script[step], hidden
            if step == min(max_new_tokens, len(script)) - 1:
                return
            logits, hidden = llm.eval_tokens([script[step]], want_last=True)
    return generate


class _FlowTimer:
    """Intervals of the token2wav flow calls (setup and windows), so the vocoder stage splits into flow and HiFT."""

    def __init__(self, flow):
        self.spans: list[tuple[float, float]] = []
        for name in ("setup", "chunk"):
            setattr(flow, name, self._timed(getattr(flow, name)))

    def _timed(self, fn):
        def call(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.spans.append((t, time.perf_counter()))
        return call


def omnilite_turns(bundle: Path, audio: np.ndarray, n_reply: int, runs: int, settings: dict) -> tuple[dict, dict]:
    """Warm-up, then `runs` sequential and overlapped turns. Returns (summary, script info)."""
    from omnilite.runtime import Done, Pipeline, PipelineConfig
    from omnilite.runtime.bundle import load_bundle

    gc.collect()
    reset_peak_rss()
    t = time.perf_counter()
    pipe = Pipeline.load(bundle, PipelineConfig(max_new_tokens=n_reply, ignore_eos=True, verify_bundle=False, **settings))
    load_s = time.perf_counter() - t
    out_cfg = load_bundle(bundle, verify=False)["output_tokens"]
    base, codes = int(out_cfg["audio_code_base"]), int(out_cfg["audio_codes"])
    script = reply_script(pipe.llm.tokenize(REPLY_TEXT, special=False), n_reply, base, codes)
    pipe.llm.generate = _scripted(pipe.llm, script)
    timer = _FlowTimer(pipe.vocoder.t2w.flow)
    t2w = pipe.vocoder.t2w
    window = t2w.chunk_tokens + t2w.lookahead
    done: dict[str, list] = {"sequential": [], "overlapped": []}
    flow_before: dict[str, list[float]] = {"sequential": [], "overlapped": []}
    flow_window: list[list[float]] = []

    def turn(mode: str) -> Done:
        timer.spans.clear()
        t_call = time.perf_counter()
        d = [e for e in pipe.respond(audio, 16000, mode=mode) if isinstance(e, Done)][0]
        rel = [(a - t_call, b - t_call) for a, b in timer.spans]
        ttfa = d.timings.get("ttfa", float("inf"))
        flow_before[mode].append(sum(min(b, ttfa) - a for a, b in rel if a < ttfa))
        if mode == "sequential":
            first = [(a, min(b, ttfa)) for a, b in rel if a < ttfa]
            flow_window.append([min(a for a, _ in first), max(b for _, b in first)] if first else [])
        return d

    try:
        turn("sequential")  # warm-up
        flow_before = {"sequential": [], "overlapped": []}
        flow_window.clear()
        for _ in range(runs):
            for mode in ("sequential", "overlapped"):
                done[mode].append(turn(mode))
        peak = peak_rss_bytes() / 2**30
        shape = pipe.llm.shape()
    finally:
        pipe.close()  # its memory goes when this function returns, before the baseline loads
        gc.collect()
    seq = done["sequential"]
    first = seq[0]
    if not len(first.audio):
        raise RuntimeError("the scripted reply produced no audio; raise --reply to at least 35 ids")
    audio_s = len(first.audio) / first.sample_rate
    result: dict = {"load_s": load_s, "peak_rss_gb": peak, "llm_shape": shape, "reply_ids": n_reply,
                    "ids_before_first_window": ids_until_first_window(script, base, codes, window),
                    "codes": len(first.units), "audio_s": audio_s, "prompt_positions": first.stats.get("prompt_tokens")}
    for mode, ds in done.items():
        result[mode] = {k: _stats([d.timings[k] for d in ds]) for k in ("ttft", "ttfa", "rtf", "total")}
        result[mode]["wall_rtf"] = _stats([d.timings["total"] / audio_s for d in ds])
        result[mode]["flow_before_first_audio"] = _stats(flow_before[mode])
    stages = ("resample", "mel", "encoder", "llm_prefill", "llm_decode", "vocoder")
    result["stages"] = {s: _stats([d.timings.get(s, 0.0) for d in seq]) for s in stages}
    before = [_busy_before(d.spans, d.timings["ttfa"]) for d in seq]
    result["before_first_audio"] = {s: _p([b.get(s, 0.0) for b in before], 50) for s in stages}
    fb = _p(flow_before["sequential"], 50)
    result["before_first_audio"]["flow"] = fb
    result["before_first_audio"]["hift"] = max(0.0, result["before_first_audio"]["vocoder"] - fb)
    wf = _first_last(first.spans, first.timings["ttfa"])
    if flow_window and flow_window[0]:
        wf["flow (in vocoder)"] = flow_window[0]
    result["waterfall_sequential"] = {k: [round(a, 3), round(b, 3)] for k, (a, b) in sorted(wf.items(), key=lambda x: x[1][0])}
    result["waterfall_ttfa"] = first.timings["ttfa"]
    return result, {"text": REPLY_TEXT, "code_seed": 0, "head": script[:10]}


# --- PyTorch reference ---------------------------------------------------------------------------

def torch_first_audio(checkpoint: Path, bundle: Path, audio: np.ndarray, n_reply: int, runs: int, threads: int,
                      precision: str) -> dict:
    """The reference stages in streaming order to the first audio sample (`precision`: the encoder's and
    LLM's dtype; the flow and HiFT stay fp32 as token2wav.py loads them)."""
    import torch

    from omnilite.export.step_audio2.checkpoint import TOKEN2WAV_DIR, open_step_audio2
    from omnilite.export.step_audio2.flow_checkpoint import load_flow, load_hift
    from omnilite.export.step_audio2.flow_reference import CHUNK_TOKENS
    from omnilite.export.step_audio2.reference import chunk_audio, load_encoder, load_llm, log_mel
    from omnilite.runtime.bundle import load_bundle
    from omnilite.runtime.step_audio2.vocoder import VoicePrompt

    torch.set_num_threads(threads)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    b = load_bundle(bundle, verify=False)
    prompt, out = b["llm"]["prompt"], b["output_tokens"]
    base, codes = int(out["audio_code_base"]), int(out["audio_codes"])
    voice = VoicePrompt.load(b.file("voice_prompt"))
    gc.collect()
    reset_peak_rss()
    t = time.perf_counter()
    ckpt = open_step_audio2(checkpoint)
    encoder = load_encoder(ckpt, dtype)
    llm = load_llm(ckpt, dtype)
    flow = load_flow(ckpt.root / TOKEN2WAV_DIR)
    hift = load_hift(ckpt.root / TOKEN2WAV_DIR)
    load_s = time.perf_counter() - t
    from tokenizers import Tokenizer

    text_ids = Tokenizer.from_file(str(ckpt.root / "tokenizer.json")).encode(REPLY_TEXT, add_special_tokens=False).ids
    script = reply_script(text_ids, n_reply, base, codes)
    la = flow.c.pre_lookahead_len
    need = CHUNK_TOKENS + la
    embed = llm.get_input_embeddings()
    wav = torch.from_numpy(np.asarray(audio, np.float32))
    p_tokens = torch.from_numpy(voice.tokens)[None]
    p_mel = torch.from_numpy(voice.mel)[None]
    xv = torch.from_numpy(voice.xvector)[None]

    def answer() -> dict:
        s: dict[str, float] = {}
        marks: dict[str, list[float]] = {}
        with torch.no_grad():
            t0 = time.perf_counter()

            def mark(name: str, a: float) -> None:
                b_ = time.perf_counter()
                s[name] = s.get(name, 0.0) + b_ - a
                lo = marks.get(name, [a - t0])[0]
                marks[name] = [lo, b_ - t0]

            a = time.perf_counter()
            mels = [log_mel(p, encoder.encoder.conv1.in_channels) for p in chunk_audio(wav)]
            mark("mel", a)
            a = time.perf_counter()
            rows = [encoder(m[None].to(dtype)) for m in mels[:1]]  # a 3 s question is one piece
            mark("encoder", a)
            a = time.perf_counter()
            x = torch.cat([embed(torch.tensor([prompt["prefix_ids"]])), rows[0][None].to(dtype),
                           embed(torch.tensor([prompt["suffix_ids"]]))], 1)
            o = llm.model(inputs_embeds=x, use_cache=True)
            past, last = o.past_key_values, o.last_hidden_state[:, -1]
            mark("llm_prefill", a)
            got: list[int] = []
            ttft = None
            for step, tok in enumerate(script):
                a = time.perf_counter()
                int(llm.lm_head(last).argmax(-1))  # the greedy pick's cost, as a trained model's reply
                if tok < base and ttft is None:
                    ttft = time.perf_counter() - t0
                if base <= tok < base + codes:
                    got.append(tok - base)
                if len(got) >= need:
                    mark("llm_decode", a)
                    break
                o = llm.model(inputs_embeds=embed(torch.tensor([[tok]])), past_key_values=past, use_cache=True)
                past, last = o.past_key_values, o.last_hidden_state[:, -1]
                mark("llm_decode", a)
            a = time.perf_counter()
            codes_t = torch.tensor([got[:need]])
            cache = flow.setup(p_tokens, codes_t[:, :la], p_mel, xv)
            mel, _ = flow.chunk(codes_t, xv, cache, last=len(got) < need)
            mark("flow", a)
            a = time.perf_counter()
            wav_out, _ = hift.inference(mel.float())
            mark("hift", a)
            s["ttfa"] = time.perf_counter() - t0
        s["ttft"] = ttft if ttft is not None else float("nan")
        s["ids_before_audio"] = step + 1
        s["first_window_samples"] = int(wav_out.shape[-1])
        s["waterfall"] = {k: [round(v[0], 3), round(v[1], 3)] for k, v in marks.items()}
        return s

    rows_: list[dict] = []
    for i in range(runs + 1):  # the first answer warms up
        r = answer()
        log.info("torch %s answer %d: TTFA %.2f s", precision, i, r["ttfa"])
        if i:
            rows_.append(r)
    keys = ("ttft", "ttfa", "mel", "encoder", "llm_prefill", "llm_decode", "flow", "hift")
    return {**{k: _stats([r[k] for r in rows_]) for k in keys}, "precision": precision, "threads": threads,
            "load_s": load_s, "peak_rss_gb": peak_rss_bytes() / 2**30, "torch": torch.__version__,
            "ids_before_audio": rows_[0]["ids_before_audio"], "waterfall": rows_[0]["waterfall"],
            "stage_precisions": {"encoder": precision, "llm": precision, "flow": "fp32", "hift": "fp32"}}


# --- report ------------------------------------------------------------------------------------

def markdown(r: dict) -> str:
    o = r["omnilite"]
    lines = [f"# Step-Audio 2 mini, {r['name']}: omnilite vs PyTorch, same run", "",
             f"- created {r['created']}; omnilite {r['versions']['omnilite']}, onnxruntime {r['versions']['onnxruntime']}, "
             f"llama-cpp-python {r['versions']['llama_cpp_python']}" + (f", torch {r['torch']['torch']}" if r.get("torch") else ""),
             f"- CPU: {describe_cpu(r['host']['cpu_record'])}; RAM {r['host']['ram_gb']:.0f} GB; profile {r['host']['profile']} "
             f"(threads {r['host']['stage_threads']})",
             f"- load average: start {r['load']['start']['load1']:.2f}, after omnilite {r['load']['after_omnilite']['load1']:.2f}"
             + (f", after torch {r['load']['after_torch']['load1']:.2f}" if "after_torch" in r["load"] else ""),
             f"- bundle {r['bundle']['path']} (preset {r['bundle']['preset']}, {r['bundle']['gb']:.2f} GB: "
             + ", ".join(f"{k} {v['precision']} {v['gb']:.2f}" for k, v in r["bundle"]["stages"].items()
                         if v["gb"] >= 0.01) + ")",
             f"- question {Path(r['question']).name} ({r['question_s']:.2f} s); reply scripted: {o['reply_ids']} ids in the "
             f"1 text : 4 audio interleave ({o['codes']} codes, {o['audio_s']:.2f} s of audio); the first flow window "
             f"(28 codes) is complete after {o['ids_before_first_window']} ids; {r['runs']} warm runs per mode", "",
             "| | omnilite overlapped | omnilite sequential | PyTorch " + (r["torch"]["precision"] if r.get("torch") else "(not run)")
             + " | torch / omnilite |", "|---|---:|---:|---:|---:|"]
    t = r.get("torch")
    ov, sq = o["overlapped"], o["sequential"]

    def cell(x):
        return f"{x:.2f}" if isinstance(x, (int, float)) and np.isfinite(x) else "-"

    for label, key in (("TTFT p50 (s)", "ttft"), ("TTFA p50 (s)", "ttfa"), ("TTFA p95 (s)", "ttfa")):
        q = "p95" if "p95" in label else "p50"
        tv = t[key][q] if t else float("nan")
        lines.append(f"| {label} | {cell(ov[key][q])} | {cell(sq[key][q])} | {cell(tv)} | "
                     f"{cell(tv / ov[key][q]) + 'x' if t else '-'} |")
    lines += [f"| RTF p50, speech side (token2wav busy / audio) | {cell(ov['rtf']['p50'])} | {cell(sq['rtf']['p50'])} | - | |",
              f"| RTF p50, wall (whole reply / audio) | {cell(ov['wall_rtf']['p50'])} | {cell(sq['wall_rtf']['p50'])} | - | |",
              f"| peak RSS (GB) | {o['peak_rss_gb']:.2f} | (same pipeline) | {cell(t['peak_rss_gb']) if t else '-'} | |",
              f"| load (s) | {o['load_s']:.1f} | | {cell(t['load_s']) if t else '-'} | |", "",
              "## Waterfall to the first audio sample (one sequential turn; seconds from the end of the question)", "",
              "| stage | omnilite start-end | omnilite busy p50 | PyTorch start-end | PyTorch p50 | ratio |", "|---|---|---:|---|---:|---:|"]
    wf = o["waterfall_sequential"]
    names = {"mel": ("mel",), "encoder": ("encoder",), "llm_prefill": ("llm_prefill",), "llm_decode": ("llm_decode",),
             "flow": ("flow (in vocoder)",), "hift": ("vocoder",)}
    for st in OMNI_STAGES:
        span = next((wf[n] for n in names[st] if n in wf), None)
        busy = o["before_first_audio"].get(st, float("nan"))
        tspan = t["waterfall"].get(st) if t else None
        tp = t[st]["p50"] if t else float("nan")
        lines.append(f"| {st} | {f'{span[0]:.2f}-{span[1]:.2f}' if span else '-'} | {cell(busy)} | "
                     f"{f'{tspan[0]:.2f}-{tspan[1]:.2f}' if tspan else '-'} | {cell(tp)} | "
                     f"{cell(tp / busy) + 'x' if t and busy > 0 else '-'} |")
    lines += ["", f"omnilite's hift row is the token2wav stage (flow + HiFT) span; its busy column is the token2wav busy "
                  f"time minus the timed flow calls. First audio after {o['ids_before_first_window']} reply ids "
                  f"(omnilite) / {t['ids_before_audio'] if t else '-'} (PyTorch)."]
    lines += [""] if r.get("torch_by_precision") else []
    for prec, x in (r.get("torch_by_precision") or {}).items():
        lines.append(f"PyTorch {prec} (encoder and LLM {prec}, flow and HiFT fp32, {x['threads']} threads): TTFA p50 "
                     f"{x['ttfa']['p50']:.2f} s, peak RSS {x['peak_rss_gb']:.2f} GB" + (" (used for the ratios: the faster)"
                     if x is r["torch"] or x == r["torch"] else "") + ".")
    if r.get("not_run"):
        lines += ["", "## Not measured", ""] + [f"- {x}" for x in r["not_run"]]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = arguments(__doc__.split("\n")[0], runs=2)
    ap.add_argument("--reply", type=int, default=100, help="reply ids (1:4 interleave; 35 hold the first flow window)")
    args = ap.parse_args(argv)

    def turns(settings: dict, audio: np.ndarray) -> dict:
        omni, script = omnilite_turns(args.bundle, audio, args.reply, args.runs, settings)
        log.info("omnilite: TTFA p50 %.2f s (overlapped)", omni["overlapped"]["ttfa"]["p50"])
        return {"omnilite": omni, "script": script}

    return run(args, argv, schema=SCHEMA, family="step-audio2", prefix="step-audio2", markdown=markdown, keep=("script",),
               omnilite=turns, torch_answer=lambda precision, threads, audio, _: torch_first_audio(
                   args.checkpoint, args.bundle, audio, args.reply, args.torch_runs, threads, precision))


if __name__ == "__main__":
    raise SystemExit(main())
