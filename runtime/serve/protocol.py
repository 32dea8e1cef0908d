"""The OpenAI Realtime protocol as `omnilite serve` speaks it: client-event validation, the session
settings a client may change, and builders for the server events.

Names and payloads follow the GA Realtime API as the `openai` Python package types it
(`openai.types.realtime`): `session.update` with `session.type = "realtime"`, nested
`audio.input` / `audio.output` settings, `response.output_audio.delta`,
`response.output_audio_transcript.delta`, ... Where omnilite differs it says so in an `error`
event (never silently): one voice, no tools, no text input, replies only to speech.

Extensions, all additive: `audio/pcm` takes any `rate` from 8 to 48 kHz (the API fixes it at
24 kHz; a 16 kHz bundle speaks 16 kHz natively, and `audio.output.native_rate` in the session says
which rate needs no resampling), and `response.done`'s response carries `omnilite` = {ttft_ms,
ttfa_ms, rtf, audio_s, timings, stats} (the per-turn latencies; the SDK keeps unknown fields, so
`event.response.omnilite` reads them).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import secrets
from dataclasses import dataclass
from typing import Any

import numpy as np

MIN_RATE, MAX_RATE = 8000, 48000
DEFAULT_INPUT_RATE = 24000  # the API's audio/pcm rate, which clients assume unless told otherwise

# Client events that exist in the API but that omnilite does not implement, with what to do instead.
UNSUPPORTED_EVENTS = {
    "conversation.item.create": "omnilite answers speech only; append audio with input_audio_buffer.append",
    "conversation.item.retrieve": "omnilite keeps no item audio or text after sending it",
    "conversation.item.delete": "the conversation lives in the model's KV cache; reconnect to start afresh",
    "conversation.item.truncate": "the reply's text stays in the model's context; nothing to do after an interruption",
    "output_audio_buffer.clear": "that event is for WebRTC/SIP; over WebSocket stop playback on the client",
}
CLIENT_EVENTS = ("session.update", "input_audio_buffer.append", "input_audio_buffer.commit",
                 "input_audio_buffer.clear", "response.create", "response.cancel")


class ProtocolError(Exception):
    """A client event omnilite cannot act on: becomes an `error` event; the connection stays open."""

    def __init__(self, code: str, message: str, param: str | None = None, event_id: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.code, self.message, self.param, self.event_id, self.kind = code, message, param, event_id, kind


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(8)}"


@dataclass(frozen=True)
class TurnDetection:
    """`server_vad` settings, mapped onto SessionConfig (silence_duration_ms -> min_silence_ms,
    prefix_padding_ms -> pad_ms, interrupt_response -> barge_in)."""

    threshold: float = 0.5
    prefix_padding_ms: int = 160
    silence_duration_ms: int = 600
    interrupt_response: bool = True

    def as_dict(self) -> dict:
        return {"type": "server_vad", "threshold": self.threshold, "prefix_padding_ms": self.prefix_padding_ms,
                "silence_duration_ms": self.silence_duration_ms, "create_response": True,
                "interrupt_response": self.interrupt_response, "idle_timeout_ms": None}


@dataclass(frozen=True)
class Settings:
    """What a client may set with `session.update`."""

    model: str
    instructions: str
    output_rate: int  # the bundle's native rate unless the client asks for another
    max_output_tokens: int
    input_rate: int = DEFAULT_INPUT_RATE
    turn_detection: TurnDetection | None = TurnDetection()  # None: push-to-talk (commit + response.create)
    modalities: tuple[str, ...] = ("audio",)

    def as_session(self, native_rate: int) -> dict:
        """The session object of session.created / session.updated."""
        return {
            "type": "realtime", "object": "realtime.session", "id": None, "model": self.model,
            "instructions": self.instructions, "output_modalities": list(self.modalities),
            "max_output_tokens": self.max_output_tokens, "tools": [], "tool_choice": "auto",
            "audio": {
                "input": {"format": {"type": "audio/pcm", "rate": self.input_rate},
                          "turn_detection": self.turn_detection.as_dict() if self.turn_detection else None,
                          "transcription": None, "noise_reduction": None},
                "output": {"format": {"type": "audio/pcm", "rate": self.output_rate}, "voice": "default", "speed": 1.0,
                           # the rate the model speaks at; other output rates are resampled from it
                           "native_rate": native_rate},
            },
        }


def expect(value: Any, kind: type | tuple[type, ...], param: str, what: str) -> Any:
    if isinstance(value, bool) and kind in (int, float, (int, float)):
        raise ProtocolError("invalid_value", f"{param} must be {what}, got {value!r}.", param)
    if not isinstance(value, kind):
        raise ProtocolError("invalid_value", f"{param} must be {what}, got {json.dumps(value)[:60]}.", param)
    return value


def _format_rate(fmt: Any, param: str) -> int:
    """The sample rate of an `audio/pcm` format object."""
    fmt = expect(fmt, dict, param, "an object such as {\"type\": \"audio/pcm\", \"rate\": 16000}")
    kind = fmt.get("type", "audio/pcm")
    if kind != "audio/pcm":
        raise ProtocolError("unsupported_audio_format", f"{param}.type {kind!r} is not supported; use \"audio/pcm\" "
                            "(16-bit little-endian mono PCM).", f"{param}.type")
    rate = fmt.get("rate", DEFAULT_INPUT_RATE)
    if isinstance(rate, bool) or not isinstance(rate, int) or not MIN_RATE <= rate <= MAX_RATE:
        raise ProtocolError("unsupported_audio_format", f"{param}.rate {rate!r} is not supported; use a whole number of "
                            f"Hz from {MIN_RATE} to {MAX_RATE} (e.g. 16000 or 24000).", f"{param}.rate")
    return rate


def _turn_detection(td: Any, current: TurnDetection | None) -> TurnDetection | None:
    param = "session.audio.input.turn_detection"
    if td is None:
        return None
    td = expect(td, dict, param, "null (push-to-talk) or a server_vad object")
    if td.get("type") != "server_vad":
        raise ProtocolError("unsupported_turn_detection", f"{param}.type {td.get('type')!r} is not supported; use "
                            "\"server_vad\", or null for push-to-talk.", f"{param}.type")
    if td.get("create_response", True) is not True:
        raise ProtocolError("unsupported_turn_detection", "create_response=false is not supported: with server_vad "
                            "every end of speech is answered; use turn_detection null to decide when to answer.",
                            f"{param}.create_response")
    if td.get("idle_timeout_ms") is not None:
        raise ProtocolError("unsupported_turn_detection", "idle_timeout_ms is not supported; omit it or pass null.",
                            f"{param}.idle_timeout_ms")
    known = {"type", "create_response", "idle_timeout_ms", "threshold", "prefix_padding_ms", "silence_duration_ms",
             "interrupt_response"}
    extra = sorted(set(td) - known)
    if extra:
        raise ProtocolError("unknown_parameter", f"{param}.{extra[0]} is not a server_vad setting; remove it.",
                            f"{param}.{extra[0]}")
    base = current or TurnDetection()
    threshold = td.get("threshold", base.threshold)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 < threshold < 1.0:
        raise ProtocolError("invalid_value", f"{param}.threshold must be between 0 and 1 (exclusive), got {threshold!r}.",
                            f"{param}.threshold")
    values = {}
    for key in ("prefix_padding_ms", "silence_duration_ms"):
        v = td.get(key, getattr(base, key))
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 10_000:
            raise ProtocolError("invalid_value", f"{param}.{key} must be a whole number of ms from 0 to 10000, got {v!r}.",
                                f"{param}.{key}")
        values[key] = v
    if values["silence_duration_ms"] < max(values["prefix_padding_ms"], 32):
        raise ProtocolError("invalid_value", f"{param}.silence_duration_ms ({values['silence_duration_ms']}) must be at "
                            f"least prefix_padding_ms ({values['prefix_padding_ms']}) and 32 ms; raise it.",
                            f"{param}.silence_duration_ms")
    interrupt = expect(td.get("interrupt_response", base.interrupt_response), bool, f"{param}.interrupt_response",
                        "true or false")
    return TurnDetection(float(threshold), values["prefix_padding_ms"], values["silence_duration_ms"], interrupt)


MAX_INSTRUCTIONS = 8000  # characters of a system prompt: a few thousand tokens of the context


def apply_session_update(settings: Settings, session: Any) -> Settings:
    """The settings after a `session.update`'s `session` object (only the fields present change)."""
    session = expect(session, dict, "session", "an object")
    if session.get("type", "realtime") != "realtime":
        raise ProtocolError("unsupported_session_type", f"session.type {session.get('type')!r} is not supported; "
                            "omnilite serves speech-to-speech sessions (\"realtime\").", "session.type")
    changes: dict[str, Any] = {}
    for key, value in session.items():
        if key in ("type", "model", "voice", "tracing", "include", "truncation", "prompt"):
            continue  # one model and one voice per server; no traces, prompts or truncation settings to apply
        if key == "instructions":
            value = expect(value, str, "session.instructions", "a string")
            if len(value) > MAX_INSTRUCTIONS:
                raise ProtocolError("invalid_value", f"session.instructions is {len(value)} characters; the server takes "
                                    f"at most {MAX_INSTRUCTIONS} (they go into the model's context).", "session.instructions")
            changes["instructions"] = value
        elif key == "output_modalities":
            value = expect(value, list, "session.output_modalities", "[\"audio\"] or [\"text\"]")
            if value not in (["audio"], ["text"]):
                raise ProtocolError("invalid_value", "session.output_modalities must be [\"audio\"] or [\"text\"].",
                                    "session.output_modalities")
            changes["modalities"] = tuple(value)
        elif key == "max_output_tokens":
            if value not in ("inf", settings.max_output_tokens):
                raise ProtocolError("unsupported_parameter", f"max_output_tokens is fixed at {settings.max_output_tokens} "
                                    "by the server (`omnilite serve -n`); omit it.", "session.max_output_tokens")
        elif key in ("tools", "tool_choice", "parallel_tool_calls", "reasoning"):
            if value not in (None, [], "auto", "none", False):
                raise ProtocolError("unsupported_parameter", f"session.{key} is not supported: omnilite models call no "
                                    "tools; omit it.", f"session.{key}")
        elif key == "audio":
            changes.update(_audio_update(settings, value))
        else:
            raise ProtocolError("unknown_parameter", f"session.{key} is not a Realtime session setting; remove it.",
                                f"session.{key}")
    return dataclasses.replace(settings, **changes)


