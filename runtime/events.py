"""Typed events yielded by `Pipeline.respond` (and later by `Session`)."""

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


Event = TextDelta | AudioChunk | Timing | Done
