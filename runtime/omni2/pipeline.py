"""The torch-free LLaMA-Omni2 pipeline: the shared `Pipeline` (frontend, Qwen2.5 LLM, conversations,
overlapped/sequential drivers, cancellation, events) with LLaMA-Omni2's speech side plugged in.

encoder (ONNX) -> Qwen2.5 (llama.cpp) -> every R text tokens: gate fusion + TTS LM writing W speech
tokens (llama.cpp, one KV cache for the whole reply) -> chunked causal flow (ONNX + numpy Euler) ->
HiFT through the ring buffer (ONNX) -> AudioChunk events.

Stage names in timings: ``speech_generator`` is the TTS LM (fusion included); ``vocoder`` is flow +
HiFT, also reported apart as ``flow`` and ``hift``.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from dataclasses import dataclass, field

import numpy as np

from ..bundle import Bundle
from ..errors import BundleError, OmniliteError
from ..llm import stage_llm_config
from ..pipeline import Pipeline, PipelineConfig
from ..vocoder import VocoderStreamConfig
from .flow import FIRST_HOP_TOKENS, FlowDecoder, FlowStreamConfig
from .hift import HiFTVocoder
from .tts import TTSDecoding, TTSWriter

log = logging.getLogger(__name__)

FAMILY = "llama-omni2"
# HiFT's lookahead for the first audio chunk only, in mel frames. Exact streaming holds back HiFT's
# receptive field (15 frames, measured at export) + the f0 predictor's context (5), so a 25-token
# first flow hop gave 30 frames of audio (24 with the old 21-frame bound). With 8 frames (what the official CosyVoice2 streaming holds
# back at every seam), the first chunk's last frames miss a little right context and that one seam is
# cross-faded: 38-41 dB against offline vocoding on random weights (tests/test_first_audio.py; 3
# frames: 19 dB, 12: 100 dB, 15: exact); a 17-token first hop (two TTS writes) then gives 21 frames.
FIRST_LOOKAHEAD_FRAMES = 8
_QWEN_TURN_PREFIX = "<|im_end|>\n<|im_start|>user\n"


def _default_vocoder() -> VocoderStreamConfig:
    return VocoderStreamConfig(crossfade=480, first_lookahead=FIRST_LOOKAHEAD_FRAMES)


@dataclass(frozen=True)
class Omni2PipelineConfig(PipelineConfig):
    read: int | None = None  # R: LLM tokens per write step; None: the bundle's (config stream_params)
    write: int | None = None  # W: TTS tokens written per step; None: the bundle's
    max_tts_tokens: int | None = None  # cap after the text ends; None: the official 1024
    tts: TTSDecoding = field(default_factory=TTSDecoding)
    # First-chunk fast path: the flow's first step on 25 tokens (+3 lookahead) instead of the 50-token
    # chunk, so the first audio needs 28 speech tokens, not 53 (its frames drift slightly; measured in
    # tests/test_first_chunk.py); every later step is chunk-aligned.
    flow: FlowStreamConfig = field(default_factory=lambda: FlowStreamConfig(first_hop_tokens=FIRST_HOP_TOKENS))
    # Thread budget per phase (see `Pipeline._phase`): until the first audio sample, the LLM and the TTS
    # LM may use every core; then each stage goes back to its own share. False: fixed shares throughout.
    phase_threads: bool = True
    vocoder: VocoderStreamConfig = field(default_factory=_default_vocoder)


def as_omni2_config(config: PipelineConfig) -> Omni2PipelineConfig:
    """A plain `PipelineConfig` works too: its `omega` (text tokens per speech chunk) becomes R."""
    if isinstance(config, Omni2PipelineConfig):
        return config
    base = {f.name: getattr(config, f.name) for f in dataclasses.fields(PipelineConfig)}
    base["vocoder"] = _default_vocoder() if config.vocoder == VocoderStreamConfig() else config.vocoder
    return Omni2PipelineConfig(**base, read=config.omega)


class _TTSStage:
    """Adapts `TTSWriter` to the pipeline's speech-generator slot: hidden-state chunks in, units out.
    The chunk's tokens are the next ones of the reply (the LLM stage appended them before handing
    the chunk over), so the stage keeps its own position in the reply's token list."""

    def __init__(self, writer: TTSWriter, write: int, max_final: int):
        self.writer, self.write, self.max_final = writer, write, max_final
        self.consumed = 0
        self.tts_tokens: list[int] = []

    def reset(self) -> None:
        self.writer.reset()
        self.consumed = 0
        self.tts_tokens = []

    def push(self, hidden: np.ndarray | None, reply_tokens: list[int], final: bool, max_new: int | None = None) -> tuple[list[int], bool]:
        """Fuse the chunk's tokens (plus <sep> when `final`) and write up to `max_new` (default W)
        tokens; returns (units, ended) where `ended` says the TTS LM wrote its eos."""
        n = 0 if hidden is None else len(hidden)
        tokens = reply_tokens[self.consumed:self.consumed + n]
        self.consumed += n
        written = self.writer.write(hidden, tokens, finished=final, max_new=max_new or self.write)
        self.tts_tokens += written
        return self.writer.units(written), bool(written) and written[-1] == self.writer.eos_id

    def more(self, max_new: int) -> tuple[list[int], bool]:
        """Keep writing after the text ended (the pending token is fed first: same as one long write)."""
        written = self.writer.write(None, [], finished=False, max_new=max_new)
        self.tts_tokens += written
        return self.writer.units(written), bool(written) and written[-1] == self.writer.eos_id


