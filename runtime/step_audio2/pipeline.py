"""The torch-free Step-Audio 2 mini pipeline: the shared `Pipeline` (LLM stage, conversations,
overlapped/sequential drivers, cancellation, events) with the family's own front end and speech side.

16 kHz speech -> 25 s pieces -> log-mel (numpy) -> encoder.onnx (one padded batch, as the official
forward) -> llama.cpp LLM with each piece's rows spliced after its ``<audio_start>`` -> one output
stream of interleaved ids, split as it is produced:

* text ids (below ``<audio_start>``) -> `TextDelta` events (special tokens print nothing);
* audio ids (``<audio_k>``, k < 6561) -> speech code k -> the streaming token2wav (DiT flow windows of
  25 + 3 lookahead tokens, HiFT) -> 24 kHz `AudioChunk` events; ``<audio_6561>`` (the interleave's
  audio pad), ``<tts_pad>`` and the other specials go nowhere;
* ``<|EOT|>`` (the official end of generation) or ``<tts_end>`` (end of speech) ends the reply.

The split does not depend on the ``<tts_start>`` ... ``<tts_end>`` structure (1 text : 4 audio chunks
in the training format): every audio id anywhere in the reply is speech, in order, and every text id is
text, which is also what the official code does with a finished reply (stepaudio2.py filters the whole
output by id range). A babbling model (random weights) therefore still gives text and audio.

Multi-turn: the reply's raw ids stay in the KV cache, as the official history feeds them back after
``<tts_start>``; the next turn adds ``<|EOT|><|BOT|>human\\n<audio_start>`` and its own speech only.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import numpy as np

from ..bundle import Bundle
from ..errors import BundleError, OmniliteError
from ..mel import HOP, LogMel
from ..onnx_session import SessionOptions, open_session
from ..pipeline import Conversation, Pipeline, PipelineConfig, _ReplyState
from ..turn import TurnInput, WholeTurnStream
from .vocoder import Token2Wav, Token2WavStream, VoicePrompt

log = logging.getLogger(__name__)

FAMILY = "step-audio2"


def piece_positions(mel_frames: int) -> int:
    """LLM rows of a piece of `mel_frames` (the official compute_token_num: valid length frames - 2,
    conv2 and the avg-pool halve it twice, the adapter conv (k3, s2, pad 1) once more)."""
    encoded = (mel_frames - 2 + 1) // 2 // 2
    return max(0, (encoded - 1) // 2 + 1)


@dataclass(frozen=True)
class PieceMels:
    """What the encoder stage takes: one log-mel (n_mels, frames) per 25 s piece."""

    mels: tuple[np.ndarray, ...]

    @property
    def frames(self) -> int:
        return sum(m.shape[1] for m in self.mels)


class StepAudio2Encoder:
    """The family's speech front end: 25 s pieces, the Whisper log-mel of each piece plus 479 zeros,
    and encoder.onnx over the pieces as the official zero-padded batch (each piece padded to the
    longest, with its own valid length). One mode only: the official one."""

    def __init__(self, bundle: Bundle, options: SessionOptions = SessionOptions()):
        cfg = bundle["encoder"]
        self.session = open_session(bundle.file("encoder"), options)
        self.log_mel = LogMel(int(cfg["n_mels"]))
        self.piece_samples = int(cfg["piece_samples"])
        self.right_pad = int(cfg["mel_right_pad"])
        self.max_samples = int(cfg["max_mel_frames"]) * HOP

    def resolve(self, mode: str | None = None) -> str:
        if mode not in (None, "exact"):
            raise OmniliteError(f"encoder mode {mode!r} does not apply to Step-Audio 2, whose front end is fixed "
                                "(25 s pieces as the official code cuts them); leave --encoder-mode out.")
        return "exact"

    def mel(self, audio_16k: np.ndarray) -> PieceMels:
        audio = np.asarray(audio_16k, np.float32).reshape(-1)
        if audio.size > self.max_samples:
            log.warning("audio is %.1f s; this bundle takes the first %.0f s of a turn", audio.size / 16000,
                        self.max_samples / 16000)
            audio = audio[: self.max_samples]
        return PieceMels(tuple(self.log_mel(np.pad(audio[i:i + self.piece_samples], (0, self.right_pad)), pad_to_30s=False)
                               for i in range(0, audio.size, self.piece_samples)))

    def embed(self, pieces: PieceMels) -> list[np.ndarray]:
        """Each piece's LLM rows (positions, llm_dim), as the official batch gives them."""
        longest = max(m.shape[1] for m in pieces.mels)
        out = []
        for m in pieces.mels:
            if piece_positions(m.shape[1]) == 0:  # a last piece of a few samples: no rows (the official count is 0 too)
                out.append(np.zeros((0, self.session.get_outputs()[0].shape[-1] or 0), np.float32))
                continue
            x = np.pad(m, ((0, 0), (0, longest - m.shape[1])))[None].astype(np.float32)
            out.append(self.session.run(None, {"mel": x, "mel_len": np.array([m.shape[1] - 2], np.int64)})[0])
        return out

    def stream(self, mode: str | None = None) -> WholeTurnStream:
        self.resolve(mode)
        # Whole turn: every piece's rows attend over the whole piece, and the batch padding depends on the longest piece.
        return WholeTurnStream(self)


