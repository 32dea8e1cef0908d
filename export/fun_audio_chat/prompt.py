"""The one-turn spoken-question prompt, two ways.

``official_prompt_ids`` is what the release feeds its LLM (NOTES.md "Input audio"): the processor's
chat template with the audio item as ``<|audio_bos|><|AUDIO|><|audio_eos|>``, ``<|AUDIO|>`` repeated
once per 5 Hz position, tokenized with the real tokenizer; the audio embeddings then replace the
``<|AUDIO|>`` rows. ``AudioPrompt`` is the same prompt cut where those rows go, for an LLM that is fed
token ids, then embedding rows, then token ids (llama.cpp).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import jinja2

from omnilite.runtime.errors import OmniliteError

from .config import AUDIO_TEMPLATE, AUDIO_TOKEN, CHAT_TEMPLATE, S2M_PROMPT

_AUDIO = "<|AUDIO|>"


def prompt_text(positions: int, system: str = S2M_PROMPT) -> str:
    """The template rendered for one user turn holding one clip of `positions` 5 Hz positions."""
    content = AUDIO_TEMPLATE.replace(_AUDIO, _AUDIO * positions)
    return jinja2.Environment().from_string(CHAT_TEMPLATE).render(
        messages=[{"role": "system", "content": system}, {"role": "user", "content": content}], add_generation_prompt=True)


@lru_cache(maxsize=4)  # parsing Qwen's 11 MB tokenizer.json takes ~0.4 s; parity encodes one prompt per clip
def _load_tokenizer(path: Path, mtime_ns: int):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


def _tokenizer(tokenizer_dir: Path):
    path = Path(tokenizer_dir).resolve() / "tokenizer.json"
    if not path.exists():
        raise OmniliteError(f"{path} is missing; the prompt and the GGUF vocabulary are read from it, download it with the "
                            "rest of the Fun-Audio-Chat-8B directory.")
    return _load_tokenizer(path, path.stat().st_mtime_ns)  # a replaced file is read again


def official_prompt_ids(tokenizer_dir: Path, positions: int, system: str = S2M_PROMPT) -> list[int]:
    return _tokenizer(tokenizer_dir).encode(prompt_text(positions, system), add_special_tokens=False).ids


@dataclass(frozen=True)
class AudioPrompt:
    prefix_ids: list[int]  # up to and including <|audio_bos|>
    suffix_ids: list[int]  # from <|audio_eos|> to the assistant header
    system: str

    @classmethod
    def build(cls, tokenizer_dir: Path, system: str = S2M_PROMPT) -> "AudioPrompt":
        ids = official_prompt_ids(tokenizer_dir, 1, system)
        if ids.count(AUDIO_TOKEN) != 1:
            raise OmniliteError(f"{Path(tokenizer_dir) / 'tokenizer.json'} does not encode {_AUDIO} as the single token "
                                f"{AUDIO_TOKEN}; the tokenizer does not belong to Fun-Audio-Chat, download it again.")
        cut = ids.index(AUDIO_TOKEN)
        return cls(ids[:cut], ids[cut + 1:], system)
