"""The torch-free Fun-Audio-Chat pipeline: the shared `Pipeline` (conversations, overlapped/sequential
drivers, cancellation, events) with the family's front end and its speech loop.

16 kHz speech -> Whisper log-mel (numpy, 128 bins, over 30 s of padding, valid frames) +
placeholder count -> audio_input.onnx -> Qwen3 (llama.cpp) with the clip's rows spliced after
``<|audio_bos|>`` -> per LLM step (export/fun_audio_chat/NOTES.md, "Output"):

* the text token: greedy; the first is forced to ``<|audio_bos|>`` (``force_text_abos``), which
  switches speech on; the reply ends at ``<|im_end|>`` (151645) only, the official eos, not at
  llama.cpp's end-of-generation set;
* the speech head reads the step's final-norm hidden state + the text embedding of the step's input
  token and writes 5 codes (greedy, or sampled as the release does: `FunAudioChatConfig.speech_sampling`);
  while speech is on they are kept, codes 0..6560 go to the vocoder stream, and a group holding the
  speech EOS ends speech (the text token becomes ``<|audio_eos|>``);
* the next LLM input is the sampled token's text embedding, averaged with ``audio_tower`` of the last
  kept group while speech is on ((text + feedback) / 2).

The head runs on every step, also before and after speech (its codes are then dropped but its cache
advances), and over every prompt position at the prefill; as in the official generate() its cache and
previous code start afresh with each reply, and its prefill covers the whole conversation in the LLM's
cache (the official prompt of a follow-up call holds the whole dialogue), so the pipeline keeps each
cached position's hidden state and input token. A finished reply stays in the dialogue as the official
web demo keeps it: its text ids (the rows read while speaking are cut from the cache and the text is
evaluated again with the next question's prefix); everything before it is reused from the cache.

Codes -> CosyVoice3 flow + causal HiFT (runtime/fun_audio_chat/vocoder.py) in the bundle's streaming
schedule (chunk-aligned by default) -> 24 kHz `AudioChunk` events; text deltas as they are decided.
"""

from __future__ import annotations

import codecs
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ..bundle import Bundle
from ..errors import AudioError, BundleError, OmniliteError
from ..events import TextDelta
from ..llm import LLMConfig, stage_llm_config
from ..mel import HOP, LogMel
from ..onnx_session import SessionOptions, open_session
from ..pipeline import _HIDDEN, _TEXT, Conversation, Pipeline, PipelineConfig, _ReplyState
from ..turn import TurnInput, WholeTurnStream
from .sampling import GREEDY, SpeechSampler, SpeechSampling, resolve_speech_sampling
from .speech_head import HeadSpec, SpeechFeedback, SpeechHead
from .vocoder import OnnxVocoder, Schedule, VocoderStream

log = logging.getLogger(__name__)

FAMILY = "fun-audio-chat"
TEXT_EMBEDDINGS_FILE = "text_embeddings.npy"
FRAMES_PER_POSITION = 20  # 5 Hz LLM positions over 100 Hz mel frames
MAX_TURN_SECONDS = 60  # what one user turn may hold; sizes the LLM context
SAMPLE_RATE = 16000


def placeholder_count(n_samples: int) -> int:
    """25 Hz placeholders of a 16 kHz clip, as the processor counts them: int(seconds * 25)."""
    return int(n_samples / SAMPLE_RATE * 25)


@dataclass(frozen=True)
class FunAudioChatConfig(PipelineConfig):
    """`speech_sampling`: how the speech head picks its codes (text is greedy either way, as in the
    release's examples).

    * ``"greedy"`` (the default): argmax codes, the exact path: reproducible and equal to the PyTorch
      reference's greedy S2M loop (what the parity tests compare). It is the default because a plain
      `PipelineConfig`, which the CLI and the server build and which has no such field, gets greedy
      too: a sampling default here would make the two configs answer differently.
    * ``"release"``: the release's sampling (temperature 0.8, top_p 0.9, top_k 0, repetition penalty
      1.2 over the reply's speech history; runtime/fun_audio_chat/sampling.py) with fresh entropy; or
      a `SpeechSampling` with other values and/or a seed (reproducible replies). Use it to listen to
      real weights: the release's examples and demo always sample speech, and greedy speech codes
      are prone to loops (repeated sounds) that the penalty and the draw break up (not measured
      here: no real weights on this machine).
    """

    schedule: str | None = None  # vocoder streaming schedule ("chunk-aligned", "official"); None: the bundle's
    speech_sampling: str | SpeechSampling = GREEDY  # "greedy", "release" or a SpeechSampling


