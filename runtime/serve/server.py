"""`omnilite serve`: the OpenAI Realtime protocol over WebSocket, a thin adapter over `Session`.

    ws://HOST:PORT/v1/realtime   JSON events, base64 PCM16 (protocol.py)
    GET /                        the browser page (static/, no build step)
    GET /healthz                 {"status": "ok", slots, busy, waiting}
    GET /v1/models               the one model this server runs

Connections and the model: a `Pipeline` answers one reply at a time and holds one conversation in
its KV cache, so each connection gets a *slot*: one of `slots` pipelines loaded at start (default 1;
each is a full copy of the ONNX stages and an LLM context, while the GGUF weights are mmapped and
shared). A connection keeps its slot, and so its conversation in the KV cache, until it closes.
Connections beyond the slots wait, at most `queue` of them and at most `queue_timeout_s` each, and
get `session.created` when a slot frees; one more gets an `error` with code `busy` and a 1013
("try again later") close. Nothing is dropped silently and nothing is written to disk.

Per connection, one `Session` (created at the first audio, so `session.update` can still choose the
input rate and turn detection) and one pump thread, which polls the Session's events and acts as
its speaker: from a reply's first sample on it takes `read_output` at real-time pace, one block
(`block_ms`) ahead, and sends each block as `response.output_audio.delta`. A barge-in therefore
stops the deltas within one block, and TTFA/underruns mean what they mean for `chat`.

Limits: `max_message_bytes` per client message (larger: an `error` event; over twice that the
WebSocket layer closes with 1009), `max_buffer_s` of uncommitted push-to-talk audio, `idle_timeout_s`
without a client message, and a bounded outgoing queue (a client that stops reading is closed).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import ipaddress
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State

from ..audio import StreamResampler
from ..errors import OmniliteError
from ..events import Done, Interrupted, TextDelta, TurnEnded, TurnStarted
from ..pipeline import Pipeline
from ..session import Session, SessionConfig
from . import protocol as P

log = logging.getLogger(__name__)

STATIC = {"/": ("index.html", "text/html; charset=utf-8"), "/app.js": ("app.js", "text/javascript; charset=utf-8"),
          "/worklet.js": ("worklet.js", "text/javascript; charset=utf-8")}
_OUTGOING_LIMIT = 4000  # queued server events per connection (~160 s of 40 ms audio deltas)
_API_KEY_PROTOCOL = "openai-insecure-api-key."  # how browsers (which cannot set headers) pass the key


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8765  # 0: any free port (see RealtimeServer.port)
    api_key: str | None = None  # required for any non-loopback host
    slots: int = 1  # pipelines, i.e. conversations served at once
    queue: int = 4  # connections that may wait for a slot; more get `busy`
    queue_timeout_s: float = 120.0
    max_message_bytes: int = 2 * 1024 * 1024  # ~24 s of 24 kHz PCM16 in base64
    max_buffer_s: float = 29.0  # uncommitted push-to-talk audio (the encoder sees at most 30 s)
    idle_timeout_s: float = 600.0  # close a connection that sends nothing for this long
    block_ms: int = 40  # audio per output delta, and how far the server runs ahead of real time
    session: SessionConfig = SessionConfig()  # VAD model and limits; turn settings come from session.update

    def validate(self) -> None:
        if not is_loopback(self.host) and not self.api_key:
            raise OmniliteError(f"binding {self.host} would expose the model to the network without a key; "
                                "pass --api-key KEY (clients send it as a Bearer token) or bind 127.0.0.1.")
        if self.slots < 1 or self.queue < 0:
            raise OmniliteError("--slots must be at least 1 and --queue at least 0.")
        if not 10 <= self.block_ms <= 500:
            raise OmniliteError(f"block_ms {self.block_ms} is outside 10..500; use e.g. 40.")
        if self.max_message_bytes < 1024 or self.idle_timeout_s <= 0 or self.max_buffer_s <= 0:
            raise OmniliteError("max_message_bytes must be at least 1024 and the timeouts and buffer positive.")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class _Pool:
    """Slots (pipeline indices) and the bounded wait for one."""

    def __init__(self, slots: int, queue: int):
        self.free: asyncio.Queue[int] = asyncio.Queue()
        for i in range(slots):
            self.free.put_nowait(i)
        self.slots, self.queue, self.waiting = slots, queue, 0

    def try_wait(self) -> bool:
        if self.free.empty() and self.waiting >= self.queue:
            return False
        self.waiting += 1
        return True

    async def get(self) -> int:
        try:
            return await self.free.get()
        finally:
            self.waiting -= 1


class RealtimeServer:
    def __init__(self, pipelines: list[Pipeline], config: ServeConfig = ServeConfig(), model_id: str = "omnilite"):
        config.validate()
        if len(pipelines) != config.slots:
            raise OmniliteError(f"{len(pipelines)} pipelines for {config.slots} slots; load one pipeline per slot.")
        self.pipelines, self.config, self.model_id = pipelines, config, model_id
        self.instructions = pipelines[0].system_prompt or ""
        self.native_rate = pipelines[0].sample_rate
        self.static = {path: (resources.files(__package__).joinpath("static", name).read_bytes(), kind)
                       for path, (name, kind) in STATIC.items()}
        self._pool: _Pool | None = None
        self._server: Any = None  # websockets' Server, once started
        self.port = config.port

    def default_settings(self) -> P.Settings:
        return P.Settings(model=self.model_id, instructions=self.instructions, output_rate=self.native_rate,
                          max_output_tokens=self.pipelines[0].config.max_new_tokens,
                          turn_detection=P.TurnDetection(self.config.session.threshold, self.config.session.pad_ms,
                                                         self.config.session.min_silence_ms))

    async def start(self) -> None:
        self._pool = _Pool(self.config.slots, self.config.queue)
        self._server = await serve(
            self._handle, self.config.host, self.config.port, process_request=self._http,
            select_subprotocol=lambda conn, offered: "realtime" if "realtime" in offered else None,
            max_size=2 * self.config.max_message_bytes, compression=None, server_header="omnilite")
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("serving ws://%s:%d/v1/realtime (%d slot(s), queue %d)", self.config.host, self.port,
                 self.config.slots, self.config.queue)

    async def serve_forever(self) -> None:
        assert self._server is not None
        await self._server.serve_forever()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    # --- HTTP --------------------------------------------------------------------------------------

    def _authorized(self, headers: Headers) -> bool:
        key = self.config.api_key
        if not key:
            return True
        offered = headers.get("Authorization", "")
        if offered.startswith("Bearer ") and hmac.compare_digest(offered[7:].strip().encode(), key.encode()):
            return True
        for proto in ",".join(headers.get_all("Sec-WebSocket-Protocol")).split(","):
            proto = proto.strip()
            if proto.startswith(_API_KEY_PROTOCOL) and hmac.compare_digest(proto[len(_API_KEY_PROTOCOL):].encode(), key.encode()):
                return True
        return False

    def _same_origin(self, headers: Headers) -> bool:
        """Browsers send Origin; only this server's own page (on a loopback name, or the bound host)
        may open the socket, so another web site cannot drive the local model through the visitor's
        browser. Non-browser clients send no Origin."""
        origin = headers.get("Origin")
        if origin is None:
            return True
        netloc, host = urlsplit(origin).netloc, headers.get("Host", "")
        hostname = urlsplit(f"//{host}").hostname or ""
        return netloc == host and (is_loopback(hostname) or hostname == self.config.host)

    def _http(self, connection: ServerConnection, request: Request) -> Response | None:
        path = urlsplit(request.path).path
        if path == "/v1/realtime":
            if not self._same_origin(request.headers):
                return _respond(connection, 403, "cross-origin WebSocket connections are refused; open the page this "
                                "server serves, or connect from a non-browser client.")
            return None  # the WebSocket handshake goes on; the key is checked once open (error event)
        if path == "/healthz":
            pool = self._pool
            return _respond(connection, 200, json.dumps({"status": "ok", "slots": self.config.slots,
                                                         "busy": self.config.slots - pool.free.qsize() if pool else 0,
                                                         "waiting": pool.waiting if pool else 0}), "application/json")
        if path == "/v1/models":
            if not self._authorized(request.headers):
                return _respond(connection, 401, json.dumps({"error": {
                    "type": "invalid_request_error", "code": "invalid_api_key",
                    "message": "missing or wrong API key; send it as 'Authorization: Bearer KEY'."}}), "application/json")
            return _respond(connection, 200, json.dumps({"object": "list", "data": [
                {"id": self.model_id, "object": "model", "created": 0, "owned_by": "omnilite"}]}), "application/json")
        if path in self.static:
            body, kind = self.static[path]
            return _respond(connection, 200, body, kind)
        return _respond(connection, 404, f"nothing at {path}; the Realtime endpoint is /v1/realtime, the page is /.")

    # --- WebSocket ---------------------------------------------------------------------------------

    async def _handle(self, ws: ServerConnection) -> None:
        assert self._pool is not None
        if not self._authorized(ws.request.headers):
            await _send_error(ws, P.ProtocolError("invalid_api_key", "missing or wrong API key; send it as "
                                                  "'Authorization: Bearer KEY' (or the openai-insecure-api-key.KEY "
                                                  "subprotocol from a browser).", kind="authentication_error"))
            await ws.close(1008, "invalid API key")
            return
        if not self._pool.try_wait():
            await _send_error(ws, P.ProtocolError("busy", f"all {self.config.slots} model slot(s) are in use and "
                                                  f"{self.config.queue} connection(s) are waiting; try again later.",
                                                  kind="server_error"))
            await ws.close(1013, "busy")
            return
        slot = await self._wait_for_slot(ws)
        if slot is None:
            return
        conn = _Connection(self, ws, self.pipelines[slot])
        try:
            await conn.run()
        finally:
            await asyncio.to_thread(conn.close_session)
            self._pool.free.put_nowait(slot)

    async def _wait_for_slot(self, ws: ServerConnection) -> int | None:
        """The slot, once free; meanwhile every client event is answered with `session_not_ready`."""
        assert self._pool is not None

        async def refuse() -> None:
            while True:
                await ws.recv()
                await _send_error(ws, P.ProtocolError("session_not_ready", "this connection is waiting for a free model "
                                                      "slot; wait for session.created before sending events."))

        refusing = asyncio.ensure_future(refuse())
        getting = asyncio.ensure_future(self._pool.get())
        try:
            done, _ = await asyncio.wait({refusing, getting}, timeout=self.config.queue_timeout_s,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            refusing.cancel()  # cancelling recv() loses no message
            getting.cancel()  # a no-op once it has its slot
            await asyncio.gather(refusing, getting, return_exceptions=True)  # (a closed socket ends `refusing`)
        if not getting.cancelled():
            if ws.state is State.OPEN:
                return getting.result()
            self._pool.free.put_nowait(getting.result())  # the client left while waiting
            return None
        if not done:
            await _send_error(ws, P.ProtocolError("busy", f"no model slot freed within {self.config.queue_timeout_s:g} s; "
                                                  "try again later.", kind="server_error"))
            await ws.close(1013, "busy")
        return None


def _respond(connection: ServerConnection, status: int, body: str | bytes, kind: str = "text/plain; charset=utf-8") -> Response:
    response = connection.respond(status, "")
    response.body = body.encode() if isinstance(body, str) else body
    del response.headers["Content-Type"], response.headers["Content-Length"]
    response.headers["Content-Type"] = kind
    response.headers["Content-Length"] = str(len(response.body))
    response.headers["Cache-Control"] = "no-store"
    return response


async def _send_error(ws: ServerConnection, err: P.ProtocolError) -> None:
    try:
        await ws.send(json.dumps(P.error_event(err)))
    except ConnectionClosed:
        pass


@dataclass
class _Response:
    """The reply in progress, as the protocol sees it."""

    id: str
    item_id: str
    modality: str
    out_rate: int
    resampler: StreamResampler | None
    text: str = ""
    clock: float | None = None  # perf_counter of its first sample
    taken: int = 0  # native-rate samples taken from the Session since the first
    cancel_requested: bool = False


class _Connection:
    def __init__(self, server: RealtimeServer, ws: ServerConnection, pipeline: Pipeline):
        self.server, self.ws, self.pipeline = server, ws, pipeline
        self.config = server.config
        self.settings = server.default_settings()
        self.loop = asyncio.get_running_loop()
        self.out: asyncio.Queue[dict | None] = asyncio.Queue()
        self.session: Session | None = None
        self.lock = threading.Lock()  # the response state, shared by the reader and the pump thread
        self.resp: _Response | None = None
        self.last_item: str | None = None
        self.user_item: str | None = None  # the user item of the turn being spoken or committed
        self.ptt_audio: list[np.ndarray] = []  # push-to-talk audio not yet committed
        self.ptt_committed: list[np.ndarray] = []  # committed, waiting for response.create
        self.committed_at = 0.0
        self.input_samples = 0
        self._stop = threading.Event()
        self._pump: threading.Thread | None = None
        self._closing = False

    # --- outgoing ----------------------------------------------------------------------------------

    def emit(self, message: dict | None) -> None:
        """Queue a server event (from any thread)."""
        self.loop.call_soon_threadsafe(self._enqueue, message)

    def _enqueue(self, message: dict | None) -> None:
        if self.out.qsize() >= _OUTGOING_LIMIT and message is not None:
            if not self._closing:
                self._closing = True
                log.warning("closing a connection that stopped reading (%d events queued)", self.out.qsize())
                asyncio.ensure_future(self.ws.close(1008, "client is not reading its events"))
            return
        self.out.put_nowait(message)

    async def _writer(self) -> None:
        while (message := await self.out.get()) is not None:
            await self.ws.send(json.dumps(message))

    # --- the connection ----------------------------------------------------------------------------

    async def run(self) -> None:
        self.emit(P.event("session.created", session=self.settings.as_session(self.server.native_rate)))
        writer = asyncio.ensure_future(self._writer())
        try:
            while True:
                try:
                    raw = await asyncio.wait_for(self.ws.recv(), self.config.idle_timeout_s)
                except asyncio.TimeoutError:
                    self.emit(P.error_event(P.ProtocolError("idle_timeout", f"no event for {self.config.idle_timeout_s:g} s; "
                                                            "closing. Reconnect to go on.")))
                    break
                try:
                    await self._on_message(raw)
                except P.ProtocolError as e:
                    self.emit(P.error_event(e))
                except OmniliteError as e:
                    self.emit(P.error_event(P.ProtocolError("invalid_audio", str(e))))
        except ConnectionClosed:
            pass
        finally:
            self.emit(None)
            try:
                await asyncio.wait_for(writer, 5.0)
            except (ConnectionClosed, asyncio.TimeoutError):
                writer.cancel()
            if self.ws.state is State.OPEN:
                await self.ws.close(1000)

    async def _on_message(self, raw: str | bytes) -> None:
        size = len(raw)
        if size > self.config.max_message_bytes:
            raise P.ProtocolError("message_too_large", f"the message has {size} bytes, over this server's limit of "
                                  f"{self.config.max_message_bytes}; send audio in smaller appends (e.g. 100 ms each).")
        ev = P.parse_client_event(raw)
        kind, event_id = ev["type"], ev.get("event_id")
        try:
            if kind == "session.update":
                self._session_update(ev.get("session"))
            elif kind == "input_audio_buffer.append":
                await self._append(P.decode_pcm16(ev.get("audio"), event_id))
            elif kind == "input_audio_buffer.commit":
                await self._commit()
            elif kind == "input_audio_buffer.clear":
                await self._clear()
            elif kind == "response.create":
                await self._response_create(ev.get("response"))
            elif kind == "response.cancel":
                await self._cancel()
        except P.ProtocolError as e:
            e.event_id = e.event_id or event_id
            raise

    def _session_update(self, session: Any) -> None:
        new = P.apply_session_update(self.settings, session)
        if new.instructions != self.settings.instructions:
            try:  # a template that cannot take other instructions says so now, not at the first turn
                self.pipeline.prefix_for(new.instructions or None)
            except OmniliteError as e:
                raise P.ProtocolError("unsupported_instructions", str(e), "session.instructions") from None
        if self.session is not None:
            for field in ("input_rate", "turn_detection", "instructions"):
                if getattr(new, field) != getattr(self.settings, field):
                    raise P.ProtocolError("session_locked", f"{field} can change only before the first audio (the "
                                          "session is built then); reconnect to change it.", f"session.{field}")
        self.settings = new
        self.emit(P.event("session.updated", session=new.as_session(self.server.native_rate)))

    def _session_config(self) -> SessionConfig:
        td = self.settings.turn_detection
        base = dataclasses.replace(self.config.session, instructions=self.settings.instructions or None)
        if td is None:
            return dataclasses.replace(base, turn_detection=False)
        return dataclasses.replace(base, turn_detection=True, threshold=td.threshold, pad_ms=td.prefix_padding_ms,
                                   min_silence_ms=td.silence_duration_ms, barge_in=td.interrupt_response)

    async def _ensure_session(self) -> Session:
        if self.session is None:
            self.session = await asyncio.to_thread(Session, self.pipeline, self._session_config())
            self._pump = threading.Thread(target=self._pump_loop, name="omnilite-serve-pump", daemon=True)
            self._pump.start()
        return self.session

    async def _append(self, samples: np.ndarray) -> None:
        session = await self._ensure_session()
        rate = self.settings.input_rate
        self.input_samples += len(samples)
        if self.settings.turn_detection is None:
            held = sum(map(len, self.ptt_audio)) + len(samples)
            if held > self.config.max_buffer_s * rate:
                self.input_samples -= len(samples)
                raise P.ProtocolError("input_audio_buffer_full", f"the input audio buffer holds at most "
                                      f"{self.config.max_buffer_s:g} s; commit (input_audio_buffer.commit) or clear it.")
            self.ptt_audio.append(samples)
            return
        if samples.size:
            await asyncio.to_thread(session.feed, samples, rate)

    async def _commit(self) -> None:
        if self.settings.turn_detection is None:
            if not self.ptt_audio:
                raise P.ProtocolError("input_audio_buffer_commit_empty", "the input audio buffer is empty; append audio "
                                      "before committing.")
            self.ptt_committed += self.ptt_audio
            self.ptt_audio = []
            self.committed_at = time.perf_counter()
            self._user_turn_committed(P.new_id("item"))
            return
        session = await self._ensure_session()
        if not await asyncio.to_thread(session.commit):
            raise P.ProtocolError("input_audio_buffer_commit_empty", "there is no speech to commit; append audio first.")

    async def _clear(self) -> None:
        if self.settings.turn_detection is None:
            self.ptt_audio = []
        elif self.session is not None:
            await asyncio.to_thread(self.session.clear_input)
        self.emit(P.event("input_audio_buffer.cleared"))

    async def _response_create(self, params: Any) -> None:
        if params is not None:
            params = P.expect(params, dict, "response", "an object")
            unsupported = sorted(set(params) - {"output_modalities", "metadata", "conversation", "audio"})
            if unsupported or params.get("conversation", "auto") != "auto":
                key = unsupported[0] if unsupported else "conversation"
                raise P.ProtocolError("unsupported_parameter", f"response.{key} is not supported: a reply answers the "
                                      "committed speech in the default conversation; omit it.", f"response.{key}")
        with self.lock:
            if self.resp is not None:
                raise P.ProtocolError("conversation_already_has_active_response", "a response is in progress; wait for "
                                      "its response.done or send response.cancel.")
        if self.settings.turn_detection is not None:
            raise P.ProtocolError("no_committed_audio", "with server_vad a reply starts by itself at the end of speech; "
                                  "set turn_detection to null to answer on response.create.")
        if not self.ptt_committed:
            raise P.ProtocolError("no_committed_audio", "there is no committed audio to answer; append audio and send "
                                  "input_audio_buffer.commit first.")
        session = await self._ensure_session()
        audio, self.ptt_committed = np.concatenate(self.ptt_committed), []
        modalities = (params or {}).get("output_modalities") or list(self.settings.modalities)

        def start() -> bool:
            session.feed(audio, self.settings.input_rate, captured_at=self.committed_at)
            with self.lock:
                started = session.commit()
                if started:
                    self._begin_response(modalities[0] if modalities in (["audio"], ["text"]) else "audio")
                return started

        if not await asyncio.to_thread(start):
            raise P.ProtocolError("no_committed_audio", "the committed audio could not start a turn; append speech.")

    async def _cancel(self) -> None:
        with self.lock:
            resp = self.resp
            if resp is None:
                raise P.ProtocolError("response_cancel_not_active", "there is no response in progress to cancel.")
            resp.cancel_requested = True
        assert self.session is not None
        await asyncio.to_thread(self.session.cancel_reply)

    def close_session(self) -> None:
        self._stop.set()
        if self._pump is not None:
            self._pump.join()
        if self.session is not None:
            self.session.close()

    # --- turn and response events (the reader's thread or the pump thread, under self.lock) -------

    def _user_turn_committed(self, item_id: str) -> None:
        self.emit(P.event("input_audio_buffer.committed", item_id=item_id, previous_item_id=self.last_item))
        item = P.user_item(item_id)
        self.emit(P.event("conversation.item.added", item=item, previous_item_id=self.last_item))
        self.emit(P.event("conversation.item.done", item=item, previous_item_id=self.last_item))
        self.last_item = item_id

    def _begin_response(self, modality: str) -> None:
        out_rate, native = self.settings.output_rate, self.server.native_rate
        resp = _Response(P.new_id("resp"), P.new_id("item"), modality, out_rate,
                         StreamResampler(native, out_rate) if out_rate != native else None)
        self.resp = resp
        self.emit(P.event("response.created", response=self._response_object(resp, "in_progress", [])))
        item = P.assistant_item(resp.item_id, "in_progress", modality, None)
        self.emit(P.event("response.output_item.added", response_id=resp.id, output_index=0, item=item))
        self.emit(P.event("conversation.item.added", item=item, previous_item_id=self.last_item))
        self.emit(P.event("response.content_part.added", response_id=resp.id, item_id=resp.item_id, output_index=0,
                          content_index=0, part=self._part(resp)))
        self.last_item = resp.item_id

    def _part(self, resp: _Response) -> dict:
        return {"type": "audio", "transcript": resp.text} if resp.modality == "audio" else {"type": "text", "text": resp.text}

    def _response_object(self, resp: _Response, status: str, output: list, details: dict | None = None,
                         usage: dict | None = None, extra: dict | None = None) -> dict:
        obj = {"id": resp.id, "object": "realtime.response", "status": status, "status_details": details,
               "output": output, "conversation_id": "conv_default", "output_modalities": [resp.modality],
               "max_output_tokens": self.settings.max_output_tokens, "metadata": None, "usage": usage,
               "audio": {"output": {"format": {"type": "audio/pcm", "rate": resp.out_rate}, "voice": "default"}}}
        return {**obj, **({"omnilite": extra} if extra else {})}

    def _end_response(self, status: str, details: dict | None = None, done: Done | None = None) -> None:
        resp, self.resp = self.resp, None
        assert resp is not None
        if resp.resampler is not None and status == "completed":
            self._send_audio(resp, resp.resampler.flush())
        ids = {"response_id": resp.id, "item_id": resp.item_id, "output_index": 0, "content_index": 0}
        if resp.modality == "audio":
            self.emit(P.event("response.output_audio.done", **ids))
            self.emit(P.event("response.output_audio_transcript.done", transcript=resp.text, **ids))
        else:
            self.emit(P.event("response.output_text.done", text=resp.text, **ids))
        self.emit(P.event("response.content_part.done", part=self._part(resp), **ids))
        item = P.assistant_item(resp.item_id, "completed" if status == "completed" else "incomplete", resp.modality, resp.text)
        self.emit(P.event("response.output_item.done", response_id=resp.id, output_index=0, item=item))
        self.emit(P.event("conversation.item.done", item=item, previous_item_id=None))
        usage = extra = None
        if done is not None:
            t, stats = done.timings, done.stats
            usage = {"input_tokens": stats.get("prompt_tokens", 0), "output_tokens": len(done.tokens),
                     "total_tokens": stats.get("prompt_tokens", 0) + len(done.tokens),
                     "input_token_details": {"cached_tokens": max(0, stats.get("context", 0) - stats.get("prompt_tokens", 0))}}
            extra = {"ttft_ms": _ms(t.get("ttft")), "ttfa_ms": _ms(t.get("ttfa")), "rtf": t.get("rtf"),
                     "audio_s": len(done.audio) / done.sample_rate, "timings": t, "stats": stats}
        self.emit(P.event("response.done", response=self._response_object(resp, status, [item], details, usage, extra)))

    def _send_audio(self, resp: _Response, samples: np.ndarray) -> None:
        if resp.modality != "audio" or not samples.size:
            return
        self.emit(P.event("response.output_audio.delta", response_id=resp.id, item_id=resp.item_id, output_index=0,
                          content_index=0, delta=P.encode_pcm16(samples)))

    # --- the pump thread: Session events and the speaker side ----------------------------------------

    def _pump_loop(self) -> None:
        session = self.session
        assert session is not None
        tick = self.config.block_ms / 1000
        block = int(self.server.native_rate * tick)
        try:
            while not self._stop.is_set():
                with self.lock:
                    before = (session.idle, self.resp)
                events = session.poll(tick)
                with self.lock:
                    for e in events:
                        self._on_session_event(e)
                    if before[0] and before[1] is not None and before[1] is self.resp:
                        # The Session dropped the turn (e.g. audio too quiet to answer) without a reply.
                        self._end_response("failed", {"type": "failed", "reason": None, "error": {
                            "type": "invalid_request_error", "code": "audio_rejected",
                            "message": "the turn's audio could not be answered (too short or too quiet); speak again."}})
                    if self.resp is not None:
                        self._take_audio(session, self.resp, block)
        except Exception as e:  # noqa: BLE001 - a runner failure ends this connection, not the server
            log.exception("session failed")
            self.emit(P.error_event(P.ProtocolError("server_error", f"the model failed: {e}", kind="server_error")))
            asyncio.run_coroutine_threadsafe(self.ws.close(1011, "model failure"), self.loop)

    def _take_audio(self, session: Session, resp: _Response, block: int) -> None:
        now = time.perf_counter()
        if resp.clock is None:
            samples = session.read_output(block)
            if not samples.any():
                return  # the reply's first sample has not come yet (read_output pads with silence)
            resp.clock, resp.taken = now, len(samples)
        else:
            due = int((now - resp.clock) * self.server.native_rate) + block  # one block ahead of real time
            if due <= resp.taken:
                return
            samples = session.read_output(due - resp.taken)
            resp.taken = due
        if resp.resampler is not None:
            samples = resp.resampler.push(samples)
        self._send_audio(resp, samples)

    def _on_session_event(self, e: Any) -> None:
        vad = self.settings.turn_detection is not None
        if isinstance(e, TurnStarted) and vad:
            self.user_item = P.new_id("item")
            self.emit(P.event("input_audio_buffer.speech_started", audio_start_ms=round(e.at * 1000), item_id=self.user_item))
        elif isinstance(e, TurnEnded) and vad:
            item_id = self.user_item or P.new_id("item")
            self.emit(P.event("input_audio_buffer.speech_stopped", audio_end_ms=round(e.end_of_speech * 1000), item_id=item_id))
            self._user_turn_committed(item_id)
            self.user_item = None
            self._begin_response(self.settings.modalities[0])
        elif isinstance(e, TextDelta) and self.resp is not None:
            resp = self.resp
            resp.text += e.text
            kind = "response.output_audio_transcript.delta" if resp.modality == "audio" else "response.output_text.delta"
            self.emit(P.event(kind, response_id=resp.id, item_id=resp.item_id, output_index=0, content_index=0, delta=e.text))
        elif isinstance(e, Interrupted) and self.resp is not None:
            reason = "client_cancelled" if self.resp.cancel_requested else "turn_detected"
            self._end_response("cancelled", {"type": "cancelled", "reason": reason})
        elif isinstance(e, Done) and self.resp is not None:
            capped = len(e.tokens) >= self.settings.max_output_tokens
            self._end_response("incomplete" if capped else "completed",
                               {"type": "incomplete", "reason": "max_output_tokens"} if capped else None, e)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


class ServerThread:
    """A `RealtimeServer` on its own event loop in a background thread (tests, benchmarks, apps that
    embed the server): `with ServerThread(pipelines, config) as srv: ... srv.url`."""

    def __init__(self, pipelines: list[Pipeline], config: ServeConfig = ServeConfig(), model_id: str = "omnilite"):
        self.server = RealtimeServer(pipelines, config, model_id)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="omnilite-serve", daemon=True)
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self.server.start())
        except BaseException as e:  # noqa: BLE001 - re-raised by __enter__
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(self.server.close())
        self.loop.close()

    @property
    def url(self) -> str:
        return f"ws://{self.server.config.host}:{self.server.port}/v1/realtime"

    @property
    def http(self) -> str:
        return f"http://{self.server.config.host}:{self.server.port}"

    def __enter__(self) -> "ServerThread":
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()


def load_pipelines(load: Callable[[], Pipeline], slots: int) -> list[Pipeline]:
    """`slots` pipelines from `load` (closing those already loaded if one fails)."""
    pipes: list[Pipeline] = []
    try:
        for _ in range(slots):
            pipes.append(load())
    except BaseException:
        for p in pipes:
            p.close()
        raise
    return pipes
