"""Step-Audio 2 stages exported so far, each checked against the PyTorch reference.

``export_step_audio2_stages(checkpoint, out_dir)`` writes

* ``encoder.onnx``  one 25 s piece's log-mel and valid length -> its LLM rows (encoder + adapter,
                    dynamic length, fp32)
* ``llm.gguf``      the Qwen2 LLM with the release tokenizer (f32, llama.cpp arch "qwen2")
* ``flow_encoder.onnx``, ``flow_estimator.onnx``, ``flow_noise.npy``  the token2wav DiT flow as chunk
                    functions with caches in and out (whole utterance = one chunk), see flow_stage.py
* ``hift_f0.onnx``, ``hift.onnx``  the HiFT vocoder (export/omni2's, hift.pt is CosyVoice2's format)
* ``parity.json``   the files' sha256 and the parity report (mel, encoder, LLM, flow, HiFT)

This is not a bundle yet (no manifest, no pipeline), and the CLI still refuses the family. Built in a temporary directory next to OUT and moved into place only when
everything is written and, with ``strict_parity``, every stage is within its threshold.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from omnilite import __version__
from omnilite.runtime.bundle import sha256_file
from omnilite.runtime.errors import OmniliteError

from ..bundle_dir import building_dir
from ..parity import fixed_audio, parity_inputs
from .checkpoint import FAMILY, TOKEN2WAV_DIR, open_step_audio2
from .encoder_stage import ENCODER_FILE, encoder_parity, export_encoder
from .flow_checkpoint import load_flow, load_hift
from .flow_stage import export_flow, flow_parity, hift_parity, parity_case
from .llm_stage import LLM_FILE, llm_parity, spliced_prompts, tokenizer_json, write_llm_gguf
from .reference import load_encoder, load_llm

log = logging.getLogger(__name__)

PARITY_FILE = "parity.json"


@dataclass(frozen=True)
class StepAudio2StageOptions:
    parity: bool = True
    strict_parity: bool = True  # refuse to write OUT when a stage misses its threshold
    overwrite: bool = False
    progress: bool = False


def stage_parity_inputs() -> list[tuple[str, np.ndarray]]:
    """The shared parity signals (3 s, 2 s, question.wav: three lengths, odd and even mel frame
    counts) plus a 26.31 s one, which the official code cuts into two pieces (two splices) whose
    last has an odd frame count (133): the case where the official padded batch differs from
    encoding the piece alone."""
    return [*parity_inputs(), ("synthetic 26.31 s (seed 7), two pieces", fixed_audio(26.31, 7))]


def export_step_audio2_stages(checkpoint: str | Path, out_dir: str | Path,
                              options: StepAudio2StageOptions = StepAudio2StageOptions()) -> Path:
    """Export the encoder+adapter ONNX and the f32 LLM GGUF of the release at `checkpoint` into
    `out_dir`, with their parity report; returns `out_dir`."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not options.overwrite:
        raise OmniliteError(f"{out} already exists and is not empty; choose another directory or pass --force.")
    ckpt = open_step_audio2(checkpoint)
    tokenizer_path = tokenizer_json(ckpt)  # refused before any work when absent
    with building_dir(out) as tmp:  # locked against a second export to OUT; removed if anything fails
        encoder = load_encoder(ckpt)
        log.info("export: %s", ENCODER_FILE)
        side = export_encoder(encoder, tmp / ENCODER_FILE)
        log.info("export: %s", LLM_FILE)
        write_llm_gguf(ckpt, tmp / LLM_FILE, progress=options.progress)
        log.info("export: token2wav flow + HiFT")
        flow_files = export_flow(load_flow(ckpt.root / TOKEN2WAV_DIR), load_hift(ckpt.root / TOKEN2WAV_DIR), tmp)
        files = [ENCODER_FILE, *side, LLM_FILE, *flow_files]
        record = {"family": FAMILY, "created_by": f"omnilite {__version__}", "source": str(ckpt.root.resolve()),
                  "files": {f: sha256_file(tmp / f) for f in files}, "parity": {}}
        if options.parity:
            log.info("export: parity")
            record["parity"] = measure_stage_parity(ckpt, tmp, tokenizer_path)
        (tmp / PARITY_FILE).write_text(json.dumps(record, indent=2))
        failed = [k for k, v in record["parity"].items() if isinstance(v, dict) and not v["ok"]]
        if failed and options.strict_parity:
            raise OmniliteError(
                f"exported stage(s) {', '.join(failed)} differ from the PyTorch reference beyond tolerance "
                f"({json.dumps({k: record['parity'][k] for k in failed})}); nothing was written to {out}.")
        for k in failed:
            log.warning("parity: stage %s misses its threshold: %s", k, record["parity"][k])
    return out


def measure_stage_parity(ckpt, stage_dir: Path, tokenizer_path: Path) -> dict:
    """mel, encoder (ONNX vs PyTorch, rows == official count), LLM (f32 GGUF vs PyTorch with the
    speech rows spliced as the official forward does), the flow (ONNX vs PyTorch, whole and streamed;
    streamed vs whole) and HiFT (on the reference flow's mel)."""
    from tokenizers import Tokenizer

    encoder, inputs = load_encoder(ckpt), stage_parity_inputs()
    report: dict = {"inputs": [name for name, _ in inputs]}
    report |= encoder_parity(encoder, stage_dir / ENCODER_FILE, inputs)
    prompts = spliced_prompts(Tokenizer.from_file(str(tokenizer_path)), encoder, inputs)
    report["llm"] = llm_parity(load_llm(ckpt), stage_dir / LLM_FILE, prompts)
    flow, case = load_flow(ckpt.root / TOKEN2WAV_DIR), parity_case()
    report |= flow_parity(flow, stage_dir, case)
    mel = flow.inference(case["tokens"], case["prompt_tokens"], case["prompt_mel"], case["xvector"])[0].numpy()
    report |= hift_parity(load_hift(ckpt.root / TOKEN2WAV_DIR), stage_dir, mel)
    return report
