"""Cost per call of Fun-Audio-Chat's chunk-aligned vocoder stream vs the reply's length: the re-solve
of every token per call (old) vs the flow cache + windowed HiFT (new), in one run on the tiny vocoder,
one onnxruntime thread. Writes benchmarks/results/fun-audio-chat-vocoder-cache-tiny.{json,md}.

    python -m omnilite.benchmarks.fun_audio_chat_vocoder_cache [--calls 16] [--real CKPT|random]

`--real CKPT` (or ``random``: the released shape, DiTFlowConfig's defaults, with PyTorch's initial
weights): also time one Euler step of the PyTorch reference DiT at that shape (fp32, one thread): `forward` over all P + 50 frames (what a re-solve pays per step) vs `forward_cached` on
the 50 new frames with P cached (what the cache pays), for a few P.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from omnilite.devices.host import describe_cpu, detect_host
from omnilite.runtime.audio import atomic_write_bytes
from omnilite.runtime.fun_audio_chat.vocoder import CHUNK_ALIGNED, OnnxVocoder, Schedule
from omnilite.runtime.metrics import snr_db
from omnilite.runtime.onnx_session import SessionOptions

HERE = Path(__file__).parent / "results"
NAME = "fun-audio-chat-vocoder-cache-tiny"


def _timed(obj, names: list[str], acc: dict) -> None:
    """Wrap obj's methods so that their wall time adds to acc[name]."""
    for name in names:
        fn = getattr(obj, name)

        def wrapped(*a, _fn=fn, _name=name, **k):
            t0 = time.perf_counter()
            try:
                return _fn(*a, **k)
            finally:
                acc[_name] = acc.get(_name, 0.0) + time.perf_counter() - t0

        setattr(obj, name, wrapped)


def run_stream(voc: OnnxVocoder, tokens: list[int], cached: bool) -> tuple[np.ndarray, list[dict], int]:
    s = Schedule.named(voc, CHUNK_ALIGNED).stream(voc)
    if not cached:
        s.flow_cache = None
    acc: dict = {}
    _timed(voc, ["solve", "solve_cached", "f0", "decode"], acc)
    hop = s.hop
    bursts = [tokens[:hop + s.lookahead]] + [tokens[i:i + hop] for i in range(hop + s.lookahead, len(tokens), hop)]
    rows, out = [], []
    try:
        for i, burst in enumerate(bursts + [None]):
            acc.clear()
            t0 = time.perf_counter()
            calls = s.calls
            out.append(s.flush() if burst is None else s.push(burst))
            wall = time.perf_counter() - t0
            if s.calls > calls:
                rows.append({"call": s.calls, "frames_total": int(s.mel.shape[1]), "wall_ms": 1e3 * wall,
                             "flow_ms": 1e3 * (acc.get("solve", 0) + acc.get("solve_cached", 0)),
                             "hift_ms": 1e3 * (acc.get("f0", 0) + acc.get("decode", 0))})
    finally:
        for name in ("solve", "solve_cached", "f0", "decode"):
            voc.__dict__.pop(name, None)
    return np.concatenate(out), rows, (s.flow_cache.nbytes if s.flow_cache is not None else 0)


def tiny(calls: int, repeats: int) -> dict:
    from omnilite.export.fun_audio_chat.tiny import make_tiny_fun_audio_chat
    from omnilite.export.fun_audio_chat.vocoder_stage import export_vocoder, parity_tokens

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "pretrained_models"
        make_tiny_fun_audio_chat(root)
        export_vocoder(root, Path(tmp) / "vocoder", strict=False)
        voc = OnnxVocoder(Path(tmp) / "vocoder", SessionOptions(intra_op_threads=1))
        n_tokens = 25 * calls + 3 + 10  # `calls` non-final calls, then a finalize call of 13 tokens
        tokens = parity_tokens(n_tokens, seed=5)
        best: dict[str, list[dict]] = {}
        audio: dict[str, np.ndarray] = {}
        cache_bytes = 0
        for _ in range(repeats):  # interleaved; the minimum per call over the repeats
            for mode in ("old", "new"):
                a, rows, nbytes = run_stream(voc, tokens, mode == "new")
                audio[mode] = a
                cache_bytes = max(cache_bytes, nbytes)
                if mode not in best:
                    best[mode] = rows
                else:
                    for r, b in zip(rows, best[mode]):
                        for k in ("wall_ms", "flow_ms", "hift_ms"):
                            b[k] = min(b[k], r[k])
        est = voc.sessions["flow_estimator_cached"]
        shapes = {i.name: i.shape for i in est.get_inputs()}
        depth, _, _, inner = shapes["past_k"]
        return {"tokens": n_tokens, "calls": len(best["new"]), "repeats": repeats, "threads": 1,
                "old": best["old"], "new": best["new"],
                "same_output": {"max_abs": float(np.max(np.abs(audio["old"] - audio["new"]))),
                                "snr_db": snr_db(audio["old"], audio["new"]), "samples": int(len(audio["new"]))},
                "cache_bytes_at_end": cache_bytes, "cache_bytes_per_frame": cache_bytes // (2 * n_tokens),
                "dit": {"depth": int(depth), "inner": int(inner)},
                "totals_ms": {m: {k: sum(r[k] for r in best[m]) for k in ("wall_ms", "flow_ms", "hift_ms")} for m in ("old", "new")}}


