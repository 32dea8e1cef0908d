"""`omnilite serve` (issue 17): the OpenAI Realtime protocol over WebSocket, on the tiny bundles, with
the server in-process on 127.0.0.1 (port 0). The official `openai` SDK's realtime client, parity with
`Pipeline.respond`, barge-in and response.cancel over the wire, the bad-input catalogue, the slot
queue and `busy`, the API key, HTTP routes, and a small run of the load benchmark."""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import urllib.error
import urllib.request

import numpy as np
import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import InvalidStatus
from openai import AsyncOpenAI

from omnilite.benchmarks.serve_load import LoadConfig, markdown, run_client, run_load, session_cut, turn_pcm
from omnilite.runtime import AudioChunk, OmniliteError, Pipeline, PipelineConfig, TextDelta
from omnilite.runtime.audio import resample
from omnilite.runtime.pipeline import Conversation
from omnilite.runtime.serve import add_parser, main as serve_main
from omnilite.runtime.serve.server import ServeConfig, ServerThread
from omnilite.runtime.session import SessionConfig
from omnilite.runtime.vad import WINDOW

CFG = PipelineConfig(max_new_tokens=16, ignore_eos=True, n_ctx=4096)
BLOCK_MS = ServeConfig().block_ms


@pytest.fixture(scope="module")
def pipe(bundle):
    with Pipeline.load(bundle, CFG) as p:
        yield p


@pytest.fixture(scope="module")
def server(pipe):
    with ServerThread([pipe], ServeConfig(port=0, session=SessionConfig(vad="silero")), model_id="tiny") as srv:
        yield srv


@pytest.fixture(scope="module")
def spare_pipe(bundle):
    """A second pipeline for the servers with other settings (one pipeline serves one server)."""
    with Pipeline.load(bundle, CFG) as p:
        yield p


@pytest.fixture(autouse=True)
def no_server_errors(caplog):
    """No test may leave a traceback or an error in the server's log."""
    caplog.set_level(logging.WARNING)
    yield
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not bad, [r.getMessage() for r in bad]


def respond(pipe: Pipeline, audio: np.ndarray, system: str | None = None) -> tuple[str, np.ndarray, int]:
    """Pipeline.respond's reply: the text as its TextDelta pieces, the audio, the token count."""
    text, chunks, tokens = "", [], 0
    for e in pipe.respond(audio, 16000, conversation=Conversation(system=system)):
        if isinstance(e, TextDelta):
            text += e.text
        elif isinstance(e, AudioChunk):
            chunks.append(e.samples)
        elif hasattr(e, "tokens"):
            tokens = len(e.tokens)
    return text, np.concatenate(chunks), tokens


def snr_db(ref: np.ndarray, test: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / max(np.sum((ref - test) ** 2), 1e-20)))


def check_wire_audio(wire: np.ndarray, ref: np.ndarray, rate: int) -> None:
    """The wire's audio is the reply, then at most one block of silence (the last block read)."""
    assert len(ref) <= len(wire) <= len(ref) + rate * BLOCK_MS // 1000
    assert not wire[len(ref):].any()
    assert snr_db(ref, wire[:len(ref)]) >= 30.0


def b64(pcm: np.ndarray) -> str:
    return base64.b64encode(pcm.astype("<i2").tobytes()).decode()


def sdk_client(srv: ServerThread, **kw) -> AsyncOpenAI:
    return AsyncOpenAI(api_key=kw.pop("api_key", "unused"), base_url=srv.http + "/v1",
                       websocket_base_url=f"ws://127.0.0.1:{srv.server.port}/v1", **kw)


async def recv_until(ws, kind: str, timeout: float = 60.0) -> list[dict]:
    events = []
    while True:
        ev = json.loads(await asyncio.wait_for(ws.recv(), timeout))
        events.append(ev)
        if ev["type"] == kind:
            return events


async def send_turn(ws, pcm: np.ndarray, step: int = 1600) -> None:
    for i in range(0, len(pcm), step):
        await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": b64(pcm[i:i + step])}))