@dataclass(frozen=True)
class ClipMel:
    """What the audio input stage takes: the valid log-mel frames and the clip's sample count (the
    placeholder count depends on the samples, not on the mel, which is cut at 30 s)."""

    mel: np.ndarray  # (128, frames)
    samples: int

    @property
    def frames(self) -> int:
        return self.mel.shape[1]


class FunAudioChatEncoder:
    """The family's front end: one clip -> its ``<|AUDIO|>`` rows. One mode only: the official one."""

    def __init__(self, bundle: Bundle, options: SessionOptions = SessionOptions()):
        cfg = bundle["encoder"]
        self.session = open_session(bundle.file("audio_input"), options)
        self.log_mel = LogMel(int(cfg["n_mels"]))
        self.mel_cap = int(cfg["mel_frames_cap"])
        self.max_samples = int(cfg["max_mel_frames"]) * HOP

    def resolve(self, mode: str | None = None) -> str:
        if mode not in (None, "exact"):
            raise OmniliteError(f"encoder mode {mode!r} does not apply to Fun-Audio-Chat, whose front end is fixed "
                                "(the processor's 30 s log-mel); leave --encoder-mode out.")
        return "exact"

    def mel(self, audio_16k: np.ndarray) -> ClipMel:
        audio = np.asarray(audio_16k, np.float32).reshape(-1)
        if audio.size > self.max_samples:
            log.warning("audio is %.1f s; this bundle takes the first %.0f s of a turn", audio.size / SAMPLE_RATE,
                        self.max_samples / SAMPLE_RATE)
            audio = audio[: self.max_samples]
        if placeholder_count(audio.size) == 0:
            raise AudioError(f"the question is {1000 * audio.size / SAMPLE_RATE:.0f} ms long, shorter than one 40 ms speech "
                             "frame; record a longer question.")
        frames = min(-(-audio.size // HOP), self.mel_cap)
        return ClipMel(self.log_mel(audio, pad_to_30s=True)[:, :frames], int(audio.size))

    def embed(self, clip: ClipMel) -> np.ndarray:
        feeds = {"mel": np.ascontiguousarray(clip.mel[None], np.float32),
                 "placeholders": np.asarray(placeholder_count(clip.samples), np.int64)}
        return self.session.run(None, feeds)[0]

    def stream(self, mode: str | None = None) -> WholeTurnStream:
        self.resolve(mode)
        # Whole turn: the log-mel's scale depends on the whole clip's maximum.
        return WholeTurnStream(self)


class _Codes:
    """The speech-generator slot: the head runs inside the LLM stage (its codes decide the LLM's next
    input), so what reaches this slot is already codes."""

    def reset(self) -> None:
        pass


class _Vocoder:
    """What `Reply` expects in `pipe.vocoder`: `.stream(config)` giving push(codes) / flush()."""

    def __init__(self, voc: OnnxVocoder, schedule: Schedule):
        self.voc, self.schedule = voc, schedule
        self.sample_rate = int(voc.source.p.sample_rate)

    def stream(self, _config=None) -> VocoderStream:
        return self.schedule.stream(self.voc)


class FunAudioChatPipeline(Pipeline):
    def __init__(self, bundle: Bundle, config: PipelineConfig = PipelineConfig()):
        if bundle.family != FAMILY:
            raise BundleError(f"{bundle.path} is a '{bundle.family}' bundle, not Fun-Audio-Chat; load it with Pipeline.load.")
        ort_for, prompt = self._open_shared(bundle, config)
        self.encoder.resolve(config.encoder_mode)  # refuse a mode flag before the first turn
        self.llm.eos_ids = self.eos_ids  # <|im_end|> only: llama.cpp's own set holds Qwen's other end tokens
        self.turn_prefix_ids = list(prompt["turn_prefix_ids"])
        self.force_abos = bool(bundle["llm"]["force_text_abos"])
        out = bundle["output_tokens"]
        self.audio_token, self.audio_bos, self.audio_eos = int(out["audio_token"]), int(out["audio_bos"]), int(out["audio_eos"])
        speech = bundle["speech"]
        self.n_codes = int(speech["vocoder_codes"])
        self.text_embeds = np.load(bundle.file("text_embeddings"), mmap_mode="r")
        if self.text_embeds.shape != (self.llm.n_vocab, self.llm.n_embd) or self.text_embeds.dtype != np.float32:
            raise BundleError(f"{bundle.file('text_embeddings')} holds {self.text_embeds.dtype} {self.text_embeds.shape}, not the "
                              f"LLM's float32 ({self.llm.n_vocab}, {self.llm.n_embd}) token table; re-export the bundle.")
        spec = HeadSpec.from_bundle(bundle)
        head_stage = stage_llm_config(bundle, "speech_head")
        # The head covers every position of the LLM's cache (5 sub-positions each) at a reply's prefill.
        self.head = SpeechHead(bundle.path, spec, LLMConfig(n_ctx=spec.group * (self.llm.n_ctx + 1), kv_cache=head_stage.kv_cache,
                                                            flash_attn=head_stage.flash_attn,
                                                            n_threads=config.threads_for("speech_generator")),
                               ort_for("speech_generator"))
        self.feedback = SpeechFeedback(bundle.file("speech_feedback"), spec.group, ort_for("speech_generator"))
        # None: greedy codes. One Generator per pipeline, continued across replies (as torch's global RNG).
        sampling = resolve_speech_sampling(getattr(config, "speech_sampling", GREEDY))
        self.speech_sampler = SpeechSampler(sampling) if sampling is not None else None
        voc = OnnxVocoder(bundle.path, ort_for("vocoder"))
        name = getattr(config, "schedule", None) or bundle["vocoder"]["schedule"]
        self.vocoder = _Vocoder(voc, Schedule.named(voc, name))
        self.sample_rate = self.vocoder.sample_rate
        self.units = _Codes()
        # Per cached LLM position: its final-norm hidden state and its input token (the head's prefill).
        self._hidden = np.zeros((self.llm.n_ctx, self.llm.n_embd), np.float32)
        self._input_ids = np.zeros(self.llm.n_ctx, np.int64)
        self._reply_start = 0  # n_past where the current reply's positions begin
        self._busy = threading.Lock()
        self._conversation: Conversation | None = None

    def _speech_encoder(self, bundle: Bundle, options: SessionOptions) -> FunAudioChatEncoder:
        return FunAudioChatEncoder(bundle, options)

    def close(self) -> None:
        super().close()
        self.head.close()

    # --- LLM evaluation that keeps what the head reads ---------------------------------------

    def _eval(self, ids: list[int], rows: np.ndarray | None = None) -> np.ndarray:
        """Evaluate `ids` (or the embedding `rows`, whose input tokens are `ids`); record every position's
        hidden state and input token; return the last position's logits."""
        start = self.llm.n_past
        if rows is None:
            logits, hidden = self.llm.eval_tokens(ids, want_hidden=True)
        else:
            logits, hidden = self.llm.eval_embeddings(rows, want_hidden=True)
        self._hidden[start:start + len(ids)] = hidden
        self._input_ids[start:start + len(ids)] = ids
        return logits

    def _head_input(self, start: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        return self._hidden[start:end], np.asarray(self.text_embeds[self._input_ids[start:end]], np.float32)

    def _eval_prompt_ids(self, ids: list[int]) -> None:
        self._eval(ids)  # the speech head needs every cached position's hidden state and input id

    def _prefill(self, conv: Conversation, turn: TurnInput, embeds: np.ndarray, state: _ReplyState) -> np.ndarray:
        """The clip's rows after ``<|audio_bos|>`` (their input token, for the head, is ``<|AUDIO|>``:
        the official text embeddings of the prompt), then the suffix. Returns the last logits."""
        self._prepare(conv)
        if self._ensure_room(conv, len(embeds)):
            state.stats["history_dropped"] = 1
        logits = None
        try:
            self._eval([self.audio_token] * len(embeds), np.ascontiguousarray(embeds, np.float32))
            logits = self._eval(self.suffix_ids)
        finally:
            if logits is None and conv.prepared_at >= 0:  # failed midway: back to the prepared point
                self.llm.truncate(min(conv.prepared_at, self.llm.n_past))
        state.stats["prompt_tokens"] = conv.prepared_tokens + len(embeds) + len(self.suffix_ids)
        state.stats["prefilled_early"] = 0
        state.stats["context"] = self._reply_start = self.llm.n_past
        return logits

    def _finish_turn(self, conv: Conversation, tokens: list[int], turn: TurnInput | None = None, dropped: bool = False) -> None:
        """The official history keeps a reply as its text (web_demo/server/server.py:617-624: the decoded ids
        with leading <|audio_bos|> and trailing <|audio_eos|> / <|im_end|> stripped, re-rendered by the chat
        template), not as the rows the LLM read while speaking: the reply's positions are cut from the cache
        and its text ids are evaluated again with the next turn's prefix."""
        turns = conv.turns
        super()._finish_turn(conv, tokens, turn, dropped)
        if conv.turns == turns:  # nothing recorded: dropped, or cancelled before the reply began
            return
        self.llm.truncate(self._reply_start)
        conv.pending = self.history_ids(tokens)

    def history_ids(self, tokens: list[int]) -> list[int]:
        """A reply's ids as the next turn's prompt holds them (see `_finish_turn`)."""
        start, end = 0, len(tokens)
        while start < end and tokens[start] == self.audio_bos:
            start += 1
        while end > start and tokens[end - 1] in (self.audio_eos, *self.eos_ids):
            end -= 1
        return list(tokens[start:end])

    # --- the reply ----------------------------------------------------------------------------

    def _llm_items(self, reply) -> Iterator[tuple[int, object]]:
        """Front end + LLM + speech head: yields (_TEXT, TextDelta) and (_HIDDEN, (codes, final))."""
        clock, state = reply.clock, reply.state
        embeds = self._turn_embeddings(reply)
        turn = reply.turn
        try:
            self._phase(reply, "llm")
            with clock.stage("llm_prefill"):
                logits = self._prefill(reply.conversation, turn, embeds, state)
            yield from self._speak(reply, logits)
        finally:
            reply.wait_for_commit()
            self._finish_turn(reply.conversation, state.tokens, turn, dropped=reply.dropped)

    def _speak(self, reply, logits: np.ndarray) -> Iterator[tuple[int, object]]:
        clock, state, token, cfg = reply.clock, reply.state, reply.token, self.config
        head, eos = self.head, self.head.spec.eos_id
        # Sampling: the repetition penalty sees this reply's kept groups (all-EOS for the one that ended
        # speech), not the codes written before <|audio_bos|> or after speech ended (NOTES.md).
        history: list[int] = []
        pick = {} if self.speech_sampler is None else {"choose": self.speech_sampler, "history": history}
        with clock.stage("speech_generator"):
            head.reset()  # as each official generate() call: the head covers this call's whole prompt
            codes = head.step(*self._head_input(0, self.llm.n_past), **pick)
        text_decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        speaking, last_group = False, None
        for step in range(cfg.max_new_tokens):
            tok = self.audio_bos if step == 0 and self.force_abos else int(np.argmax(logits))
            spoken: list[int] = []
            if speaking:
                if eos in codes:  # the official rule: the group becomes all-EOS and the text <|audio_eos|>
                    codes, tok, speaking = [eos] * head.spec.group, self.audio_eos, False
                last_group = codes
                history.extend(codes)
                spoken = [c for c in codes if 0 <= c < self.n_codes]
            state.tokens.append(tok)
            if tok not in self.eos_ids:
                piece = text_decoder.decode(self.llm.token_piece(tok))
                if piece:
                    yield _TEXT, TextDelta(piece)
            if spoken:
                yield _HIDDEN, (spoken, False)
            token.check()  # between steps: a cancelled reply stops after at most one more
            if step == cfg.max_new_tokens - 1 or (tok in self.eos_ids and not cfg.ignore_eos):
                break  # the final token is not fed: nobody reads its prediction
            speaking |= tok == self.audio_bos
            text = np.asarray(self.text_embeds[tok], np.float32)
            x = text
            if speaking and last_group is not None:
                with clock.stage("speech_generator"):
                    x = self.feedback.llm_input(text, last_group)
            with clock.stage("llm_decode"):
                logits = self._eval([tok], x[None])
            with clock.stage("speech_generator"):
                codes = head.step(*self._head_input(self.llm.n_past - 1, self.llm.n_past), **pick)
            self._phase(reply, "llm")
        tail = text_decoder.decode(b"", final=True)
        if tail:
            yield _TEXT, TextDelta(tail)
        yield _HIDDEN, (None, True)

    def _speech_units(self, reply, codes: list[int] | None, final: bool):
        codes = codes or []
        reply.state.units.extend(codes)
        yield codes, final

