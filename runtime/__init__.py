"""Torch-free runtime: load a bundle, answer speech with streamed text and speech."""

from .bundle import Bundle, load_bundle
from .errors import AudioError, BundleError, CheckpointError, DeviceError, OmniliteError
from .events import AudioChunk, Done, Event, TextDelta, Timing
from .pipeline import Pipeline, PipelineConfig
from .vocoder import VocoderStreamConfig

__all__ = [
    "AudioChunk", "AudioError", "Bundle", "BundleError", "CheckpointError", "DeviceError", "Done", "Event",
    "OmniliteError", "Pipeline", "PipelineConfig", "TextDelta", "Timing", "VocoderStreamConfig", "load_bundle",
]
