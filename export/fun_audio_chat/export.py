"""Fun-Audio-Chat model stages (the bundle, with the vocoder and the manifest, is bundle.py's).

Files written into OUT, atomically (built in ``.OUT.partial`` under OUT's lock, renamed when complete):

* ``audio_input.onnx``  log-mel + placeholder count -> ``<|AUDIO|>`` embeddings (encoder, 25 Hz
                        pooling, grouping by 5, continual_output_matching); dynamic mel length, fp32
* ``llm.gguf``          the Qwen3 LLM + the release's tokenizer (llama.cpp), f32 (or f16 with ``llm_dtype``)
* ``speech_head_input.onnx``, ``speech_head_codes.npy``, ``speech_head.gguf``: the speech head
                        (``audio_invert_tower``, 5 codes per LLM step, its own KV cache), f32
* ``speech_feedback.onnx``  5 codes -> the ``audio_tower`` row the LLM reads back while speaking
* ``stages.json``       the files with their sha256, the audio prompt cut, and the parity report
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from omnilite import __version__
from omnilite.runtime.bundle import sha256_file
from omnilite.runtime.errors import OmniliteError
from omnilite.runtime.fun_audio_chat.speech_head import FEEDBACK_FILE, HEAD_CODES_FILE, HEAD_INPUT_FILE, HEAD_LM_FILE
from omnilite.runtime.llm import default_flash_attn

from ..bundle_dir import building_dir
from ..checkpoint import LazyTensor
from ..onnx_export import export_onnx, io_shapes
from .audio_stage import AudioInputStage
from .checkpoint import FunAudioChatCheckpoint, open_fun_audio_chat
from .config import FAMILY, IM_END
from .gguf_qwen3 import write_qwen3_gguf
from .prompt import AudioPrompt
from .speech_head import export_speech_head, head_spec

log = logging.getLogger(__name__)

AUDIO_INPUT_FILE, LLM_FILE, STAGES_FILE = "audio_input.onnx", "llm.gguf", "stages.json"
LLM_PREFIX = "language_model."


@dataclass(frozen=True)
class FunAudioChatStageOptions:
    parity: bool = True
    strict_parity: bool = True  # a stage beyond tolerance fails the export (nothing is written)
    overwrite: bool = False
    llm_dtype: str = "f32"  # "f16" halves the LLM GGUF (16 GB at the real shape); judged as an F16 GGUF


def export_fun_audio_chat_stages(checkpoint: str | Path, out_dir: str | Path,
                                 options: FunAudioChatStageOptions = FunAudioChatStageOptions()) -> Path:
    """Export the audio input stage and the LLM of the release under `checkpoint` into `out_dir`."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not options.overwrite:
        raise OmniliteError(f"{out} already exists and is not empty; choose another directory or pass overwrite=True.")
    check_llm_dtype(options.llm_dtype)
    ckpt = open_fun_audio_chat(checkpoint)
    prompt = AudioPrompt.build(ckpt.model_dir)
    with building_dir(out) as tmp:
        model = ckpt.reference(torch.float32, language_model=options.parity)
        report = write_model_stages(ckpt, model, prompt, tmp, options.parity, options.llm_dtype)
        (tmp / STAGES_FILE).write_text(json.dumps(_stages_record(ckpt, prompt, tmp, report, options.llm_dtype), indent=2))
        failed = [k for k, v in report.items() if not v["ok"]]
        if failed and options.strict_parity:
            raise OmniliteError(f"exported stage(s) {', '.join(failed)} differ from the PyTorch reference beyond tolerance "
                                f"({json.dumps({k: _summary(report[k]) for k in failed})}); nothing was written.")
        for k in failed:
            log.warning("parity: stage %s misses its threshold: %s", k, _summary(report[k]))
    return out


def check_llm_dtype(dtype: str) -> None:
    if dtype not in ("f32", "f16"):
        raise OmniliteError(f"LLM dtype {dtype!r} is not supported; use f32 or f16.")


