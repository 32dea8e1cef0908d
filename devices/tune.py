"""`omnilite tune`: the fastest backend per stage, measured on this host, within the accuracy tolerances.

A bundle's precisions come from a preset fixed in advance, but which one is fastest depends on the
CPU (an AVX2-only EPYC ran the INT4 encoder slower than INT8 and fp32, and a Q4_K_M prefill slower
than F32). `tune_bundle` builds every candidate of every stage role from an unquantized bundle with
the quantizer's own machinery (`quant.quantize_bundle`), judges each against the source with the
accuracy report `omnilite quantize` runs (`quant.measure_accuracy`, the same tolerances), times
the accepted ones on this host for what the user waits for, interleaved over rounds (the machine is
shared; medians), and writes the winners as a normal bundle whose manifest has a "tuning" section:
the host fingerprint, the measured table and the chosen precision / flash attention / threads /
pipeline mode per stage.

Candidates per role (`quant.presets.FAMILY_ROLES`), never above the source's precision:
* ONNX roles: fp32, fp16 (only if onnxruntime's CPU path runs it), int8, int4 (not the vocoder:
  MatMulNBits does not cover convolutions);
* GGUF roles (LLM, TTS LM): F32, F16, BF16, Q8_0, Q6_K, Q4_K_M (IQ4_NL and Q4_0 only when `--only` names
  them: they prefill fastest on x86, but on trained weights cost 4-6x Q4_K_M's KL, which the tiny
  report judged here cannot show: benchmarks/results/quant_real_weights.md), each with llama.cpp's flash
  attention on and off (F32 only off: that is the exact path); BF16 only where the CPU computes bf16
  natively (`HostInfo.native_bf16`; elsewhere llama.cpp emulates it through f32 conversions, so it is
  left out unless `--only` names it; the report says which applies here);
* threads: 1 and every core (`TuneConfig.threads`).

What is timed (the bundle's own inputs: the packaged question cut to 3 s, the source chain's LLM
reply and hidden states, fixed speech units):
* encoder: one encode of the 3 s question in the bundle's encoder mode;
* llm: prefill of the turn's positions (prompt + speech + suffix) and greedy decode per token;
  before the first sample the runtime prefills and decodes on every core, so the first-audio time
  is prefill + the first chunk's tokens at every core, and the threads chosen are decode's;
* decoder (LLaMA-Omni's CTC generator) per LLM token; tts (LLaMA-Omni2's TTS LM with its fusion)
  per speech token through the runtime's `TTSWriter`, the first write step being the first-audio part;
* flow and vocoder: per second of audio produced.

Choice per role: the accepted candidate with the lowest time on the path to the first audio sample;
candidates within `TuneConfig.tie` of it count as tied (the machine is noisy), and among those the
lowest steady-state cost wins. Stages that share a thread setting in the pipeline (LLaMA-Omni2's flow
and HiFT both run as its "vocoder" stage) get the thread count with the lowest summed time. Last,
the assembled bundle answers the 3 s question in overlapped and in sequential mode (interleaved,
stopped at the first audio sample) and the lower median time to first audio picks the mode.

`tuned_settings` reads the section back for the CLI: the threads and mode apply only on a host with
the same fingerprint (CPU model, architecture, features, cores).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from omnilite.runtime.errors import BundleError, OmniliteError

from .host import HostInfo

log = logging.getLogger(__name__)

ONNX_CANDIDATES = ("fp32", "fp16", "int8", "int4")
# Q6_K: at Qwen2.5-0.5B's 896-wide rows llama.cpp stores it as Q8_0 plus Q6_K ffn_down, which on a
# 2-core AVX-512 EPYC prefilled faster than Q4_K_M's Q5_0 rows (1.57 vs 2.04 s, 305 positions) and
# decoded the TTS LM faster (26.0 vs 30.5 ms a token, one thread), at ~1/5 of Q4_K_M's KL on trained
# weights (benchmarks/results/quant_real_weights.md) and ~27% more memory.
GGUF_CANDIDATES = ("F32", "F16", "BF16", "Q8_0", "Q6_K", "Q4_K_M")
NATIVE_ONLY = {"BF16"}  # GGUF candidates tried by default only where the CPU computes bf16 natively
# The PipelineConfig.stage_threads key each role's threads go to (LLaMA-Omni2's flow and HiFT are
# its "vocoder" stage, its TTS LM and fusion the "speech_generator" stage).
THREAD_STAGE = {"encoder": "encoder", "llm": "llm", "decoder": "speech_generator", "tts": "speech_generator",
                "flow": "vocoder", "vocoder": "vocoder"}
MODES = ("overlapped", "sequential")
SECTION = "tuning"
FORMAT = 1  # of the "tuning" section


@dataclass(frozen=True)
class TuneConfig:
    rounds: int = 3  # interleaved timing rounds; medians are kept
    threads: tuple[int, ...] | None = None  # thread counts tried per stage; None: 1 and every core
    precisions: dict[str, tuple[str, ...]] = field(default_factory=dict)  # role -> candidates (default: all that apply)
    tolerances: dict[str, float] = field(default_factory=dict)  # {"role.metric": value}, as `quantize --tolerance`
    report_tokens: int = 16  # LLM tokens in each accuracy report
    decode_tokens: int = 16  # decode steps timed per LLM candidate
    question_seconds: float = 3.0
    audio_seconds: float = 2.0  # speech the flow and vocoder candidates synthesize per timing
    mode_rounds: int = 3  # overlapped vs sequential rounds; 0 skips the comparison (overlapped kept)
    tie: float = 0.05  # first-audio times within this fraction of the best count as tied
    report: Path | None = None  # where tune.json + tune.md go (default: inside OUT)
    overwrite: bool = False
    progress: bool = False
    host: HostInfo | None = None  # default: detected

    def validate(self) -> None:
        if self.rounds < 1 or self.decode_tokens < 1 or self.report_tokens < 1 or self.mode_rounds < 0:
            raise OmniliteError("rounds, decode and report tokens must be at least 1 (mode rounds at least 0); raise them.")
        if self.threads is not None and (not self.threads or min(self.threads) < 1):
            raise OmniliteError(f"thread counts {list(self.threads)} must be whole numbers of at least 1; pass e.g. 1,2.")
        if not 0.5 <= self.question_seconds <= 30 or not 0.5 <= self.audio_seconds <= 30:
            raise OmniliteError("question and audio lengths must be between 0.5 and 30 s; choose one in that range.")


@dataclass
class Candidate:
    role: str
    precision: str
    flash_attn: str | None  # GGUF roles: "on" / "off"
    source: bool  # the source bundle's own file (no quantization)
    bundle: Path | None = None  # a bundle holding this candidate (for accuracy and timing)
    accuracy: dict | None = None  # the accuracy report's stage section
    accepted: bool | None = None
    reason: str = ""  # why rejected
    times: dict[int, dict[str, float]] = field(default_factory=dict)  # threads -> medians
    samples: dict[int, list[dict[str, float]]] = field(default_factory=dict)  # threads -> one dict per round
    first_s: float | None = None
    steady_s: float | None = None
    threads: int | None = None  # the thread count first_s / steady_s were measured at (LLM: decode's)

    @property
    def key(self) -> str:
        return f"{self.role}:{self.precision}" + (f"/fa-{self.flash_attn}" if self.flash_attn else "")

    def row(self) -> dict:
        judged = {}
        if self.accuracy and not self.accuracy.get("identical_file"):
            tol = self.accuracy["tolerance"]
            judged = {k[:-2]: self.accuracy["metrics"][k[:-2]] for k in tol if k[:-2] in self.accuracy["metrics"]}
        return {"role": self.role, "precision": self.precision, "flash_attn": self.flash_attn, "source": self.source,
                "accepted": self.accepted, "rejected_because": self.reason or None, "metrics": judged,
                "tolerance": (self.accuracy or {}).get("tolerance", {}),
                "times": {str(t): v for t, v in sorted(self.times.items())},
                "first_s": self.first_s, "steady_s": self.steady_s, "threads": self.threads}


@dataclass
class TuneResult:
    path: Path
    manifest: dict
    report: dict
    report_files: tuple[Path, Path]


# --- host fingerprint and the CLI's read-back ---------------------------------------------------

def host_fingerprint(host: HostInfo) -> dict:
    """What must match for measured threads/mode to apply: same CPU model, features and cores."""
    return {"cpu_model": host.cpu_model, "cpu_vendor": host.cpu_vendor, "arch": host.arch,
            "features": sorted(host.features), "physical_cores": host.physical_cores,
            "logical_cores": host.logical_cores}


_MATCH_KEYS = ("cpu_model", "arch", "features", "physical_cores", "logical_cores")


@dataclass(frozen=True)
class TunedSettings:
    stage_threads: dict[str, int]
    mode: str
    matches: bool  # tuned on a host with this fingerprint
    tuned_on: str  # one phrase naming the host it was tuned on


def tuned_settings(manifest: dict, host: HostInfo, where: str = "the bundle") -> TunedSettings | None:
    """The "tuning" section's threads and mode, and whether they were measured on `host`; None for
    a bundle never tuned. A damaged section is one sentence naming the fix."""
    section = manifest.get(SECTION)
    if section is None:
        return None
    try:
        fp = section["host"]
        threads = {str(k): int(v) for k, v in section["stage_threads"].items()}
        mode = str(section["mode"])
        tuned_on = f"{fp['cpu_model']} ({fp['logical_cores']} cores; {' '.join(fp['features']) or 'no listed features'})"
        ok = mode in MODES and all(v >= 1 for v in threads.values())
    except (KeyError, TypeError, ValueError, AttributeError):
        ok = False
    if not ok:
        raise BundleError(f"{where} has a damaged '{SECTION}' section in its manifest; run `omnilite tune` again "
                          "on the unquantized bundle.")
    mine = host_fingerprint(host)
    matches = all(_same(fp.get(k), mine[k]) for k in _MATCH_KEYS)
    return TunedSettings(threads, mode, matches, tuned_on)


def _same(a, b) -> bool:
    return sorted(a) == sorted(b) if isinstance(b, list) and isinstance(a, list) else a == b


# --- candidates ---------------------------------------------------------------------------------

def _candidate_precisions(src, config: TuneConfig, host: HostInfo) -> tuple[dict[str, list[str]], list[str]]:
    """role -> precisions to try (the source's first), and notes on what is left out and why."""
    from omnilite.quant.presets import FAMILY_ROLES, GGUF_PRECISIONS, GGUF_ROLES, ONNX_PRECISIONS, bits

    roles = FAMILY_ROLES[src.family]
    unknown = set(config.precisions) - set(roles)
    if unknown:
        raise OmniliteError(f"--only {sorted(unknown)[0]}: a {src.family} bundle has the stage roles "
                            f"{', '.join(roles)}; use one of them.")
    out, notes = {}, []
    native_bf16 = bool(getattr(host, "native_bf16", False))
    bf16_reason = host.bf16_reason() if hasattr(host, "bf16_reason") else "bf16 support unknown"
    bf16_roles: dict[str, bool] = {}  # GGUF role -> BF16 tried because --only named it (else by default)
    for role, stages in roles.items():
        have = src.stages[stages[0]].precision
        gguf = role in GGUF_ROLES
        offered = GGUF_PRECISIONS if gguf else ONNX_PRECISIONS
        wanted = config.precisions.get(role)
        for p in wanted or ():
            if p not in offered and p.lower() != have.lower():
                raise OmniliteError(f"--only {role}={p}: {p!r} is not a {'llama.cpp type' if gguf else 'ONNX precision'} "
                                    f"omnilite offers; use one of: {', '.join(offered)}.")
        pool = list(wanted) if wanted else list(GGUF_CANDIDATES if gguf else ONNX_CANDIDATES)
        if gguf and not wanted and not native_bf16:
            pool = [p for p in pool if p not in NATIVE_ONLY]
        if role == "vocoder" and "int4" in pool:
            pool.remove("int4")
            notes.append("vocoder int4: not tried (the vocoder is convolutions; int4 weight-only quantization covers MatMul)")
        picked = [have]  # the source's own file is always a candidate (it is the reference)
        for p in pool:
            if p.lower() == have.lower():
                continue
            if bits(p) > bits(have):
                notes.append(f"{role} {p}: not tried (above the source's {have}: the lost bits do not come back)")
                continue
            picked.append(p)
            if gguf and p == "BF16":
                bf16_roles[role] = bool(wanted)
        out[role] = picked
    gguf_roles = [r for r in roles if r in GGUF_ROLES]
    if gguf_roles and not native_bf16 and not any(bf16_roles.values()):
        notes.append(f"GGUF BF16: not tried; this CPU has {bf16_reason}, so llama.cpp would emulate bf16 through f32 "
                     "conversions; `--only llm=BF16` times it anyway")
    elif bf16_roles:
        asked = sorted(r for r, by_only in bf16_roles.items() if by_only)
        notes.append(f"GGUF BF16: tried for {', '.join(sorted(bf16_roles))}"
                     + (f" (named by --only for {', '.join(asked)})" if asked else "") + f"; this CPU has {bf16_reason}")
    return out, notes


def _expand(precisions: dict[str, list[str]]) -> list[Candidate]:
    from omnilite.quant.presets import GGUF_ROLES

    cands = []
    for role, ps in precisions.items():
        for i, p in enumerate(ps):
            if role in GGUF_ROLES:
                # f32 with flash attention moves logits by ~1e-2 (README): the exact path stays off.
                for fa in (("off",) if p.lower() == "f32" else ("on", "off")):
                    cands.append(Candidate(role, p, fa, source=i == 0))
            else:
                cands.append(Candidate(role, p, None, source=i == 0))
    return cands


# --- building candidate bundles -------------------------------------------------------------------

def _link_tree(src: Path, dst: Path) -> None:
    from omnilite.quant.onnx_quant import link_or_copy
    from omnilite.runtime.bundle import MANIFEST

    for f in src.rglob("*"):
        rel = f.relative_to(src)
        if f.is_file() and rel.as_posix() != MANIFEST and rel.parts[0] not in ("tune.json", "tune.md"):
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            link_or_copy(f, dst / rel)


def _materials(src, cands: list[Candidate], work: Path, config: TuneConfig) -> dict[tuple[str, str], Path]:
    """(role, precision) -> a bundle holding that role at that precision, built by the quantizer:
    slot i holds the i-th reduced precision of every role, so a few quantizer runs build them all."""
    from omnilite.quant import QuantizeOptions, quantize_bundle

    wanted: dict[str, list[str]] = {}
    for c in cands:
        if not c.source and c.precision not in wanted.setdefault(c.role, []):
            wanted[c.role].append(c.precision)
    slots = max((len(v) for v in wanted.values()), default=0)
    where: dict[tuple[str, str], Path] = {}
    for i in range(slots):
        overrides = {role: ps[i] for role, ps in wanted.items() if i < len(ps)}
        path = work / f"slot{i}"
        log.info("tune: building %s", ", ".join(f"{r} {p}" for r, p in overrides.items()))
        quantize_bundle(src.path, path, QuantizeOptions(preset="fp32", overrides=overrides, report=False,
                                                        progress=config.progress))
        where.update({(role, p): path for role, p in overrides.items()})
    return where


def _compose(src, dst: Path, picks: list[Candidate], materials: dict[tuple[str, str], Path]) -> dict:
    """A bundle at `dst`: the source's files, with each picked role's stages taken from the
    bundle that holds its precision (hard links) and its flash attention setting. Returns the
    manifest; stages taken from a quantized bundle carry its quantization details under "_details"."""
    from omnilite.quant.onnx_quant import link_or_copy
    from omnilite.quant.presets import FAMILY_ROLES
    from omnilite.runtime.bundle import MANIFEST

    dst.mkdir(parents=True, exist_ok=True)
    _link_tree(src.path, dst)
    manifest = copy.deepcopy(src.manifest)
    manifest.pop(SECTION, None)
    entries = {s["name"]: s for s in manifest["stages"]}
    details: dict[str, dict] = {}
    for c in picks:
        stages = FAMILY_ROLES[src.family][c.role]
        if not c.source:
            home = materials[(c.role, c.precision)]
            made = json.loads((home / MANIFEST).read_text())
            for entry in made["stages"]:
                if entry["name"] not in stages:
                    continue
                for name in [entry["file"], *entry.get("extra_files", {})]:
                    (dst / name).unlink(missing_ok=True)
                    link_or_copy(home / name, dst / name)
                entries[entry["name"]].clear()
                entries[entry["name"]].update(copy.deepcopy(entry))
                details[entry["name"]] = made["quantization"]["stages"][entry["name"]]
                if entry["name"] == "encoder" and "encoder" in made:
                    manifest["encoder"] = copy.deepcopy(made["encoder"])  # its padding cache entry
        if c.flash_attn:
            entries[stages[0]]["flash_attn"] = c.flash_attn
    manifest["_details"] = details
    _write_manifest(dst, manifest)
    return manifest


def _write_manifest(path: Path, manifest: dict) -> None:
    from omnilite.runtime.audio import atomic_write_bytes
    from omnilite.runtime.bundle import MANIFEST

    clean = {k: v for k, v in manifest.items() if k != "_details"}
    atomic_write_bytes(path / MANIFEST, (json.dumps(clean, indent=2) + "\n").encode())


def _groups(cands: list[Candidate]) -> list[list[Candidate]]:
    """Quantized candidates measured together: at most one per role (the report measures each stage
    in isolation, fed the reference's upstream outputs, so roles do not disturb each other)."""
    per_role: dict[str, list[Candidate]] = {}
    for c in cands:
        if not c.source and c.accepted is not False:
            per_role.setdefault(c.role, []).append(c)
    n = max((len(v) for v in per_role.values()), default=0)
    return [[v[i] for v in per_role.values() if i < len(v)] for i in range(n)]


def _probe_onnx(src, cands: list[Candidate], materials: dict[tuple[str, str], Path]) -> None:
    """Reject, before any report, a reduced-precision ONNX candidate onnxruntime's CPU provider
    cannot open (an fp16 graph needs fp16 kernels for every node it keeps in fp16)."""
    from omnilite.quant.presets import FAMILY_ROLES, GGUF_ROLES
    from omnilite.runtime.onnx_session import open_session

    for c in cands:
        if c.source or c.role in GGUF_ROLES:
            continue
        home = materials[(c.role, c.precision)]
        for stage in FAMILY_ROLES[src.family][c.role]:
            if src.stages[stage].format != "onnx":
                continue
            try:
                open_session(home / src.stages[stage].file)
            except OmniliteError:
                c.accepted, c.reason = False, f"onnxruntime's CPU provider cannot run the {c.precision} {stage} graph"
                break


def _judge_accuracy(src, cands: list[Candidate], materials, work: Path, config: TuneConfig) -> None:
    """The accuracy report `omnilite quantize` runs, once per group of quantized candidates; each
    gets its role's verdict. The source's own files are the reference: accepted as they are (a
    GGUF source with another flash attention setting gets a bundle of its own for the timing)."""
    from omnilite.quant import AccuracyOptions, measure_accuracy
    from omnilite.quant.presets import FAMILY_ROLES
    from omnilite.runtime.bundle import load_bundle
    from omnilite.runtime.llm import default_flash_attn

    options = AccuracyOptions(tokens=config.report_tokens, tolerances=config.tolerances)
    for c in cands:
        if not c.source:
            continue
        c.accepted, c.accuracy = True, {"identical_file": True, "ok": True}
        stage = src.stages[FAMILY_ROLES[src.family][c.role][0]]
        if c.flash_attn and c.flash_attn != (stage.flash_attn or default_flash_attn(stage.precision)):
            c.bundle = work / f"source-{c.role}-fa-{c.flash_attn}"
            _compose(src, c.bundle, [c], materials)
        else:
            c.bundle = src.path
    from tqdm import tqdm

    for i, group in enumerate(tqdm(_groups(cands), desc="tune: accuracy", unit="report", disable=not config.progress)):
        path = work / f"group{i}"
        _compose(src, path, group, materials)
        log.info("tune: accuracy of %s", ", ".join(c.key for c in group))
        report = measure_accuracy(load_bundle(path, verify=False), src, options)
        for c in group:
            rep = report["stages"][c.role]
            c.bundle, c.accuracy, c.accepted = path, rep, bool(rep["ok"])
            if not c.accepted:
                c.reason = "; ".join(f"{m}={rep['metrics'][m]:.4g} misses {_limit(rep['tolerance'], m)}"
                                     for m in rep["failed_metrics"])


def _limit(tolerance: dict, metric: str) -> str:
    return next((f"{k[len(metric):]} {v:g}" for k, v in tolerance.items() if k[:-2] == metric), "its tolerance")


# --- timing --------------------------------------------------------------------------------------

@dataclass
class _Inputs:
    """What every candidate of a role is timed on, computed once from the source chain."""

    speech: object  # (n,) float32 at 16 kHz, question_seconds long
    embeds: object  # the source encoder's speech embeddings for it (bundle's mode)
    hidden: object  # (n, llm_dim) LLM hidden states of the source's greedy reply
    tokens: list[int]
    units: list[int]  # speech units for the flow (LLaMA-Omni2) or vocoder (LLaMA-Omni)
    mel: object = None  # LLaMA-Omni2: the source flow's mel for HiFT
    frames: object = None  # LLaMA-Omni: units repeated by the source's durations
    first_tokens: int = 10  # LLM tokens before the first speech chunk (omega / R)
    write: int = 10  # LLaMA-Omni2: speech tokens per write step (W)


def _inputs(src, config: TuneConfig) -> _Inputs:
    import numpy as np

    from omnilite.quant.accuracy import QUESTION, fixed_units
    from omnilite.runtime.audio import prepare_speech, read_wav
    from omnilite.runtime.encoder import SpeechEncoder
    from omnilite.runtime.llm import LlamaCppLLM, stage_llm_config

    audio, rate = read_wav(QUESTION)
    speech = prepare_speech(audio, rate, 16000, source=str(QUESTION))
    n = int(config.question_seconds * 16000)
    speech = np.pad(speech, (0, max(0, n - len(speech))))[:n].astype(np.float32)  # a question of that length
    embeds = SpeechEncoder(src)(speech)
    stream = src["streaming"]
    first = int(stream.get("read", stream.get("omega", 10)))
    n_tok = max(config.decode_tokens, 2 * first)
    prompt = src["llm"]["prompt"]
    n_ctx = len(prompt["prefix_ids"]) + len(embeds) + len(prompt["suffix_ids"]) + n_tok + 16
    with LlamaCppLLM(src.file("llm"), stage_llm_config(src, "llm", n_ctx=max(512, n_ctx))) as llm:
        llm.eval_tokens(prompt["prefix_ids"])
        llm.eval_embeddings(embeds)
        pairs = list(llm.generate(n_tok, ignore_eos=True, first=llm.eval_tokens(prompt["suffix_ids"], want_last=True)))
    tokens = [t for t, _ in pairs]
    hidden = np.stack([h for _, h in pairs]).astype(np.float32)
    if src.family == "llama-omni2":
        from omnilite.runtime.omni2.flow import FlowDecoder

        units_cfg = src["tts"]["units"]
        vocab = int(units_cfg["count"]) if "count" in units_cfg else len(units_cfg["units"])
        units = fixed_units(n=max(2, int(25 * config.audio_seconds)), vocab=vocab)  # 25 Hz speech tokens
        mel = FlowDecoder(src).offline(units)
        return _Inputs(speech, embeds, hidden, tokens, units, mel=mel, first_tokens=first, write=int(stream["write"]))
    from omnilite.runtime.vocoder import UnitVocoder

    voc = UnitVocoder(src)
    units = fixed_units(n=max(2, int(50 * config.audio_seconds)))  # mHuBERT units are 50 Hz
    u = np.asarray(units, np.int64)
    return _Inputs(speech, embeds, hidden, tokens, units, frames=np.repeat(u, voc.durations(u)), first_tokens=first)


def _clock(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _time_role(c: Candidate, threads: list[int], inp: _Inputs, config: TuneConfig) -> dict[int, dict[str, float]]:
    """One timing round of one candidate at every thread count: {threads: measurements}."""
    from omnilite.runtime.bundle import load_bundle
    from omnilite.runtime.onnx_session import SessionOptions

    b = load_bundle(c.bundle, verify=False)
    out: dict[int, dict[str, float]] = {}
    if c.role == "llm":
        return _time_llm(b, threads, inp, config)
    if c.role == "tts":
        return _time_tts(b, threads, inp)
    for t in threads:
        opts = SessionOptions(intra_op_threads=t)
        if c.role == "encoder":
            from omnilite.runtime.encoder import SpeechEncoder

            enc = SpeechEncoder(b, opts)
            mel = enc.mel(inp.speech)
            enc.embed(mel)  # warm-up (and a +fill mode's padding cache)
            s = _clock(lambda: enc.embed(mel))
            out[t] = {"encode_s": s, "first_s": s, "steady_s": s}
        elif c.role == "decoder":
            from omnilite.runtime.units import StreamingUnitGenerator

            gen = StreamingUnitGenerator(b, opts)
            k = inp.first_tokens
            gen.push(inp.hidden[:k])
            gen.reset()
            chunks = [_clock(lambda a=a: gen.push(inp.hidden[a:a + k])) for a in range(0, len(inp.hidden), k)]
            out[t] = {"first_chunk_s": chunks[0], "per_token_s": sum(chunks) / len(inp.hidden),
                      "first_s": chunks[0], "steady_s": sum(chunks) / len(inp.hidden)}
        elif c.role == "flow":
            from omnilite.runtime.omni2.flow import FlowDecoder

            flow = FlowDecoder(b, opts)
            flow.offline(inp.units[: flow.chunk_tokens])  # warm-up
            seconds = inp.mel.shape[1] * int(b["hift"]["hop"]) / int(b["hift"]["sample_rate"])
            s = _clock(lambda: flow.offline(inp.units)) / seconds
            out[t] = {"per_audio_second_s": s, "first_s": s, "steady_s": s}
        elif c.role == "vocoder" and b.family == "llama-omni2":
            from omnilite.runtime.omni2.hift import HiFTVocoder

            voc = HiFTVocoder(b, opts)
            voc.offline(inp.mel[:, :20])
            seconds = inp.mel.shape[1] * voc.hop / voc.sample_rate
            s = _clock(lambda: voc.offline(inp.mel)) / seconds
            out[t] = {"per_audio_second_s": s, "first_s": s, "steady_s": s}
        elif c.role == "vocoder":
            from omnilite.runtime.vocoder import UnitVocoder

            voc = UnitVocoder(b, opts)
            voc.generate(inp.frames[:20])
            seconds = len(inp.frames) * voc.hop / voc.sample_rate
            s = _clock(lambda: voc.generate(inp.frames)) / seconds
            out[t] = {"per_audio_second_s": s, "first_s": s, "steady_s": s}
        else:
            raise OmniliteError(f"stage role {c.role!r} has no timing in this omnilite; upgrade omnilite.")
    return out


def _time_llm(b, threads: list[int], inp: _Inputs, config: TuneConfig) -> dict[int, dict[str, float]]:
    import numpy as np

    from omnilite.runtime.llm import LlamaCppLLM, stage_llm_config

    prompt = b["llm"]["prompt"]
    positions = len(prompt["prefix_ids"]) + len(inp.embeds) + len(prompt["suffix_ids"])
    n_ctx = max(512, positions + config.decode_tokens + 16)
    out = {}
    with LlamaCppLLM(b.file("llm"), stage_llm_config(b, "llm", n_ctx=n_ctx)) as llm:
        llm.eval_tokens(prompt["prefix_ids"])  # warm-up: the first decode allocates the graph
        for t in threads:
            llm.set_threads(t, t)
            llm.reset()

            def prefill():
                llm.eval_tokens(prompt["prefix_ids"])
                llm.eval_embeddings(inp.embeds)
                return llm.eval_tokens(prompt["suffix_ids"], want_last=True)

            t0 = time.perf_counter()
            logits, _ = prefill()
            prefill_s = time.perf_counter() - t0
            token = int(np.argmax(logits))
            t0 = time.perf_counter()
            for _ in range(config.decode_tokens):
                token = int(np.argmax(llm.eval_tokens([token], want_last=True)[0]))
            decode_s = (time.perf_counter() - t0) / config.decode_tokens
            out[t] = {"prefill_s": prefill_s, "decode_s": decode_s, "positions": positions}
    return out


def _time_tts(b, threads: list[int], inp: _Inputs) -> dict[int, dict[str, float]]:
    """The TTS LM through the runtime's writer: fuse R text tokens, write W speech tokens, repeat.
    One writer per candidate; its LM and fusion session get each thread count in turn."""
    from omnilite.runtime.llm import stage_llm_config
    from omnilite.runtime.omni2.tts import TTSWriter
    from omnilite.runtime.onnx_session import SessionOptions, open_session

    r, w = inp.first_tokens, inp.write
    n_ctx = max(512, len(inp.tokens) * (1 + -(-w // r)) + 16)
    writer = TTSWriter(b, stage_llm_config(b, "tts_lm", n_ctx=n_ctx))
    out = {}
    try:
        writer.write(inp.hidden[:r], inp.tokens[:r], finished=False, max_new=1)  # warm-up
        for t in threads:
            writer.lm.set_threads(t, t)
            writer.fusion = open_session(b.file("tts_fusion"), SessionOptions(intra_op_threads=t))
            writer.reset()
            steps, written = [], 0
            for a in range(0, len(inp.tokens) - r + 1, r):
                t0 = time.perf_counter()
                written += len(writer.write(inp.hidden[a:a + r], inp.tokens[a:a + r], finished=False, max_new=w))
                steps.append(time.perf_counter() - t0)
            per_token = sum(steps) / max(written, 1)
            out[t] = {"first_write_s": steps[0], "per_token_s": per_token, "tokens": written, "first_s": steps[0],
                      "steady_s": per_token}
    finally:
        writer.close()
    return out


def _time_all(cands: list[Candidate], threads: list[int], inp: _Inputs, config: TuneConfig) -> None:
    """Every accepted candidate at every thread count, `rounds` times, interleaved: each round runs
    all of them in an order rotated by one, so load on the shared machine spreads over all."""
    from tqdm import tqdm

    timed = [c for c in cands if c.accepted]
    for r in tqdm(range(config.rounds), desc="tune: timing", unit="round", disable=not config.progress):
        k = r % max(len(timed), 1)
        for c in timed[k:] + timed[:k]:
            for t, m in _time_role(c, threads, inp, config).items():
                c.samples.setdefault(t, []).append(m)
        log.info("tune: timing round %d of %d done", r + 1, config.rounds)
    cores = max(threads)
    for c in timed:
        c.times = {t: {k: statistics.median(m[k] for m in ms) for k in ms[0]} for t, ms in c.samples.items()}
        if c.role == "llm":
            # The runtime prefills and decodes on every core until the first sample leaves.
            full = c.times[cores]
            c.first_s = full["prefill_s"] + inp.first_tokens * full["decode_s"]
            c.threads = min(c.times, key=lambda t: c.times[t]["decode_s"])
            c.steady_s = c.times[c.threads]["decode_s"]
        else:
            c.threads = min(c.times, key=lambda t: (c.times[t]["first_s"], c.times[t]["steady_s"]))
            c.first_s, c.steady_s = c.times[c.threads]["first_s"], c.times[c.threads]["steady_s"]


# --- choice --------------------------------------------------------------------------------------

def choose(cands: list[Candidate], tie: float) -> Candidate:
    """The accepted candidate with the lowest first-audio time; those within `tie` of it are tied
    and the lowest steady-state cost among them wins."""
    ok = [c for c in cands if c.accepted and c.first_s is not None]
    best = min(c.first_s for c in ok)
    return min((c for c in ok if c.first_s <= best * (1 + tie)), key=lambda c: (c.steady_s, c.first_s))


def _stage_threads(winners: dict[str, Candidate]) -> dict[str, int]:
    """PipelineConfig.stage_threads from the winners; roles sharing a stage get the thread count
    with the lowest summed steady-state time."""
    out: dict[str, int] = {}
    by_stage: dict[str, list[Candidate]] = {}
    for role, c in winners.items():
        by_stage.setdefault(THREAD_STAGE[role], []).append(c)
    for stage, cs in by_stage.items():
        if len(cs) == 1:
            out[stage] = cs[0].threads
            continue
        common = set.intersection(*(set(c.times) for c in cs))
        out[stage] = min(common, key=lambda t: sum(c.times[t]["steady_s"] for c in cs))
    return out


def _compare_modes(path: Path, family: str, stage_threads: dict[str, int], inp: _Inputs, config: TuneConfig) -> dict:
    """Median seconds from the call to the first audio chunk, per pipeline mode, interleaved; the
    reply is cancelled at its first chunk (what follows does not change the first-audio time)."""
    from omnilite.runtime import AudioChunk, Pipeline, PipelineConfig

    base = PipelineConfig(stage_threads=dict(stage_threads), max_new_tokens=64, ignore_eos=True, verify_bundle=False)
    if family == "llama-omni2":
        from omnilite.runtime.omni2.pipeline import as_omni2_config

        base = as_omni2_config(base)
    times: dict[str, list[float]] = {m: [] for m in MODES}
    with Pipeline.load(path, base) as pipe:
        for r in range(config.mode_rounds + 1):  # round 0 warms the stages up
            for m in (MODES if r % 2 else MODES[::-1]):
                t0 = time.perf_counter()
                events = pipe.respond(inp.speech, 16000, mode=m)
                ttfa = None
                for e in events:
                    if isinstance(e, AudioChunk):
                        ttfa = time.perf_counter() - t0
                        break
                events.close()
                if r and ttfa is not None:
                    times[m].append(ttfa)
    return {m: statistics.median(v) for m, v in times.items() if v}


# --- the command -----------------------------------------------------------------------------------

def tune_bundle(src: str | Path, out: str | Path, config: TuneConfig = TuneConfig()) -> TuneResult:
    """Tune the unquantized bundle `src` for this host into the bundle `out` (see the module doc)."""
    from omnilite.export.bundle_dir import target_lock
    from omnilite.quant.bundle_quant import is_derived
    from omnilite.quant.presets import FAMILY_ROLES
    from omnilite.runtime.bundle import load_bundle

    from .host import detect_host

    config.validate()
    out = Path(out)
    source = load_bundle(src)
    if out.resolve() == source.path.resolve():
        raise OmniliteError(f"OUT is the source bundle {source.path}; write the tuned bundle to a new directory.")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not config.overwrite:
        raise OmniliteError(f"{out} already exists and is not empty; choose another directory or pass --force.")
    if source.family not in FAMILY_ROLES:
        raise BundleError(f"{source.path} is a '{source.family}' bundle, which this omnilite cannot tune; upgrade omnilite.")
    if is_derived(source):
        recorded = source.manifest.get("quantization", {}).get("source", {}).get("path")
        raise OmniliteError(f"{source.path} is already quantized; tune its unquantized source "
                            f"{recorded or '(the fp32 export)'} instead, so that every precision can be tried.")
    host = config.host or detect_host()
    threads = sorted(set(config.threads or (1, os.cpu_count() or 1)))
    precisions, notes = _candidate_precisions(source, config, host)
    t_start = time.perf_counter()
    with target_lock(out):  # one writer of OUT, from the first candidate to the rename
        return _tune_locked(source, out, config, host, threads, precisions, notes, t_start)


def _tune_locked(source, out: Path, config: TuneConfig, host: HostInfo, threads: list[int],
                 precisions: dict[str, list[str]], notes: list[str], t_start: float) -> TuneResult:
    from omnilite.export.bundle_dir import building_dir
    from omnilite.quant import AccuracyOptions, measure_accuracy
    from omnilite.runtime.bundle import load_bundle

    cands = _expand(precisions)
    # Candidate bundles live beside OUT; one left by a killed run is ours to remove (we hold the lock).
    work = out.absolute().with_name(f".{out.name}.tune")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        materials = _materials(source, cands, work, config)
        _probe_onnx(source, cands, materials)
        _judge_accuracy(source, cands, materials, work, config)
        inp = _inputs(source, config)
        _time_all(cands, threads, inp, config)
        winners = {role: choose([c for c in cands if c.role == role], config.tie) for role in precisions}
        stage_threads = _stage_threads(winners)
        with building_dir(out) as tmp:
            manifest = _compose(source, tmp, list(winners.values()), materials)
            details = manifest.pop("_details")
            accuracy = None
            if details:
                accuracy = measure_accuracy(load_bundle(tmp, verify=False), source,
                                            AccuracyOptions(tokens=config.report_tokens, tolerances=config.tolerances))
                if not accuracy["ok"]:  # each stage passed alone, with the same files and settings: a bug
                    raise RuntimeError(f"the tuned bundle misses its tolerance in {', '.join(accuracy['failed'])} "
                                       "although each candidate passed alone; report this as a bug.")
                manifest["quantization"] = _quantization_section(source, manifest, details, winners, accuracy)
            modes = _compare_modes(tmp, source.family, stage_threads, inp, config) if config.mode_rounds else {}
            mode = min(modes, key=modes.get) if modes else "overlapped"
            report = _report(source, out, host, config, threads, cands, winners, stage_threads, modes, mode, notes,
                             time.perf_counter() - t_start)
            manifest[SECTION] = {k: report[k] for k in ("format", "host", "cpu", "versions", "measured_at", "config",
                                                         "candidates", "chosen", "stage_threads", "mode",
                                                         "mode_first_audio_s", "notes")}
            _write_manifest(tmp, manifest)
            report_dir = Path(config.report) if config.report else tmp
            files = _write_report(report_dir, report)
        if not config.report:
            files = (out / files[0].name, out / files[1].name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return TuneResult(out, manifest, report, files)


def _quantization_section(source, manifest: dict, details: dict, winners: dict[str, Candidate], accuracy: dict) -> dict:
    import llama_cpp
    import onnxruntime

    from omnilite import __version__

    manifest["created_by"] = f"omnilite {__version__} (tune)"
    return {
        "preset": "tuned",
        "plan": {role: c.precision for role, c in winners.items()},
        "requantized": False,
        "source": {"path": str(source.path.resolve()), "sha256": {s.name: s.sha256 for s in source.stages.values()},
                   "precisions": {s.name: s.precision for s in source.stages.values()}},
        "stages": details,
        "tools": {"onnxruntime": onnxruntime.__version__, "llama_cpp_python": llama_cpp.__version__},
        "parity_note": "the 'parity' section was measured at export, on the unquantized source",
        "accuracy": accuracy,
    }


def _report(source, out: Path, host: HostInfo, config: TuneConfig, threads: list[int], cands: list[Candidate],
            winners: dict[str, Candidate], stage_threads: dict[str, int], modes: dict, mode: str, notes: list[str],
            seconds: float) -> dict:
    from omnilite.benchmarks.streaming import package_versions

    cfg = {k: v for k, v in asdict(config).items() if k not in ("host", "report", "overwrite", "progress")}
    cfg["threads"] = threads
    return {
        "format": FORMAT,
        "source": str(source.path.resolve()), "out": str(out.absolute()), "family": source.family,
        "host": host_fingerprint(host),
        "cpu": host.cpu_record() if hasattr(host, "cpu_record") else host.to_dict(),
        "versions": package_versions(),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": json.loads(json.dumps(cfg, default=list)),
        "candidates": [c.row() for c in cands],
        "chosen": {role: {"precision": c.precision, "flash_attn": c.flash_attn, "threads": stage_threads[THREAD_STAGE[role]],
                          "first_s": c.first_s, "steady_s": c.steady_s, "key": c.key}
                   for role, c in winners.items()},
        "stage_threads": stage_threads,
        "mode": mode,
        "mode_first_audio_s": modes,
        "notes": notes,
        "seconds": round(seconds, 1),
    }


_UNITS = {"encoder": "s per 3 s question", "llm": "s: prefill + first chunk / per token",
          "decoder": "s: first chunk / per LLM token", "tts": "s: first write / per speech token",
          "flow": "s per audio second", "vocoder": "s per audio second"}


def _accuracy(c: dict) -> str:
    """The metrics a candidate was judged on, as measured (a fast type that is accepted may still cost
    accuracy: the column shows how much, so a user can pass a stricter --tolerance)."""
    if c["source"]:
        return "reference"
    return ", ".join(f"{k} {v:.3g}" for k, v in (c.get("metrics") or {}).items()) or "-"


def markdown(report: dict) -> str:
    """tune.md: the host, one row per candidate (rejected ones with the metric that missed), the choice."""
    cpu = report["cpu"]
    feats = (" ".join(f for f, on in cpu["features"].items() if on) if isinstance(cpu.get("features"), dict)
             else " ".join(report["host"]["features"]))
    lines = [f"# omnilite tune: {report['family']} on {report['host']['cpu_model']}", "",
             f"CPU: {report['host']['cpu_model']} ({report['host']['arch']}, {report['host']['physical_cores']} physical / "
             f"{report['host']['logical_cores']} logical cores); features: {feats or 'none detected'}",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
             f"Rounds: {report['config']['rounds']} interleaved (medians); threads tried: "
             f"{', '.join(map(str, report['config']['threads']))}; measured {report['measured_at']}", "",
             "| role | precision | flash attn | accepted | accuracy (judged) | first audio | steady | source / this (first audio) "
             "| threads | unit | why rejected |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    f = (lambda v: "-" if v is None else f"{v:.4g}")
    for c in report["candidates"]:
        chosen = report["chosen"][c["role"]]["key"] == (f"{c['role']}:{c['precision']}"
                                                        + (f"/fa-{c['flash_attn']}" if c["flash_attn"] else ""))
        # The speed-up over the source's own file, timed in the same rounds.
        base = next((s["first_s"] for s in report["candidates"] if s["role"] == c["role"] and s["source"]
                     and s["first_s"]), None)
        ratio = f"{base / c['first_s']:.2f}x" if base and c["first_s"] else "-"
        lines.append(f"| {c['role']} | {'**' + c['precision'] + '**' if chosen else c['precision']}"
                     f"{' (source)' if c['source'] else ''} | {c['flash_attn'] or '-'} | "
                     f"{'yes' if c['accepted'] else 'no'} | {_accuracy(c)} | {f(c['first_s'])} | {f(c['steady_s'])} | {ratio} | "
                     f"{c['threads'] or '-'} | {_UNITS[c['role']]} | {c['rejected_because'] or ''} |")
    lines += ["", "Chosen (bold above): " + "; ".join(
        f"{r} {c['precision']}" + (f" flash attention {c['flash_attn']}" if c["flash_attn"] else "") + f", {c['threads']} threads"
        for r, c in report["chosen"].items())]
    modes = report["mode_first_audio_s"]
    lines.append(f"Pipeline mode: {report['mode']}" + (" (median s to first audio: " + ", ".join(
        f"{m} {v:.3f}" for m, v in modes.items()) + ")" if modes else " (not compared)"))
    lines += ["", "First audio: the stage's time on the path to the first audio sample (LLM: prefill of the turn's "
              "positions plus the first chunk's tokens on every core); steady: its cost once audio flows. "
              "Candidates within the tie margin of the fastest first-audio time are ranked by steady cost."]
    lines += [f"- {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


def _write_report(folder: Path, report: dict) -> tuple[Path, Path]:
    from omnilite.runtime.audio import atomic_write_bytes

    folder.mkdir(parents=True, exist_ok=True)
    j, m = folder / "tune.json", folder / "tune.md"
    atomic_write_bytes(j, (json.dumps(report, indent=1) + "\n").encode())
    atomic_write_bytes(m, markdown(report).encode())
    return j, m
