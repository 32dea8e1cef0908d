"""The torch-free LLaMA-Omni pipeline: speech in, streamed text and speech out.

encoder (ONNX) -> LLM (llama.cpp, speech embeddings spliced into the prompt) -> every `omega`
generated tokens, their hidden states -> streaming CTC unit generator (ONNX, KV cache) ->
ring-buffered unit vocoder (ONNX) -> AudioChunk events.

Two ways to run the same stage code:
- ``overlapped`` (default): the LLM, the unit generator and the vocoder each run in their own
  worker thread, joined by bounded channels, so the LLM keeps generating while chunk k is turned
  into units and chunk k-1 into audio.
- ``sequential``: the stages run one after another in the caller's thread (the baseline the
  benchmark compares against).
Both give the same tokens, units and samples. A reply can be cancelled (barge-in): every stage
stops at its next hand-off, queued audio is dropped and the worker threads are joined.

A `Conversation` keeps the dialogue in the LLM's KV cache across replies: a follow-up turn
evaluates only its own positions (the previous reply's last token, the user header, the speech and
the instruction), never the history again.
"""

from __future__ import annotations

import codecs
import importlib
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .audio import prepare_speech
from .bundle import Bundle, load_bundle
from .encoder import SpeechEncoder
from .errors import BundleError, OmniliteError
from .events import AudioChunk, Done, Event, TextDelta, Timing
from .llm import LlamaCppLLM, stage_llm_config
from .onnx_session import SessionOptions
from .streaming import CancelToken, Cancelled, Channel, StageClock
from .turn import TurnInput
from .units import StreamingUnitGenerator
from .vocoder import UnitVocoder, VocoderStreamConfig

log = logging.getLogger(__name__)

SUPPORTED_FAMILIES = ("llama-omni",)
# Families with their own pipeline class (a subclass sharing this one's stages and drivers),
# imported only when such a bundle is loaded.
FAMILY_PIPELINES = {"llama-omni2": "omnilite.runtime.omni2.pipeline:Omni2Pipeline",
                    "step-audio2": "omnilite.runtime.step_audio2.pipeline:StepAudio2Pipeline",
                    "fun-audio-chat": "omnilite.runtime.fun_audio_chat.pipeline:FunAudioChatPipeline"}
MODES = ("overlapped", "sequential")
STAGES = ("resample", "mel", "encoder", "llm_prefill", "llm_decode", "speech_generator", "vocoder")
# What separates the previous assistant reply from the next user turn's speech in the llama_3
# template (used only for bundles exported before the manifest stored these ids).
_TURN_PREFIX_TEXT = "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
# LLaMA-Omni's first speech chunk, in text tokens (benchmarks/results/turn_latency-*.md measures it).
FIRST_OMEGA = 3
_JOIN_TIMEOUT_S = 60.0  # a stage finishes its current chunk well within this; more means a hang


@dataclass(frozen=True)
class PipelineConfig:
    # None: the bundle's default mode (manifest "encoder"."mode"); "exact" pads to 30 s as trained;
    # fast modes (e.g. "tail-2s+fill", "unpadded") are listed in runtime/encoder.py.
    encoder_mode: str | None = None
    omega: int | None = None  # text tokens per speech chunk; None: the bundle's (10)
    # Text tokens per speech chunk until the first audio sample is out (LLaMA-Omni): fewer gives
    # earlier first audio at no cost in accuracy (the unit generator and the vocoder stream exactly);
    # None: FIRST_OMEGA, at most omega.
    first_omega: int | None = None
    max_new_tokens: int = 256
    ignore_eos: bool = False  # benchmarks force a fixed reply length with random weights
    vocoder: VocoderStreamConfig = field(default_factory=VocoderStreamConfig)
    threads: int | None = None
    # Per stage ("encoder", "llm", "speech_generator", "vocoder"), from a device profile; else `threads`.
    stage_threads: dict[str, int] = field(default_factory=dict)
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    n_gpu_layers: int = 0
    verify_bundle: bool = True
    mode: str = "overlapped"  # "overlapped" (a worker thread per stage) or "sequential"
    # Chunks held between two stages. Bounded so memory stays flat and a fast LLM cannot run far
    # ahead of what will be spoken (the device profile will set this; 4 suits a CPU).
    queue_size: int = 4
    # Until the first audio sample (overlapped mode), the LLM stays one text chunk ahead of the speech
    # generator instead of `queue_size`: past that its decoding only takes cores from the stages on the
    # path to the first sample (it needs R tokens per write). Same tokens and audio either way.
    first_audio_priority: bool = True
    event_queue_size: int = 256  # events waiting for the caller (text, audio chunks)
    n_ctx: int | None = None  # LLM context positions; None: one turn (prompt + 30 s of speech + reply), >= 2048
    profile_dir: str | None = None  # benchmarks: ONNX Runtime per-node profiles go here (see benchmarks/cost.py)

    def threads_for(self, stage: str) -> int | None:
        return self.stage_threads.get(stage, self.threads)