def real_reference(ckpt: str, pasts: list[int]) -> dict:
    """One Euler step (CFG batch of two) of the reference DiT at the checkpoint's shape."""
    import torch

    from omnilite.export.fun_audio_chat.checkpoint import open_cosyvoice3

    from omnilite.export.fun_audio_chat.vocoder_reference import DiT, DiTFlowConfig

    torch.set_num_threads(1)
    torch.manual_seed(0)
    est = DiT(DiTFlowConfig()).eval() if ckpt == "random" else open_cosyvoice3(ckpt).flow().decoder.estimator
    attn = est.transformer_blocks[0].attn
    depth, inner, ctx = len(est.transformer_blocks), attn.heads * attn.dim_head, est.input_embed.conv_pos_embed.kernel - 1
    g = torch.Generator().manual_seed(0)
    rows = []
    with torch.no_grad():
        for p in pasts:
            n = p + 50
            x, mu = torch.randn(2, 80, n, generator=g), torch.randn(2, 80, n, generator=g)
            t, spks, cond = torch.full((2,), 0.3), torch.randn(2, 80, generator=g), torch.zeros(2, 80, n)
            t0 = time.perf_counter()
            full = est(x, torch.ones(2, 1, n), mu, t, spks, cond, 50)
            t_full = time.perf_counter() - t0
            # the cache of the first p frames, then the 50 new ones
            k = v = torch.zeros(depth, 2, 0, inner)
            c1 = c2 = torch.zeros(2, ctx, est.dim)
            if p:
                _, k, v, c1, c2 = est.forward_cached(x[..., :p], mu[..., :p], t, spks, cond[..., :p], k, v, c1, c2, torch.tensor(50))
            t0 = time.perf_counter()
            new, *_ = est.forward_cached(x[..., p:], mu[..., p:], t, spks, cond[..., p:], k, v, c1, c2, torch.tensor(50))
            t_new = time.perf_counter() - t0
            rows.append({"past_frames": p, "full_step_ms": 1e3 * t_full, "cached_step_ms": 1e3 * t_new,
                         "max_abs": float((new - full[..., p:]).abs().max())})
    return {"checkpoint": ckpt, "dit": {"depth": depth, "dim": est.dim, "inner": inner}, "threads": 1, "precision": "fp32 (PyTorch)",
            "steps": rows, "cache_mb_per_frame": depth * 2 * 2 * inner * 4 * 10 / 2**20}


def markdown(res: dict) -> str:
    t = res["tiny"]
    lines = [f"# Fun-Audio-Chat vocoder: chunk-aligned stream, re-solve vs flow cache (tiny, {t['threads']} thread)", "",
             f"CPU: {describe_cpu(res['cpu'])}", "",
             f"{t['tokens']} tokens ({t['calls']} calls, hop 25 + 3 lookahead, 50-frame chunk attention); min of {t['repeats']} "
             f"interleaved runs. Same output: max abs {t['same_output']['max_abs']:.2e}, SNR {t['same_output']['snr_db']:.1f} dB "
             f"over {t['same_output']['samples']} samples.", "",
             "| call | frames so far | old wall ms | old flow ms | old HiFT ms | new wall ms | new flow ms | new HiFT ms | wall old/new |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for o, n in zip(t["old"], t["new"]):
        lines.append(f"| {o['call']} | {o['frames_total']} | {o['wall_ms']:.1f} | {o['flow_ms']:.1f} | {o['hift_ms']:.1f} | "
                     f"{n['wall_ms']:.1f} | {n['flow_ms']:.1f} | {n['hift_ms']:.1f} | {o['wall_ms'] / n['wall_ms']:.2f} |")
    to, tn = t["totals_ms"]["old"], t["totals_ms"]["new"]
    lines += ["", f"Whole reply: old {to['wall_ms']:.0f} ms (flow {to['flow_ms']:.0f}, HiFT {to['hift_ms']:.0f}), new "
              f"{tn['wall_ms']:.0f} ms (flow {tn['flow_ms']:.0f}, HiFT {tn['hift_ms']:.0f}): {to['wall_ms'] / tn['wall_ms']:.2f}x. "
              f"Flow cache at the end: {t['cache_bytes_at_end'] / 2**20:.1f} MiB ({t['cache_bytes_per_frame']} bytes per frame)."]
    if "real" in res:
        r = res["real"]
        lines += ["", f"## Real shape, reference DiT, one Euler step ({r['precision']}, {r['threads']} thread, depth {r['dit']['depth']}, "
                  f"dim {r['dit']['dim']})", "", "| past frames | full step (P+50 frames) ms | cached step (50 new) ms | ratio | max abs |",
                  "|---:|---:|---:|---:|---:|"]
        for s in r["steps"]:
            lines.append(f"| {s['past_frames']} | {s['full_step_ms']:.0f} | {s['cached_step_ms']:.0f} | "
                         f"{s['full_step_ms'] / s['cached_step_ms']:.2f} | {s['max_abs']:.1e} |")
        lines += ["", f"Flow cache at this shape: {r['cache_mb_per_frame']:.2f} MiB per mel frame (10 steps x 2 CFG halves x K, V; fp32)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--real", default=None)
    ap.add_argument("--real-pasts", default="0,100,200,400")
    args = ap.parse_args()
    res = {"cpu": detect_host().cpu_record(), "tiny": tiny(args.calls, args.repeats)}
    if args.real:
        res["real"] = real_reference(args.real, [int(p) for p in args.real_pasts.split(",")])
    atomic_write_bytes(HERE / f"{NAME}.json", json.dumps(res, indent=2).encode())
    atomic_write_bytes(HERE / f"{NAME}.md", markdown(res).encode())
    print(markdown(res))


if __name__ == "__main__":
    main()
