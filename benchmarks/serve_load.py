"""Load: concurrent OpenAI-Realtime clients against an in-process `omnilite serve`.

    python -m omnilite.benchmarks.serve_load [--bundle BUNDLE] [--clients 4] [--turns 10] [--slots 4] [-n 16]

Each client opens its own WebSocket, asks `--turns` spoken questions (1 s of silence, the question,
1 s of silence, appended in 100 ms events as fast as the socket takes them; server VAD ends each
turn) and waits for each `response.done` before the next. The clients speak different questions
(the packaged question, reversed, and sped up / slowed down by resampling), so a reply that reached
the wrong connection, or a lost one, shows: after the run every reply's transcript is compared with
what `Pipeline.respond` says to that client's own turns in its own conversation (the turn's audio as
the Session cuts it: speech +- its padding, located by the wire's speech_started/stopped). Reported:
p50/p95 of TTFT and TTFA (server side, from the end of speech; the server speaks at real-time pace,
so replies of different clients overlap) under load and, as the baseline measured first in the same
run, for one client alone on the same server (their ratio is what the load costs); client-side time
from the last append to response.done; the server's RSS before the clients and after; the host. Without --bundle, a tiny LLaMA-Omni
bundle is made first (needs the export extra). Writes serve-NAME.json and serve-NAME.md.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from omnilite import __version__
from omnilite.devices.host import detect_host
from omnilite.runtime import Conversation, Pipeline, PipelineConfig, TextDelta
from omnilite.runtime.audio import prepare_speech, read_wav, resample
from omnilite.runtime.events import AudioChunk

from .report import write_report
from .streaming import package_versions

log = logging.getLogger(__name__)

SCHEMA = "omnilite.serve_load/1"
RATE = 16000
PACKAGED_QUESTION = Path(__file__).parents[1] / "omnilite" / "data" / "question.wav"


@dataclass(frozen=True)
class LoadConfig:
    clients: int = 4
    turns: int = 10
    slots: int = 4  # pipelines in the server; clients beyond wait in its queue
    max_new_tokens: int = 16  # the tiny model has random weights: fixed-length replies (EOS ignored)
    n_ctx: int = 8192
    gap_s: float = 1.0  # silence before and after each question
    chunk_ms: int = 100  # audio per input_audio_buffer.append
    timeout_s: float = 900.0  # the whole run; a hang fails it instead of blocking


@dataclass
class TurnResult:
    """One turn as a client saw it on the wire."""

    status: str = ""
    transcript: str = ""
    audio: list[np.ndarray] = field(default_factory=list)  # int16 deltas at the session's output rate
    speech_ms: tuple[int, int] = (0, 0)  # speech_started.audio_start_ms, speech_stopped.audio_end_ms
    ttft_ms: float | None = None
    ttfa_ms: float | None = None
    client_done_s: float = 0.0  # last append sent -> response.done received
    response_id: str = ""
    cancelled_deltas_after_speech: int = 0

    @property
    def samples(self) -> np.ndarray:
        return np.concatenate(self.audio) if self.audio else np.zeros(0, np.int16)


def question_variants(n: int, question: Path = PACKAGED_QUESTION) -> list[np.ndarray]:
    """`n` distinct spoken questions at 16 kHz from one recording."""
    audio, rate = read_wav(question)
    q = prepare_speech(audio, rate, RATE)
    variants = [q, q[::-1].copy(), resample(q, RATE, int(RATE * 0.9)), resample(q, RATE, int(RATE * 1.12))]
    return [variants[i % len(variants)] * (1.0 - 0.1 * (i // len(variants))) for i in range(n)]


def turn_pcm(question: np.ndarray, gap_s: float) -> np.ndarray:
    """Silence, the question, silence, as the int16 samples a client sends."""
    gap = np.zeros(int(gap_s * RATE), np.float32)
    x = np.concatenate([gap, question.astype(np.float32), gap])
    return np.clip(np.round(x * 32767), -32768, 32767).astype(np.int16)


def session_cut(stream: np.ndarray, speech_ms: tuple[int, int], pad_ms: int = 160) -> np.ndarray:
    """The audio a Session answers for a turn: the speech with `pad_ms` before and after (its preroll
    and hangover padding), from the float stream it was fed at 16 kHz."""
    start = max(0, (speech_ms[0] - pad_ms) * RATE // 1000)
    return stream[start:(speech_ms[1] + pad_ms) * RATE // 1000]


async def run_client(url: str, turns: list[np.ndarray], chunk_ms: int = 100, headers: dict | None = None) -> list[TurnResult]:
    """Speak each int16 16 kHz turn and collect the reply; raises on an `error` event."""
    from websockets.asyncio.client import connect

    results = []
    async with connect(url, additional_headers=headers, max_size=None) as ws:
        first = json.loads(await ws.recv())
        if first["type"] != "session.created":
            raise RuntimeError(f"expected session.created, got {first}")
        await ws.send(json.dumps({"type": "session.update", "session": {
            "type": "realtime", "audio": {"input": {"format": {"type": "audio/pcm", "rate": RATE}}}}}))
        step = RATE * chunk_ms // 1000
        for pcm in turns:
            for i in range(0, len(pcm), step):
                await ws.send(json.dumps({"type": "input_audio_buffer.append",
                                          "audio": base64.b64encode(pcm[i:i + step].tobytes()).decode()}))
            sent = time.perf_counter()
            result = TurnResult()
            while True:
                ev = json.loads(await ws.recv())
                kind = ev["type"]
                if kind == "error":
                    raise RuntimeError(f"server error {ev['error']['code']}: {ev['error']['message']}")
                if kind == "input_audio_buffer.speech_started":
                    result.speech_ms = (ev["audio_start_ms"], result.speech_ms[1])
                elif kind == "input_audio_buffer.speech_stopped":
                    result.speech_ms = (result.speech_ms[0], ev["audio_end_ms"])
                elif kind == "response.output_audio_transcript.delta":
                    result.transcript += ev["delta"]
                elif kind == "response.output_audio.delta":
                    result.audio.append(np.frombuffer(base64.b64decode(ev["delta"]), "<i2"))
                elif kind == "response.done":
                    r = ev["response"]
                    o = r.get("omnilite") or {}
                    result.status, result.response_id = r["status"], r["id"]
                    result.ttft_ms, result.ttfa_ms = o.get("ttft_ms"), o.get("ttfa_ms")
                    result.client_done_s = time.perf_counter() - sent
                    break
            results.append(result)
    return results


def expected_replies(pipe: Pipeline, turns: list[np.ndarray], wire: list[TurnResult]) -> list[tuple[str, np.ndarray]]:
    """What `Pipeline.respond` says to each turn of one connection, in one conversation: (text as the
    TextDelta pieces, audio)."""
    stream = np.concatenate(turns).astype(np.float32) / 32768.0
    conv = Conversation()
    out = []
    for result in wire:
        text, audio = "", []
        for e in pipe.respond(session_cut(stream, result.speech_ms), RATE, conversation=conv):
            if isinstance(e, TextDelta):
                text += e.text
            elif isinstance(e, AudioChunk):
                audio.append(e.samples)
        out.append((text, np.concatenate(audio) if audio else np.zeros(0, np.float32)))
    return out


def _rss(field_name: str = "VmRSS") -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    return 0


def run_load(bundle: Path, cfg: LoadConfig) -> dict:
    from omnilite.runtime.serve.server import ServeConfig, ServerThread, load_pipelines

    config = PipelineConfig(max_new_tokens=cfg.max_new_tokens, ignore_eos=True, n_ctx=cfg.n_ctx)
    pipes = load_pipelines(lambda: Pipeline.load(bundle, config), cfg.slots)
    questions = question_variants(cfg.clients)
    streams = [[turn_pcm(q, cfg.gap_s)] * cfg.turns for q in questions]
    try:
        serve = ServeConfig(port=0, slots=cfg.slots, queue=cfg.clients)
        rss_before = _rss()
        with ServerThread(pipes, serve, model_id=Path(bundle).name) as srv:
            # Baseline in the same run: one client alone, the same turns as client 0.
            alone = asyncio.run(asyncio.wait_for(run_client(srv.url, streams[0], cfg.chunk_ms), cfg.timeout_s))
            t0 = time.perf_counter()

            async def all_clients():
                return await asyncio.gather(*(run_client(srv.url, s, cfg.chunk_ms) for s in streams))

            wire = asyncio.run(asyncio.wait_for(all_clients(), cfg.timeout_s))
            wall = time.perf_counter() - t0
            rss_after = _rss()
        mismatches = []
        for c, (s, results) in enumerate([(streams[0], alone), *zip(streams, wire)]):
            for t, (result, (text, _)) in enumerate(zip(results, expected_replies(pipes[0], s, results))):
                if result.transcript != text or result.status not in ("completed", "incomplete"):
                    mismatches.append({"client": c - 1 if c else "alone", "turn": t + 1, "wire": result.transcript,
                                       "expected": text, "status": result.status})
    finally:
        for p in pipes:
            p.close()
    turns = [r for results in wire for r in results]
    return _report(bundle, cfg, wall, turns, alone, mismatches, rss_before, rss_after)


def _pct(values: list[float]) -> dict[str, float]:
    a = np.asarray([v for v in values if v is not None], float)
    return {"p50": round(float(np.percentile(a, 50)), 1), "p95": round(float(np.percentile(a, 95)), 1)} if a.size else {}


def _report(bundle, cfg: LoadConfig, wall, turns: list[TurnResult], alone: list[TurnResult], mismatches, rss_before,
            rss_after) -> dict:
    host = detect_host()
    expected = cfg.clients * cfg.turns
    ttfa, ttfa_alone = _pct([t.ttfa_ms for t in turns]), _pct([t.ttfa_ms for t in alone])
    return {
        "schema": SCHEMA, "omnilite": __version__, "versions": package_versions(),
        "host": {"cpu": host.cpu_model, "vendor": host.cpu_vendor, "arch": host.arch, "features": sorted(host.features),
                 "physical_cores": host.physical_cores, "logical_cores": host.logical_cores,
                 "ram_gb": round(host.ram_gb, 1), "load_avg_1m_at_end": round(os.getloadavg()[0], 2)},
        "bundle": str(bundle), "config": asdict(cfg), "wall_s": round(wall, 1),
        "turns_answered": len(turns), "turns_expected": expected,
        "replies_matching_own_question": expected + len(alone) - len(mismatches) if len(turns) == expected else 0,
        "mismatches": mismatches,
        "ttft_ms": _pct([t.ttft_ms for t in turns]), "ttfa_ms": ttfa,
        # The same server with one client, measured first in this run: the ratio is the load's cost.
        "alone": {"ttft_ms": _pct([t.ttft_ms for t in alone]), "ttfa_ms": ttfa_alone,
                  "client_done_ms": _pct([t.client_done_s * 1000 for t in alone])},
        "ttfa_ratio_to_alone": {k: round(ttfa[k] / ttfa_alone[k], 2) for k in ("p50", "p95")},
        "client_done_ms": _pct([t.client_done_s * 1000 for t in turns]),
        "audio_s_per_reply": round(float(np.mean([len(t.samples) / RATE for t in turns])), 2),
        "rss_before": rss_before, "rss_after": rss_after, "peak_rss": _rss("VmHWM"),
        "ok": len(turns) == expected and not mismatches,
    }


def markdown(r: dict) -> str:
    mib = 2**20
    h, c = r["host"], r["config"]
    return "\n".join([
        f"# Serve load: {c['clients']} clients x {c['turns']} turns over the Realtime WebSocket ({Path(r['bundle']).name})", "",
        f"host: {h['cpu']} ({h['vendor']}), {h['arch']}, {h['physical_cores']} physical / {h['logical_cores']} logical cores, "
        f"{h['ram_gb']} GiB; CPU features {' '.join(h['features']) or 'none detected'}; load average at the end "
        f"{h['load_avg_1m_at_end']}",
        f"omnilite {r['omnilite']}, " + ", ".join(f"{k} {v}" for k, v in r["versions"].items()),
        f"server: {c['slots']} slot(s) in one process; {c['max_new_tokens']} tokens per reply (EOS ignored), "
        f"{r['audio_s_per_reply']} s of audio per reply spoken at real-time pace; wall {r['wall_s']} s", "",
        f"| metric | {c['clients']} clients p50 ms | p95 ms | 1 client alone p50 ms | p95 ms |", "|---|---:|---:|---:|---:|",
        *(f"| {label} | {r[key].get('p50')} | {r[key].get('p95')} | {a[key].get('p50')} | {a[key].get('p95')} |"
          for label, key, a in (("TTFT (end of speech -> first text, server)", "ttft_ms", r["alone"]),
                                ("TTFA (end of speech -> first audio sent, server)", "ttfa_ms", r["alone"]),
                                ("last append -> response.done (client)", "client_done_ms", r["alone"]))), "",
        f"TTFA under load / alone (same run): p50 x{r['ttfa_ratio_to_alone']['p50']}, p95 x{r['ttfa_ratio_to_alone']['p95']}",
        f"replies: {r['turns_answered']} of {r['turns_expected']} answered under load (+{c['turns']} alone first); "
        f"{r['replies_matching_own_question']} match `Pipeline.respond` on their own connection's turns"
        + (" (all)" if r["ok"] else f"; MISMATCHES: {len(r['mismatches'])}"),
        f"server RSS: {r['rss_before'] / mib:.1f} MiB before the clients (pipelines loaded), {r['rss_after'] / mib:.1f} MiB "
        f"after; peak {r['peak_rss'] / mib:.1f} MiB", "",
    ])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, help="bundle directory (default: make a tiny LLaMA-Omni bundle)")
    p.add_argument("--clients", type=int, default=LoadConfig.clients)
    p.add_argument("--turns", type=int, default=LoadConfig.turns)
    p.add_argument("--slots", type=int, help="pipelines in the server (default: one per client)")
    p.add_argument("-n", "--max-new-tokens", type=int, default=LoadConfig.max_new_tokens)
    p.add_argument("-o", "--out", type=Path, default=Path(__file__).parent / "results",
                   help="directory for serve-NAME.json/.md")
    p.add_argument("--name", default=None, help="result name (default: 'tiny' without --bundle, else the bundle's)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    cfg = LoadConfig(clients=args.clients, turns=args.turns, slots=args.slots or args.clients,
                     max_new_tokens=args.max_new_tokens)
    with tempfile.TemporaryDirectory() as work:
        bundle = args.bundle
        if bundle is None:
            from omnilite.export.llama_omni import ExportOptions, export_llama_omni
            from omnilite.export.tiny import make_tiny_llama_omni

            make_tiny_llama_omni(Path(work) / "ckpt")
            bundle = export_llama_omni(Path(work) / "ckpt", Path(work) / "tiny-bundle", ExportOptions(progress=False))
        report = run_load(bundle, cfg)
    name = args.name or ("tiny" if args.bundle is None else Path(args.bundle).name)
    write_report(args.out / f"serve-{name}", report, markdown(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
