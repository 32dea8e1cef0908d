"""`omnilite export` for Fun-Audio-Chat: release -> bundle, every stage checked against PyTorch.

``export_fun_audio_chat(checkpoint, out, options)`` writes, atomically (built in ``.OUT.partial`` under
OUT's lock, moved into place only when complete and, with ``strict_parity``, within every threshold):

* the model stages of ``export.write_model_stages``: ``audio_input.onnx``, ``llm.gguf`` (Qwen3, f32 or f16),
  ``speech_head_input.onnx`` + ``speech_head_codes.npy`` + ``speech_head.gguf`` (the speech head),
  ``speech_feedback.onnx``;
* ``text_embeddings.npy``: the LLM's token table (vocab, D) as float32. The head reads the text
  embedding of every input token and the feedback averages it with the speech row; llama.cpp does
  not hand its table out (and may hold it quantized), so the bundle carries it and the runtime
  memory-maps it (only the rows a reply touches are read; 2.5 GB on disk at the real shape);
* the vocoder stages of ``vocoder_stage.write_vocoder_stages`` (CosyVoice3 flow + causal HiFT,
  ``vocoder.json`` with the 192-d embedding of the release's voice, 中文女 from
  ``utils/new_spk2info.pt``, as the official detokenizer loads it);
* ``omnilite.json``: family "fun-audio-chat", the stages with sha256, the S2M prompt cut at the splice
  (prefix ids ending with ``<|audio_bos|>``, suffix ids from ``<|audio_eos|>``), the turn prefix for a
  follow-up question, ``force_text_abos``, the speech ids, the streaming schedule and the parity report.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from omnilite import __version__
from omnilite.runtime.bundle import FORMAT_VERSION, MANIFEST, sha256_file
from omnilite.runtime.errors import OmniliteError
from omnilite.runtime.fun_audio_chat.pipeline import FRAMES_PER_POSITION, MAX_TURN_SECONDS, TEXT_EMBEDDINGS_FILE
from omnilite.runtime.fun_audio_chat.speech_head import FEEDBACK_FILE, HEAD_CODES_FILE, HEAD_INPUT_FILE, HEAD_LM_FILE
from omnilite.runtime.fun_audio_chat.vocoder import CHUNK_ALIGNED, RECORD_FILE, SCHEDULES
from omnilite.runtime.llm import default_flash_attn

from ..bundle_dir import building_dir, record_parity
from ..onnx_export import io_shapes
from .checkpoint import open_cosyvoice3, open_fun_audio_chat
from .config import AUDIO_BOS, AUDIO_EOS, AUDIO_TOKEN, FAMILY, IM_END, MODEL_TYPE, N_CODES, SPK2INFO_VOICE
from .export import AUDIO_INPUT_FILE, LLM_FILE, check_llm_dtype, onnx_side_files, write_model_stages
from .prompt import AudioPrompt, _tokenizer
from .speech_head import head_spec
from .vocoder_stage import write_vocoder_stages

log = logging.getLogger(__name__)

N_MELS = 128
MAX_MEL_FRAMES = 3000  # the processor cuts the log-mel at 30 s (its placeholders are not cut)
TEXT_TABLE = "language_model.model.embed_tokens.weight"


@dataclass(frozen=True)
class FunAudioChatExportOptions:
    parity: bool = True
    strict_parity: bool = True  # refuse to write OUT when a stage misses its threshold
    overwrite: bool = False
    voice: str = SPK2INFO_VOICE  # a key of utils/new_spk2info.pt
    schedule: str = CHUNK_ALIGNED  # the runtime's default streaming schedule (runtime/fun_audio_chat/vocoder.py)
    llm_dtype: str = "f32"  # "f16": a 16 GB LLM GGUF at the real shape instead of 33 GB


def export_fun_audio_chat(checkpoint: str | Path, out_dir: str | Path,
                          options: FunAudioChatExportOptions = FunAudioChatExportOptions()) -> Path:
    """Export the release under `checkpoint` (the folder holding Fun-Audio-Chat-8B/,
    Fun-CosyVoice3-0.5B-2512/ and utils/new_spk2info.pt) into the bundle `out_dir`; returns `out_dir`."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not options.overwrite:
        raise OmniliteError(f"{out} already exists and is not empty; choose another directory or pass --force.")
    if options.schedule not in SCHEDULES:
        raise OmniliteError(f"vocoder schedule {options.schedule!r} is unknown; use one of: {', '.join(SCHEDULES)}.")
    check_llm_dtype(options.llm_dtype)
    # A bad model dir, vocoder dir or voice is refused, in one sentence, before any work.
    ckpt = open_fun_audio_chat(checkpoint)
    vocoder = open_cosyvoice3(checkpoint)
    vocoder.speaker_embedding(options.voice)
    prompt = AudioPrompt.build(ckpt.model_dir)
    with building_dir(out) as tmp:
        # The f32 LLM is loaded only for parity: without it the export fits a 24 GB machine at the real shape.
        model = ckpt.reference(torch.float32, language_model=options.parity)
        report = write_model_stages(ckpt, model, prompt, tmp, options.parity, options.llm_dtype)
        del model
        log.info("export: %s", TEXT_EMBEDDINGS_FILE)
        np.save(tmp / TEXT_EMBEDDINGS_FILE, ckpt.tensors[TEXT_TABLE].float().numpy())
        log.info("export: vocoder (CosyVoice3 flow + causal HiFT)")
        report |= write_vocoder_stages(vocoder, tmp, options.voice, parity=options.parity)
        manifest = _manifest(ckpt, vocoder, prompt, tmp, options)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False))
        if options.parity:
            record_parity(manifest, tmp, report, options.strict_parity)
    return out


