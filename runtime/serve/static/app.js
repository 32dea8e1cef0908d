// The page's client: microphone -> input_audio_buffer.append; reply audio deltas -> speaker;
// transcript and per-turn latencies from the Realtime events. No framework, no build step.
"use strict";
const $ = (id) => document.getElementById(id);
let ws = null, ctx = null, mic = null, player = null, current = null, speaking = null, turns = 0, receivedSeconds = 0;
// The server builds its session at the first audio, with the rates it has by then: send none until
// it has confirmed ours (session.updated), or it would lock the default rate and refuse our update.
let configured = false;

function toBase64(int16) {
  const bytes = new Uint8Array(int16.buffer, int16.byteOffset, int16.byteLength);
  let text = "";
  for (let i = 0; i < bytes.length; i += 0x8000) text += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  return btoa(text);
}

function fromBase64(b64) {
  const raw = atob(b64);
  const bytes = new Uint8Array(raw.length);
  for (let i = 0; i < raw.length; i++) bytes[i] = raw.charCodeAt(i);
  const pcm = new Int16Array(bytes.buffer);
  const out = new Float32Array(pcm.length);
  for (let i = 0; i < pcm.length; i++) out[i] = pcm[i] / 32768;
  return out;
}

function line(cls, text) {
  const div = document.createElement("div");
  div.className = cls;
  div.textContent = text;
  $("transcript").appendChild(div);
  return div;
}

function setStatus(text) { $("status").textContent = text; }

function send(event) { if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(event)); }

function fmt(v, digits) { return v === null || v === undefined ? "-" : Number(v).toFixed(digits); }

function onEvent(ev) {
  switch (ev.type) {
    case "session.created":
      // Speak and listen at the audio device's rate: the server resamples both ways.
      send({type: "session.update", session: {type: "realtime", audio: {
        input: {format: {type: "audio/pcm", rate: ctx.sampleRate}},
        output: {format: {type: "audio/pcm", rate: ctx.sampleRate}}}}});
      break;
    case "session.updated":
      configured = true;
      setStatus("listening: speak, then pause");
      break;
    case "input_audio_buffer.speech_started":
      player.port.postMessage({type: "clear"});  // barge-in: stop the reply at once
      speaking = line("user", "you: (speaking)");
      setStatus("hearing you");
      break;
    case "input_audio_buffer.speech_stopped":
      if (speaking) speaking.textContent = `you: (spoke until ${(ev.audio_end_ms / 1000).toFixed(2)} s)`;
      speaking = null;
      setStatus("answering");
      break;
    case "response.created":
      current = line("assistant", "");
      break;
    case "response.output_audio_transcript.delta":
    case "response.output_text.delta":
      if (current) current.textContent += ev.delta;
      break;
    case "response.output_audio.delta": {
      const samples = fromBase64(ev.delta);
      receivedSeconds += samples.length / ctx.sampleRate;
      player.port.postMessage({type: "audio", samples}, [samples.buffer]);
      $("audio").textContent = `received ${receivedSeconds.toFixed(2)} s of reply audio`;
      break;
    }
    case "response.done": {
      const r = ev.response, o = r.omnilite || {};
      turns += 1;
      if (current && r.status === "cancelled") current.classList.add("cancelled");
      const row = document.createElement("tr");
      for (const v of [turns, r.status, fmt(o.ttft_ms, 0), fmt(o.ttfa_ms, 0), fmt(o.rtf, 2), fmt(o.audio_s, 2)]) {
        const td = document.createElement("td");
        td.textContent = v;
        row.appendChild(td);
      }
      $("latency").tBodies[0].appendChild(row);
      current = null;
      setStatus("listening: speak, then pause");
      break;
    }
    case "error":
      $("errors").textContent = `${ev.error.code}: ${ev.error.message}`;
      break;
  }
}

async function start() {
  $("start").disabled = true;
  $("errors").textContent = "";
  try {
    ctx = new AudioContext();  // created on the click, so the browser lets it play
    await ctx.audioWorklet.addModule("/worklet.js");
    mic = await navigator.mediaDevices.getUserMedia({audio: {channelCount: 1, echoCancellation: true, noiseSuppression: false}});
  } catch (err) {
    $("errors").textContent = `microphone: ${err.message}`;
    stop();
    return;
  }
  const capture = new AudioWorkletNode(ctx, "capture", {processorOptions: {blockFrames: Math.round(ctx.sampleRate * 0.04)}});
  player = new AudioWorkletNode(ctx, "player", {outputChannelCount: [1]});
  const mute = ctx.createGain();
  mute.gain.value = 0;  // the capture node must be pulled by the graph, but is not heard
  ctx.createMediaStreamSource(mic).connect(capture).connect(mute).connect(ctx.destination);
  player.connect(ctx.destination);
  const protocols = ["realtime"];
  if ($("key").value) protocols.push("openai-insecure-api-key." + $("key").value);
  ws = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/v1/realtime`, protocols);
  ws.onmessage = (m) => onEvent(JSON.parse(m.data));
  ws.onclose = (e) => { if (ws) { setStatus(`disconnected (${e.code}${e.reason ? ": " + e.reason : ""})`); stop(); } };
  configured = false;
  capture.port.onmessage = (e) => { if (configured) send({type: "input_audio_buffer.append", audio: toBase64(e.data)}); };
  setStatus("connecting");
  $("stop").disabled = false;
}

function stop() {
  const socket = ws;
  ws = null;
  if (socket) socket.close();
  if (mic) mic.getTracks().forEach((t) => t.stop());
  if (ctx) ctx.close();
  mic = ctx = null;
  $("start").disabled = false;
  $("stop").disabled = true;
  if (!$("status").textContent.startsWith("disconnected")) setStatus("stopped");
}

$("start").onclick = start;
$("stop").onclick = stop;
