"""The Step-Audio 2 tokenizer, rebuilt offline: the real Qwen2.5 BPE (``export.omni2.qwen_tokenizer``) plus
the Step-Audio special tokens at their release ids.

Ids confirmed by the official code: ``<audio_start>`` 151688 (the modeling file splices audio after it),
text ids below 151688 and audio code k at 151696 + k (stepaudio2.py), ``<audio_end>`` 151689,
``<audio_patch>`` 151690, ``<tts_start>`` 151693, ``<tts_end>`` 151694 and ``<audio_0>`` ...
``<audio_6561>`` (6561 is the interleave's audio pad) from StepFun's vLLM fork. Not confirmed (no copy of
the released tokenizer_config.json could be read here): ``<|EOT|>`` at 151665 (the one id the official
StepAudio2TextConfig always adds to the eos list beside Qwen's), ``<|BOT|>`` at 151666 and ``<tts_pad>``
at 151695. The release has tokens at 151667-151687, 151691 and 151692 whose text is unknown; the HF
tokenizers library numbers added tokens contiguously, so those ids hold placeholders named
``<|step_audio2_unknown_ID|>`` here. Every consumer looks tokens up by name, never by these ids.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..omni2.qwen_tokenizer import qwen25_tokenizer, tokenizer_config, write_tokenizer
from .checkpoint import AUDIO_CODE_BASE, N_AUDIO_CODES

# (id, content, confirmed by the official code)
STEP_SPECIALS: tuple[tuple[int, str, bool], ...] = (
    (151665, "<|EOT|>", False),
    (151666, "<|BOT|>", False),
    (151688, "<audio_start>", True),
    (151689, "<audio_end>", True),
    (151690, "<audio_patch>", True),
    (151693, "<tts_start>", True),
    (151694, "<tts_end>", True),
    (151695, "<tts_pad>", False),
)
AUDIO_PAD_CODE = N_AUDIO_CODES  # <audio_6561>: pads the audio side of the 1 text : 4 audio interleave


def step_audio2_tokenizer() -> dict:
    """tokenizer.json (as a dict): Qwen2.5's, with the Step-Audio tokens and <audio_0>..<audio_6561>."""
    tok = qwen25_tokenizer()
    named = {i: c for i, c, _ in STEP_SPECIALS} | {AUDIO_CODE_BASE + k: f"<audio_{k}>" for k in range(N_AUDIO_CODES + 1)}
    first = max(t["id"] for t in tok["added_tokens"]) + 1
    extra = [(i, named.get(i, f"<|step_audio2_unknown_{i}|>")) for i in range(first, max(named) + 1)]
    for i, content in extra:
        tok["added_tokens"].append({"id": i, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
                                    "normalized": False, "special": True})
    return tok


def write_step_audio2_tokenizer(model_dir: Path, max_length: int) -> None:
    """The release's tokenizer files: tokenizer.json, tokenizer_config.json (eos/pad <|endoftext|>: the
    official StepAudio2 class sets eos to <|EOT|> itself), special_tokens_map.json, vocab.json, merges.txt
    and added_tokens.json. No chat template: the official code renders the prompt by hand."""
    tok = step_audio2_tokenizer()
    write_tokenizer(model_dir, tok, tokenizer_config(tok, eos="<|endoftext|>", chat_template=None, max_length=max_length))
    added = {t["content"]: t["id"] for t in tok["added_tokens"]}
    (model_dir / "added_tokens.json").write_text(json.dumps(added, ensure_ascii=False, indent=2), encoding="utf-8")
