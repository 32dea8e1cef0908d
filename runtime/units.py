"""Streaming CTC speech generator: LLM hidden states in, discrete units out.

The exported graph takes a chunk of new hidden states and the decoder's KV cache; attention is
causal, so feeding the states chunk by chunk gives the same per-position predictions as one pass
over all of them. CTC collapsing carries the last raw prediction across chunks, so the collapsed
units are identical too.
"""

from __future__ import annotations

import numpy as np

from .bundle import Bundle
from .onnx_session import SessionOptions, open_session


def ctc_collapse(preds: np.ndarray, blank: int, previous: int | None) -> list[int]:
    """Merge repeats then drop blanks; `previous` is the raw prediction just before `preds`."""
    out = []
    for p in preds.tolist():
        if p != previous and p != blank:
            out.append(p)
        previous = p
    return out


class StreamingUnitGenerator:
    def __init__(self, bundle: Bundle, options: SessionOptions = SessionOptions()):
        cfg = bundle["speech_generator"]
        self.session = open_session(bundle.file("speech_generator"), options)
        self.blank = int(cfg["blank"])
        self.upsample = int(cfg["upsample_factor"])
        self._cache_shape = (int(cfg["layers"]), 1, int(cfg["heads"]), 0, int(cfg["head_dim"]))
        self.reset()

    def reset(self) -> None:
        self._key = np.zeros(self._cache_shape, np.float32)
        self._value = np.zeros(self._cache_shape, np.float32)
        self._previous: int | None = None

    @property
    def positions(self) -> int:
        return self._key.shape[3]

    def push(self, hidden: np.ndarray) -> list[int]:
        """hidden (n, H) float32 -> the units completed by these n new states."""
        if len(hidden) == 0:
            return []
        preds, self._key, self._value = self.session.run(
            None, {"hidden": np.ascontiguousarray(hidden, np.float32)[None], "past_key": self._key, "past_value": self._value}
        )
        preds = preds[0]
        units = ctc_collapse(preds, self.blank, self._previous)
        self._previous = int(preds[-1])
        return units
