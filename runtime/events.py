"""Typed events yielded by `Pipeline.respond` and delivered by `Session.poll`."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class TextDelta:
    """New reply text (whole UTF-8 characters only)."""

    text: str


@dataclass(frozen=True)
class AudioChunk:
    """Reply audio ready to play: mono float32 in [-1, 1]."""

    samples: np.ndarray
    sample_rate: int


@dataclass(frozen=True)
class Timing:
    """Wall time of one stage for this turn (`calls` invocations), or a latency such as TTFA."""

    stage: str
    seconds: float
    calls: int = 1


@dataclass(frozen=True)
class Done:
    """End of the reply, with everything it produced."""

    text: str
    tokens: list[int]
    units: list[int]
    audio: np.ndarray
    sample_rate: int
    timings: dict[str, float] = field(default_factory=dict)
    # Counts for this turn: prompt_tokens (positions evaluated for it), context (positions in the
    # KV cache after its prompt), underruns (Session: blocks the speaker had to fill with silence).
    stats: dict[str, int] = field(default_factory=dict)
    turn: int = 0
    # Every stage call of this turn as (stage, start, end) in seconds since t0 (for waterfalls).
    spans: list[tuple[str, float, float]] = field(default_factory=list)


@dataclass(frozen=True)
class TurnStarted:
    """The VAD heard the user start speaking; `at` is the session time (s of input audio)."""

    turn: int
    at: float


@dataclass(frozen=True)
class TurnEnded:
    """The endpointer closed the user's turn. `end_of_speech` (session time of the last speech
    sample) is t0 for this turn's latencies; the endpointer fired `silence` seconds of audio later."""

    turn: int
    start: float
    end_of_speech: float
    silence: float


@dataclass(frozen=True)
class Interrupted:
    """The reply to `turn` was cut short (the user spoke over it): its queued audio was dropped and
    every stage cancelled. `played` seconds of it had reached the speaker."""

    turn: int
    played: float
    reason: str = "barge-in"


Event = TextDelta | AudioChunk | Timing | Done | TurnStarted | TurnEnded | Interrupted
