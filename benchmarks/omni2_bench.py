"""LLaMA-Omni2 latency benchmark: omnilite (torch-free runtime) vs the PyTorch reference, same run.

For one bundle (and the checkpoint it came from, for the baseline) and a spoken question:

* omnilite: TTFT, TTFA, RTF, per-stage busy time (sequential mode, where busy times add up) and the
  overlapped mode's TTFA, for each read/write setting, p50/p95 over repeated warm turns;
* PyTorch fp32 baseline: the reference stages run in streaming order (encoder, LLM prefill and
  greedy decoding, every R tokens a TTS write with a KV cache (the official code re-runs the TTS LM
  from scratch, so this baseline is faster than the release), and the flow + HiFT on the first
  chunk + lookahead tokens as the official streaming call does) to its first audio sample;
* peak RSS of the process and the bundle size.

Random weights never stop on their own, so replies have a fixed length (``--tokens``). Results go
to ``benchmarks/results/omni2-<name>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import resource
import time
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def _p(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, np.float64), q)) if values else float("nan")


def omnilite_runs(bundle: Path, audio: np.ndarray, rw: tuple[int, int], tokens: int, tts_tail: int, runs: int,
                  threads: int | None, chunk: int | None) -> dict:
    from omnilite.runtime import Done, Pipeline
    from omnilite.runtime.omni2.flow import FlowStreamConfig
    from omnilite.runtime.omni2.pipeline import Omni2PipelineConfig

    out: dict = {"read": rw[0], "write": rw[1], "flow_chunk": chunk}
    for mode in ("sequential", "overlapped"):
        cfg = Omni2PipelineConfig(max_new_tokens=tokens, ignore_eos=True, max_tts_tokens=tts_tail, read=rw[0], write=rw[1],
                                  mode=mode, threads=threads, flow=FlowStreamConfig(chunk_tokens=chunk))
        with Pipeline.load(bundle, cfg) as pipe:
            list(pipe.respond(audio, 16000))  # warm-up
            dones = []
            for _ in range(runs):
                dones.append([e for e in pipe.respond(audio, 16000) if isinstance(e, Done)][0])
        t = [d.timings for d in dones]
        out[mode] = {k: {"p50": _p([x[k] for x in t if k in x], 50), "p95": _p([x[k] for x in t if k in x], 95)}
                     for k in sorted(set().union(*t))}
        out[mode]["audio_s"] = len(dones[0].audio) / dones[0].sample_rate
    return out


def torch_baseline(checkpoint: Path, speaker: np.ndarray, audio: np.ndarray, rw: tuple[int, int], tokens: int,
                   runs: int, threads: int | None) -> dict:
    import torch

    from omnilite.export.omni2.checkpoint import Omni2Checkpoint
    from omnilite.export.omni2.reference import Omni2ReferencePipeline
    from omnilite.export.omni2.tts import GreedyTTS, TTSState

    if threads:
        torch.set_num_threads(threads)
    ref = Omni2ReferencePipeline(Omni2Checkpoint.open(checkpoint), speaker)
    llm, gen, flow, hift = ref.llm, ref.generator, ref.flow, ref.hift
    need = flow.c.chunk_tokens + flow.c.pre_lookahead_len
    xv = torch.from_numpy(ref.xvector)[None]
    ttfa, ttft = [], []
    for i in range(runs + 1):
        with torch.no_grad():
            t0 = time.perf_counter()
            _, emb = ref.speech_embeddings(audio)
            embed = llm.get_input_embeddings()
            x = torch.cat([embed(torch.tensor([ref.prompt.prefix_ids])), emb[None], embed(torch.tensor([ref.prompt.suffix_ids]))], 1)
            o = llm.model(inputs_embeds=x, use_cache=True)
            past, last = o.past_key_values, o.last_hidden_state[:, -1]
            tts, state = GreedyTTS(gen, ref.tts_eos, ref.sep_id), TTSState()
            toks, hid, units, first_tok = [], [], [], None
            for step in range(tokens):
                tok = int(llm.lm_head(last).argmax(-1))
                first_tok = first_tok or time.perf_counter() - t0
                toks.append(tok)
                hid.append(last[0])
                final = step == tokens - 1
                if len(toks) % rw[0] == 0 or final:
                    a = (len(toks) - 1) // rw[0] * rw[0]
                    units += ref.units(tts.write(state, torch.stack(hid[a:]), toks[a:], final, rw[1]))
                if len(units) >= need or final:
                    break
                o = llm.model(inputs_embeds=embed(torch.tensor([[tok]])), past_key_values=past, use_cache=True)
                past, last = o.past_key_values, o.last_hidden_state[:, -1]
            while len(units) < need:  # text done: the TTS keeps writing
                units += ref.units(tts.write(state, torch.zeros(0, hid[0].shape[0]), [], False, rw[1]))
            mel = flow.inference(torch.tensor([units[:need]]), xv, finalize=False)
            hift.inference(mel)
            if i:  # the first run warms up
                ttfa.append(time.perf_counter() - t0)
                ttft.append(first_tok)
    return {"ttft": {"p50": _p(ttft, 50), "p95": _p(ttft, 95)}, "ttfa": {"p50": _p(ttfa, 50), "p95": _p(ttfa, 95)},
            "note": "PyTorch fp32 reference stages in streaming order; TTS with a KV cache (the release re-runs it)"}


def main(argv: list[str] | None = None) -> int:
    from omnilite.runtime.audio import prepare_speech, read_wav

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--checkpoint", type=Path, help="the checkpoint the bundle came from (for the PyTorch baseline)")
    ap.add_argument("--question", type=Path, default=Path(__file__).parents[1] / "omnilite" / "data" / "question.wav")
    ap.add_argument("--name", default="bench")
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--tts-tail", type=int, default=60, help="speech tokens after the text ends")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rw", default="3,10;1,5;5,15", help="read,write settings separated by ';'")
    ap.add_argument("--flow-chunk", type=int, default=None, help="flow attention chunk in tokens (default: the bundle's)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    wav, rate = read_wav(args.question)
    audio = prepare_speech(wav, rate, 16000)
    settings = [tuple(int(v) for v in s.split(",")) for s in args.rw.split(";")]
    result = {
        "schema": "omnilite.bench.omni2/1", "bundle": str(args.bundle), "question_s": len(audio) / 16000,
        "host": {"machine": platform.machine(), "python": platform.python_version(), "threads": args.threads},
        "bundle_mb": sum(f.stat().st_size for f in args.bundle.iterdir() if f.is_file()) / 2**20,
        "omnilite": [omnilite_runs(args.bundle, audio, rw, args.tokens, args.tts_tail, args.runs, args.threads, args.flow_chunk)
                     for rw in settings],
    }
    result["peak_rss_mb_omnilite"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.checkpoint:
        result["torch"] = torch_baseline(args.checkpoint, audio, audio, settings[0], args.tokens, args.runs, args.threads)
        result["peak_rss_mb_with_torch"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / f"omni2-{args.name}.json").write_text(json.dumps(result, indent=2))
    lines = [f"# LLaMA-Omni2 benchmark: {args.name}", "",
             f"question {result['question_s']:.2f} s, reply {args.tokens} text tokens (+{args.tts_tail} speech tokens after), "
             f"{args.runs} warm runs, bundle {result['bundle_mb']:.0f} MiB, peak RSS {result['peak_rss_mb_omnilite']:.0f} MiB "
             "(omnilite alone)", "",
             "| R/W | TTFT p50 (s) | TTFA p50 seq (s) | TTFA p50 overlapped (s) | RTF p50 | speech_generator (s) | flow (s) | hift (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["omnilite"]:
        s, o = r["sequential"], r["overlapped"]
        lines.append(f"| {r['read']}/{r['write']} | {o['ttft']['p50']:.3f} | {s['ttfa']['p50']:.3f} | {o['ttfa']['p50']:.3f} | "
                     f"{o.get('rtf', {}).get('p50', float('nan')):.3f} | {s['speech_generator']['p50']:.3f} | "
                     f"{s['flow']['p50']:.3f} | {s['hift']['p50']:.3f} |")
    if "torch" in result:
        t = result["torch"]
        first = result["omnilite"][0]["overlapped"]["ttfa"]["p50"]
        lines += ["", f"PyTorch fp32 baseline (R/W {settings[0][0]}/{settings[0][1]}, same run): TTFT p50 {t['ttft']['p50']:.3f} s, "
                  f"TTFA p50 {t['ttfa']['p50']:.3f} s; omnilite overlapped TTFA is {t['ttfa']['p50'] / first:.2f}x faster. "
                  + t["note"] + "."]
    (out / f"omni2-{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
