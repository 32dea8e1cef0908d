"""Work per stage, and latency estimates for hardware we cannot run (`omnilite bench --estimate`).

Work is measured, not modelled: one extra turn runs with ONNX Runtime's profiler on, which records
each node's input/output shapes and the bytes of weights and activations it touched; FLOPs follow
from the shapes of the matrix products and convolutions. The LLM's work follows from llama.cpp's
own sizes (parameters, bytes of weights, layers, KV heads) and the turn's token counts.

An estimate is a roofline per stage: max(compute time, memory time) plus dispatch overhead, with
compute time = FLOPs / (peak x efficiency) per precision class and memory time = bytes /
(bandwidth x efficiency). The efficiencies are fixed constants chosen before any check, never
fitted to the run they are checked against; `host_figures()` measures this machine's peak and
bandwidth so the model's error can be measured here.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import onnxruntime as ort

from omnilite.devices.profiles import Profile
from omnilite.runtime.events import Done
from omnilite.runtime.onnx_session import LazySessions
from omnilite.runtime.pipeline import Pipeline, PipelineConfig

# Fraction of the sustained peak (a BLAS GEMM, a large memory copy) that ONNX Runtime's and
# llama.cpp's kernels reach on the shapes of these models: typical CPU figures, set a priori.
EFFICIENCY = {"fp32": 0.6, "int8": 0.35, "bandwidth": 0.75}
# Dispatch cost per ONNX node executed and per llama_decode call (graph build, thread wake-up).
NODE_OVERHEAD_S = 5e-6
LLM_CALL_OVERHEAD_S = 3e-4

# Which pipeline stage (timing name) an ONNX file belongs to.
STAGE_OF_FILE = {"encoder": "encoder", "speech_generator": "speech_generator", "unit_duration": "vocoder",
                 "vocoder": "vocoder", "tts_fusion": "speech_generator", "flow_encoder": "vocoder",
                 "flow_estimator": "vocoder", "flow_estimator_cached": "vocoder", "hift_f0": "vocoder", "hift": "vocoder"}
_MATMUL = {"MatMul", "FusedMatMul", "Gemm", "FusedGemm", "MatMulInteger", "DynamicQuantizeMatMul",
           "QLinearMatMul", "MatMulNBits", "MatMulIntegerToFloat"}
_CONV = {"Conv", "FusedConv", "ConvInteger", "QLinearConv"}
# int8 arithmetic (MatMulNBits with accuracy level 4 computes in int8 on CPU; see quant/onnx_quant.py).
_INT8 = {"MatMulInteger", "ConvInteger", "DynamicQuantizeMatMul", "QLinearMatMul", "QLinearConv", "MatMulNBits",
         "MatMulIntegerToFloat"}
_UNQUANTIZED_GGUF = {"f32", "f16", "F32", "F16", "bf16", "BF16"}
_PROFILE_NAME = re.compile(r"_\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}(_\d+)?\.json$")  # ORT's suffix to our prefix


@dataclass
class Work:
    flops_fp32: float = 0.0
    flops_int8: float = 0.0
    bytes: float = 0.0
    calls: int = 0  # model runs / llama_decode calls
    nodes: int = 0  # ONNX nodes executed

    def __iadd__(self, other: "Work") -> "Work":
        for k, v in asdict(other).items():
            setattr(self, k, getattr(self, k) + v)
        return self


@dataclass(frozen=True)
class Figures:
    """Sustained compute and bandwidth of a device (GFLOP/s, GB/s)."""

    fp32_gflops: float
    int8_gops: float
    bandwidth_gbps: float
    source: str

    @classmethod
    def of_profile(cls, p: Profile) -> "Figures":
        return cls(p.peak_gflops["fp32"], p.peak_gflops["int8"], p.memory_bandwidth_gbps, f"profile {p.name}")


def _prod(dims) -> int:
    return math.prod(int(d) for d in dims)


def node_flops(op: str, inputs: list[list[int]], outputs: list[list[int]]) -> float:
    """Multiply-adds x 2 of one executed node (0 for ops whose cost is memory traffic only)."""
    if not outputs or not inputs:
        return 0.0
    if op in _MATMUL:
        return 2.0 * _prod(outputs[0]) * int(inputs[0][-1])
    if op in _CONV:
        w_at = 3 if op == "QLinearConv" else 1
        if len(inputs) > w_at:
            return 2.0 * _prod(outputs[0]) * _prod(inputs[w_at][1:])
        # ONNX Runtime pre-packed the weight, so the profile omits its shape: a pointwise lower bound.
        return 2.0 * _prod(outputs[0]) * int(inputs[0][1])
    if op == "ConvTranspose":  # every input element scatters into (C_out / groups) x kernel outputs
        if len(inputs) > 1:
            return 2.0 * _prod(inputs[0]) * _prod(inputs[1][1:])
        # Weight pre-packed (shape not in the profile): each output gathers C_in x kernel/stride inputs,
        # and HiFi-GAN-style upsamplers (the only ConvTranspose users here) have kernel = 2 x stride.
        return 2.0 * _prod(outputs[0]) * int(inputs[0][1]) * 2
    return 0.0


def onnx_profile_work(path: Path) -> Work:
    """The work recorded in one ONNX Runtime profile file (every run of that session)."""
    w = Work()
    for e in json.loads(Path(path).read_text()):
        if e.get("cat") == "Session" and e.get("name") == "model_run":
            w.calls += 1
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        a = e.get("args", {})
        shapes = [[next(iter(s.values())) for s in a.get(k, [])] for k in ("input_type_shape", "output_type_shape")]
        flops = node_flops(a.get("op_name", ""), *shapes)
        if a.get("op_name") in _INT8:
            w.flops_int8 += flops
        else:
            w.flops_fp32 += flops
        w.bytes += sum(float(a.get(k, 0)) for k in ("parameter_size", "activation_size", "output_size"))
        w.nodes += 1
    return w


def llm_work(shape: dict[str, int], precision: str, prompt_tokens: int, decode_calls: int, context_after_prompt: int,
             kv_bytes_per_value: int) -> dict[str, Work]:
    """Prefill and decode work of one turn from llama.cpp's sizes. The token-embedding table is a
    row lookup, so neither its FLOPs nor (beyond a row) its bytes count; the output head runs for
    the positions that give logits only (the last of a prefill, every decode step)."""
    emb = shape["n_vocab"] * shape["n_embd"]
    tied = shape["n_params"] < 2 * emb  # no separate output matrix
    body = shape["n_params"] - (emb if tied else 2 * emb)  # the transformer layers
    dense = body + emb  # layers + output head: read by every decode step
    weight_bytes = shape["size_bytes"] * dense / shape["n_params"]
    head_dim = shape["n_embd"] // shape["n_head"]
    kv_per_pos = 2 * shape["n_layer"] * shape["n_head_kv"] * head_dim * kv_bytes_per_value  # K and V
    attn_per_pair = 4 * shape["n_layer"] * shape["n_embd"]  # QK^T and AV per (query, key) pair
    klass = "flops_fp32" if precision in _UNQUANTIZED_GGUF else "flops_int8"
    p, n = prompt_tokens, decode_calls
    prefill = Work(bytes=weight_bytes + kv_per_pos * p, calls=1)
    setattr(prefill, klass, 2.0 * body * p + 2.0 * emb + attn_per_pair * p * p / 2)
    mean_ctx = context_after_prompt + n / 2
    decode = Work(bytes=n * (weight_bytes + kv_per_pos * mean_ctx), calls=n)
    setattr(decode, klass, n * (2.0 * dense + attn_per_pair * mean_ctx))
    return {"llm_prefill": prefill, "llm_decode": decode}


def _ort_sessions(pipe: Pipeline) -> list[ort.InferenceSession]:
    """Every ONNX Runtime session the pipeline's stages hold (one attribute level down, and the opened
    ones of a stage's `LazySessions`)."""
    found = []
    for stage in vars(pipe).values():
        for value in (vars(stage).values() if hasattr(stage, "__dict__") else ()):
            for session in (value.opened() if isinstance(value, LazySessions) else [value]):
                if isinstance(session, ort.InferenceSession) and session not in found:
                    found.append(session)
    return found


