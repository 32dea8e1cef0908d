"""`omnilite export` for Step-Audio 2 mini: release -> bundle, every stage checked against PyTorch.

``export_step_audio2(checkpoint, out, options, speaker_wav)`` writes

* ``encoder.onnx``  one 25 s piece's log-mel and valid length -> its LLM rows (encoder + adapter,
                    dynamic length, fp32)
* ``llm.gguf``      the Qwen2 LLM with the release tokenizer (f32, or f16 with ``llm_dtype``; llama.cpp arch
                    "qwen2")
* ``flow_encoder.onnx``, ``flow_estimator.onnx``, ``flow_noise.npy``  the token2wav DiT flow as chunk
                    functions with caches in and out (whole utterance = one chunk), see flow_stage.py
* ``hift_f0.onnx``, ``hift.onnx``  the HiFT vocoder (export/omni2's, hift.pt is CosyVoice2's format)
* ``token2wav.json`` the flow schedule and HiFT source settings the torch-free token2wav reads
* ``voice_prompt.npz`` the flow's prompt conditioning from ``--speaker-wav`` (speech tokens, mel,
                    CAM++ x-vector; voice_prompt.py), so the runtime needs neither the S3 tokenizer
                    nor campplus
* ``omnilite.json`` the manifest: stages with sha256, the prompt ids and splice plan, the output
                    token layout, rates, streaming settings and the parity report

Built in a temporary directory next to OUT and moved into place only when everything is written and,
with ``strict_parity``, every stage is within its threshold.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from omnilite import __version__
from omnilite.runtime.bundle import FORMAT_VERSION, MANIFEST, sha256_file
from omnilite.runtime.errors import OmniliteError
from omnilite.runtime.llm import default_flash_attn
from omnilite.runtime.step_audio2.flow import CHUNK_TOKENS, ENCODER_FILE as FLOW_ENCODER_FILE
from omnilite.runtime.step_audio2.flow import ESTIMATOR_FILE, NOISE_FILE
from omnilite.runtime.step_audio2.vocoder import CONFIG_FILE, HIFT_F0_FILE, HIFT_FILE

from ..bundle_dir import building_dir, record_parity
from ..onnx_export import io_shapes
from ..parity import fixed_audio, parity_inputs
from .checkpoint import AUDIO_CODE_BASE, AUDIO_START_ID, FAMILY, N_AUDIO_CODES, TOKEN2WAV_DIR, open_step_audio2
from .encoder_stage import ENCODER_FILE, encoder_parity, export_encoder
from .flow_checkpoint import load_flow, load_hift
from .flow_stage import export_flow, flow_parity, hift_parity, parity_case
from .llm_stage import (LLM_FILE, SYSTEM_PROMPT, llm_parity, prompt_segments, render_speech_prompt, splice_plan,
                        spliced_prompts, tokenizer_json, write_llm_gguf)
from .reference import CHUNK_SAMPLES, MEL_RIGHT_PAD, load_encoder, load_llm
from .voice_prompt import VOICE_PROMPT_FILE, voice_prompt

log = logging.getLogger(__name__)

FRAMES_PER_POSITION = 8  # 12.5 Hz LLM positions over 100 Hz mel frames
MAX_TURN_SECONDS = 60  # what one user turn may hold (three 25 s pieces); sizes the LLM context
HANDOFF_TOKENS = 5  # LLM tokens per hand-off to token2wav: one 1 text + 4 audio interleave chunk

STAGE_FILES = (("encoder", ENCODER_FILE), ("llm", LLM_FILE), ("flow_encoder", FLOW_ENCODER_FILE),
               ("flow_estimator", ESTIMATOR_FILE), ("flow_noise", NOISE_FILE), ("hift_f0", HIFT_F0_FILE),
               ("hift", HIFT_FILE), ("token2wav_config", CONFIG_FILE), ("voice_prompt", VOICE_PROMPT_FILE))


@dataclass(frozen=True)
class StepAudio2ExportOptions:
    # GGUF weights: "f32" (exact), or "f16" (half the file: 15 GB instead of 30 GB at the real shape, the
    # source an `--preset` export quantizes from when the f32 file would not fit on disk).
    llm_dtype: str = "f32"
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


def export_step_audio2(checkpoint: str | Path, out_dir: str | Path,
                       options: StepAudio2ExportOptions = StepAudio2ExportOptions(),
                       speaker_wav: str | Path | None = None) -> Path:
    """Export the release at `checkpoint` into the bundle `out_dir`, speaking in the voice of
    `speaker_wav`; returns `out_dir`."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not options.overwrite:
        raise OmniliteError(f"{out} already exists and is not empty; choose another directory or pass --force.")
    if options.llm_dtype not in ("f32", "f16"):
        raise OmniliteError(f"LLM dtype {options.llm_dtype!r} is not supported; use f32 or f16.")
    ckpt = open_step_audio2(checkpoint)
    tokenizer_path = tokenizer_json(ckpt)  # refused before any work when absent
    t2w = ckpt.root / TOKEN2WAV_DIR
    voice = voice_prompt(t2w, speaker_wav, N_AUDIO_CODES)  # refused before any work without a usable recording
    with building_dir(out) as tmp:  # locked against a second export to OUT; removed if anything fails
        encoder = load_encoder(ckpt)
        log.info("export: %s", ENCODER_FILE)
        side = {ENCODER_FILE: export_encoder(encoder, tmp / ENCODER_FILE)}
        log.info("export: %s", LLM_FILE)
        write_llm_gguf(ckpt, tmp / LLM_FILE, dtype=options.llm_dtype, progress=options.progress)
        log.info("export: token2wav flow + HiFT")
        export_flow(load_flow(t2w), load_hift(t2w), tmp)
        voice.save(tmp / VOICE_PROMPT_FILE)
        manifest = _manifest(ckpt, tokenizer_path, tmp, side, voice, speaker_wav, options.llm_dtype)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if options.parity:
            log.info("export: parity")
            record_parity(manifest, tmp, measure_stage_parity(ckpt, tmp, tokenizer_path, options.llm_dtype),
                          options.strict_parity)
    return out


