"""The LLaMA-Omni2 TTS LM stage (torch-free): gate fusion (ONNX) + TTS LM (llama.cpp) with a
persistent KV cache across read/write steps.

Each write step appends, in order: the token written last in the previous step (the official code
appends every written token's embedding; all but the last were already fed while decoding), the
fused inputs of the new LLM tokens (raw embedding batch), and ``<sep>`` at the end of the text. The
official code re-runs the TTS LM over the whole sequence every step; since the sequence only grows
by appending, keeping the cache gives the same logits at a fraction of the cost.

Decoding is greedy by default (what parity is measured on); ``sample=True`` draws like the official
release (temperature 1, top-k 50, top-p 1) from a seeded generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..bundle import Bundle
from ..llm import LlamaCppLLM, LLMConfig
from ..onnx_session import SessionOptions, open_session


@dataclass(frozen=True)
class TTSDecoding:
    sample: bool = False
    top_k: int = 50
    temperature: float = 1.0
    seed: int = 0


class TTSWriter:
    def __init__(self, bundle: Bundle, llm_config: LLMConfig, options: SessionOptions = SessionOptions(),
                 decoding: TTSDecoding = TTSDecoding()):
        cfg = bundle["tts"]
        self.lm = LlamaCppLLM(bundle.file("tts_lm"), llm_config)
        self.fusion = open_session(bundle.file("tts_fusion"), options)
        self.text_embed = np.load(bundle.file("tts_text_embed"), mmap_mode="r")  # rows for the LLM's token ids
        self.eos_id, self.sep_id = int(cfg["eos_id"]), int(cfg["sep_id"])
        self.max_final = int(cfg["max_tokens_final"])
        units = cfg["units"]
        if "first_id" in units:
            self._first, self._count, self._map = int(units["first_id"]), int(units["count"]), None
        else:
            self._first, self._count = 0, 0
            self._map = dict(zip(units["ids"], units["units"]))
        self.decoding = decoding
        self.reset()

    def reset(self) -> None:
        self.lm.reset()
        self._pending: list[int] = []
        self._rng = np.random.default_rng(self.decoding.seed)

    def close(self) -> None:
        self.lm.close()

    @property
    def positions(self) -> int:
        return self.lm.n_past

    def unit(self, token: int) -> int | None:
        """The speech unit a TTS token stands for, or None (text, eos, specials)."""
        if self._map is not None:
            return self._map.get(token)
        u = token - self._first
        return u if 0 <= u < self._count else None

    def units(self, tokens: list[int]) -> list[int]:
        return [u for u in (self.unit(t) for t in tokens) if u is not None]

    def fuse(self, hidden: np.ndarray, tokens: list[int]) -> np.ndarray:
        emb = np.asarray(self.text_embed[np.asarray(tokens, np.int64)], np.float32)
        return self.fusion.run(None, {"hidden": np.ascontiguousarray(hidden, np.float32), "text_embeds": emb})[0]

    def write(self, hidden: np.ndarray, tokens: list[int], finished: bool, max_new: int | None = None) -> list[int]:
        """One read/write step; returns the TTS tokens written (the last may be eos)."""
        feeds: list[tuple[str, object]] = []
        if self._pending:
            feeds.append(("tokens", self._pending))
        if len(tokens):
            feeds.append(("embeds", self.fuse(hidden, tokens)))
        if finished:
            feeds.append(("tokens", [self.sep_id]))
        if not feeds:
            return []
        out = None
        for i, (kind, data) in enumerate(feeds):
            last = i == len(feeds) - 1
            out = self.lm.eval_tokens(data, want_last=last) if kind == "tokens" else self.lm.eval_embeddings(data, want_last=last)
        logits = out[0]
        limit = (self.max_final if finished else 0) if max_new is None else max_new
        written: list[int] = []
        for i in range(limit):
            token = self._pick(logits)
            written.append(token)
            if token == self.eos_id or i == limit - 1:
                break
            logits = self.lm.eval_tokens([token], want_last=True)[0]
        self._pending = written[-1:]
        return written

    def _pick(self, logits: np.ndarray) -> int:
        d = self.decoding
        if not d.sample:
            return int(np.argmax(logits))
        k = min(d.top_k, len(logits))
        top = np.argpartition(logits, -k)[-k:]
        z = logits[top].astype(np.float64) / d.temperature
        p = np.exp(z - z.max())
        return int(top[self._rng.choice(k, p=p / p.sum())])