def measure_work(bundle: Path, config: PipelineConfig, audio: np.ndarray, rate: int) -> tuple[dict[str, Work], Done]:
    """One sequential turn with profiling on: the work of each stage, and the turn itself."""
    work: dict[str, Work] = {}
    with tempfile.TemporaryDirectory(prefix="omnilite-cost-") as tmp:
        with Pipeline.load(bundle, replace(config, mode="sequential", profile_dir=tmp)) as pipe:
            done = [e for e in pipe.respond(audio, rate) if isinstance(e, Done)][-1]
            for session in _ort_sessions(pipe):
                session.end_profiling()
            kv_bytes = 4 if pipe.bundle.stages["llm"].precision == "f32" else 2
            decode_calls = sum(1 for name, _, _ in done.spans if name == "llm_decode")
            work.update(llm_work(pipe.llm.shape(), pipe.bundle.stages["llm"].precision, done.stats["prompt_tokens"],
                                 decode_calls, done.stats["context"], kv_bytes))
            tts = getattr(pipe, "tts", None)
            if tts is not None and "tts_lm" in pipe.bundle.stages:  # LLaMA-Omni2's TTS LM: llama.cpp work too
                text = len(done.tokens) + 1  # every fused text position, and <sep>
                tts_work = llm_work(tts.lm.shape(), pipe.bundle.stages["tts_lm"].precision, text,
                                    len(pipe.units.tts_tokens), text, kv_bytes)
                work.setdefault("speech_generator", Work())
                for w in tts_work.values():
                    work["speech_generator"] += w
        for f in sorted(Path(tmp).glob("*.json")):
            stage = STAGE_OF_FILE.get(_PROFILE_NAME.sub("", f.name))
            if stage:
                work.setdefault(stage, Work())
                work[stage] += onnx_profile_work(f)
    return work, done


