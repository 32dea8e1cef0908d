"""Torch-free runtime: load a bundle, answer speech with streamed text and speech."""

from .bundle import Bundle, load_bundle
from .errors import AudioError, BundleError, CheckpointError, DeviceError, OmniliteError
from .events import AudioChunk, Done, Event, Interrupted, TextDelta, Timing, TurnEnded, TurnStarted
from .pipeline import Conversation, Pipeline, PipelineConfig, Reply
from .session import Session, SessionConfig
from .vocoder import VocoderStreamConfig

__all__ = [
    "AudioChunk", "AudioError", "Bundle", "BundleError", "CheckpointError", "Conversation", "DeviceError", "Done",
    "Event", "Interrupted", "OmniliteError", "Pipeline", "PipelineConfig", "Reply", "Session", "SessionConfig",
    "TextDelta", "Timing", "TurnEnded", "TurnStarted", "VocoderStreamConfig", "load_bundle",
]