def turn_prefix_ids(tokenizer_dir: Path) -> list[int]:
    """What follows a finished reply before the next question's audio rows: the reply's
    ``<|im_end|>``, the user header and ``<|audio_bos|>`` (the chat template's rendering)."""
    return _tokenizer(tokenizer_dir).encode("<|im_end|>\n<|im_start|>user\n<|audio_bos|>", add_special_tokens=False).ids


def _stage(tmp: Path, name: str, file: str, n_embd: int, precision: str = "fp32", **extra) -> dict:
    fmt = file.rsplit(".", 1)[1]
    inputs: dict = {}
    outputs: dict = {}
    if fmt == "onnx":
        inputs, outputs = io_shapes(tmp / file)
        extra["side"] = extra.get("side") or onnx_side_files(tmp, file)
    elif fmt == "gguf":
        inputs, outputs = {"tokens_or_embeddings": ["n", n_embd]}, {"logits_and_hidden": ["n", "vocab+hidden"]}
        extra.setdefault("flash_attn", default_flash_attn(precision))
    elif fmt == "npy":
        outputs = {"array": list(np.load(tmp / file, mmap_mode="r").shape)}
    side = extra.pop("side", [])
    return {"name": name, "file": file, "format": fmt, "precision": precision, "sha256": sha256_file(tmp / file),
            "inputs": inputs, "outputs": outputs, "extra_files": {f: sha256_file(tmp / f) for f in side}, **extra}


def _manifest(ckpt, vocoder, prompt: AudioPrompt, tmp: Path, options: FunAudioChatExportOptions) -> dict:
    text, audio = ckpt.text_config, ckpt.audio_config
    spec = head_spec(audio)
    voc = json.loads((tmp / RECORD_FILE).read_text())
    d = text["hidden_size"]
    head_width = audio["crq_transformer_config"]["hidden_size"]
    vocoder_stages = [_stage(tmp, s["name"], s["file"], d, side=list(s.get("extra_files", {}))) for s in voc["stages"]]
    return {
        "format_version": FORMAT_VERSION,
        "family": FAMILY,
        "created_by": f"omnilite {__version__}",
        "source": {"model_dir": str(ckpt.model_dir.resolve()), "model_type": MODEL_TYPE, "hidden_size": d,
                   "num_hidden_layers": text["num_hidden_layers"], "vocoder_dir": str(vocoder.vocoder_dir.resolve()),
                   "spk2info": str(vocoder.spk2info.resolve()), "voice": options.voice},
        "audio": {"input_sample_rate": 16000, "output_sample_rate": int(voc["audio"]["sample_rate"])},
        "encoder": {"n_mels": N_MELS, "frames_per_position": FRAMES_PER_POSITION, "max_mel_frames": MAX_TURN_SECONDS * 100,
                    "mel_frames_cap": MAX_MEL_FRAMES, "mode": "exact",
                    "note": "Whisper log-mel over 30 s of padding, valid frames only (at most 3000); the placeholder count "
                            "int(samples / 640) comes from the samples (up to max_mel_frames' worth), as the processor counts"},
        "llm": {"n_embd": d, "n_vocab": text["vocab_size"], "eos_ids": [IM_END],
                "prompt": {"system": prompt.system, "prefix_ids": prompt.prefix_ids, "suffix_ids": prompt.suffix_ids,
                           "turn_prefix_ids": turn_prefix_ids(ckpt.model_dir),
                           "splice": "the clip's rows go right after <|audio_bos|>, where the processor puts the <|AUDIO|> run"},
                "force_text_abos": True, "max_context": text["max_position_embeddings"]},
        "output_tokens": {"audio_token": AUDIO_TOKEN, "audio_bos": AUDIO_BOS, "audio_eos": AUDIO_EOS, "eos": IM_END},
        "speech": {"group": spec.group, "bos_id": spec.bos_id, "eos_id": spec.eos_id, "vocoder_codes": N_CODES,
                   "text_embeddings": TEXT_EMBEDDINGS_FILE},  # the head's precision is its stage's
        "vocoder": {"config": RECORD_FILE, "voice": options.voice, "schedule": options.schedule, "schedules": list(SCHEDULES),
                    "sample_rate": int(voc["audio"]["sample_rate"])},
        "stages": [
            _stage(tmp, "audio_input", AUDIO_INPUT_FILE, d),
            _stage(tmp, "llm", LLM_FILE, d, options.llm_dtype),
            _stage(tmp, "text_embeddings", TEXT_EMBEDDINGS_FILE, d),
            _stage(tmp, "speech_head_input", HEAD_INPUT_FILE, d),
            # The codes table is its own stage, not the GGUF's side file: a quantized head is a new
            # GGUF, and the quantizer carries side files of ONNX stages only.
            _stage(tmp, "speech_head_codes", HEAD_CODES_FILE, d),
            _stage(tmp, "speech_head", HEAD_LM_FILE, head_width, spec.precision),
            _stage(tmp, "speech_feedback", FEEDBACK_FILE, d),
            *vocoder_stages,
            _stage(tmp, "vocoder_config", RECORD_FILE, d),
        ],
        "parity": {},
    }
