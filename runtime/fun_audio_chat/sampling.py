"""Fun-Audio-Chat's speech-code sampling as the release does it, in numpy (no torch).

The release samples every speech-head code (export/fun_audio_chat/NOTES.md, "Speech sampling"): the
generation's logits processors minus ``NoBadWords``, i.e. for ``DEFAULT_S2M_GEN_KWARGS`` (temperature
0.8, top_p 0.9, top_k 0, repetition penalty 1.2) transformers'

    RepetitionPenaltyLogitsProcessor -> TemperatureLogitsWarper -> [TopKLogitsWarper] -> TopPLogitsWarper

on the head's float32 logits, with the speech history (the reply's kept codes + this step's earlier
codes) as the ids the penalty sees, then one multinomial draw. `SpeechSampler.scores` reproduces the
processors' float32 arithmetic: the penalty divides positive and multiplies negative scores of every
id in the history once (repeats count once), the temperature divides, top-k keeps every score
>= the k-th largest (ties kept), top-p sorts ascending (ties in index order: the release's CUDA sort
of 6565 entries is stable), takes float32 softmax cumulative sums (accumulated in double, as
PyTorch's CPU cumsum does), drops entries whose cumulative sum is <= float32(1 - top_p) and always
keeps the `min_tokens_to_keep` largest. The draw uses a numpy Generator (seeded or not): the release
draws with torch's global RNG, unseeded, so no stream of codes can be matched, only the distribution.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import OmniliteError

GREEDY = "greedy"
RELEASE = "release"


@dataclass(frozen=True)
class SpeechSampling:
    """Sampling parameters of the speech codes; the defaults are the release's
    (utils/constant.py:65-76 of FunAudioLLM/Fun-Audio-Chat, ``DEFAULT_S2M_GEN_KWARGS``). `seed`: None
    draws fresh entropy (as the release, which seeds nothing); an int makes a pipeline's replies
    reproducible (one Generator per pipeline, continued across replies, like torch's global RNG)."""

    temperature: float = 0.8
    top_p: float = 0.9
    top_k: int = 0  # 0: off (transformers adds no TopKLogitsWarper)
    repetition_penalty: float = 1.2  # 1.0: off
    seed: int | None = None
    min_tokens_to_keep: int = 1  # transformers' value for num_beams == 1

    def __post_init__(self):
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            raise OmniliteError(f"speech sampling temperature must be a positive number, got {self.temperature!r}; "
                                "use speech_sampling='greedy' for argmax codes.")
        if not (isinstance(self.top_p, (int, float)) and 0.0 <= self.top_p <= 1.0):
            raise OmniliteError(f"speech sampling top_p must be in [0, 1], got {self.top_p!r}.")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise OmniliteError(f"speech sampling top_k must be a non-negative integer (0: off), got {self.top_k!r}.")
        if not (isinstance(self.repetition_penalty, (int, float)) and self.repetition_penalty > 0):
            raise OmniliteError(f"speech sampling repetition_penalty must be a positive number (1.0: off), "
                                f"got {self.repetition_penalty!r}.")
        if not (isinstance(self.min_tokens_to_keep, int) and self.min_tokens_to_keep >= 1):
            raise OmniliteError("speech sampling min_tokens_to_keep must be a positive integer, "
                                f"got {self.min_tokens_to_keep!r}.")
        if self.seed is not None and not (isinstance(self.seed, int) and self.seed >= 0):
            raise OmniliteError(f"speech sampling seed must be a non-negative integer or None, got {self.seed!r}.")


def resolve_speech_sampling(value) -> SpeechSampling | None:
    """'greedy' (or None) -> None (argmax codes, the exact path); 'release' -> the release's parameters
    (fresh entropy); a `SpeechSampling` -> itself."""
    if value is None or value == GREEDY:
        return None
    if value == RELEASE:
        return SpeechSampling()
    if isinstance(value, SpeechSampling):
        return value
    raise OmniliteError(f"speech_sampling must be 'greedy', 'release' or a SpeechSampling, got {value!r}.")


def softmax32(scores: np.ndarray) -> np.ndarray:
    """float32 softmax over the last axis (-inf entries get probability 0)."""
    s = np.asarray(scores, np.float32)
    e = np.exp(s - np.max(s, axis=-1, keepdims=True))
    return e / np.sum(e, axis=-1, keepdims=True, dtype=np.float32)


def repetition_penalty(scores: np.ndarray, history: Sequence[int], penalty: float) -> np.ndarray:
    """transformers' RepetitionPenaltyLogitsProcessor on one row: each id in `history` once, its score
    divided by `penalty` when >= 0, multiplied when < 0 (float32)."""
    out = np.array(scores, np.float32, copy=True)
    if penalty == 1.0 or not len(history):
        return out
    ids = np.unique(np.asarray(history, np.int64))
    s = out[ids]
    p = np.float32(penalty)
    out[ids] = np.where(s < 0, s * p, s / p)
    return out


def top_k_filter(scores: np.ndarray, top_k: int, min_tokens_to_keep: int = 1) -> np.ndarray:
    """transformers' TopKLogitsWarper: -inf below the k-th largest score (ties with it are kept)."""
    k = min(max(top_k, min_tokens_to_keep), scores.shape[-1])
    kth = np.partition(scores, scores.shape[-1] - k)[scores.shape[-1] - k]
    return np.where(scores < kth, np.float32(-np.inf), scores).astype(np.float32)


def top_p_filter(scores: np.ndarray, top_p: float, min_tokens_to_keep: int = 1) -> np.ndarray:
    """transformers' TopPLogitsWarper on one row (see the module docstring for the arithmetic)."""
    order = np.argsort(scores, kind="stable")  # ascending; equal scores in index order
    probs = softmax32(scores[order])
    cum = np.cumsum(probs, dtype=np.float64).astype(np.float32)
    remove = cum <= np.float32(1 - top_p)
    remove[-min_tokens_to_keep:] = False
    out = np.array(scores, np.float32, copy=True)
    out[order[remove]] = -np.inf
    return out


class SpeechSampler:
    """Chooses one code from the head's logits and the speech history, as the release's
    ``sampling_step`` does (callable as the `choose` hook of `SpeechHead.step`)."""

    def __init__(self, params: SpeechSampling = SpeechSampling()):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def scores(self, logits: np.ndarray, history: Sequence[int] = ()) -> np.ndarray:
        """The processed (float32) scores: -inf for every code the warpers remove."""
        p = self.params
        s = np.asarray(logits, np.float32).reshape(-1)
        if history is not None and len(history):
            h = np.asarray(history, np.int64)
            if h.min() < 0 or h.max() >= s.size:
                raise OmniliteError(f"speech history holds ids outside the codebook of {s.size}: "
                                    f"{int(h.min())}..{int(h.max())}.")
        s = repetition_penalty(s, history, p.repetition_penalty)
        if p.temperature != 1.0:
            s = s / np.float32(p.temperature)
        if p.top_k:
            s = top_k_filter(s, p.top_k, p.min_tokens_to_keep)
        if p.top_p < 1.0:
            s = top_p_filter(s, p.top_p, p.min_tokens_to_keep)
        return s

    def probs(self, logits: np.ndarray, history: Sequence[int] = ()) -> np.ndarray:
        """The distribution a code is drawn from (float32 softmax of `scores`)."""
        return softmax32(self.scores(logits, history))

    def __call__(self, logits: np.ndarray, history: Sequence[int] = ()) -> int:
        s = self.scores(logits, history).astype(np.float64)
        p = np.exp(s - s.max())  # the largest score is always kept, so the max is finite
        cdf = np.cumsum(p)
        i = int(np.searchsorted(cdf, self.rng.random() * cdf[-1], side="right"))
        return min(i, int(np.flatnonzero(p)[-1]))  # guards a product that rounded up to the total