class _AudioIds:
    """The speech-generator slot: the reply's next ids (the LLM stage appended them before handing the
    chunk over) -> speech codes. Keeps its own position in the reply's id list."""

    def __init__(self, code_base: int, codes: int):
        self.code_base, self.codes = code_base, codes
        self.consumed = 0

    def reset(self) -> None:
        self.consumed = 0

    def take(self, reply_tokens: list[int], n: int) -> list[int]:
        ids = reply_tokens[self.consumed:self.consumed + n]
        self.consumed += len(ids)
        return [t - self.code_base for t in ids if self.code_base <= t < self.code_base + self.codes]


class _Token2WavVocoder:
    """What `Reply` expects in `pipe.vocoder`: `.stream(config)` giving push(codes) / flush()."""

    def __init__(self, t2w: Token2Wav, prompt: VoicePrompt):
        self.t2w, self.prompt = t2w, prompt
        self.sample_rate = t2w.sample_rate

    def stream(self, _config=None) -> Token2WavStream:
        return self.t2w.open_stream(self.prompt)


class StepAudio2Pipeline(Pipeline):
    def __init__(self, bundle: Bundle, config: PipelineConfig = PipelineConfig()):
        if bundle.family != FAMILY:
            raise BundleError(f"{bundle.path} is a '{bundle.family}' bundle, not Step-Audio 2; load it with Pipeline.load.")
        ort_for, prompt = self._open_shared(bundle, config)
        self.encoder.resolve(config.encoder_mode)  # refuse a mode flag before the first turn
        # Stop where the bundle says (<|EOT|>, <tts_end>): llama.cpp also counts Qwen's other end tokens.
        self.llm.eos_ids = self.eos_ids
        self.turn_prefix_ids = list(prompt["turn_prefix_ids"])
        self.piece_separator_ids = list(prompt["piece_separator_ids"])
        out = bundle["output_tokens"]
        self.tts_end_id = int(out["tts_end"])
        self.units = _AudioIds(int(out["audio_code_base"]), int(out["audio_codes"]))
        self.omega = int(config.omega or bundle["streaming"]["omega"])
        if self.omega < 1:
            raise OmniliteError(f"omega (LLM tokens per hand-off to token2wav) must be at least 1, got {self.omega}.")
        t2w = Token2Wav(bundle.path, ort_for("vocoder"))  # flow + HiFT are the profile's "vocoder" stage
        self.vocoder = _Token2WavVocoder(t2w, VoicePrompt.load(bundle.file("voice_prompt")))
        self.sample_rate = self.vocoder.sample_rate
        self._busy = threading.Lock()
        self._conversation: Conversation | None = None

    def _speech_encoder(self, bundle: Bundle, options: SessionOptions) -> StepAudio2Encoder:
        return StepAudio2Encoder(bundle, options)

    def _prefill(self, conv: Conversation, turn: TurnInput, embeds: list[np.ndarray], state: _ReplyState):
        """The turn's pieces, each after its ``<audio_start>`` (the prefix ends with the first one; two
        pieces are joined by ``<audio_end><audio_start>``), then the suffix up to ``<tts_start>``."""
        self._prepare(conv)
        positions = sum(len(r) for r in embeds) + len(self.piece_separator_ids) * (len(embeds) - 1)
        if self._ensure_room(conv, positions):
            state.stats["history_dropped"] = 1
        first = None
        try:
            for i, rows in enumerate(embeds):
                if i:
                    self.llm.eval_tokens(self.piece_separator_ids)
                if len(rows):
                    self.llm.eval_embeddings(np.ascontiguousarray(rows, np.float32))
            first = self.llm.eval_tokens(self.suffix_ids, want_last=True)
        finally:
            if first is None and conv.prepared_at >= 0:  # failed midway: back to the prepared point
                self.llm.truncate(min(conv.prepared_at, self.llm.n_past))
        state.stats["prompt_tokens"] = conv.prepared_tokens + positions + len(self.suffix_ids)
        state.stats["speech_pieces"] = len(embeds)
        state.stats["prefilled_early"] = 0
        state.stats["context"] = self.llm.n_past
        return first

    def _finish_turn(self, conv: Conversation, tokens: list[int], turn: TurnInput | None = None, dropped: bool = False) -> None:
        super()._finish_turn(conv, tokens, turn, dropped)
        # The base drops a final end token, as the next turn prefix opens with <|EOT|>. A reply that ended
        # at <tts_end> keeps it: the official history holds every generated id before the <|EOT|>.
        if tokens and not (dropped and turn is not None) and tokens[-1] == self.tts_end_id:
            conv.pending = [self.tts_end_id]

    def _speech_units(self, reply, hidden: np.ndarray | None, final: bool):
        """The chunk's speech codes (its ids are the next `len(hidden)` of the reply)."""
        codes = self.units.take(reply.state.tokens, 0 if hidden is None else len(hidden))
        reply.state.units.extend(codes)
        yield codes, final