async def open_16k(url: str, **kw):
    ws = await ws_connect(url, max_size=None, **kw)
    assert json.loads(await ws.recv())["type"] == "session.created"
    await ws.send(json.dumps({"type": "session.update", "session": {
        "type": "realtime", "audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000}}}}}))
    assert json.loads(await ws.recv())["type"] == "session.updated"
    return ws


# --- the official SDK --------------------------------------------------------------------------


def test_openai_sdk_client_server_vad_turn_matches_pipeline_respond(server, pipe, question_16k):
    pcm = turn_pcm(question_16k, 1.0)

    async def talk():
        async with sdk_client(server).realtime.connect(model="tiny") as conn:
            created = await conn.recv()
            await conn.session.update(session={"type": "realtime", "audio": {
                "input": {"format": {"type": "audio/pcm", "rate": 16000}}}})
            for i in range(0, len(pcm), 1600):  # the WAV in 100 ms chunks
                await conn.input_audio_buffer.append(audio=b64(pcm[i:i + 1600]))
            events = []
            async for ev in conn:
                events.append(ev)
                if ev.type == "response.done":
                    return created, events

    created, events = asyncio.run(asyncio.wait_for(talk(), 120))
    assert type(created).__name__ == "SessionCreatedEvent"
    assert created.session.audio.output.format.rate == pipe.sample_rate == 16000
    assert created.session.instructions == pipe.bundle["llm"]["prompt"]["system"]
    kinds = [e.type for e in events]
    for kind in ("session.updated", "input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                 "input_audio_buffer.committed", "response.created", "response.output_audio_transcript.delta",
                 "response.output_audio.delta", "response.output_audio.done", "response.output_audio_transcript.done"):
        assert kind in kinds, kind
    assert kinds.index("input_audio_buffer.speech_stopped") < kinds.index("response.created") < kinds.index("response.output_audio.delta")
    # The SDK parsed every event into its own types (none fell back to an untyped dict).
    deltas = [e for e in events if e.type == "response.output_audio.delta"]
    assert {type(e).__name__ for e in deltas} == {"ResponseAudioDeltaEvent"}
    started = next(e for e in events if e.type == "input_audio_buffer.speech_started")
    stopped = next(e for e in events if e.type == "input_audio_buffer.speech_stopped")
    transcript = "".join(e.delta for e in events if e.type == "response.output_audio_transcript.delta")
    wire = np.concatenate([np.frombuffer(base64.b64decode(e.delta), "<i2") for e in deltas]).astype(np.float32) / 32768

    # Pipeline.respond on the audio the Session answered (the speech +- its padding) says the same.
    cut = session_cut(pcm.astype(np.float32) / 32768, (started.audio_start_ms, stopped.audio_end_ms))
    text, audio, n_tokens = respond(pipe, cut)
    assert transcript == text and len(text) > 0
    check_wire_audio(wire, audio, pipe.sample_rate)

    done = events[-1].response
    assert done.status == "incomplete" and done.status_details.reason == "max_output_tokens"  # 16 tokens, EOS ignored
    assert done.usage.output_tokens == n_tokens == 16
    assert done.output[0].content[0].transcript == text
    timings = done.omnilite  # omnilite's per-turn latencies ride along (the SDK keeps unknown fields)
    assert 0 < timings["ttft_ms"] <= timings["ttfa_ms"] and timings["rtf"] > 0
    assert timings["audio_s"] == pytest.approx(len(audio) / pipe.sample_rate)


INSTRUCTIONS = "You answer in French, in one short sentence."


def test_openai_sdk_client_push_to_talk_commit_and_response_create(server, pipe, question_16k):
    """Push-to-talk with the client's own instructions (the system prompt of this conversation)."""
    pcm = turn_pcm(question_16k, 0.2)

    async def talk():
        async with sdk_client(server).realtime.connect(model="tiny") as conn:
            await conn.recv()
            await conn.session.update(session={"type": "realtime", "instructions": INSTRUCTIONS, "audio": {
                "input": {"format": {"type": "audio/pcm", "rate": 16000}, "turn_detection": None}}})
            updated = await conn.recv()
            for i in range(0, len(pcm), 3200):
                await conn.input_audio_buffer.append(audio=b64(pcm[i:i + 3200]))
            await conn.input_audio_buffer.commit()
            await conn.response.create()
            events = []
            async for ev in conn:
                events.append(ev)
                if ev.type == "response.done":
                    return updated, events

    updated, events = asyncio.run(asyncio.wait_for(talk(), 120))
    assert updated.type == "session.updated" and updated.session.audio.input.turn_detection is None
    assert updated.session.instructions == INSTRUCTIONS
    kinds = [e.type for e in events]
    assert "input_audio_buffer.speech_started" not in kinds  # no VAD events in push-to-talk
    assert kinds.index("input_audio_buffer.committed") < kinds.index("response.created")
    transcript = "".join(e.delta for e in events if e.type == "response.output_audio_transcript.delta")
    wire = np.concatenate([np.frombuffer(base64.b64decode(e.delta), "<i2") for e in events
                           if e.type == "response.output_audio.delta"]).astype(np.float32) / 32768
    # Push-to-talk answers exactly the committed audio (the Session pads its last VAD window with zeros).
    x = pcm.astype(np.float32) / 32768
    text, audio, _ = respond(pipe, np.pad(x, (0, -len(x) % WINDOW)), system=INSTRUCTIONS)
    evaluated_default = next(e for e in pipe.respond(np.pad(x, (0, -len(x) % WINDOW)), 16000)
                             if hasattr(e, "stats")).stats["prompt_tokens"]
    assert transcript == text and len(text) > 0
    # The instructions reached the model: the prompt it evaluated is the one they make (not the bundle's).
    done = next(e for e in events if e.type == "response.done")
    evaluated = done.response.omnilite["stats"]["prompt_tokens"]
    assert evaluated - len(pipe.prefix_for(INSTRUCTIONS)) == evaluated_default - len(pipe.prefix_ids)
    assert len(pipe.prefix_for(INSTRUCTIONS)) != len(pipe.prefix_ids)
    check_wire_audio(wire, audio, pipe.sample_rate)


# --- barge-in, cancel, conversation -------------------------------------------------------------


def _deltas_of(events: list[dict], response_id: str) -> list[int]:
    return [i for i, e in enumerate(events) if e["type"] == "response.output_audio.delta" and e["response_id"] == response_id]


def test_barge_in_over_the_wire_cancels_the_reply_within_one_block(server, question_16k):
    pcm = turn_pcm(question_16k, 1.0)

    async def talk():
        ws = await open_16k(server.url)
        try:
            await send_turn(ws, pcm)
            events = await recv_until(ws, "response.output_audio.delta")  # the reply is being spoken
            await send_turn(ws, pcm)  # the user speaks over it
            events += await recv_until(ws, "response.done")
            events += await recv_until(ws, "response.done")  # the second turn is answered
            return events
        finally:
            await ws.close()

    events = asyncio.run(asyncio.wait_for(talk(), 180))
    first, second = [e["response"] for e in events if e["type"] == "response.done"]
    assert first["status"] == "cancelled" and first["status_details"]["reason"] == "turn_detected"
    assert first["output"][0]["status"] == "incomplete"
    assert second["status"] == "incomplete" and second["status_details"]["reason"] == "max_output_tokens"
    barge = [i for i, e in enumerate(events) if e["type"] == "input_audio_buffer.speech_started"][1]
    first_done = next(i for i, e in enumerate(events) if e["type"] == "response.done")
    # After the second speech_started at most one more audio block of the first reply was sent.
    late = [i for i in _deltas_of(events, first["id"]) if i > barge]
    assert len(late) <= 1 and all(i < first_done for i in late)
    assert _deltas_of(events, second["id"])  # the next turn answered with audio
    samples = sum(len(base64.b64decode(events[i]["delta"])) // 2 for i in _deltas_of(events, first["id"]))
    assert samples < second["omnilite"]["audio_s"] * 16000  # the first reply was cut short


def test_response_cancel_then_next_turn_in_the_same_conversation(server, question_16k):
    pcm = turn_pcm(question_16k, 1.0)

    async def talk():
        ws = await open_16k(server.url)
        try:
            await send_turn(ws, pcm)
            events = await recv_until(ws, "response.output_audio.delta")
            await ws.send(json.dumps({"type": "response.cancel"}))
            events += await recv_until(ws, "response.done")
            await ws.send(json.dumps({"type": "response.cancel", "event_id": "c2"}))  # nothing left to cancel
            events += await recv_until(ws, "error")
            await send_turn(ws, pcm)
            events += await recv_until(ws, "response.done")
            return events
        finally:
            await ws.close()

    events = asyncio.run(asyncio.wait_for(talk(), 180))
    first, second = [e["response"] for e in events if e["type"] == "response.done"]
    assert first["status"] == "cancelled" and first["status_details"]["reason"] == "client_cancelled"
    err = next(e["error"] for e in events if e["type"] == "error")
    assert err["code"] == "response_cancel_not_active" and err["event_id"] == "c2"
    # The second turn is a follow-up in the KV cache: the history is cached, only its own positions are new.
    assert second["usage"]["input_token_details"]["cached_tokens"] > 0
    assert second["omnilite"]["stats"]["context"] > second["usage"]["input_tokens"]


def test_24khz_input_and_output(server, pipe, question_16k):
    q24 = resample(question_16k, 16000, 24000)
    gap = np.zeros(24000, np.float32)
    pcm = np.round(np.concatenate([gap, q24, gap]) * 32767).astype(np.int16)

    async def talk():
        async with ws_connect(server.url, max_size=None) as ws:
            await recv_until(ws, "session.created")
            await ws.send(json.dumps({"type": "session.update", "session": {"type": "realtime", "audio": {
                "input": {"format": {"type": "audio/pcm", "rate": 24000}},
                "output": {"format": {"type": "audio/pcm", "rate": 24000}}}}}))
            updated = (await recv_until(ws, "session.updated"))[-1]
            await send_turn(ws, pcm, 2400)
            return updated, await recv_until(ws, "response.done")

    updated, events = asyncio.run(asyncio.wait_for(talk(), 120))
    assert updated["session"]["audio"]["output"]["format"]["rate"] == 24000
    assert updated["session"]["audio"]["output"]["native_rate"] == 16000
    stopped = next(e for e in events if e["type"] == "input_audio_buffer.speech_stopped")
    assert abs(stopped["audio_end_ms"] - (1000 + 1000 * len(question_16k) / 16000)) < 400  # the question's end
    n = sum(len(base64.b64decode(e["delta"])) // 2 for e in events if e["type"] == "response.output_audio.delta")
    audio_s = events[-1]["response"]["omnilite"]["audio_s"]
    assert abs(n - audio_s * 24000) <= 24000 * BLOCK_MS / 1000 + 64  # resampled to 24 kHz


# --- bad input ------------------------------------------------------------------------------------


def test_bad_input_catalogue_gets_error_events_and_the_connection_stays_usable(server):
    big = json.dumps({"type": "input_audio_buffer.append", "audio": "A" * (ServeConfig().max_message_bytes + 4)})
    cases = [
        ("not json{", "invalid_json"),
        (b"\x00\x01binary", "invalid_message"),
        ("[1, 2]", "invalid_event"),
        ('{"event_id": "x"}', "invalid_event"),
        ('{"type": "response.fly"}', "unknown_event"),
        ('{"type": "conversation.item.create", "item": {}}', "unsupported_event"),
        ('{"type": "input_audio_buffer.append", "audio": "%%%"}', "invalid_audio"),
        ('{"type": "input_audio_buffer.append", "audio": "AAEC"}', "invalid_audio"),  # 3 bytes: not 16-bit PCM
        ('{"type": "input_audio_buffer.append", "audio": 5}', "invalid_value"),
        ('{"type": "session.update", "session": {"audio": {"input": {"format": {"type": "audio/pcmu"}}}}}',
         "unsupported_audio_format"),
        ('{"type": "session.update", "session": {"audio": {"input": {"format": {"type": "audio/pcm", "rate": 96000}}}}}',
         "unsupported_audio_format"),
        ('{"type": "session.update", "session": {"voices": 3}}', "unknown_parameter"),
        ('{"type": "session.update", "session": {"instructions": "   "}}', "unsupported_instructions"),
        ('{"type": "session.update", "session": {"instructions": "%s"}}' % ("x" * 9000), "invalid_value"),
        ('{"type": "session.update", "session": {"audio": {"input": {"turn_detection": {"type": "semantic_vad"}}}}}',
         "unsupported_turn_detection"),
        ('{"type": "response.cancel"}', "response_cancel_not_active"),
        ('{"type": "input_audio_buffer.commit"}', "input_audio_buffer_commit_empty"),
        ('{"type": "response.create"}', "no_committed_audio"),
        (big, "message_too_large"),
    ]

    async def talk():
        got = []
        async with ws_connect(server.url, max_size=None) as ws:
            await recv_until(ws, "session.created")
            for raw, _ in cases:
                await ws.send(raw)
                got.append(json.loads(await asyncio.wait_for(ws.recv(), 30)))
            await ws.send('{"type": "session.update", "event_id": "ok", "session": {"type": "realtime"}}')
            got.append(json.loads(await asyncio.wait_for(ws.recv(), 30)))
        return got

    got = asyncio.run(talk())
    for (raw, code), ev in zip(cases, got):
        assert ev["type"] == "error", (raw[:40], ev)
        err = ev["error"]
        assert err["code"] == code, (raw[:40], err)
        # One sentence that names the problem and the fix: no traceback, no second line.
        assert err["message"].endswith(".") and "\n" not in err["message"] and "Traceback" not in err["message"]
    assert "response.fly" in got[4]["error"]["message"] and "input_audio_buffer.append" in got[4]["error"]["message"]
    assert got[-1]["type"] == "session.updated"  # still usable
    assert _get(server.http + "/healthz")[0] == 200  # the server is alive


def test_push_to_talk_buffer_is_bounded_and_settings_lock_at_the_first_audio(server):
    three_s = b64(np.zeros(3 * 16000, np.int16))
    limit_s = ServeConfig().max_buffer_s

    async def talk():
        ws = await open_16k(server.url)
        try:
            await ws.send(json.dumps({"type": "session.update", "session": {"audio": {"input": {"turn_detection": None}}}}))
            await recv_until(ws, "session.updated")
            for _ in range(int(limit_s // 3)):  # 27 s: within the limit, no reply to any of it
                await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": three_s}))
            await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": three_s, "event_id": "over"}))
            full = (await recv_until(ws, "error"))[-1]
            await ws.send(json.dumps({"type": "session.update", "session": {"audio": {"input": {
                "format": {"type": "audio/pcm", "rate": 24000}}}}}))
            locked = (await recv_until(ws, "error"))[-1]
            await ws.send(json.dumps({"type": "input_audio_buffer.clear"}))
            cleared = (await recv_until(ws, "input_audio_buffer.cleared"))[-1]
            await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
            empty = (await recv_until(ws, "error"))[-1]
            return full, locked, cleared, empty
        finally:
            await ws.close()

    full, locked, cleared, empty = asyncio.run(asyncio.wait_for(talk(), 60))
    assert full["error"]["code"] == "input_audio_buffer_full" and full["error"]["event_id"] == "over"
    assert locked["error"]["code"] == "session_locked" and "reconnect" in locked["error"]["message"]
    assert cleared["type"] == "input_audio_buffer.cleared"
    assert empty["error"]["code"] == "input_audio_buffer_commit_empty"


def _get(url: str, headers: dict | None = None) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as r:
            return r.status, r.headers["Content-Type"], r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read().decode()


def test_slot_queue_busy_and_api_key(spare_pipe, question_16k):
    config = ServeConfig(port=0, slots=1, queue=1, api_key="sekrit", session=SessionConfig(vad="silero"))
    auth = {"Authorization": "Bearer sekrit"}

    async def talk(url: str):
        out = {}
        for name, headers in (("wrong", {"Authorization": "Bearer nope"}), ("none", None)):
            async with ws_connect(url, additional_headers=headers) as ws:
                out[name] = json.loads(await ws.recv())
                await ws.wait_closed()
                out[name + "_close"] = ws.close_code
        holder = await ws_connect(url, additional_headers=auth)
        out["holder"] = json.loads(await holder.recv())
        waiting = await ws_connect(url, additional_headers=auth)
        await waiting.send(json.dumps({"type": "input_audio_buffer.append", "audio": b64(np.zeros(160, np.int16))}))
        out["early"] = json.loads(await asyncio.wait_for(waiting.recv(), 10))  # audio before session.created
        async with ws_connect(url, additional_headers=auth) as third:
            out["busy"] = json.loads(await third.recv())
            await third.wait_closed()
            out["busy_close"] = third.close_code
        await holder.close()  # frees the slot: the waiting connection gets its session
        out["admitted"] = json.loads(await asyncio.wait_for(waiting.recv(), 30))
        await waiting.close()
        # Browsers cannot set headers: the key rides in a subprotocol, and "realtime" is selected.
        async with ws_connect(url, subprotocols=["realtime", "openai-insecure-api-key.sekrit"]) as ws:
            out["browser"] = json.loads(await ws.recv())
            out["subprotocol"] = ws.subprotocol
        return out

    with ServerThread([spare_pipe], config) as srv:
        out = asyncio.run(asyncio.wait_for(talk(srv.url), 60))
        models_anon = _get(srv.http + "/v1/models")
        models = _get(srv.http + "/v1/models", auth)
    for name in ("wrong", "none"):
        assert out[name]["error"]["code"] == "invalid_api_key" and out[name + "_close"] == 1008
    assert out["holder"]["type"] == "session.created"
    assert out["early"]["error"]["code"] == "session_not_ready"
    assert out["busy"]["error"]["code"] == "busy" and out["busy_close"] == 1013
    assert "1 model slot(s)" in out["busy"]["error"]["message"]
    assert out["admitted"]["type"] == "session.created"
    assert out["browser"]["type"] == "session.created" and out["subprotocol"] == "realtime"
    assert models_anon[0] == 401 and json.loads(models_anon[2])["error"]["code"] == "invalid_api_key"
    assert models[0] == 200 and json.loads(models[2])["data"][0]["object"] == "model"


def test_idle_timeout_closes_a_silent_connection(spare_pipe):
    async def talk(url):
        async with ws_connect(url) as ws:
            events = [json.loads(await ws.recv()), json.loads(await asyncio.wait_for(ws.recv(), 10))]
            await ws.wait_closed()
            return events

    with ServerThread([spare_pipe], ServeConfig(port=0, idle_timeout_s=0.5)) as srv:
        created, err = asyncio.run(talk(srv.url))
        assert _get(srv.http + "/healthz")[0] == 200
    assert created["type"] == "session.created"
    assert err["error"]["code"] == "idle_timeout"


def test_non_loopback_bind_needs_an_api_key():
    with pytest.raises(OmniliteError, match=r"^binding 0\.0\.0\.0 would expose the model to the network without a key; "
                                            r"pass --api-key KEY .* or bind 127\.0\.0\.1\.$"):
        ServeConfig(host="0.0.0.0").validate()
    ServeConfig(host="0.0.0.0", api_key="k").validate()
    ServeConfig(host="::1").validate()  # loopback, v6
    # The command refuses before loading anything (the bundle path does not even exist).
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "--host", "192.168.1.5"])
    args.bundle = "/nonexistent/bundle"
    with pytest.raises(OmniliteError, match="pass --api-key KEY"):
        serve_main(args, CFG)


def test_port_in_use_is_one_sentence(server, bundle):
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "--port", str(server.server.port)])
    args.bundle = str(bundle)
    with pytest.raises(OmniliteError, match=rf"^cannot listen on 127\.0\.0\.1:{server.server.port} \(.*\); choose another "):
        serve_main(args, CFG)


def test_http_routes_and_same_origin_websocket(server):
    status, kind, page = _get(server.http + "/")
    assert status == 200 and kind.startswith("text/html") and "<title>omnilite</title>" in page
    assert "/app.js" in page and "cdn" not in page.lower() and "https://" not in page
    status, kind, js = _get(server.http + "/app.js")
    assert status == 200 and kind.startswith("text/javascript") and "/v1/realtime" in js and "audioWorklet" in js
    status, _, worklet = _get(server.http + "/worklet.js")
    assert status == 200 and 'registerProcessor("capture"' in worklet and 'registerProcessor("player"' in worklet
    status, kind, health = _get(server.http + "/healthz")
    assert status == 200 and kind == "application/json" and json.loads(health)["status"] == "ok"
    status, _, models = _get(server.http + "/v1/models")
    assert status == 200 and json.loads(models)["data"][0]["id"] == "tiny"
    assert _get(server.http + "/v2/anything")[0] == 404

    async def connect(origin):
        async with ws_connect(server.url, origin=origin) as ws:
            return json.loads(await ws.recv())["type"]

    assert asyncio.run(connect(f"http://127.0.0.1:{server.server.port}")) == "session.created"
    with pytest.raises(InvalidStatus) as e:
        asyncio.run(connect("http://evil.example"))
    assert e.value.response.status_code == 403


# --- load ---------------------------------------------------------------------------------------


def test_load_two_clients_nothing_lost_or_mixed(bundle):
    """The load benchmark, small: 2 concurrent clients x 2 turns over 2 slots; every reply matches
    `Pipeline.respond` on its own connection's turns (benchmarks/serve_load.py runs 4 x 10)."""
    report = run_load(bundle, LoadConfig(clients=2, turns=2, slots=2, timeout_s=300))
    # 4 turns under load and, first, client 0's 2 turns alone (the baseline).
    assert report["turns_answered"] == 4 and report["replies_matching_own_question"] == 6, report["mismatches"]
    assert report["ok"] and report["ttfa_ms"]["p50"] > 0 and report["alone"]["ttfa_ms"]["p50"] > 0
    assert report["ttfa_ratio_to_alone"]["p50"] > 0 and report["rss_before"] > 0 and report["rss_after"] > 0
    assert "| TTFA" in markdown(report) and report["host"]["logical_cores"] >= 1


def test_two_queued_clients_on_one_slot_are_served_in_turn(spare_pipe, question_16k):
    """One slot, two clients at once: the second waits in the queue (no error) and is answered after."""
    pcm = turn_pcm(question_16k, 1.0)
    with ServerThread([spare_pipe], ServeConfig(port=0, slots=1, queue=2)) as srv:
        async def both():
            return await asyncio.gather(run_client(srv.url, [pcm]), run_client(srv.url, [pcm]))

        a, b = asyncio.run(asyncio.wait_for(both(), 180))
    assert a[0].transcript == b[0].transcript and a[0].status == b[0].status == "incomplete"


# --- LLaMA-Omni2 ------------------------------------------------------------------------------------


def test_omni2_bundle_speaks_24khz_over_the_wire(omni2_bundle, question_16k):
    from omnilite.runtime.omni2.pipeline import Omni2PipelineConfig

    config = Omni2PipelineConfig(max_new_tokens=8, ignore_eos=True, max_tts_tokens=30, n_ctx=4096)
    pcm = turn_pcm(question_16k, 0.2)
    # The speaker starts once the whole ~2 s reply is queued (a start buffer longer than it): on a loaded
    # host the tiny flow can fall behind real time, and the silence an underrun sends would lengthen the
    # wire audio; this test is about the 24 kHz reply arriving whole, not about pacing.
    with Pipeline.load(omni2_bundle, config) as pipe2:
        with ServerThread([pipe2], ServeConfig(port=0, session=SessionConfig(start_buffer_s=20.0))) as srv:
            async def talk():
                async with ws_connect(srv.url, max_size=None) as ws:
                    created = (await recv_until(ws, "session.created"))[-1]
                    await ws.send(json.dumps({"type": "session.update", "session": {"type": "realtime", "audio": {
                        "input": {"format": {"type": "audio/pcm", "rate": 16000}, "turn_detection": None}}}}))
                    await send_turn(ws, pcm)
                    await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
                    await ws.send(json.dumps({"type": "response.create"}))
                    return created, await recv_until(ws, "response.done", 300)

            created, events = asyncio.run(asyncio.wait_for(talk(), 400))
        x = pcm.astype(np.float32) / 32768
        text, audio, _ = respond(pipe2, np.pad(x, (0, -len(x) % WINDOW)))
    assert created["session"]["audio"]["output"]["format"]["rate"] == 24000
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_audio_transcript.delta") == text
    wire = np.concatenate([np.frombuffer(base64.b64decode(e["delta"]), "<i2") for e in events
                           if e["type"] == "response.output_audio.delta"]).astype(np.float32) / 32768
    check_wire_audio(wire, audio, 24000)
