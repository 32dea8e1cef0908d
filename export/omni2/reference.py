"""The PyTorch reference LLaMA-Omni2 pipeline, which the exported stages and the runtime are checked against.

30 s padded Whisper log-mel -> Whisper encoder -> concat adapter -> speech embeddings spliced at
``<speech>`` in the Qwen2.5 chat prompt -> greedy Qwen2.5 decoding, keeping each token's predicting
hidden state -> read R / write W: gate fusion + greedy TTS LM -> speech units -> CosyVoice2 flow
(whole utterance, 10 Euler steps, fixed noise, CFG) -> HiFT with the deterministic source.

Greedy TTS decoding and the deterministic HiFT source are the two places where this reference
departs from the official (sampling) inference on purpose: they make parity measurable.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from omnilite.runtime.errors import CheckpointError

from ..reference import greedy_decode
from ..speech_encoder import log_mel_torch
from .checkpoint import Omni2Checkpoint
from .tts import GreedyTTS, TTSState

SPEECH_PLACEHOLDER = "<speech>"
DEFAULT_MAX_TTS_TOKENS = 1024  # what the official final R/W step allows


@dataclass(frozen=True)
class Omni2Prompt:
    prefix_ids: list[int]
    suffix_ids: list[int]
    text: str


def render_prompt(tokenizer_dir: Path, system: str | None = None) -> Omni2Prompt:
    """The official prompt: the model's chat template over one user turn whose content is ``<speech>``."""
    import jinja2

    cfg = json.loads((tokenizer_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    template = cfg.get("chat_template")
    if not template:
        raise CheckpointError(f"{tokenizer_dir / 'tokenizer_config.json'} has no chat_template; the LLaMA-Omni2 tokenizer is incomplete.")
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": SPEECH_PLACEHOLDER}]
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda v, **_: json.dumps(v)
    text = env.from_string(template).render(messages=messages, add_generation_prompt=True, tools=None)
    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    ids = tok.encode(text, add_special_tokens=False).ids
    sp = tok.token_to_id(SPEECH_PLACEHOLDER)
    if sp is None or ids.count(sp) != 1:
        raise CheckpointError(f"{tokenizer_dir / 'tokenizer.json'} does not turn {SPEECH_PLACEHOLDER} into one token; the LLaMA-Omni2 tokenizer is incomplete.")
    i = ids.index(sp)
    return Omni2Prompt(prefix_ids=ids[:i], suffix_ids=ids[i + 1:], text=text)


def rw_chunks(n_tokens: int, read: int) -> list[tuple[int, int]]:
    """[start, end) of the LLM tokens fused at each R/W step: every `read` tokens, and the rest at the end."""
    bounds = list(range(0, n_tokens, read)) + [n_tokens]
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


@dataclass
class Omni2Reference:
    mel: np.ndarray
    speech_embeds: np.ndarray
    tokens: list[int]
    hidden: np.ndarray
    tts_tokens: list[int]
    units: list[int]
    flow_mel: np.ndarray
    f0: np.ndarray
    audio: np.ndarray


class Omni2ReferencePipeline:
    def __init__(self, ckpt: Omni2Checkpoint, speaker_wav_16k: np.ndarray):
        self.ckpt = ckpt
        self.encoder = ckpt.speech_encoder()
        self.prompt = render_prompt(ckpt.tokenizer_dir)
        self.n_mels = ckpt.whisper_dims["n_mels"]
        gen_cfg_path = ckpt.model_dir / "generation_config.json"
        eos = json.loads(gen_cfg_path.read_text()).get("eos_token_id") if gen_cfg_path.exists() else None
        eos = ckpt.config.get("eos_token_id") if eos is None else eos
        self.eos_ids = frozenset(eos if isinstance(eos, list) else [eos])
        specials = ckpt.tts_specials()
        self.tts_eos, self.sep_id, self.unit_of = specials["eos"], specials["sep"], specials["units"]
        self.read, self.write = ckpt.stream_params
        self.xvector = ckpt.speaker_embedding(speaker_wav_16k)

    @cached_property
    def llm(self):
        return self.ckpt.llm()

    @cached_property
    def generator(self):
        return self.ckpt.speech_generator()

    @cached_property
    def flow(self):
        return self.ckpt.flow()

    @cached_property
    def hift(self):
        return self.ckpt.hift()

    @cached_property
    def spks(self) -> np.ndarray:
        with torch.no_grad():
            return self.flow.speaker(torch.from_numpy(self.xvector)[None])[0].numpy()

    @torch.no_grad()
    def speech_embeddings(self, audio_16k: np.ndarray, pad_to_30s: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        mel = log_mel_torch(torch.from_numpy(np.asarray(audio_16k, np.float32)), self.n_mels, pad_to_30s)
        return mel, self.encoder(mel[None])[0]

    @torch.no_grad()
    def text(self, embeds: torch.Tensor, max_new_tokens: int, ignore_eos: bool = False) -> tuple[list[int], torch.Tensor]:
        return greedy_decode(self.llm, self.prompt.prefix_ids, embeds, self.prompt.suffix_ids, max_new_tokens, self.eos_ids, ignore_eos)

    @torch.no_grad()
    def speech_tokens(self, tokens: list[int], hidden: torch.Tensor, read: int | None = None, write: int | None = None,
                      max_tts_tokens: int = DEFAULT_MAX_TTS_TOKENS) -> list[list[int]]:
        """The TTS tokens written at each R/W step (the last step is the final one)."""
        read, write = read or self.read, write or self.write
        tts = GreedyTTS(self.generator, self.tts_eos, self.sep_id)
        state = TTSState()
        steps = []
        chunks = rw_chunks(len(tokens), read)
        for i, (a, b) in enumerate(chunks):
            last = i == len(chunks) - 1
            steps.append(tts.write(state, hidden[a:b], tokens[a:b], finished=last, max_new=max_tts_tokens if last else write))
        return steps

    def units(self, tts_tokens: list[int]) -> list[int]:
        return [self.unit_of[t] for t in tts_tokens if t in self.unit_of]

    @torch.no_grad()
    def vocode(self, units: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Whole-utterance flow + HiFT: (mel (80, T), f0 (T,), audio (T*480,))."""
        if not units:
            return np.zeros((80, 0), np.float32), np.zeros(0, np.float32), np.zeros(0, np.float32)
        mel = self.flow.inference(torch.tensor([units]), torch.from_numpy(self.xvector)[None])
        audio, f0 = self.hift.inference(mel)
        return mel[0].numpy(), f0, audio[0].numpy()

    @torch.no_grad()
    def generate(self, audio_16k: np.ndarray, max_new_tokens: int = 64, ignore_eos: bool = False, read: int | None = None,
                 write: int | None = None, max_tts_tokens: int = DEFAULT_MAX_TTS_TOKENS) -> Omni2Reference:
        mel, embeds = self.speech_embeddings(audio_16k)
        tokens, hidden = self.text(embeds, max_new_tokens, ignore_eos)
        tts = [t for step in self.speech_tokens(tokens, hidden, read, write, max_tts_tokens) for t in step]
        units = self.units(tts)
        flow_mel, f0, audio = self.vocode(units)
        return Omni2Reference(mel.numpy(), embeds.numpy(), tokens, hidden.numpy(), tts, units, flow_mel, f0, audio)