def _audio_update(settings: Settings, audio: Any) -> dict[str, Any]:
    audio = expect(audio, dict, "session.audio", "an object with input and/or output")
    changes: dict[str, Any] = {}
    for side, value in audio.items():
        if side not in ("input", "output"):
            raise ProtocolError("unknown_parameter", f"session.audio.{side} is not a setting; use input or output.",
                                f"session.audio.{side}")
        value = expect(value, dict, f"session.audio.{side}", "an object")
        for key, v in value.items():
            param = f"session.audio.{side}.{key}"
            if key == "format":
                changes["input_rate" if side == "input" else "output_rate"] = _format_rate(v, param)
            elif side == "input" and key == "turn_detection":
                changes["turn_detection"] = _turn_detection(v, settings.turn_detection)
            elif side == "input" and key in ("transcription", "noise_reduction"):
                if v is not None:
                    raise ProtocolError("unsupported_parameter", f"{param} is not supported (the model hears the audio "
                                        "itself); pass null or omit it.", param)
            elif side == "output" and key in ("voice", "speed"):
                if key == "speed" and v not in (1, 1.0):
                    raise ProtocolError("unsupported_parameter", f"{param} must be 1.0: omnilite does not time-stretch "
                                        "its speech.", param)
            else:
                raise ProtocolError("unknown_parameter", f"{param} is not a setting; remove it.", param)
    return changes


