"""The torch-free LLaMA-Omni pipeline: speech in, streamed text and speech out.

encoder (ONNX) -> LLM (llama.cpp, speech embeddings spliced into the prompt) -> every `omega`
generated tokens, their hidden states -> streaming CTC unit generator (ONNX, KV cache) ->
ring-buffered unit vocoder (ONNX) -> AudioChunk events.
"""

from __future__ import annotations

import codecs
import logging
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .audio import prepare_speech
from .bundle import Bundle, load_bundle
from .encoder import SpeechEncoder
from .errors import BundleError, OmniliteError
from .events import AudioChunk, Done, Event, TextDelta, Timing
from .llm import LlamaCppLLM, LLMConfig
from .onnx_session import SessionOptions
from .units import StreamingUnitGenerator
from .vocoder import UnitVocoder, VocoderStreamConfig

log = logging.getLogger(__name__)

SUPPORTED_FAMILIES = ("llama-omni",)


@dataclass(frozen=True)
class PipelineConfig:
    encoder_mode: str = "exact"  # "exact" (30 s padding, as trained) or "unpadded"
    omega: int | None = None  # text tokens per speech chunk; None: the bundle's (10)
    max_new_tokens: int = 256
    ignore_eos: bool = False  # benchmarks force a fixed reply length with random weights
    vocoder: VocoderStreamConfig = field(default_factory=VocoderStreamConfig)
    threads: int | None = None
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    n_gpu_layers: int = 0
    verify_bundle: bool = True


class _Clock:
    """Accumulates wall time per stage for one turn."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    @contextmanager
    def stage(self, name: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - t
            self.calls[name] += 1


class Pipeline:
    def __init__(self, bundle: Bundle, config: PipelineConfig = PipelineConfig()):
        if bundle.family not in SUPPORTED_FAMILIES:
            raise BundleError(f"{bundle.path} is a '{bundle.family}' bundle, which this omnilite cannot run; upgrade omnilite.")
        self.bundle = bundle
        self.config = config
        ort_options = SessionOptions(providers=config.providers, intra_op_threads=config.threads or 0)
        self.encoder = SpeechEncoder(bundle, ort_options)
        llm_cfg = bundle["llm"]
        self.prefix_ids = list(llm_cfg["prompt"]["prefix_ids"])
        self.suffix_ids = list(llm_cfg["prompt"]["suffix_ids"])
        self.eos_ids = frozenset(llm_cfg["eos_ids"])
        # Room for the prompt, 30 s of speech positions and the reply.
        needed = len(self.prefix_ids) + len(self.suffix_ids) + bundle["encoder"]["max_mel_frames"] // bundle["encoder"]["frames_per_position"]
        n_ctx = max(2048, needed + config.max_new_tokens + 8)
        # An f32 LLM keeps its KV cache in f32 too, so the exact path stays exact.
        kv = "f32" if bundle.stages["llm"].precision == "f32" else "f16"
        self.llm = LlamaCppLLM(bundle.file("llm"), LLMConfig(n_ctx=n_ctx, n_threads=config.threads,
                                                             n_gpu_layers=config.n_gpu_layers, kv_cache=kv))
        self.units = StreamingUnitGenerator(bundle, ort_options)
        self.vocoder = UnitVocoder(bundle, ort_options)
        self.omega = int(config.omega or bundle["streaming"]["omega"])
        if self.omega < 1:
            raise OmniliteError(f"omega must be at least 1 text token per chunk, got {self.omega}.")
        self.sample_rate = self.vocoder.sample_rate

    @classmethod
    def load(cls, bundle: str | Path, config: PipelineConfig = PipelineConfig()) -> "Pipeline":
        return cls(load_bundle(bundle, verify=config.verify_bundle), config)

    def close(self) -> None:
        self.llm.close()

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def respond(self, audio: np.ndarray, sample_rate: int) -> Iterator[Event]:
        """Answer one spoken question. t0 (for TTFT/TTFA) is this call: the audio is complete."""
        t0 = time.perf_counter()
        clock = _Clock()
        latency: dict[str, float] = {}
        with clock.stage("resample"):
            speech = prepare_speech(audio, sample_rate, 16000)
        with clock.stage("mel"):
            mel = self.encoder.mel(speech, self.config.encoder_mode)
        with clock.stage("encoder"):
            embeds = self.encoder.embed(mel)
        with clock.stage("llm_prefill"):
            self.llm.reset()
            self.llm.eval_tokens(self.prefix_ids)
            self.llm.eval_embeddings(embeds)
            first = self.llm.eval_tokens(self.suffix_ids, want_last=True)
        self.units.reset()
        stream = self.vocoder.stream(self.config.vocoder)
        text_decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        tokens: list[int] = []
        units: list[int] = []
        audio_out: list[np.ndarray] = []
        pending: list[np.ndarray] = []

        def speak(final: bool) -> Iterator[Event]:
            with clock.stage("speech_generator"):
                new_units = self.units.push(np.stack(pending)) if pending else []
            pending.clear()
            units.extend(new_units)
            with clock.stage("vocoder"):
                wav = stream.push(new_units)
                if final:
                    wav = np.concatenate([wav, stream.flush()])
            if len(wav):
                latency.setdefault("ttfa", time.perf_counter() - t0)
                audio_out.append(wav)
                yield AudioChunk(wav, self.sample_rate)

        steps = self.llm.generate(self.config.max_new_tokens, ignore_eos=self.config.ignore_eos, first=first)
        while True:
            with clock.stage("llm_decode"):
                item = next(steps, None)
            if item is None:
                break
            token, hidden = item
            tokens.append(token)
            pending.append(hidden)
            if token not in self.eos_ids:
                piece = text_decoder.decode(self.llm.token_piece(token))
                if piece:
                    latency.setdefault("ttft", time.perf_counter() - t0)
                    yield TextDelta(piece)
            if len(pending) == self.omega:
                yield from speak(final=False)
        tail = text_decoder.decode(b"", final=True)
        if tail:
            yield TextDelta(tail)
        yield from speak(final=True)

        total = time.perf_counter() - t0
        reply = np.concatenate(audio_out) if audio_out else np.zeros(0, np.float32)
        timings = dict(clock.seconds)
        for name, seconds in timings.items():
            yield Timing(name, seconds, clock.calls[name])
        for name, seconds in latency.items():
            yield Timing(name, seconds)
        yield Timing("total", total)
        audio_seconds = len(reply) / self.sample_rate
        if audio_seconds > 0:
            synth = timings.get("speech_generator", 0.0) + timings.get("vocoder", 0.0)
            latency["rtf"] = synth / audio_seconds
        timings.update(latency, total=total)
        text = self.llm.detokenize([t for t in tokens if t not in self.eos_ids])
        yield Done(text=text, tokens=tokens, units=units, audio=reply, sample_rate=self.sample_rate, timings=timings)
