"""`Session`: a live conversation over continuous audio.

The microphone side calls `feed(block, rate)` with blocks of any size (10-40 ms is typical) at any
rate; the speaker side calls `read_output(n)` for each block it plays. Between them:

    feed -> stream resampler (16 kHz) -> VAD per 32 ms window -> endpointer
         -> runner thread: the turn's audio into a `TurnInput` as it arrives; at silence onset a
            speculative reply; at the confirmed end of turn that reply is committed
         -> text events; audio into the playback buffer -> read_output

Turn-taking: speech that lasts `min_speech_ms` opens a turn (TurnStarted); `min_silence_ms` of
silence closes it (TurnEnded). t0 for the turn's latencies is the last speech sample, timed by when
the block holding it arrived, not when the endpointer fired.

Work moves before the confirmed end of turn in two ways. While the user speaks, the turn's audio is
fed to a `TurnInput` (runtime/turn.py: in blocked encoder modes completed blocks are encoded and
prefilled; in the others only the prompt prefix moves). At silence onset (`pad_ms` of silence after
the last speech, when the audio the reply needs is complete) the reply starts speculatively: its
text and audio are held back until the endpointer confirms the turn (then they are released at
once), and dropped, with the LLM cache cut back and nothing played, if the user speaks again
first; `wasted_starts` counts those. Speech that opens
a turn while the assistant is still answering is a barge-in: queued audio is dropped at once (the
next output block is silence), every reply stage is cancelled, `Interrupted` is emitted, and the new
turn proceeds. The KV cache keeps the dialogue: a follow-up turn evaluates only its own positions,
and the part before its speech is evaluated while the user is still silent or speaking.

Events (TextDelta, Timing, Done, TurnStarted, TurnEnded, Interrupted) are collected with `poll()`.
A turn's `Done` comes when its audio has been played out; its timings hold TTFT and TTFA measured
from t0 (TTFA when `read_output` hands out the first sample) and its stats the underrun count:
output blocks the speaker had to fill with silence because the vocoder had not kept real time
(`stalled_samples`: their length at `output_rate`; `first_chunk_samples`: the first audio chunk's).
Something must call `read_output` (a speaker, or a loop that discards the audio): the playback
buffer is bounded, and a turn is complete only once its audio has been taken.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .audio import StreamResampler, to_mono
from .errors import AudioError, OmniliteError
from .events import AudioChunk, Done, Event, Interrupted, Timing, TurnEnded, TurnStarted
from .pipeline import Conversation, Pipeline, Reply
from .vad import VAD_RATE, WINDOW, make_vad

log = logging.getLogger(__name__)

_WINDOW_S = WINDOW / VAD_RATE


@dataclass(frozen=True)
class SessionConfig:
    vad: str = "auto"  # "silero" (Silero VAD ONNX), "energy" (no model), "auto" (silero if installed)
    vad_model: Path | None = None  # another Silero VAD ONNX file
    threshold: float = 0.5  # speech probability that opens speech; it closes below threshold - 0.15
    min_speech_ms: int = 160  # speech must last this long to open a turn (or to barge in)
    min_silence_ms: int = 600  # silence that ends the user's turn
    pad_ms: int = 160  # audio kept before the first and after the last speech window
    max_turn_s: float = 29.0  # the encoder sees at most 30 s: a longer turn is closed here
    barge_in: bool = True  # user speech during a reply interrupts it
    playback_buffer_s: float = 30.0  # reply audio queued for the speaker; the vocoder waits beyond it
    # Audio a reply must have queued before the speaker starts it (a jitter buffer): a later first
    # sample, fewer underruns while the vocoder catches up after its first chunk. 0: start at once.
    start_buffer_s: float = 0.0
    # Start the reply at silence onset, before min_silence_ms confirms the end of the turn (held back
    # until then, dropped if the user speaks again): the hangover stops being dead time.
    speculative_start: bool = True
    # False: no automatic end of turn (push-to-talk): every block belongs to the open turn and
    # `commit()` ends it. The VAD still runs for barge-in only when this is True.
    turn_detection: bool = True
    instructions: str | None = None  # a system prompt instead of the bundle's (None: the bundle's)

    def windows(self, ms: float) -> int:
        return max(1, int(round(ms / 1000 / _WINDOW_S)))


@dataclass
class _Job:
    """A reply to answer: committed (the turn is confirmed) or speculative (started at silence onset)."""

    turn: int
    t0: float
    speech_end: int  # 16 kHz input position of the last speech sample: what the reply's audio ends on
    committed: bool = True
    reply: Reply | None = None
    cancelled: bool = False
    play: "_Playback | None" = None
    held: list = field(default_factory=list)  # events of a speculative reply, until it is committed
    released: float | None = None  # when a speculative reply was committed


@dataclass
class _Feed:
    """Audio of the open turn for the runner's `TurnInput` (the first one of a turn begins it)."""

    turn: int
    audio: np.ndarray  # 16 kHz


