"""Greedy LLM ids in each encoder mode against exact mode, on the three parity questions.

Exact mode reproduces the official code; fast modes are allowed to differ, and this says by how much
the drift of `encoder_drift` reaches the reply: the first diverging step and the share of equal ids
over `tokens` greedy steps, per question, for any bundle (family-agnostic: the manifest's prompt ids,
the runtime's encoder and llama.cpp with the bundle's own settings).

    python -m omnilite.benchmarks.fast_mode_agreement BUNDLE --out benchmarks/results/fast_mode_agreement-tiny
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from omnilite.benchmarks.report import write_report
from omnilite.runtime.audio import prepare_speech, read_wav
from omnilite.runtime.bundle import load_bundle
from omnilite.runtime.encoder import ENCODER_MODES, SpeechEncoder
from omnilite.runtime.llm import LlamaCppLLM, stage_llm_config

ROOT = Path(__file__).parents[1]
QUESTIONS = (ROOT / "omnilite/data/question.wav", ROOT / "tests/data/question_mountain.wav", ROOT / "tests/data/question_story_22k.wav")


def agreement(bundle_dir: Path, tokens: int = 32) -> dict:
    bundle = load_bundle(bundle_dir)
    prompt = bundle["llm"]["prompt"]
    encoder = SpeechEncoder(bundle)
    questions = {q.name: prepare_speech(*read_wav(q), 16000) for q in QUESTIONS}
    ids: dict[str, dict[str, list[int]]] = {}
    with LlamaCppLLM(bundle.file("llm"), stage_llm_config(bundle, "llm", n_ctx=2048)) as llm:
        for mode in ENCODER_MODES:
            ids[mode] = {}
            for name, audio in questions.items():
                llm.reset()
                llm.eval_tokens(prompt["prefix_ids"])
                llm.eval_embeddings(encoder(audio, mode))
                first = llm.eval_tokens(prompt["suffix_ids"], want_last=True)
                ids[mode][name] = [t for t, _ in llm.generate(tokens, ignore_eos=True, first=first)]
    rows = {}
    for mode in ENCODER_MODES:
        per_q = {}
        for name in questions:
            a, b = ids["exact"][name], ids[mode][name]
            same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
            per_q[name] = {"identical_prefix": same, "token_agreement": float(np.mean(np.asarray(a) == np.asarray(b)))}
        rows[mode] = {"questions": per_q, "mean_token_agreement": float(np.mean([q["token_agreement"] for q in per_q.values()]))}
    return {"bundle": bundle_dir.name, "family": bundle.family, "llm_precision": bundle.stages["llm"].precision,
            "tokens": tokens, "modes": rows}


def markdown(report: dict) -> str:
    names = list(next(iter(report["modes"].values()))["questions"])
    lines = [f"# Fast encoder modes against exact: greedy LLM ids ({report['family']}, LLM {report['llm_precision']})", "",
             f"Bundle `{report['bundle']}`, {report['tokens']} greedy steps per question. Cells: identical prefix "
             "(steps before the first different id) / share of equal ids.", "",
             "| mode | " + " | ".join(names) + " | mean agreement |", "|---" * (len(names) + 2) + "|"]
    for mode, r in report["modes"].items():
        cells = [f"{q['identical_prefix']} / {q['token_agreement']:.2f}" for q in r["questions"].values()]
        lines.append(f"| `{mode}` | " + " | ".join(cells) + f" | {r['mean_token_agreement']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("bundle")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--out", required=True, help="path stem for the .json and .md results")
    args = p.parse_args(argv)
    report = agreement(Path(args.bundle), args.tokens)
    write_report(args.out, report, markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