class _SpeechStream:
    """units -> flow stream -> mel -> HiFT stream -> audio, with per-part timing."""

    def __init__(self, pipe: "Omni2Pipeline", clock=None):
        self.flow = pipe.flow.stream(pipe.config.flow)
        self.hift = pipe.hift.stream(pipe.config.vocoder)
        self.clock = clock

    def _timed(self, name: str):
        return self.clock.stage(name) if self.clock is not None else _Null()

    def mel(self, units: list[int], final: bool = False) -> np.ndarray:
        """The flow part: units in, the mel frames that are ready (all of them when `final`)."""
        with self._timed("flow"):
            mel = self.flow.push(units)
            return np.concatenate([mel, self.flow.flush()], axis=1) if final else mel

    def audio(self, mel: np.ndarray, final: bool = False) -> np.ndarray:
        """The HiFT part: mel frames in, the audio that is ready (all of it when `final`)."""
        with self._timed("hift"):
            wav = self.hift.push(mel) if mel.shape[1] else np.zeros(0, np.float32)
            return np.concatenate([wav, self.hift.flush()]) if final else wav


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _SpeechVocoder:
    """What `Reply` expects in `pipe.vocoder`: `.stream(config)` giving push(units) / flush()."""

    def __init__(self, pipe: "Omni2Pipeline"):
        self.pipe = pipe
        self.sample_rate = pipe.hift.sample_rate

    def stream(self, _config=None) -> _SpeechStream:
        return _SpeechStream(self.pipe)


