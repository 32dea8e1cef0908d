"""`TurnInput`: a user turn taken as its audio arrives, so that work moves before the end of speech.

What can move depends on the encoder mode (runtime/encoder.py):

- every mode: resampling happens as blocks arrive (the caller feeds 16 kHz), and the part of the
  prompt before the speech (system prompt, or the previous reply's last token and the user header)
  is in the KV cache before the user speaks (`Pipeline.prepare`);
- blocked modes (`blocked-Ns`, `blocked-Ns+fill`): each completed N s block is final (its windows
  never see later audio), so it is encoded and its speech positions are prefilled into the LLM
  while the user is still speaking; after the end of speech only the last, partial block, the
  `+fill` rows (their count depends on where speech ended) and the prompt suffix remain;
- `exact`, `tail-Ns`, `pad-Ns`, `unpadded` (and their `+fill`): nothing of the encoder or the
  speech positions. Their attention spans the whole clip (exact: all 30 s), so a frame's output
  for early audio changes with every later sample, and every speech position waits for the end
  of speech. Exact mode moves only the prompt prefix.

The result is the same as answering the whole audio at once (`Pipeline.respond`): the completed
blocks' embeddings are the offline call's first rows, and prefilling positions in two pieces
gives the same cache (tests/test_turn_input.py checks the reply's tokens).

A turn may be answered speculatively (at silence onset, before the endpointer confirms) and the
reply dropped when the user speaks again: `rollback_point` is where the cache is cut back to, and
the turn keeps taking audio.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from .errors import AudioError, OmniliteError

if TYPE_CHECKING:
    from .encoder import EncoderInput
    from .pipeline import Conversation, Pipeline

log = logging.getLogger(__name__)


class WholeClipEncoder(Protocol):
    """A front end that reads the whole turn at once: its log-mel (or the pieces' log-mels) -> its rows."""

    def mel(self, audio_16k: np.ndarray) -> Any: ...

    def embed(self, mel: Any) -> Any: ...


class WholeTurnStream:
    """What `TurnInput` drives for a `WholeClipEncoder`: audio is kept as it arrives and encoded at the
    end of the turn (each family's encoder says why nothing of it can run earlier)."""

    final = None  # nothing can be prefilled before the end of speech

    def __init__(self, encoder: WholeClipEncoder):
        self.encoder = encoder
        self._audio: list[np.ndarray] = []

    @property
    def samples(self) -> int:
        return sum(a.size for a in self._audio)

    def push(self, audio_16k: np.ndarray) -> int:
        self._audio.append(np.asarray(audio_16k, np.float32).reshape(-1))
        return 0

    def pending(self) -> Any:
        return self.encoder.mel(np.concatenate(self._audio) if self._audio else np.zeros(0, np.float32))

    def finish(self, pending: Any = None) -> Any:
        return self.encoder.embed(self.pending() if pending is None else pending)


class TurnInput:
    """Audio of one user turn (16 kHz mono) fed as it arrives, for `Pipeline.reply_to`."""

    def __init__(self, pipe: "Pipeline", conversation: "Conversation", encoder_mode: str | None = None,
                 ingest: bool = True):
        self.pipe = pipe
        self.conversation = conversation
        self.stream = pipe.encoder.stream(pipe.config.encoder_mode if encoder_mode is None else encoder_mode)
        self.ingest = ingest  # False: keep the audio only; everything runs in the reply (offline respond)
        self.prefilled = 0  # speech positions of this turn already in the LLM's KV cache
        self.prefilled_at = -1  # n_past after them (-1: none; the turn starts at the prepared point)
        self.closed = False
        self.peak = 0.0  # loudest sample so far: a silent turn is refused as a silent file is

    @property
    def samples(self) -> int:
        return self.stream.samples

    def feed(self, audio_16k: np.ndarray) -> int:
        """Add samples; in a blocked mode, encode completed blocks and prefill their positions.
        Returns the speech positions prefilled by this call."""
        if self.closed:
            raise OmniliteError("this turn has been answered; start a new turn with Pipeline.begin_turn.")
        audio_16k = np.asarray(audio_16k, dtype=np.float32).reshape(-1)
        if audio_16k.size:
            self.peak = max(self.peak, float(np.max(np.abs(audio_16k))))
        self.stream.push(audio_16k)
        final = self.stream.final
        if not self.ingest or final is None or len(final) <= self.prefilled:
            return 0
        pipe = self.pipe
        if not pipe._busy.acquire(blocking=False):
            raise OmniliteError("this Pipeline is answering; feed the next turn after that reply ends or is cancelled.")
        try:
            return self._prefill_final(final)
        finally:
            pipe._busy.release()

    def _prefill_final(self, final: np.ndarray) -> int:
        pipe, conv = self.pipe, self.conversation
        pipe._prepare(conv)
        if self.prefilled == 0:
            # Room for the longest turn this can become: drop the history now, not mid-turn.
            pipe._ensure_room(conv, pipe.max_speech_positions)
        new = final[self.prefilled:]
        pipe.llm.eval_embeddings(new)
        self.prefilled = len(final)
        self.prefilled_at = pipe.llm.n_past
        log.debug("turn: %d speech positions prefilled before the end of speech", self.prefilled)
        return len(new)

    @property
    def rollback_point(self) -> int:
        """n_past to cut the cache back to when a reply to this turn is dropped."""
        return self.prefilled_at if self.prefilled_at >= 0 else self.conversation.prepared_at

    def check(self, source: str = "the turn's audio") -> None:
        """The refusals `prepare_speech` gives a whole file: nothing, or only silence, to answer."""
        if self.samples == 0:
            raise AudioError(f"{source} is empty; record at least a short spoken question.")
        if self.peak < 1e-4:
            raise AudioError(f"{source} is silent (peak below -80 dBFS); check the microphone or the file.")

    def pending(self) -> "EncoderInput":
        return self.stream.pending()

    def embeddings(self, pending: "EncoderInput") -> np.ndarray:
        """All speech embeddings of the turn so far (what the offline encoder call returns)."""
        return self.stream.finish(pending)

    def forget(self) -> None:
        """The turn was abandoned (input cleared): cut its positions out of the cache."""
        pipe, conv = self.pipe, self.conversation
        self.closed = True
        if self.prefilled and pipe._conversation is conv and conv.prepared_at >= 0:
            with pipe._busy:
                pipe.llm.truncate(min(conv.prepared_at, pipe.llm.n_past))
        self.prefilled, self.prefilled_at = 0, -1
