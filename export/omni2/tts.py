"""Reference LLaMA-Omni2 speech generator: gate fusion + the autoregressive TTS LM, and the
read R / write W schedule that interleaves it with the LLM.

Facts (ictnlp/LLaMA-Omni2 ``speech_generator.py`` / ``generation.py``, re-implemented):

* ``input_proj`` = Linear(H -> 2H), ReLU, Linear(2H -> H_tts) on the LLM's final (post-norm) hidden
  state of the position that predicted each text token; ``gate`` = Linear(2 H_tts -> H_tts), Sigmoid;
  fused = g * rep + (1 - g) * emb, where emb is the TTS LM's input embedding of the same token id.
* Every R LLM tokens (and at the end) the new tokens are fused and appended to the TTS input
  sequence, and the TTS LM writes up to W tokens; at the end ``<sep>`` is appended and it writes
  until its eos (up to 1024). Generated tokens (eos included) are appended as embeddings.
* The official code re-runs the TTS LM over the whole growing sequence each chunk and samples
  (temperature 1, top-p 1, top-k 50 by transformers' default). This reference decodes greedily (the
  parity mode) with a persistent KV cache, which gives the same tokens as re-running from scratch
  because the sequence only grows by appending.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import Qwen2Config, Qwen2ForCausalLM


class GateFusion(nn.Module):
    """input_proj + gate of ``LLMSpeechGenerator``; names match ``speech_generator.input_proj.*`` / ``gate.*``."""

    def __init__(self, llm_dim: int, tts_dim: int):
        super().__init__()
        self.input_proj = nn.Sequential(nn.Linear(llm_dim, 2 * llm_dim), nn.ReLU(), nn.Linear(2 * llm_dim, tts_dim))
        self.gate = nn.Sequential(nn.Linear(2 * tts_dim, tts_dim), nn.Sigmoid())

    def forward(self, hidden: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """hidden (n, H_llm), text_embeds (n, H_tts) -> fused TTS inputs (n, H_tts)."""
        rep = self.input_proj(hidden)
        g = self.gate(torch.cat([rep, text_embeds], dim=-1))
        return rep * g + text_embeds * (1 - g)


class SpeechGenerator(nn.Module):
    """``speech_generator.*``: ``model`` is the TTS Qwen2ForCausalLM, plus the fusion layers."""

    def __init__(self, llm_dim: int, tts_config: Qwen2Config):
        super().__init__()
        self.model = Qwen2ForCausalLM(tts_config)
        fusion = GateFusion(llm_dim, tts_config.hidden_size)
        self.input_proj, self.gate = fusion.input_proj, fusion.gate

    def fuse(self, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        rep = self.input_proj(hidden)
        emb = self.model.get_input_embeddings()(tokens)
        g = self.gate(torch.cat([rep, emb], dim=-1))
        return rep * g + emb * (1 - g)


@dataclass
class TTSState:
    """A TTS LM conversation: its KV cache and the tokens written but not yet fed back."""

    past: object = None
    pending: list[int] = field(default_factory=list)  # written tokens whose embeddings come next
    positions: int = 0


class GreedyTTS:
    """Greedy TTS LM with a persistent cache (equal to the official re-run from scratch)."""

    def __init__(self, gen: SpeechGenerator, eos_id: int, sep_id: int):
        self.gen, self.eos_id, self.sep_id = gen, eos_id, sep_id

    def _feed(self, state: TTSState, embeds: torch.Tensor) -> torch.Tensor:
        out = self.gen.model(inputs_embeds=embeds[None], past_key_values=state.past, use_cache=True)
        state.past = out.past_key_values
        state.positions += embeds.shape[0]
        return out.logits[0, -1]

    @torch.no_grad()
    def write(self, state: TTSState, hidden: torch.Tensor, tokens: list[int], finished: bool, max_new: int) -> list[int]:
        """One R/W step: fuse (hidden, tokens), append (+ <sep> if finished), write up to max_new tokens."""
        embed = self.gen.model.get_input_embeddings()
        parts = []
        if state.pending:
            parts.append(embed(torch.tensor(state.pending)))
            state.pending = []
        if len(tokens):
            parts.append(self.gen.fuse(hidden, torch.tensor(tokens)))
        if finished:
            parts.append(embed(torch.tensor([self.sep_id])))
        logits = self._feed(state, torch.cat(parts))
        written: list[int] = []
        for i in range(max_new):
            token = int(logits.argmax())
            written.append(token)
            if token == self.eos_id or i == max_new - 1:
                break
            logits = self._feed(state, embed(torch.tensor([token])))
        state.pending = written[-1:]  # the last written token is fed at the start of the next step
        return written