class Omni2Pipeline(Pipeline):
    def __init__(self, bundle: Bundle, config: PipelineConfig = PipelineConfig()):
        if bundle.family != FAMILY:
            raise BundleError(f"{bundle.path} is a '{bundle.family}' bundle, not LLaMA-Omni2; load it with Pipeline.load.")
        config = as_omni2_config(config)
        ort_for, prompt = self._open_shared(bundle, config)
        # Stop where the reference (generation_config.json) stops: llama.cpp also counts Qwen's FIM and
        # repo tokens (and a stray id) as end-of-generation, which would end a reply the model continues.
        self.llm.eos_ids = self.eos_ids
        self.turn_prefix_ids = list(prompt.get("turn_prefix_ids") or self.llm.tokenize(_QWEN_TURN_PREFIX, special=True))
        stream = bundle["streaming"]
        self.read = int(config.read or stream["read"])
        self.write = int(config.write or stream["write"])
        if self.read < 1 or self.write < 1:
            raise OmniliteError(f"read/write must be at least 1 token each, got R={self.read}, W={self.write}.")
        max_final = int(config.max_tts_tokens or bundle["tts"]["max_tokens_final"])
        # The TTS context holds every fused text token, every written speech token and <sep>.
        tts_ctx = config.max_new_tokens * (1 + -(-self.write // self.read)) + max_final + 16
        writer = TTSWriter(bundle, stage_llm_config(bundle, "tts_lm", n_ctx=max(512, tts_ctx), n_gpu_layers=config.n_gpu_layers,
                                                    n_threads=config.threads_for("speech_generator")),
                           ort_for("speech_generator"), config.tts)
        self.tts = writer
        self.units = _TTSStage(writer, self.write, max_final)
        self.omega = self.read  # the shared LLM stage hands over a chunk every `omega` tokens
        self.flow = FlowDecoder(bundle, ort_for("vocoder"))  # flow + HiFT are the profile's "vocoder" stage
        self.hift = HiFTVocoder(bundle, ort_for("vocoder"))
        self.vocoder = _SpeechVocoder(self)
        self.sample_rate = self.hift.sample_rate
        self._busy = threading.Lock()
        self._conversation = None

    def close(self) -> None:
        self.llm.close()
        self.tts.close()

    def _units_step(self, reply, hidden: np.ndarray | None, final: bool = False) -> list[int]:
        return next(self._speech_units(reply, hidden, final))[0]

    def _speech_units(self, reply, hidden: np.ndarray | None, final: bool):
        """A text chunk's W speech tokens; after the last text chunk (and <sep>), the rest of the
        speech in pieces of W tokens up to eos or the cap, each handed to the vocoder at once (the
        official code writes them all in one call, so audio would wait for the whole tail)."""
        stage, clock = self.units, reply.clock
        cap = stage.max_final if final else stage.write
        self._phase(reply, "speech_generator")
        with clock.stage("speech_generator"):
            units, ended = stage.push(hidden, reply.state.tokens, final, max_new=min(stage.write, cap))
        written = min(stage.write, cap)
        reply.state.units.extend(units)
        while final and not ended and written < cap:
            yield units, False
            reply.token.check()
            self._phase(reply, "speech_generator")
            n = min(stage.write, cap - written)
            with clock.stage("speech_generator"):
                units, ended = stage.more(n)
            written += n
            reply.state.units.extend(units)
        yield units, final

    def _phase(self, reply, stage: str) -> None:
        """The base budget for the LLM, and the same for the TTS LM's llama.cpp context: every core
        until the first audio sample (the TTS LM is then on the path to it, mostly alone: the LLM needs
        only R tokens per write), its own share after."""
        if not self.config.phase_threads:
            return
        if stage != "speech_generator":
            super()._phase(reply, stage)
            return
        if reply.phase.get(stage) == reply.steady:
            return
        reply.phase[stage] = reply.steady
        own = self.config.threads_for("speech_generator") or self.cores
        every = max(own, self.cores)
        self.tts.lm.set_threads(own if reply.steady else every, every)

    # Flow and HiFT on two threads in overlapped mode (`Pipeline.split_vocoder`): per second of audio
    # the flow (0.78 s at the real 0.5B shape, int8, one thread) and HiFT (0.29 s) together exceed
    # real time on one core; split, each has a core while the TTS LM shares them.
    split_vocoder = True

    def _vocoder_front(self, reply, units: list[int], final: bool) -> np.ndarray:
        reply.stream.clock = reply.clock
        with reply.clock.stage("vocoder"):
            return reply.stream.mel(units, final)

    def _vocoder_back(self, reply, mel: np.ndarray, final: bool) -> np.ndarray:
        with reply.clock.stage("vocoder"):
            return reply.stream.audio(mel, final)

    def _vocoder_step(self, reply, units: list[int], final: bool) -> np.ndarray:
        return self._vocoder_back(reply, self._vocoder_front(reply, units, final), final)