def parse_client_event(raw: str | bytes) -> dict:
    """A client event as a dict with a known `type`, or ProtocolError."""
    if isinstance(raw, bytes):
        raise ProtocolError("invalid_message", "binary WebSocket frames are not events; send JSON text frames "
                            "(audio goes base64-encoded in input_audio_buffer.append).")
    try:
        event = json.loads(raw)
    except ValueError:
        raise ProtocolError("invalid_json", "the message is not valid JSON; send one JSON event object per message.") from None
    if not isinstance(event, dict):
        raise ProtocolError("invalid_event", "the message is JSON but not an object; send an event such as "
                            "{\"type\": \"input_audio_buffer.append\", \"audio\": \"...\"}.")
    kind, event_id = event.get("type"), event.get("event_id")
    if event_id is not None and not isinstance(event_id, str):
        raise ProtocolError("invalid_value", "event_id must be a string.", "event_id")
    if not isinstance(kind, str):
        raise ProtocolError("invalid_event", "the event has no \"type\"; every client event names its type.", "type",
                            event_id)
    if kind in UNSUPPORTED_EVENTS:
        raise ProtocolError("unsupported_event", f"{kind} is not supported: {UNSUPPORTED_EVENTS[kind]}.", "type", event_id)
    if kind not in CLIENT_EVENTS:
        raise ProtocolError("unknown_event", f"unknown event type {kind!r}; use one of: {', '.join(CLIENT_EVENTS)}.",
                            "type", event_id)
    return event