def stage_seconds(w: Work, f: Figures) -> float:
    compute = (w.flops_fp32 / (f.fp32_gflops * 1e9 * EFFICIENCY["fp32"])
               + w.flops_int8 / (f.int8_gops * 1e9 * EFFICIENCY["int8"]))
    memory = w.bytes / (f.bandwidth_gbps * 1e9 * EFFICIENCY["bandwidth"])
    overhead = w.nodes * NODE_OVERHEAD_S + (w.calls * LLM_CALL_OVERHEAD_S if w.nodes == 0 else 0.0)
    return max(compute, memory) + overhead


def share_before_first_audio(done: Done) -> dict[str, float]:
    """Per stage, the fraction of its calls that a sequential turn made before its first audio."""
    ttfa = done.timings.get("ttfa", float("inf"))
    out = {}
    for stage in {n for n, _, _ in done.spans}:
        ends = [b for n, _, b in done.spans if n == stage]
        out[stage] = sum(1 for b in ends if b <= ttfa + 1e-9) / len(ends)
    return out


def estimate(work: dict[str, Work], figures: Figures, share: dict[str, float],
             unmodelled_ms: dict[str, float] | None = None, scale: float = 1.0) -> dict:
    """Per-stage milliseconds and TTFA for `figures`. Stages without recorded work (numpy resample
    and mel) are `unmodelled_ms` measured here, scaled by the ratio of fp32 figures `scale`."""
    stages = {s: stage_seconds(w, figures) * 1000 for s, w in work.items()}
    for s, ms in (unmodelled_ms or {}).items():
        stages.setdefault(s, ms * scale)
    ttfa = sum(ms * share.get(s, 0.0) for s, ms in stages.items())
    return {"figures": asdict(figures), "stages_ms": stages, "ttfa_ms": ttfa, "efficiency": dict(EFFICIENCY)}


def host_figures(int8_per_fp32: float, seconds: float = 1.0) -> Figures:
    """This machine's sustained fp32 GEMM rate and copy bandwidth (numpy, every core), with the
    int8 rate taken as `int8_per_fp32` times fp32 (the profile's ratio: no int8 GEMM in numpy)."""
    n = 1024
    a = np.random.default_rng(0).random((n, n), dtype=np.float32)
    a @ a  # warm-up: thread pool, caches
    reps, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        a @ a
        reps += 1
    gflops = 2 * n**3 * reps / (time.perf_counter() - t) / 1e9
    src = np.ones(64 * 2**20, np.float32)  # 256 MiB: far past any cache
    dst = np.empty_like(src)
    np.copyto(dst, src)
    reps, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        np.copyto(dst, src)
        reps += 1
    gbps = 2 * src.nbytes * reps / (time.perf_counter() - t) / 1e9  # read + write
    return Figures(gflops, gflops * int8_per_fp32, gbps, "measured on this host (numpy GEMM and copy)")


def host_speed(seconds: float = 0.5) -> dict:
    """This instance's speed, recorded next to the CPU kind: two machines of one kind (same model and
    features) differed 2x in every vectorised stage, PyTorch's included, so absolute seconds from
    different runs compare only together with these."""
    f = host_figures(1.0, seconds)
    return {"fp32_gemm_gflops": round(f.fp32_gflops, 1), "copy_gbps": round(f.bandwidth_gbps, 1)}


def describe_speed(speed: dict | None) -> str:
    if not speed:
        return "not measured"
    return f"fp32 GEMM {speed['fp32_gemm_gflops']:.0f} GFLOP/s, copy {speed['copy_gbps']:.1f} GB/s (numpy, every core)"