def prompt_layout(tokenizer, system: str = SYSTEM_PROMPT) -> dict:
    """The official speech turn cut at its splice points: ids before the first piece's rows (ending with
    ``<audio_start>``), between two pieces (``<audio_end><audio_start>``) and after the last piece (up to
    the prefilled ``<tts_start>``); and what separates a finished reply from the next user turn's speech."""
    one = render_speech_prompt(tokenizer, [1], system=system)
    two = render_speech_prompt(tokenizer, [1, 1], system=system)
    (at,), (a, b) = splice_plan(one, [1]), splice_plan(two, [1, 1])
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False).ids  # noqa: E731
    # The official history closes the reply with <|EOT|> and opens the next human turn (stepaudio2.py
    # __main__, multi-turn): the reply's own <|EOT|>, when it ends with one, is never fed (see the pipeline).
    turn = encode("<|EOT|>") + encode("<|BOT|>human\n") + [AUDIO_START_ID]
    return {"system": system, "prefix_ids": one[:at], "suffix_ids": one[at + 1:], "piece_separator_ids": two[a + 1:b],
            "turn_prefix_ids": turn, "text": "".join(prompt_segments([1])).replace("<audio_patch>", "<audio_patch>*N"),
            "splice": "each 25 s piece's encoder rows take the positions right after its <audio_start> "
                      "(the official forward overwrites the <audio_patch> run there)"}


def _stage(tmp: Path, name: str, file: str, side: dict[str, list[str]], n_embd: int, llm_dtype: str) -> dict:
    fmt = file.rsplit(".", 1)[1]
    precision, extra = "fp32", {}
    if fmt == "onnx":
        inputs, outputs = io_shapes(tmp / file)
    elif fmt == "gguf":
        inputs, outputs = {"tokens_or_embeddings": ["n", n_embd]}, {"logits_and_hidden": ["n", "vocab+hidden"]}
        precision, extra = llm_dtype, {"flash_attn": default_flash_attn(llm_dtype)}
    elif fmt == "npy":
        inputs, outputs = {}, {"array": list(np.load(tmp / file, mmap_mode="r").shape)}
    elif fmt == "npz":
        with np.load(tmp / file) as z:
            inputs, outputs = {}, {k: list(z[k].shape) for k in z.files}
    else:
        inputs, outputs = {}, {}
    return {"name": name, "file": file, "format": fmt, "precision": precision, "sha256": sha256_file(tmp / file),
            "inputs": inputs, "outputs": outputs, "extra_files": {f: sha256_file(tmp / f) for f in side.get(file, [])}} | extra


