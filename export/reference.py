"""The PyTorch reference pipeline (greedy), which every exported stage and the runtime are checked against.

It follows the official LLaMA-Omni inference: 30 s padded log-mel -> Whisper encoder -> adapter ->
speech embeddings spliced between the prompt's token embeddings -> greedy Llama decoding, keeping the
post-norm hidden state of the position that predicted each token -> CTC speech generator over all of
them -> unit HiFi-GAN with duration prediction.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from .checkpoint import LlamaOmniCheckpoint
from .prompt import SpeechPrompt, speech_prompt
from .speech_encoder import log_mel_torch


@dataclass
class ReferenceOutput:
    mel: np.ndarray
    speech_embeds: np.ndarray
    tokens: list[int]
    hidden: np.ndarray  # (n_tokens, H) the hidden state that predicted each token
    units: list[int]
    durations: np.ndarray
    audio: np.ndarray


def greedy_decode(
    llm, prefix_ids: list[int], speech_embeds: torch.Tensor, suffix_ids: list[int], max_new_tokens: int,
    eos_ids: frozenset[int], ignore_eos: bool = False,
) -> tuple[list[int], torch.Tensor]:
    """Greedy decoding from spliced input embeddings with a KV cache; returns tokens and hidden states."""
    embed = llm.get_input_embeddings()
    speech_embeds = speech_embeds.to(embed.weight.dtype)  # a bfloat16 baseline LLM takes bf16 inputs
    inputs = torch.cat(
        [embed(torch.tensor([prefix_ids])), speech_embeds.reshape(1, -1, speech_embeds.shape[-1]), embed(torch.tensor([suffix_ids]))],
        dim=1,
    )
    out = llm.model(inputs_embeds=inputs, use_cache=True)
    past, last = out.past_key_values, out.last_hidden_state[:, -1]
    tokens, hidden = [], []
    for _ in range(max_new_tokens):
        token = int(llm.lm_head(last).argmax(-1))
        tokens.append(token)
        hidden.append(last[0])
        if token in eos_ids and not ignore_eos:
            break
        out = llm.model(inputs_embeds=embed(torch.tensor([[token]])), past_key_values=past, use_cache=True)
        past, last = out.past_key_values, out.last_hidden_state[:, -1]
    return tokens, torch.stack(hidden).float()


class ReferencePipeline:
    def __init__(self, ckpt: LlamaOmniCheckpoint):
        self.ckpt = ckpt
        self.prompt: SpeechPrompt = speech_prompt(ckpt.model_dir / "tokenizer.json")
        eos = ckpt.config.get("eos_token_id", [])
        self.eos_ids = frozenset(eos if isinstance(eos, list) else [eos])
        self.n_mels = ckpt.whisper_dims["n_mels"]

    # Stages load on first use and `release` drops one, so a benchmark can hold one stage at a time.
    @cached_property
    def encoder(self):
        return self.ckpt.speech_encoder()

    @cached_property
    def generator(self):
        return self.ckpt.speech_generator()

    @cached_property
    def vocoder(self):
        return self.ckpt.vocoder()

    def release(self, stage: str) -> None:
        self.__dict__.pop(stage, None)
        if stage == "encoder":
            self.ckpt.release_whisper_state()

    @cached_property
    def llm(self):
        """Loaded on first use: exporting without parity never needs the fp32 LLM in memory."""
        return self.ckpt.llm()

    @torch.no_grad()
    def speech_embeddings(self, audio_16k: np.ndarray, pad_to_30s: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        mel = log_mel_torch(torch.from_numpy(np.asarray(audio_16k, np.float32)), self.n_mels, pad_to_30s)
        return mel, self.encoder(mel[None])[0]

    @torch.no_grad()
    def generate(self, audio_16k: np.ndarray, max_new_tokens: int = 64, ignore_eos: bool = False, pad_to_30s: bool = True) -> ReferenceOutput:
        mel, embeds = self.speech_embeddings(audio_16k, pad_to_30s)
        tokens, hidden = greedy_decode(
            self.llm, self.prompt.prefix_ids, embeds, self.prompt.suffix_ids, max_new_tokens, self.eos_ids, ignore_eos
        )
        units = self.generator.predict(hidden)
        if units:
            u = torch.tensor([units])
            durations = self.vocoder.durations(u)
            audio = self.vocoder.generate(torch.repeat_interleave(u, durations.view(-1), dim=1))[0].numpy()
            durations = durations[0].numpy()
        else:
            durations, audio = np.zeros(0, np.int64), np.zeros(0, np.float32)
        return ReferenceOutput(mel.numpy(), embeds.numpy(), tokens, hidden.numpy(), units, durations, audio)