def write_model_stages(ckpt: FunAudioChatCheckpoint, model, prompt: AudioPrompt, tmp: Path, parity: bool = True,
                       llm_dtype: str = "f32") -> dict:
    """Write the audio input ONNX, the LLM GGUF and the speech head / feedback files into `tmp`;
    returns their parity report (empty without `parity`; `model` then needs no language model)."""
    log.info("export: %s", AUDIO_INPUT_FILE)
    export_onnx(AudioInputStage(model), (torch.zeros(1, 128, 537), torch.tensor(35)), tmp / AUDIO_INPUT_FILE,
                {"mel": {2: "mel_frames"}, "placeholders": {}}, {"audio_embeds": {0: "positions"}})
    log.info("export: %s", LLM_FILE)
    write_llm_gguf(ckpt, tmp / LLM_FILE, llm_dtype)
    export_speech_head(model, tmp)
    if not parity:
        return {}
    from .parity import audio_input_parity, feedback_parity, llm_parity, s2m_traces, speech_head_parity

    spec = head_spec(ckpt.audio_config)
    traces = s2m_traces(model, ckpt.model_dir, prompt.system)
    return {"audio_input": audio_input_parity(model, tmp / AUDIO_INPUT_FILE),
            "llm": llm_parity(model, tmp / LLM_FILE, ckpt.model_dir, prompt, llm_dtype),
            "speech_head": speech_head_parity(model, tmp, spec, traces),
            "speech_feedback": feedback_parity(model, tmp, spec, traces)}


def write_llm_gguf(ckpt: FunAudioChatCheckpoint, path: Path, dtype: str = "f32") -> None:
    tensors = {n[len(LLM_PREFIX):]: LazyTensor(ckpt.tensors, n) for n in ckpt.shapes if n.startswith(LLM_PREFIX)}
    if ckpt.text_config.get("tie_word_embeddings"):
        tensors.pop("lm_head.weight", None)  # llama.cpp reuses token_embd when output.weight is absent
    write_qwen3_gguf(tensors, ckpt.text_config, ckpt.model_dir, path, eos_id=IM_END, dtype=dtype,
                     name=ckpt.model_dir.name, what="Fun-Audio-Chat LLM", progress=True)


def _summary(stage: dict) -> dict:
    return {k: v for k, v in stage.items() if not isinstance(v, (list, dict))}


def onnx_side_files(folder: Path, file: str) -> list[str]:
    """The external-data file `export_onnx` writes beside a model over 2 GB (the real shape's audio
    input stage, 2.6 GB in fp32): a part of the stage, hashed and carried with it."""
    return [file + ".data"] if (folder / (file + ".data")).exists() else []


def _onnx_stage(tmp: Path, name: str, file: str) -> dict:
    onnx_in, onnx_out = io_shapes(tmp / file)
    return {"name": name, "file": file, "format": "onnx", "precision": "fp32", "sha256": sha256_file(tmp / file),
            "inputs": onnx_in, "outputs": onnx_out, "extra_files": {f: sha256_file(tmp / f) for f in onnx_side_files(tmp, file)}}


def _stages_record(ckpt: FunAudioChatCheckpoint, prompt: AudioPrompt, tmp: Path, report: dict, llm_dtype: str) -> dict:
    spec = head_spec(ckpt.audio_config)
    return {
        "family": FAMILY,
        "created_by": f"omnilite {__version__}",
        "note": "model stages only, not a runnable bundle (export_fun_audio_chat in bundle.py writes one)",
        "source": {"model_dir": str(ckpt.model_dir.resolve())},
        "stages": [
            _onnx_stage(tmp, "audio_input", AUDIO_INPUT_FILE),
            {"name": "llm", "file": LLM_FILE, "format": "gguf", "precision": llm_dtype, "sha256": sha256_file(tmp / LLM_FILE),
             "n_embd": ckpt.text_config["hidden_size"], "kv_cache": "f32" if llm_dtype == "f32" else "f16",
             "flash_attn": default_flash_attn(llm_dtype)},
            _onnx_stage(tmp, "speech_head_input", HEAD_INPUT_FILE),
            # The decoder; its code table (input_matching of each code embedding) rides along as a side file.
            {"name": "speech_head", "file": HEAD_LM_FILE, "format": "gguf", "precision": spec.precision,
             "sha256": sha256_file(tmp / HEAD_LM_FILE), "n_embd": ckpt.audio_config["crq_transformer_config"]["hidden_size"],
             "kv_cache": "f32", "flash_attn": default_flash_attn(spec.precision), "extra_files": {HEAD_CODES_FILE: sha256_file(tmp / HEAD_CODES_FILE)},
             "bos_id": spec.bos_id, "eos_id": spec.eos_id, "group": spec.group},
            _onnx_stage(tmp, "speech_feedback", FEEDBACK_FILE),
        ],
        "prompt": {"prefix_ids": prompt.prefix_ids, "suffix_ids": prompt.suffix_ids, "system": prompt.system,
                   "eos_ids": [IM_END]},
        "parity": report,
    }