@dataclass
class _Forget:
    """The open turn was cleared: its positions leave the LLM cache."""

    turn: int


@dataclass
class _Playback:
    """Reply audio waiting for the speaker, and the bookkeeping of the turn it belongs to."""

    turn: int = 0
    t0: float = 0.0
    chunks: deque = field(default_factory=deque)
    buffered: int = 0
    played: int = 0
    first_audio: float | None = None
    released: float | None = None  # a speculative reply: when the confirmed turn released it
    underruns: int = 0
    stalled: int = 0  # samples of silence the speaker got mid-reply (the underruns' total length)
    first_chunk: int = 0  # samples of the first audio chunk the pipeline handed over
    finished: bool = False  # the reply is complete: no more audio will come
    done: Done | None = None
    timings: list[Timing] = field(default_factory=list)


class Session:
    def __init__(self, pipeline: Pipeline, config: SessionConfig = SessionConfig()):
        if not 0.0 < config.threshold < 1.0:
            raise OmniliteError(f"VAD threshold {config.threshold} is outside (0, 1); use e.g. 0.5.")
        if not 0.0 <= config.start_buffer_s < config.playback_buffer_s:
            raise OmniliteError(f"start_buffer_s ({config.start_buffer_s}) must be >= 0 and below playback_buffer_s "
                                f"({config.playback_buffer_s}), or the speaker would wait for audio the vocoder may not queue.")
        if config.min_silence_ms < config.pad_ms:
            raise OmniliteError(f"min_silence_ms ({config.min_silence_ms}) must be at least pad_ms ({config.pad_ms}); "
                                "raise min_silence_ms or lower pad_ms.")
        self.pipeline = pipeline
        self.config = config
        self.vad = make_vad(config.vad, config.vad_model)
        self.output_rate = pipeline.sample_rate
        pipeline.prefix_for(config.instructions)  # refuse instructions the bundle cannot take, now
        self.conversation = Conversation(system=config.instructions)
        self._lock = threading.RLock()
        self._events: queue.Queue[Event] = queue.Queue()
        self._errors: list[BaseException] = []
        # input side
        self._resampler: StreamResampler | None = None
        self._pending = np.zeros(0, np.float32)  # 16 kHz samples short of a full VAD window
        self._pos = 0  # 16 kHz samples consumed by the VAD
        self._clock: deque[tuple[float, float]] = deque(maxlen=256)  # (16 kHz input position, capture time)
        self._preroll: deque[np.ndarray] = deque(maxlen=config.windows(config.pad_ms) + config.windows(config.min_speech_ms))
        self._speech_run = 0
        self._in_speech = False
        self._utterance: list[np.ndarray] = []
        self._utt_start = 0
        self._last_speech_end = 0
        self._silence_run = 0
        self._turn = 0
        self._fed = 0  # windows of the open turn's utterance handed to the runner
        self.wasted_starts = 0  # speculative replies dropped because the user spoke again
        # reply side
        self._jobs: queue.Queue[_Job | _Feed | _Forget | None] = queue.Queue()
        self._job: _Job | None = None  # queued or running
        self._input = None  # the runner's TurnInput for the open turn (runner thread only)
        self._input_turn = 0
        self._play: _Playback | None = None
        self._room = threading.Condition(self._lock)  # playback buffer has room / was cleared
        self._closed = False
        self._runner = threading.Thread(target=self._run, name="omnilite-session", daemon=True)
        self._runner.start()

    # --- microphone side -----------------------------------------------------------------------

    def feed(self, pcm: np.ndarray, sample_rate: int, captured_at: float | None = None) -> None:
        """Add a block of microphone audio ((n,) or (n, channels), any rate). `captured_at`
        (time.perf_counter()) is when its last sample was captured; by default, now."""
        now = time.perf_counter() if captured_at is None else captured_at
        self._raise_errors()
        if self._closed:
            raise OmniliteError("this session is closed; open a new Session.")
        if not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0:
            raise AudioError(f"feed() got sample rate {sample_rate!r}; pass the microphone rate in Hz, e.g. 16000.")
        block = to_mono(pcm)
        if not np.isfinite(block).all():
            raise AudioError("the audio block contains NaN or infinite samples; check the microphone stream.")
        with self._lock:
            if self._resampler is None:
                self._resampler = StreamResampler(int(sample_rate), VAD_RATE)
            elif self._resampler.src_rate != sample_rate:
                raise AudioError(f"feed() got {sample_rate} Hz after {self._resampler.src_rate} Hz; a session takes one "
                                 "input rate, so open a new Session for the new rate.")
            audio = np.concatenate([self._pending, self._resampler.push(block)])
            self._clock.append((self._resampler.received * VAD_RATE / self._resampler.src_rate, now))
            n = len(audio) // WINDOW * WINDOW
            for start in range(0, n, WINDOW):
                self._window(audio[start:start + WINDOW])
            self._pending = audio[n:]

    def _time_of(self, position: float) -> float:
        """Capture time of 16 kHz input position `position`, interpolated between block arrivals."""
        prev = None
        for pos, t in self._clock:
            if pos >= position:
                if prev is None:
                    return t - (pos - position) / VAD_RATE
                p0, t0 = prev
                return t0 + (t - t0) * (position - p0) / max(pos - p0, 1e-9)
            prev = (pos, t)
        pos, t = self._clock[-1]
        return t + (position - pos) / VAD_RATE

    def _window(self, window: np.ndarray) -> None:
        cfg = self.config
        if not cfg.turn_detection:
            self._ptt_window(window)
            return
        p = self.vad(window)
        start = self._pos
        self._pos += WINDOW
        if not self._in_speech:
            self._preroll.append(window)
            self._speech_run = self._speech_run + 1 if p >= cfg.threshold else 0
            if self._speech_run >= cfg.windows(cfg.min_speech_ms):
                self._open_turn(start + WINDOW - self._speech_run * WINDOW)
            return
        self._utterance.append(window)
        if p >= cfg.threshold - 0.15:
            if self._silence_run and self._job is not None and not self._job.committed:
                self._drop_speculation()  # the user went on speaking
            self._silence_run = 0
            self._last_speech_end = self._pos
        else:
            self._silence_run += 1
        pad = cfg.windows(cfg.pad_ms)
        # Audio up to the last speech sample + pad is in the turn whatever comes next.
        self._feed_turn(min(self._pos, self._last_speech_end + pad * WINDOW))
        too_long = (self._pos - self._utt_start) / VAD_RATE >= cfg.max_turn_s
        if self._silence_run >= cfg.windows(cfg.min_silence_ms) or too_long:
            self._close_turn(self._pos if too_long else self._last_speech_end)
        elif cfg.speculative_start and self._silence_run == pad and self._job is None:
            self._speculate()

    def _ptt_window(self, window: np.ndarray) -> None:
        """Push-to-talk: every window joins the open turn (one opens with the first); `commit()` ends it."""
        if not self._in_speech:
            self._utterance, self._utt_start, self._fed = [], self._pos, 0
            self._in_speech = True
            self._turn += 1
            self._events.put(TurnStarted(self._turn, self._pos / VAD_RATE))
        self._pos += WINDOW
        self._utterance.append(window)
        if float(np.max(np.abs(window))) > 0:
            self._last_speech_end = self._pos
        self._feed_turn(self._pos)

    def _feed_turn(self, upto: int) -> None:
        """Hand the open turn's audio up to input position `upto` to the runner's TurnInput."""
        k = (upto - self._utt_start) // WINDOW
        if k > self._fed:
            self._jobs.put(_Feed(self._turn, np.concatenate(self._utterance[self._fed:k])))
            self._fed = k

    def _speculate(self) -> None:
        """Silence onset: the reply's audio is complete; start answering before the end is confirmed."""
        speech_end = self._last_speech_end
        job = _Job(self._turn, self._time_of(speech_end), speech_end, committed=False)
        self._job = job
        self._jobs.put(job)

    def _drop_speculation(self) -> None:
        job = self._job
        self._job = None
        job.cancelled = True
        if job.reply is not None:
            job.reply.drop()
        self.wasted_starts += 1
        self._room.notify_all()

    def _open_turn(self, speech_start: int) -> None:
        cfg = self.config
        if self._responding():
            if not cfg.barge_in:
                self._speech_run = 0  # the assistant has the floor
                return
            self._interrupt()
        pad = cfg.windows(cfg.pad_ms)
        keep = min(len(self._preroll), self._speech_run + pad)
        self._utterance = list(self._preroll)[-keep:]
        self._utt_start = self._pos - keep * WINDOW
        self._preroll.clear()
        self._in_speech = True
        self._silence_run = 0
        self._last_speech_end = self._pos
        self._turn += 1
        self._fed = 0
        self._events.put(TurnStarted(self._turn, speech_start / VAD_RATE))

    def _close_turn(self, speech_end: int) -> None:
        pad = self.config.windows(self.config.pad_ms)
        end = min(self._pos, speech_end + pad * WINDOW)
        self._feed_turn(end)
        self._events.put(TurnEnded(self._turn, self._utt_start / VAD_RATE, speech_end / VAD_RATE,
                                   (self._pos - speech_end) / VAD_RATE))
        self._in_speech = False
        self._speech_run = 0
        self._utterance = []
        job = self._job
        if job is not None and not job.committed:
            if job.speech_end == speech_end and job.turn == self._turn:
                self._commit(job)
                return
            self._drop_speculation()
        job = _Job(self._turn, self._time_of(speech_end), speech_end)
        self._job = job
        self._jobs.put(job)

    def _commit(self, job: _Job) -> None:
        """The endpointer confirmed the turn a speculative reply answers: release what it held."""
        job.committed = True
        if job.reply is not None:
            job.reply.commit()
        job.released = time.perf_counter()
        play = job.play
        if play is not None:
            play.released = job.released
            self._play = play
            for event in job.held:
                self._events.put(event)
            job.held = []
            if play.finished and play.buffered == 0 and (play.first_audio is not None or not play.done.audio.size):
                self._complete(play)
        self._room.notify_all()

    def _responding(self) -> bool:
        return self._job is not None or self._play is not None

    def _interrupt(self, reason: str = "barge-in") -> None:
        """Barge-in: silence the speaker now, cancel every stage, drop what is queued."""
        job, play = self._job, self._play
        turn = job.turn if job is not None else play.turn
        played = play.played / self.output_rate if play is not None and play.turn == turn else 0.0
        self._play = None
        self._room.notify_all()
        if job is not None:
            job.cancelled = True
            if job.reply is not None:
                job.reply.cancel()
            self._job = None
        self._events.put(Interrupted(turn, played, reason))

    # --- speaker side --------------------------------------------------------------------------

    def read_output(self, n: int) -> np.ndarray:
        """The next `n` samples for the speaker (at `output_rate`); silence when nothing is due."""
        out = np.zeros(n, np.float32)
        with self._lock:
            play = self._play
            if play is None:
                return out
            if (play.first_audio is None and not play.finished
                    and play.buffered < self.config.start_buffer_s * self.output_rate):
                return out  # still filling the start buffer: not an underrun
            got = 0
            while got < n and play.chunks:
                chunk = play.chunks[0]
                take = min(n - got, len(chunk))
                out[got:got + take] = chunk[:take]
                got += take
                if take == len(chunk):
                    play.chunks.popleft()
                else:
                    play.chunks[0] = chunk[take:]
            if got:
                if play.first_audio is None:
                    play.first_audio = time.perf_counter()
                play.buffered -= got
                play.played += got
                self._room.notify_all()
            if got < n:
                if play.finished:
                    self._complete(play)
                elif play.first_audio is not None:
                    play.underruns += 1  # mid-reply and nothing to play: the vocoder fell behind
                    play.stalled += n - got
        return out

    def _push_audio(self, job: _Job, samples: np.ndarray) -> None:
        limit = int(self.config.playback_buffer_s * self.output_rate)
        with self._lock:
            while True:
                play = job.play
                if job.cancelled or (job.committed and self._play is not play):
                    return  # interrupted: this audio is never played
                if play.buffered < limit or play.buffered == 0:
                    if not play.first_chunk:
                        play.first_chunk = len(samples)
                    play.chunks.append(samples)
                    play.buffered += len(samples)
                    return
                self._room.wait(0.1)

    def _complete(self, play: _Playback) -> None:
        """The turn's reply has been played out: publish its timings and Done."""
        self._play = None
        if self._job is not None and self._job.turn == play.turn:
            self._job = None
        done = play.done
        timings = dict(done.timings)
        stats = dict(done.stats, underruns=play.underruns, stalled_samples=play.stalled, first_chunk_samples=play.first_chunk)
        if "ttfa" in timings:
            timings["ttfa_ready"] = timings["ttfa"]  # when the pipeline handed the first audio over
        if play.released is not None:
            # A speculative reply's first text and audio were held until the turn was confirmed:
            # the user saw and could hear them only from then on.
            for name in ("ttft", "ttfa_ready"):
                if name in timings:
                    timings[name] = max(timings[name], play.released - play.t0)
            stats["speculative"] = 1
        if play.first_audio is not None:
            timings["ttfa"] = play.first_audio - play.t0  # when the speaker took the first sample
        else:
            timings.pop("ttfa", None)
        for t in play.timings:
            if t.stage == "ttfa":
                if "ttfa" in timings:
                    self._events.put(Timing("ttfa", timings["ttfa"]))
                self._events.put(Timing("ttfa_ready", timings["ttfa_ready"]))
            elif t.stage == "ttft":
                self._events.put(Timing("ttft", timings["ttft"]))
            else:
                self._events.put(t)
        self._events.put(dataclasses.replace(done, timings=timings, stats=stats, turn=play.turn))

    # --- reply runner --------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self.pipeline.prepare(self.conversation)  # the system prompt, before anyone speaks
            while True:
                item = self._jobs.get()
                if item is None:
                    return
                if isinstance(item, _Feed):
                    self._ingest(item)
                    continue
                if isinstance(item, _Forget):
                    if self._input is not None and self._input_turn == item.turn:
                        self._input.forget()
                        self._input = None
                    continue
                if not self._answer(item):
                    continue  # dropped: the turn stays open for more audio
                if self._input is not None and not self._input.closed:
                    self._input.forget()  # never answered (cancelled first, or refused): out of the cache
                self._input = None
                # The next user turn's header goes into the cache while this reply is played.
                self.pipeline.prepare(self.conversation)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread by poll()/feed()
            log.debug("session runner failed", exc_info=True)
            self._errors.append(e)
            self._events.put(None)  # wake a waiting poll()

    def _ingest(self, item: _Feed) -> None:
        if self._input is None or self._input_turn != item.turn:
            self._input = self.pipeline.begin_turn(self.conversation)
            self._input_turn = item.turn
        self._input.feed(item.audio)

    def _answer(self, job: _Job) -> bool:
        """Run one reply; False when it was a speculative start that got dropped (turn still open)."""
        with self._lock:
            if job.cancelled:
                return job.committed  # a dropped speculative start leaves its turn's input as fed
            if self._input is None or self._input_turn != job.turn:
                log.warning("turn %d has no audio to answer", job.turn)
                return True
            reply = self.pipeline.reply_to(self._input, t0=job.t0, speculative=not job.committed)
            job.reply = reply
            play = job.play = _Playback(turn=job.turn, t0=job.t0, released=job.released)
            if job.committed:
                self._play = play
        timings: list[Timing] = []
        done: Done | None = None
        try:
            for event in reply:
                if isinstance(event, AudioChunk):
                    self._push_audio(job, event.samples)
                elif isinstance(event, Timing):
                    timings.append(event)
                elif isinstance(event, Done):
                    done = event
                elif not job.cancelled:
                    with self._lock:
                        (self._events.put if job.committed else job.held.append)(event)
        except AudioError as e:
            # An utterance the pipeline refuses (e.g. near-silent) ends this turn, not the session.
            log.warning("turn %d skipped: %s", job.turn, e)
            with self._lock:
                if self._play is play:
                    self._play = None
                if self._job is job:
                    self._job = None
            return True
        if reply.dropped:
            return False
        with self._lock:
            if done is None or job.cancelled:
                return True
            play.done, play.timings, play.finished = done, timings, True
            if job.committed and self._play is play and play.buffered == 0 and (play.first_audio is not None or not done.audio.size):
                self._complete(play)
        return True


    # --- explicit turn control (push-to-talk, servers) ---------------------------------------

    def commit(self) -> bool:
        """End the open user turn now, as if the endpointer had confirmed it, and answer it (with
        `turn_detection=False` this is how a turn ends). False when no turn is open."""
        self._raise_errors()
        with self._lock:
            if not self.config.turn_detection and self._pending.size:
                # The last partial window, zero-padded: push-to-talk ends where the caller says.
                self._window(np.pad(self._pending, (0, WINDOW - self._pending.size)))
                self._pending = np.zeros(0, np.float32)
            if not self._in_speech or not self._utterance:
                return False
            # With the VAD, speech ended at its last speech window (now, if still speaking).
            self._close_turn(self._last_speech_end if self.config.turn_detection else self._pos)
            return True

    def clear_input(self) -> None:
        """Drop the open turn's audio (not yet answered) and any audio short of a VAD window."""
        with self._lock:
            self._pending = np.zeros(0, np.float32)
            self._preroll.clear()
            self._speech_run = 0
            if not self._in_speech:
                return
            job = self._job
            if job is not None and not job.committed:
                self._drop_speculation()
                self.wasted_starts -= 1  # the caller cleared the turn: not a wasted start
            self._in_speech = False
            self._utterance = []
            self._jobs.put(_Forget(self._turn))

    def cancel_reply(self) -> bool:
        """Stop the reply in progress (queued audio dropped, every stage cancelled) and emit
        `Interrupted` with reason "cancelled". False when nothing is being answered or played."""
        with self._lock:
            if not self._responding() or (self._job is not None and not self._job.committed and self._play is None):
                return False
            self._interrupt(reason="cancelled")
            return True

    # --- consumer API --------------------------------------------------------------------------

    def poll(self, timeout: float = 0.0) -> list[Event]:
        """Events so far (waiting up to `timeout` seconds for the first). Raises a runner error."""
        events: list[Event] = []
        try:
            first = self._events.get(timeout=timeout) if timeout > 0 else self._events.get_nowait()
            if first is not None:
                events.append(first)
            while True:
                e = self._events.get_nowait()
                if e is not None:
                    events.append(e)
        except queue.Empty:
            pass
        self._raise_errors()
        return events

    @property
    def idle(self) -> bool:
        """No user speech open, no reply pending, running or being played."""
        with self._lock:
            return not self._in_speech and not self._responding()

    @property
    def turns(self) -> int:
        return self._turn

    def _raise_errors(self) -> None:
        if self._errors:
            raise self._errors[0]

    def close(self) -> None:
        """Cancel any reply and stop the runner thread (the pipeline stays open)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            job = self._job
            if job is not None:
                job.cancelled = True
                if job.reply is not None:
                    job.reply.cancel()
            self._play = None
            self._room.notify_all()
        self._jobs.put(None)
        self._runner.join()

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