@dataclass
class Conversation:
    """A dialogue kept in the pipeline's KV cache. Pass the same object to consecutive
    `Pipeline.respond` calls; each follow-up turn evaluates only its own positions."""

    system: str | None = None  # instructions instead of the bundle's system prompt (None: the bundle's)
    turns: int = 0  # completed (or interrupted after the reply began) assistant turns
    pending: list[int] = field(default_factory=list)  # the last reply token, not yet in the cache
    prepared_at: int = -1  # n_past where the pre-speech part of the next user turn ends; -1: not yet
    prepared_tokens: int = 0  # positions that preparation evaluated


@dataclass
class _ReplyState:
    tokens: list[int] = field(default_factory=list)
    units: list[int] = field(default_factory=list)
    audio: list[np.ndarray] = field(default_factory=list)
    latency: dict[str, float] = field(default_factory=dict)
    stats: dict[str, int] = field(default_factory=dict)


_TEXT, _HIDDEN = 0, 1
_LLM_DONE, _VOC_DONE = object(), object()


class Pipeline:
    def __init__(self, bundle: Bundle, config: PipelineConfig = PipelineConfig()):
        if bundle.family not in SUPPORTED_FAMILIES:
            raise BundleError(f"{bundle.path} is a '{bundle.family}' bundle, which this omnilite cannot run; upgrade omnilite.")
        ort_for, prompt = self._open_shared(bundle, config)
        if "turn_prefix_ids" in prompt:
            self.turn_prefix_ids = list(prompt["turn_prefix_ids"])
        else:
            # Bundles exported before multi-turn support: the GGUF carries the same Llama-3
            # tokenizer, so its tokenization of the template's turn separator is the same ids.
            self.turn_prefix_ids = self.llm.tokenize(_TURN_PREFIX_TEXT, special=True)
            log.info("bundle has no turn_prefix_ids; tokenized the turn separator with the GGUF tokenizer: %s",
                     self.turn_prefix_ids)
        self.units = StreamingUnitGenerator(bundle, ort_for("speech_generator"))
        self.vocoder = UnitVocoder(bundle, ort_for("vocoder"))
        self.omega = int(config.omega or bundle["streaming"]["omega"])
        self.first_omega = min(self.omega, int(config.first_omega or FIRST_OMEGA))
        if self.omega < 1 or self.first_omega < 1:
            raise OmniliteError(f"omega must be at least 1 text token per chunk, got {self.omega} (first {self.first_omega}).")
        self.sample_rate = self.vocoder.sample_rate
        self._busy = threading.Lock()  # one reply at a time: the stages hold per-reply state
        self._conversation: Conversation | None = None  # the one whose history is in the KV cache

    def _open_shared(self, bundle: Bundle, config: PipelineConfig) -> tuple[Callable[[str], SessionOptions], dict]:
        """What every family opens the same way: config checks, the speech encoder, the prompt ids
        and the LLM with a context sized for one turn. Returns the ORT options per stage name and the
        prompt section."""
        if config.mode not in MODES:
            raise OmniliteError(f"pipeline mode {config.mode!r} is unknown; use one of: {', '.join(MODES)}.")
        if config.queue_size < 1 or config.event_queue_size < 1:
            raise OmniliteError("queue sizes must be at least 1 chunk; raise queue_size / event_queue_size.")
        self.bundle = bundle
        self.config = config
        self.first_omega: int | None = None  # None: the first chunk is `omega` tokens like the rest
        def ort_for(stage: str) -> SessionOptions:
            return SessionOptions(providers=config.providers, intra_op_threads=config.threads_for(stage) or 0,
                                  profile_dir=config.profile_dir)

        self.encoder = self._speech_encoder(bundle, ort_for("encoder"))
        llm_cfg = bundle["llm"]
        prompt = llm_cfg["prompt"]
        self.prefix_ids = list(prompt["prefix_ids"])
        self.suffix_ids = list(prompt["suffix_ids"])
        self.eos_ids = frozenset(llm_cfg["eos_ids"])
        # Room for the prompt, 30 s of speech positions and the reply.
        self.max_speech_positions = bundle["encoder"]["max_mel_frames"] // bundle["encoder"]["frames_per_position"]
        needed = len(self.prefix_ids) + len(self.suffix_ids) + self.max_speech_positions + config.max_new_tokens + 8
        n_ctx = config.n_ctx or max(2048, needed)
        if n_ctx < needed:
            raise OmniliteError(f"n_ctx={n_ctx} cannot hold one turn ({needed} positions with "
                                f"max_new_tokens={config.max_new_tokens}); raise n_ctx or lower max_new_tokens.")
        self.llm = LlamaCppLLM(bundle.file("llm"), stage_llm_config(bundle, "llm", n_ctx=n_ctx, n_threads=config.threads_for("llm"),
                                                                    n_gpu_layers=config.n_gpu_layers))
        return ort_for, prompt

    def _speech_encoder(self, bundle: Bundle, options: SessionOptions):
        """The speech front end + encoder stage; a family with its own front end overrides this."""
        return SpeechEncoder(bundle, options)

    @classmethod
    def load(cls, bundle: str | Path, config: PipelineConfig = PipelineConfig()) -> "Pipeline":
        """Load a bundle; the manifest's family picks the pipeline class (never the caller)."""
        b = load_bundle(bundle, verify=config.verify_bundle)
        if cls is Pipeline and b.family in FAMILY_PIPELINES:
            module, name = FAMILY_PIPELINES[b.family].split(":")
            cls = getattr(importlib.import_module(module), name)
        return cls(b, config)

    def close(self) -> None:
        self.llm.close()

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- public API ----------------------------------------------------------------------------

    def respond(self, audio: np.ndarray, sample_rate: int, *, conversation: Conversation | None = None,
                t0: float | None = None, mode: str | None = None) -> Iterator[Event]:
        """Answer one spoken question with streamed events. Without a `conversation` every call
        starts afresh; with one, the question is the next turn of that dialogue. `t0`
        (time.perf_counter()) is the end of the user's speech; by default this call, as the audio
        is complete. Closing the iterator early cancels the reply."""
        return iter(self.start_reply(audio, sample_rate, conversation=conversation, t0=t0, mode=mode))

    def start_reply(self, audio: np.ndarray, sample_rate: int, *, conversation: Conversation | None = None,
                    t0: float | None = None, mode: str | None = None) -> "Reply":
        """Like `respond`, but returns the `Reply` itself, whose `cancel()` may be called from any thread."""
        return Reply(self, conversation or Conversation(), t0, self._mode(mode), audio=(audio, sample_rate))

    def begin_turn(self, conversation: Conversation, encoder_mode: str | None = None) -> TurnInput:
        """A user turn whose audio (16 kHz mono) is fed as it arrives (`TurnInput.feed`); answer it with
        `reply_to`. In blocked encoder modes completed blocks are encoded and prefilled while the user
        speaks (runtime/turn.py says what each mode can move)."""
        return TurnInput(self, conversation, encoder_mode)

    def reply_to(self, turn: TurnInput, *, t0: float | None = None, mode: str | None = None,
                 speculative: bool = False) -> "Reply":
        """The reply to a fed turn: only what the end of speech decides runs now. A `speculative`
        reply (started before the end of the turn is confirmed) runs and streams as usual, but the
        conversation records it only after `Reply.commit()`; `Reply.drop()` (the user spoke again)
        cuts the cache back to the turn as fed and leaves the turn open for more audio."""
        if turn.pipe is not self:
            raise OmniliteError("this turn was begun on another Pipeline; feed it to the one that answers.")
        return Reply(self, turn.conversation, t0, self._mode(mode), turn=turn, speculative=speculative)

    def _mode(self, mode: str | None) -> str:
        mode = mode or self.config.mode
        if mode not in MODES:
            raise OmniliteError(f"pipeline mode {mode!r} is unknown; use one of: {', '.join(MODES)}.")
        return mode

    def prepare(self, conversation: Conversation) -> int:
        """Evaluate the part of the conversation's next user turn that precedes the speech (the system
        prompt for the first turn; the last reply token and the user header later), so that it is
        done before the user stops speaking. Returns the positions evaluated now (0 if already done)."""
        with self._busy:
            return self._prepare(conversation)

    # --- LLM prompt bookkeeping ------------------------------------------------------------------

    @property
    def system_prompt(self) -> str | None:
        """The bundle's system prompt: stored by the exporter, or read from the rendered ChatML prompt
        (LLaMA-Omni2 bundles store the text its chat template rendered, with Qwen's default system turn)."""
        prompt = self.bundle["llm"]["prompt"]
        if "system" in prompt:
            return prompt["system"]
        m = re.match(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", prompt.get("text", ""), re.S)
        return m.group(1) if m else None

    def prefix_for(self, system: str | None) -> list[int]:
        """The prompt ids before the first user turn's speech, with `system` as the instructions.
        The bundle stores them tokenized with its own system prompt; that prompt's tokens are found
        in them and replaced by the new text's (the template's special tokens stay as exported)."""
        default = self.system_prompt
        if system is None or system == default:
            return self.prefix_ids
        if not system.strip():
            raise OmniliteError("the instructions are empty; pass a system prompt, or None for the bundle's own.")
        old = self.llm.tokenize(default, special=False) if default else []
        at = next((i for i in range(len(self.prefix_ids) - len(old) + 1) if old and self.prefix_ids[i:i + len(old)] == old), -1)
        if at < 0:
            raise OmniliteError(f"{self.bundle.path}'s prompt does not hold its system prompt as plain tokens, so it "
                                "cannot take other instructions; use the bundle's own (re-export it to store the template).")
        return self.prefix_ids[:at] + self.llm.tokenize(system, special=False) + self.prefix_ids[at + len(old):]

    def _claim(self, conv: Conversation) -> None:
        if conv is self._conversation:
            return
        if conv.turns:
            raise OmniliteError("this conversation's history is no longer in the LLM cache (another conversation "
                                "used the pipeline since); start a new Conversation.")
        conv.prepared_at = -1
        self._conversation = conv

    def _eval_prompt_ids(self, ids: list[int]) -> None:
        """Evaluate prompt ids into the KV cache (a family that keeps per-position state hooks in here)."""
        self.llm.eval_tokens(ids)

    def _prepare(self, conv: Conversation) -> int:
        self._claim(conv)
        if conv.prepared_at >= 0:
            return 0
        if conv.turns == 0:
            ids = self.prefix_for(conv.system)
            self.llm.reset()
        else:
            ids = conv.pending + self.turn_prefix_ids
        self._eval_prompt_ids(ids)
        conv.pending = []
        conv.prepared_at = self.llm.n_past
        conv.prepared_tokens = len(ids)
        return len(ids)

    def _ensure_room(self, conv: Conversation, speech_positions: int) -> bool:
        """Make room for a turn of `speech_positions` and its reply; True when the history was dropped."""
        needed = speech_positions + len(self.suffix_ids) + self.config.max_new_tokens + 1
        if not conv.turns or self.llm.n_past + needed <= self.llm.n_ctx:
            return False
        log.warning("the conversation no longer fits n_ctx=%d (%d + %d positions); dropping the history of %d turns",
                    self.llm.n_ctx, self.llm.n_past, needed, conv.turns)
        conv.turns, conv.pending, conv.prepared_at = 0, [], -1
        self._prepare(conv)
        return True

    def _prefill(self, conv: Conversation, turn: TurnInput, embeds: np.ndarray, state: _ReplyState) -> tuple[np.ndarray, np.ndarray]:
        """Evaluate what the turn has not yet put into the cache: its last speech positions and the
        prompt suffix. Returns the last position's (logits, hidden)."""
        self._prepare(conv)
        if turn.prefilled and self.llm.n_past != turn.prefilled_at:
            raise OmniliteError("the LLM cache moved since this turn was fed (another reply ran); begin the turn again.")
        if self._ensure_room(conv, len(embeds) - turn.prefilled):
            turn.prefilled, turn.prefilled_at = 0, -1  # the history went, and the turn's early positions with it
            state.stats["history_dropped"] = 1
        rest = embeds[turn.prefilled:]
        first = None
        try:
            if len(rest):
                self.llm.eval_embeddings(rest)
            first = self.llm.eval_tokens(self.suffix_ids, want_last=True)
        finally:
            if first is None and conv.prepared_at >= 0:  # failed midway: back to as fed, not half a turn
                self.llm.truncate(min(turn.rollback_point, self.llm.n_past))
        state.stats["prompt_tokens"] = conv.prepared_tokens + len(embeds) + len(self.suffix_ids)
        state.stats["prefilled_early"] = turn.prefilled
        state.stats["context"] = self.llm.n_past
        return first

    def _finish_turn(self, conv: Conversation, tokens: list[int], turn: TurnInput | None = None, dropped: bool = False) -> None:
        """Record where the dialogue stands after a reply (complete, cut at max_new_tokens or cancelled).
        A dropped reply (a speculative start the user talked over) leaves no trace: the cache goes
        back to the turn as fed, and the turn stays open."""
        if dropped and turn is not None:
            if conv.prepared_at >= 0 and self.llm.n_past > turn.rollback_point:
                self.llm.truncate(turn.rollback_point)
            return
        if turn is not None:
            turn.closed = True
        if not tokens:
            # Cancelled before the reply began: forget this user turn, keep the prepared part.
            if conv.prepared_at >= 0 and self.llm.n_past > conv.prepared_at:
                self.llm.truncate(conv.prepared_at)
            return
        # `generate` never feeds the last token it yields; an end-of-turn token is replaced by the
        # template's own <|eot_id|> at the start of the next turn prefix.
        conv.turns += 1
        conv.pending = [] if tokens[-1] in self.eos_ids else [tokens[-1]]
        conv.prepared_at = -1
        conv.prepared_tokens = 0

    # --- stages (the same code in both modes) ----------------------------------------------------

    def _turn_embeddings(self, reply: "Reply") -> np.ndarray | list[np.ndarray]:
        """The reply's turn (the whole question taken into one when none was fed; `reply.turn` after
        this) through the front end: its speech embeddings, as the encoder returns them."""
        clock, token = reply.clock, reply.token
        turn = reply.turn
        if turn is None:  # the whole question at once
            with clock.stage("resample"):
                speech = prepare_speech(*reply.audio, 16000)
            turn = reply.turn = TurnInput(self, reply.conversation, ingest=False)
            turn.feed(speech)
        else:
            turn.check()
        token.check()
        with clock.stage("mel"):
            mel = turn.pending()
        with clock.stage("encoder"):
            embeds = turn.embeddings(mel)
        token.check()
        return embeds

    def _llm_items(self, reply: "Reply") -> Iterator[tuple[int, object]]:
        """Frontend + LLM: yields (_TEXT, TextDelta) and (_HIDDEN, (hidden chunk, final))."""
        clock, state, token = reply.clock, reply.state, reply.token
        embeds = self._turn_embeddings(reply)
        turn = reply.turn
        try:
            self._phase(reply, "llm")
            with clock.stage("llm_prefill"):
                first = self._prefill(reply.conversation, turn, embeds, state)
            token.check()
            text_decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            pending: list[np.ndarray] = []
            first_chunk = self.first_omega or self.omega
            steps = self.llm.generate(self.config.max_new_tokens, ignore_eos=self.config.ignore_eos, first=first)
            while True:
                with clock.stage("llm_decode"):
                    item = next(steps, None)
                if item is None:
                    break
                tok, hidden = item
                state.tokens.append(tok)
                pending.append(hidden)
                if tok not in self.eos_ids:
                    piece = text_decoder.decode(self.llm.token_piece(tok))
                    if piece:
                        yield _TEXT, TextDelta(piece)
                # The reply's last token goes out with the final chunk (not as a full chunk followed by
                # an empty final one): LLaMA-Omni2's TTS treats the final chunk differently.
                last = len(state.tokens) >= self.config.max_new_tokens or (tok in self.eos_ids and not self.config.ignore_eos)
                # Until the first audio sample is out, short chunks (the first one may be too short
                # for the vocoder's lookahead); then `omega` tokens per chunk.
                if len(pending) == (self.omega if reply.steady else first_chunk) and not last:
                    yield _HIDDEN, (np.stack(pending), False)
                    pending = []
                token.check()  # between tokens: a cancelled reply stops after at most one more
                self._phase(reply, "llm")
            tail = text_decoder.decode(b"", final=True)
            if tail:
                yield _TEXT, TextDelta(tail)
            yield _HIDDEN, (np.stack(pending) if pending else None, True)
        finally:
            reply.wait_for_commit()
            self._finish_turn(reply.conversation, state.tokens, turn, dropped=reply.dropped)

    def _speech_units(self, reply: "Reply", hidden: np.ndarray | None, final: bool) -> Iterator[tuple[list[int], bool]]:
        """(units, last) pieces for one hidden-state chunk; `last` marks the reply's final piece. One
        piece here; a speech generator that keeps writing after the text ends (LLaMA-Omni2's TTS LM)
        yields several, so the vocoder starts on them before the writing is done."""
        yield self._units_step(reply, hidden, final), final

    def _units_step(self, reply: "Reply", hidden: np.ndarray | None, final: bool = False) -> list[int]:
        # `final` (the reply's last chunk) is unused here; a family whose speech generator must
        # know where the text ends (LLaMA-Omni2 appends <sep>) overrides this step.
        with reply.clock.stage("speech_generator"):
            new = self.units.push(hidden) if hidden is not None else []
        reply.state.units.extend(new)
        return new

    # A vocoder in two parts (LLaMA-Omni2: flow, then HiFT) runs them on two threads in overlapped
    # mode, so each part gets a core while the other works: `_vocoder_front` (units -> what the back
    # part takes) and `_vocoder_back` (-> audio); together they equal `_vocoder_step`.
    split_vocoder = False

    def _vocoder_front(self, reply: "Reply", units: list[int], final: bool) -> object:
        raise NotImplementedError("a pipeline with split_vocoder = True implements _vocoder_front/_vocoder_back")

    def _vocoder_back(self, reply: "Reply", front: object, final: bool) -> np.ndarray:
        raise NotImplementedError("a pipeline with split_vocoder = True implements _vocoder_front/_vocoder_back")

    def _vocoder_step(self, reply: "Reply", units: list[int], final: bool) -> np.ndarray:
        with reply.clock.stage("vocoder"):
            wav = reply.stream.push(units)
            if final:
                wav = np.concatenate([wav, reply.stream.flush()])
        return wav

    # --- thread budget per phase -----------------------------------------------------------------

    def _phase(self, reply: "Reply", stage: str) -> None:
        """Move cores between stages at a phase boundary; each stage calls this from its own thread
        (llama.cpp's thread count is per context and must not change under a running decode) at the
        reply's start and between its steps. Until the first audio sample leaves, every stage on the
        path to it may use every core: there they mostly run one after another. Once it is out
        (`reply.steady`), each stage goes back to its own share, as they now overlap. A family with
        more llama.cpp contexts (LLaMA-Omni2's TTS LM) extends this for its stages."""
        if stage != "llm" or reply.phase.get(stage) == reply.steady:
            return
        reply.phase[stage] = reply.steady
        own = self.config.threads_for("llm") or self.cores
        self.llm.set_threads(own if reply.steady else max(own, self.cores), max(own, self.cores))

    @property
    def cores(self) -> int:
        return self.config.threads or os.cpu_count() or 1


class Reply:
    """One reply in progress. Iterate it (once) for events; `cancel()` (any thread) stops every
    stage within one chunk, drops queued audio and ends the iteration without a `Done`."""

    def __init__(self, pipe: Pipeline, conversation: Conversation, t0: float | None, mode: str, *,
                 audio: tuple[np.ndarray, int] | None = None, turn: TurnInput | None = None,
                 speculative: bool = False):
        self.pipe = pipe
        self.audio = audio  # (samples, rate) of the whole question, or None with a fed `turn`
        self.turn = turn
        self.dropped = False
        self._committed = threading.Event()
        if not speculative:
            self._committed.set()
        self.conversation = conversation
        self.t0 = time.perf_counter() if t0 is None else t0
        self.mode = mode
        self.token = CancelToken()
        self.clock = StageClock()
        self.state = _ReplyState()
        self.stream = pipe.vocoder.stream(pipe.config.vocoder)
        self.threads: list[threading.Thread] = []
        self.steady = False  # the first audio sample has left: stages share the cores (see Pipeline._phase)
        self.phase: dict[str, bool] = {}  # stage -> the `steady` value its threads were last set for
        self.finished = False
        self._errors: list[BaseException] = []
        self._started = False

    @property
    def cancelled(self) -> bool:
        return self.token.cancelled

    def cancel(self) -> None:
        self.token.cancel()

    def drop(self) -> None:
        """Cancel as if the reply had never started (a speculative start the user talked over):
        the cache goes back to the turn as fed, the conversation counts no turn, the turn stays open."""
        if self._committed.is_set():
            raise OmniliteError("this reply has been committed; cancel() it instead.")
        self.dropped = True
        self.token.cancel()

    def commit(self) -> None:
        """A speculative reply's turn is confirmed: the conversation may record it."""
        self._committed.set()

    def wait_for_commit(self) -> None:
        """Called by the LLM stage before it records the turn: a speculative reply may still be dropped."""
        while not self._committed.wait(0.02):
            if self.token.cancelled:
                return

    def join(self, timeout: float = _JOIN_TIMEOUT_S) -> bool:
        """Wait for the worker threads; True when none is left."""
        deadline = time.perf_counter() + timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.perf_counter()))
        return not any(t.is_alive() for t in self.threads)

    def __iter__(self) -> Iterator[Event]:
        if self._started:
            raise RuntimeError("a Reply can be iterated only once")
        self._started = True
        pipe = self.pipe
        if not pipe._busy.acquire(blocking=False):
            raise OmniliteError("this Pipeline is already answering; finish or cancel that reply first "
                                "(or load a second Pipeline).")
        try:
            pipe.units.reset()
            events = self._overlapped() if self.mode == "overlapped" else self._sequential()
            for event in events:
                yield from self._hand_out(event)
            self.finished = True
            yield from self._summary()
        except Cancelled:
            pass
        finally:
            if not self.finished:
                self.token.cancel()
            if not self.join():
                log.error("reply worker threads did not stop within %.0f s: %s", _JOIN_TIMEOUT_S,
                          [t.name for t in self.threads if t.is_alive()])
            pipe._busy.release()
        if self._errors:
            raise self._errors[0]

    # --- drivers -------------------------------------------------------------------------------

    def _sequential(self) -> Iterator[Event]:
        pipe = self.pipe
        # closing(): a cancelled reply still runs the LLM stage's bookkeeping right away.
        with closing(pipe._llm_items(self)) as items:
            yield from self._sequential_items(items)

    def _sequential_items(self, items: Iterator[tuple[int, object]]) -> Iterator[Event]:
        pipe = self.pipe
        for kind, payload in items:
            if kind == _TEXT:
                yield payload
                continue
            hidden, final = payload
            for units, last in pipe._speech_units(self, hidden, final):
                wav = pipe._vocoder_step(self, units, last)
                if len(wav):
                    yield AudioChunk(wav, pipe.sample_rate)
                self.token.check()

    def _overlapped(self) -> Iterator[Event]:
        pipe, token, clock = self.pipe, self.token, self.clock
        size = pipe.config.queue_size
        hidden_ch: Channel = Channel(size, token, "hidden")
        units_ch: Channel = Channel(size, token, "units")
        out: Channel = Channel(pipe.config.event_queue_size, token, "events")

        def llm_worker() -> None:
            with closing(pipe._llm_items(self)) as items:
                for kind, payload in items:
                    clock.waited("llm", (out if kind == _TEXT else hidden_ch).put(payload))
                    if kind != _TEXT and pipe.config.first_audio_priority and not self.steady:
                        clock.waited("llm", hidden_ch.wait_drained(lambda: self.steady))
            out.put(_LLM_DONE)

        split = pipe.split_vocoder
        front_ch: Channel | None = Channel(size, token, "vocoder-front") if split else None

        def consume(ch: Channel, stage: str, step: Callable[[object, bool], None], done: bool = False) -> None:
            """A stage's loop: (payload, final) items off `ch` until the final one; `done`: then say so."""
            final = False
            while not final:
                (payload, final), waited = ch.get()
                clock.waited(stage, waited)
                step(payload, final)
            if done:
                out.put(_VOC_DONE)

        def audio_out(wav: np.ndarray) -> None:
            if len(wav):
                clock.waited("vocoder", out.put(AudioChunk(wav, pipe.sample_rate)))

        def units_step(hidden, final: bool) -> None:
            for piece in pipe._speech_units(self, hidden, final):
                clock.waited("speech_generator", units_ch.put(piece))

        def vocoder_step(units, final: bool) -> None:
            if front_ch is None:
                audio_out(pipe._vocoder_step(self, units, final))
            else:  # the front part here, the back part on its own thread
                clock.waited("vocoder", front_ch.put((pipe._vocoder_front(self, units, final), final)))

        workers = [("llm", llm_worker), ("units", lambda: consume(hidden_ch, "speech_generator", units_step)),
                   ("vocoder", lambda: consume(units_ch, "vocoder", vocoder_step, done=front_ch is None))]
        if front_ch is not None:
            workers.append(("vocoder-back", lambda: consume(
                front_ch, "vocoder", lambda front, final: audio_out(pipe._vocoder_back(self, front, final)), done=True)))
        for name, target in workers:
            t = threading.Thread(target=self._guard, args=(target,), name=f"omnilite-{name}", daemon=True)
            self.threads.append(t)
        for t in self.threads:
            t.start()
        try:
            done = 0
            while done < 2:
                item, _ = out.get()
                if item is _LLM_DONE or item is _VOC_DONE:
                    done += 1
                else:
                    yield item
        finally:
            if token.cancelled:
                out.clear()  # barge-in: audio not yet handed out is never played

    def _guard(self, target) -> None:
        """Run a stage; an error cancels the reply and is re-raised in the caller's thread."""
        try:
            target()
        except Cancelled:
            pass
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
            self._errors.append(e)
            self.token.cancel()

    # --- events --------------------------------------------------------------------------------

    def _hand_out(self, event: Event) -> Iterator[Event]:
        """Latencies are taken where an event leaves the pipeline (handed to the caller)."""
        latency = self.state.latency
        if isinstance(event, TextDelta):
            latency.setdefault("ttft", time.perf_counter() - self.t0)
        elif isinstance(event, AudioChunk):
            latency.setdefault("ttfa", time.perf_counter() - self.t0)
            self.steady = True
            self.state.audio.append(event.samples)
        yield event

    def _summary(self) -> Iterator[Event]:
        pipe, state, clock = self.pipe, self.state, self.clock
        total = time.perf_counter() - self.t0
        reply = np.concatenate(state.audio) if state.audio else np.zeros(0, np.float32)
        timings = {k: v for k, v in clock.busy.items()}
        for name in STAGES:
            if name in timings:
                yield Timing(name, timings[name], clock.calls[name])
        for name, seconds in clock.wait.items():
            timings[f"{name}_wait"] = seconds
            yield Timing(f"{name}_wait", seconds)
        for name, seconds in state.latency.items():
            yield Timing(name, seconds)
        yield Timing("total", total)
        latency = dict(state.latency)
        audio_seconds = len(reply) / pipe.sample_rate
        if audio_seconds > 0:
            latency["rtf"] = (timings.get("speech_generator", 0.0) + timings.get("vocoder", 0.0)) / audio_seconds
        timings.update(latency, total=total)
        text = pipe.llm.detokenize([t for t in state.tokens if t not in pipe.eos_ids])
        yield Done(text=text, tokens=list(state.tokens), units=list(state.units), audio=reply,
                   sample_rate=pipe.sample_rate, timings=timings, stats=dict(state.stats),
                   turn=self.conversation.turns,
                   spans=[(name, a - self.t0, b - self.t0) for name, a, b in clock.spans])
