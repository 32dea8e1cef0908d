"""Prefill cost with and without outputs for every position (issue 14: what is computed per position).

    python -m omnilite.benchmarks.prefill_outputs LLM.gguf [LLM2.gguf ...] [--positions 329] [--rounds 5]

With embeddings on and pooling NONE (how omnilite reads hidden states), llama.cpp computes logits
and hidden states for every row of a decode: the LM head per position and a copy of all logits.
omnilite used to decode the prompt's last piece that way; `LlamaCppLLM._eval` now decodes all but
the last position without outputs and the last one alone. This times both on the same context
(random input embeddings, `--positions` of them, as a turn's speech + suffix), interleaved over
rounds, and checks that the last position's logits agree. Writes prefill_outputs.{json,md}.
"""

from __future__ import annotations

import argparse
import ctypes
import time
from pathlib import Path

import llama_cpp
import numpy as np

from omnilite import __version__
from omnilite.devices.host import describe_cpu, detect_host
from omnilite.runtime.bundle import load_bundle
from omnilite.runtime.llm import LlamaCppLLM, LLMConfig, stage_llm_config

from .report import write_report
from .streaming import package_versions


def _all_outputs(llm: LlamaCppLLM, embeds: np.ndarray) -> np.ndarray:
    """The old way: one decode, embeddings on, every row an output; returns the last row's logits."""
    batch, n = llm._emb_batch, len(embeds)
    ctypes.memmove(batch.embd, np.ascontiguousarray(embeds).ctypes.data, n * llm.n_embd * 4)
    batch.n_tokens = n
    for i in range(n):
        batch.pos[i], batch.n_seq_id[i], batch.logits[i] = i, 1, True
        batch.seq_id[i][0] = 0
    llama_cpp.llama_set_embeddings(llm._ctx, True)
    if llama_cpp.llama_decode(llm._ctx, batch) != 0:
        raise RuntimeError("llama_decode failed")
    llm._n_past = n
    return llm._output(n - 1)[0]


def measure(gguf: Path, positions: int, rounds: int, threads: int | None) -> dict:
    sizes = dict(n_ctx=max(1024, positions + 8), n_batch=max(512, positions), n_threads=threads)
    cfg = LLMConfig(**sizes)
    if (gguf.parent / "omnilite.json").exists():  # a bundle's stage: its KV cache type and attention kernel
        bundle = load_bundle(gguf.parent, verify=False)
        stage = next(name for name, s in bundle.stages.items() if s.file == gguf.name)
        cfg = stage_llm_config(bundle, stage, **sizes)
    with LlamaCppLLM(gguf, cfg) as llm:
        rng = np.random.default_rng(0)
        embeds = (0.02 * rng.standard_normal((positions, llm.n_embd))).astype(np.float32)
        times: dict[str, list[float]] = {"all outputs": [], "last output only": []}
        logits = {}
        for r in range(rounds + 1):  # the first round warms up
            for name in times:
                llm.reset()
                t = time.perf_counter()
                out = _all_outputs(llm, embeds) if name == "all outputs" else llm.eval_embeddings(embeds, want_last=True)[0]
                dt = time.perf_counter() - t
                if r:
                    times[name].append(dt)
                logits[name] = out
        diff = float(np.max(np.abs(logits["all outputs"] - logits["last output only"])))
        return {"gguf": str(gguf), "shape": llm.shape(), "kv_cache": cfg.kv_cache, "flash_attn": cfg.flash_attn, "positions": positions, "threads": llm.threads,
                "seconds": times, "last_logits_max_abs_diff": diff,
                "same_argmax": bool(np.argmax(logits["all outputs"]) == np.argmax(logits["last output only"]))}


def markdown(report: dict) -> str:
    lines = ["# Prefill: outputs for every position vs the last one only", "",
             f"- CPU: {describe_cpu(report['cpu'])}; omnilite {report['omnilite']}, llama-cpp-python "
             f"{report['packages'].get('llama_cpp_python')}",
             f"- {report['rounds']} interleaved rounds after one warm-up; random input embeddings; times are medians", "",
             "| GGUF | params | vocab | positions | all outputs (s) | last only (s) | speed-up | ms/position (last only) | last logits max abs diff |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m in report["models"]:
        a, b = (float(np.median(m["seconds"][k])) for k in ("all outputs", "last output only"))
        lines.append(f"| {Path(m['gguf']).parent.name}/{Path(m['gguf']).name} | {m['shape']['n_params'] / 1e6:.0f} M | "
                     f"{m['shape']['n_vocab']} | {m['positions']} | {a:.3f} | {b:.3f} | {a / b:.2f}x | "
                     f"{b / m['positions'] * 1000:.1f} | {m['last_logits_max_abs_diff']:.2e} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m omnilite.benchmarks.prefill_outputs", description=__doc__.split("\n\n")[0])
    ap.add_argument("gguf", type=Path, nargs="+")
    ap.add_argument("--positions", type=int, default=329)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "prefill_outputs")
    args = ap.parse_args(argv)
    report = {"omnilite": __version__, "cpu": detect_host().cpu_record(), "packages": package_versions(),
              "rounds": args.rounds, "models": [measure(g, args.positions, args.rounds, args.threads) for g in args.gguf]}
    write_report(args.out, report, markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