def _manifest(ckpt, tokenizer_path: Path, tmp: Path, side: dict[str, list[str]], voice, speaker_wav,
              llm_dtype: str) -> dict:
    from tokenizers import Tokenizer

    text, audio = ckpt.config.text, ckpt.config.audio
    ids = ckpt.token_ids
    t2w = json.loads((tmp / CONFIG_FILE).read_text())
    return {
        "format_version": FORMAT_VERSION,
        "family": FAMILY,
        "created_by": f"omnilite {__version__}",
        "source": {"model_dir": str(ckpt.root.resolve()), "model_type": "step_audio_2", "hidden_size": text.hidden_size,
                   "num_hidden_layers": text.num_hidden_layers, "n_audio_layer": audio.n_audio_layer},
        "audio": {"input_sample_rate": 16000, "output_sample_rate": int(t2w["hift"]["sample_rate"])},
        "encoder": {"n_mels": audio.n_mels, "frames_per_position": FRAMES_PER_POSITION,
                    "max_mel_frames": MAX_TURN_SECONDS * 100, "mode": "exact",
                    "piece_samples": CHUNK_SAMPLES, "mel_right_pad": MEL_RIGHT_PAD,
                    "note": "25 s pieces, each the Whisper log-mel of the piece plus 479 zeros; all pieces of a turn "
                            "zero-padded to the longest, each with mel_len = its own frames - 2 (the official batch)"},
        "llm": {"n_embd": text.hidden_size, "n_vocab": text.vocab_size,
                # <|EOT|> ends the official generation; <tts_end> (end of speech) ends the reply here too.
                "eos_ids": sorted({ids["<|EOT|>"], ids["<tts_end>"]}),
                "prompt": prompt_layout(Tokenizer.from_file(str(tokenizer_path))),
                "max_context": text.max_position_embeddings},
        "tokenizer": {"source": tokenizer_path.name, "in": LLM_FILE},
        "output_tokens": {"text_below": AUDIO_START_ID, "audio_code_base": AUDIO_CODE_BASE, "audio_codes": N_AUDIO_CODES,
                          "audio_pad_code": N_AUDIO_CODES, "eot": ids["<|EOT|>"], "tts_start": ids["<tts_start>"],
                          "tts_end": ids["<tts_end>"], "tts_pad": ids.get("<tts_pad>")},
        "speaker": {"file": VOICE_PROMPT_FILE, "prompt_tokens": int(len(voice.tokens)), "prompt_mel_frames": int(len(voice.mel)),
                    "seconds": round(voice.seconds, 3), "speaker_wav": str(Path(speaker_wav).resolve()),
                    "source": "S3Tokenizer v2 (speech_tokenizer_v2_25hz.onnx) tokens, CAM++ (campplus.onnx) x-vector and "
                              "the 24 kHz flow mel of --speaker-wav, computed at export"},
        "token2wav": t2w,
        "streaming": {"omega": HANDOFF_TOKENS, "flow_chunk_tokens": CHUNK_TOKENS,
                      "flow_lookahead": int(t2w["flow"]["pre_lookahead_len"])},
        "stages": [_stage(tmp, name, file, side, text.hidden_size, llm_dtype) for name, file in STAGE_FILES],
        "parity": {},
    }


def measure_stage_parity(ckpt, stage_dir: Path, tokenizer_path: Path, llm_dtype: str = "f32") -> dict:
    """mel, encoder (ONNX vs PyTorch, rows == official count), LLM (the GGUF vs PyTorch with the
    speech rows spliced as the official forward does), the flow (ONNX vs PyTorch, whole and streamed;
    streamed vs whole) and HiFT (on the reference flow's mel)."""
    from tokenizers import Tokenizer

    encoder, inputs = load_encoder(ckpt), stage_parity_inputs()
    report: dict = {"inputs": [name for name, _ in inputs]}
    report |= encoder_parity(encoder, stage_dir / ENCODER_FILE, inputs)
    prompts = spliced_prompts(Tokenizer.from_file(str(tokenizer_path)), encoder, inputs)
    report["llm"] = llm_parity(load_llm(ckpt), stage_dir / LLM_FILE, prompts, llm_dtype)
    flow, case = load_flow(ckpt.root / TOKEN2WAV_DIR), parity_case()
    report |= flow_parity(flow, stage_dir, case)
    mel = flow.inference(case["tokens"], case["prompt_tokens"], case["prompt_mel"], case["xvector"])[0].numpy()
    report |= hift_parity(load_hift(ckpt.root / TOKEN2WAV_DIR), stage_dir, mel)
    return report