def decode_pcm16(audio: Any, event_id: str | None) -> np.ndarray:
    """input_audio_buffer.append's base64 PCM16 (little-endian, mono) as float32 in [-1, 1)."""
    if not isinstance(audio, str):
        raise ProtocolError("invalid_value", "audio must be a base64 string of 16-bit little-endian mono PCM.",
                            "audio", event_id)
    try:
        data = base64.b64decode(audio, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError("invalid_audio", "audio is not valid base64; encode the 16-bit PCM bytes with base64.",
                            "audio", event_id) from None
    if len(data) % 2:
        raise ProtocolError("invalid_audio", f"audio has {len(data)} bytes, an odd count, so it is not 16-bit PCM; send "
                            "whole 2-byte samples (16-bit little-endian mono).", "audio", event_id)
    return np.frombuffer(data, "<i2").astype(np.float32) / 32768.0


def encode_pcm16(samples: np.ndarray) -> str:
    pcm = np.clip(np.round(np.asarray(samples, np.float32) * 32767.0), -32768, 32767).astype("<i2")
    return base64.b64encode(pcm.tobytes()).decode("ascii")


def event(kind: str, **fields: Any) -> dict:
    return {"type": kind, "event_id": new_id("event"), **fields}


def error_event(err: ProtocolError) -> dict:
    return event("error", error={"type": err.kind, "code": err.code, "message": err.message, "param": err.param,
                                 "event_id": err.event_id})


def user_item(item_id: str, status: str = "completed") -> dict:
    return {"id": item_id, "object": "realtime.item", "type": "message", "role": "user", "status": status,
            "content": [{"type": "input_audio", "transcript": None}]}


def assistant_item(item_id: str, status: str, modality: str, transcript: str | None) -> dict:
    content = [] if transcript is None else [
        {"type": "output_audio", "transcript": transcript} if modality == "audio" else {"type": "output_text", "text": transcript}]
    return {"id": item_id, "object": "realtime.item", "type": "message", "role": "assistant", "status": status,
            "content": content}
