"""Quantization presets, per-stage precisions and the accuracy tolerances each precision must meet.

A bundle's stages are grouped in *roles*; a preset gives one precision per role and the CLI can
override any role the bundle's family has (`FAMILY_ROLES`). LLaMA-Omni: encoder, llm, decoder (the
CTC speech decoder), vocoder. LLaMA-Omni2: encoder, llm, tts (the TTS LM, a GGUF like the LLM, with
its text-embedding table), flow (CosyVoice2 flow matching), vocoder (HiFT). Step-Audio 2: encoder
(encoder + adapter), llm, flow (the token2wav DiT flow: encoder + estimator), vocoder (HiFT). ONNX roles take
`fp32 | fp16 | int8 | int4`, GGUF roles a llama.cpp type name. Stages outside the roles stay as
exported: see `FIXED_STAGES` for why.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from omnilite.runtime.errors import OmniliteError

ONNX_PRECISIONS = ("fp32", "fp16", "int8", "int4")
# llama.cpp file types offered; "F32"/"F16" are unquantized. BF16 keeps f32's range with an 8-bit
# mantissa: near-exact, but computed natively only where the CPU has bf16 instructions (see
# devices/host.py BF16_FEATURES), emulated through f32 conversions elsewhere. IQ4_NL is Q4_0's size
# (4.5 bits per weight) on a non-linear grid of levels; llama.cpp repacks both for its x86 kernels
# (LLaMA-Omni2-0.5B, 300 positions, 2 threads, AVX-512: prefill 0.55 s vs Q4_K_M's 0.98 s).
GGUF_PRECISIONS = ("F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "IQ4_NL", "Q4_0")
UNQUANTIZED = frozenset({"fp32", "f32", "f16", "F32", "F16"})  # a source the report may use as reference

# Bits per weight, for ordering precisions: requantizing upwards cannot restore what was lost.
_BITS = {"fp32": 32, "f32": 32, "F32": 32, "fp16": 16, "f16": 16, "F16": 16, "BF16": 16, "int8": 8, "Q8_0": 8.5,
         "Q6_K": 6.56, "Q5_K_M": 5.7, "Q4_K_M": 4.85, "IQ4_NL": 4.5, "Q4_0": 4.5, "int4": 4.5}

ROLES = ("encoder", "llm", "decoder", "tts", "flow", "vocoder")
GGUF_ROLES = ("llm", "tts")  # the others are ONNX

# Family -> role -> bundle stage names (the first is the one the accuracy report names).
FAMILY_ROLES: dict[str, dict[str, tuple[str, ...]]] = {
    "llama-omni": {"encoder": ("encoder",), "llm": ("llm",), "decoder": ("speech_generator",), "vocoder": ("vocoder",)},
    # tts_text_embed (the TTS LM's input rows for the LLM's token ids, a numpy table as large as the
    # TTS LM's own embedding) follows the TTS LM: fp16 whenever the TTS LM is below F32. The flow's
    # cached estimator (the same weights, for the stream; absent in older bundles) goes with the flow.
    "llama-omni2": {"encoder": ("encoder",), "llm": ("llm",), "tts": ("tts_lm", "tts_text_embed"),
                    "flow": ("flow_encoder", "flow_estimator", "flow_estimator_cached"), "vocoder": ("hift",)},
    # Step-Audio 2 mini: the same presets mean the same per role (balanced: encoder int8, LLM Q8_0,
    # flow int8, HiFT fp32; small: encoder int4, LLM Q4_K_M, flow int8, HiFT fp32).
    "step-audio2": {"encoder": ("encoder",), "llm": ("llm",), "flow": ("flow_encoder", "flow_estimator"),
                    "vocoder": ("hift",)},
    # Fun-Audio-Chat: encoder = the audio input stage (audio encoder + adapter), llm, tts = the
    # speech head (a GGUF LM writing 5 codes per LLM step; capped at Q8_0, see FAMILY_CAPS), flow
    # (CosyVoice3 flow: encoder + estimator, and the estimator's cached form for the chunk-aligned
    # stream), vocoder (causal HiFT).
    "fun-audio-chat": {"encoder": ("audio_input",), "llm": ("llm",), "tts": ("speech_head",),
                       "flow": ("flow_encoder", "flow_estimator", "flow_estimator_cached"), "vocoder": ("hift",)},
}
# Family -> role -> the lowest precision a preset gives it (an explicit --ROLE still wins). The
# Fun-Audio-Chat speech head's codes are heard and fed back into the LLM's next input, and no trained
# head has been measured below Q8_0 yet (the tiny head's rows are too narrow for Q4_K).
FAMILY_CAPS: dict[str, dict[str, str]] = {"fun-audio-chat": {"tts": "Q8_0"}}
# Stages that never change precision, and why (printed in the report).
FIXED_STAGES: dict[str, str] = {
    "unit_duration": "kept fp32: 0.1% of the vocoder's weights, and a duration that rounds differently shifts every later sample",
    "tts_fusion": "kept fp32: two small projections (LLM hidden state + text embedding -> TTS input) read at every TTS step",
    "flow_noise": "kept fp32: the flow's fixed initial noise is data, not weights",
    "hift_f0": "kept fp32: the F0 predictor is small, and an F0 error moves the phase of the sine source in every later sample",
    "voice_prompt": "kept fp32: the flow's prompt conditioning (speech tokens, mel, x-vector) is data, not weights",
    "speech_head_input": "kept fp32: the head's input projections (hidden state + text embedding), read at every LLM step; not yet measured at int8",
    "speech_feedback": "kept fp32: the code embeddings averaged into the LLM's next input; not yet measured at int8",
    "speech_head_codes": "kept fp32: the head's per-code input rows are a table read by index, not matmul weights",
}


def table_precision(asked: str, current: str) -> str:
    """The precision of a numpy table (npy stage) in a role asked for `asked`: fp16 below 32 bits
    (lossless enough next to a quantized TTS LM, half the size), never upwards from fp16."""
    return "fp16" if bits(asked) < 32 or current == "fp16" else "fp32"


def bits(precision: str) -> float:
    return _BITS.get(precision, 32.0)


@dataclass(frozen=True)
class QuantPlan:
    """One precision per role. `llm=None` / `tts=None` keep that GGUF as exported (f32 or f16).
    A family uses only its own roles (`FAMILY_ROLES`); the rest of a preset does not apply to it."""

    encoder: str = "fp32"
    llm: str | None = None
    decoder: str = "fp32"
    tts: str | None = None
    flow: str = "fp32"
    vocoder: str = "fp32"

    def with_overrides(self, overrides: dict[str, str | None]) -> "QuantPlan":
        unknown = set(overrides) - set(ROLES)
        if unknown:
            raise OmniliteError(f"unknown stage role(s) {sorted(unknown)}; use {', '.join(ROLES)}.")
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def validate(self) -> None:
        for role in ROLES:
            p = getattr(self, role)
            if role in GGUF_ROLES:
                if p is not None and p not in GGUF_PRECISIONS:
                    raise OmniliteError(f"--{role} {p!r} is not a supported llama.cpp type; use one of: {', '.join(GGUF_PRECISIONS)}.")
            elif p not in ONNX_PRECISIONS:
                raise OmniliteError(f"--{role} {p!r} is not an ONNX precision; use one of: {', '.join(ONNX_PRECISIONS)}.")
        if self.vocoder == "int4":
            # MatMulNBits covers MatMul only; the HiFi-GAN is convolutions, so int4 would change nothing.
            raise OmniliteError("--vocoder int4 is not supported (the vocoder is convolutions; int4 weight-only "
                                "quantization covers MatMul); use int8 or fp16.")

    def as_dict(self, family: str | None = None) -> dict[str, str | None]:
        """Precision per role: the family's roles, or every role."""
        return {r: getattr(self, r) for r in (FAMILY_ROLES[family] if family else ROLES)}


PRESETS: dict[str, QuantPlan] = {
    # The exported precisions: a copy, useful as the baseline row of a comparison.
    "fp32": QuantPlan(),
    # INT8 weights and activations where the CPU has integer dot products (VNNI, ARM dotprod).
    "balanced": QuantPlan(encoder="int8", llm="Q8_0", decoder="int8", tts="Q8_0", flow="int8", vocoder="fp32"),
    # Smallest: 4-bit weight-only matmuls, Q4_K_M LLM. The vocoder stays fp32: it is 1% of the
    # bundle, and onnxruntime's int8 convolutions (ConvInteger) ran 4x slower than fp32 on an
    # AVX-512 VNNI CPU (RTF 1.7 for 1 s of audio: no longer real time); `--vocoder int8` (39% of
    # the size) stays available for hardware with fast int8 convolutions.
    # LLaMA-Omni2's flow stays int8 here: at the real shape (random weights, 1 thread) int4
    # MatMulNBits ran the estimator no faster than fp32 (0.82 s vs 0.82 s a call) while int8 took
    # 0.48 s, and int4 was 10x the error (estimator output 0.20 vs 0.020) for 8% less size.
    "small": QuantPlan(encoder="int4", llm="Q4_K_M", decoder="int4", tts="Q4_K_M", flow="int8", vocoder="fp32"),
    # GPU profiles: fp16 everywhere (tensor cores); on CPU it mainly halves the size.
    "gpu-fp16": QuantPlan(encoder="fp16", llm="F16", decoder="fp16", tts="F16", flow="fp16", vocoder="fp16"),
}


def plan_for(preset: str, overrides: dict[str, str | None] | None = None, family: str | None = None) -> QuantPlan:
    """The preset with the overrides applied; with `family`, an override of a role that family
    does not have is refused (it would silently do nothing)."""
    if preset not in PRESETS:
        raise OmniliteError(f"unknown preset {preset!r}; use one of: {', '.join(PRESETS)}.")
    if family is not None:
        roles = FAMILY_ROLES[family]
        foreign = [r for r, v in (overrides or {}).items() if v is not None and r in ROLES and r not in roles]
        if foreign:
            raise OmniliteError(f"--{foreign[0]} does not apply to a {family} bundle, whose stage roles are "
                                f"{', '.join(roles)}; drop it.")
    plan = PRESETS[preset]
    for role, cap in FAMILY_CAPS.get(family or "", {}).items():
        if getattr(plan, role) is not None and bits(getattr(plan, role)) < bits(cap):
            plan = replace(plan, **{role: cap})
    plan = plan.with_overrides(overrides or {})
    plan.validate()
    return plan


# --- tolerances -------------------------------------------------------------------------------
# Per stage and precision. Calibrated on the tiny random-weight model (tests) and on real weights
# (benchmarks/results/quant_real_weights.md) with margin, so that an ordinary quantization passes
# and a damaged weight (tests/test_quant.py corrupts one) fails. "min" metrics must be >= the
# tolerance, "max" metrics <=.

@dataclass(frozen=True)
class Tolerance:
    min: dict[str, float] = field(default_factory=dict)
    max: dict[str, float] = field(default_factory=dict)

    def check(self, metrics: dict) -> list[str]:
        """Names of the metrics that miss (a metric absent from `metrics` is not judged)."""
        bad = [k for k, v in self.min.items() if k in metrics and not metrics[k] >= v]
        return bad + [k for k, v in self.max.items() if k in metrics and not metrics[k] <= v]

    def as_dict(self) -> dict:
        return {**{f"{k}>=": v for k, v in self.min.items()}, **{f"{k}<=": v for k, v in self.max.items()}}


def _tol(mins: dict[str, float] | None = None, maxs: dict[str, float] | None = None) -> Tolerance:
    return Tolerance(dict(mins or {}), dict(maxs or {}))


# Tiny-model measurements below: AVX2-only AMD EPYC (no VNNI), onnxruntime 1.28 and 1.32, numpy 1.26
# and 2.4, 16 and 32 report tokens, two versions of the tiny models; each bound keeps at least ~2x
# margin over them. Only continuous metrics are judged by default: an argmax (LLM top-1, decoder
# frame) over the near-tied classes of random weights flips with any rounding change (tiny LLM
# Q4_K_M top-1 0.78-0.94 on 32 tokens), so those are reported, and bounded only when the user asks
# (`--tolerance llm.top1_agreement=0.9`).
TOLERANCES: dict[str, dict[str, Tolerance]] = {
    # tiny: int8 cosine 0.9996-0.9999 / RMS 0.016-0.028 (0.069 with 8-bit weights on this CPU,
    # saturated), int4 (int8 adapter) 0.997-0.999 / 0.035-0.085, fp16 1.0 / 0.0003; Whisper-base
    # (real weights): see benchmarks/results/quant_real_weights.md. Judged on the mean row cosine: on
    # real Whisper weights a few positions of the 30 s padding are outliers (cosine_min is reported,
    # not judged). Whisper-base int8: mean 0.994 / RMS 0.107.
    "encoder": {
        "fp16": _tol({"cosine_mean": 0.9999}, {"rel_rms_error": 0.01}),
        "int8": _tol({"cosine_mean": 0.98}, {"rel_rms_error": 0.2}),
        "int4": _tol({"cosine_mean": 0.97}, {"rel_rms_error": 0.3}),
    },
    # mean KL(reference || quantized) of the next-token distributions. SmolLM2-135M (real): Q8_0
    # 0.0047 (top-1 0.948), Q6_K 0.010 (0.896), Q4_K_M 0.054 (0.901), Q4_0 0.344 (0.708); tiny: Q8_0
    # 0.0015-0.0024, Q4_K_M 0.040-0.051, F16 2e-5 (the f32 reference runs plain attention, the
    # quantized LLM llama.cpp's flash attention, as the runtime does).
    # BF16 and IQ4_NL, each measured in one run with Q8_0 / Q4_K_M / Q4_0 (AMD EPYC with avx512_bf16,
    # llama-cpp-python 0.3.36): SmolLM2 BF16 0.0002 (top-1 0.995), IQ4_NL 0.222 (0.776; Q4_K_M 0.053
    # and Q4_0 0.344 in the same run; its rows are 576 wide, so Q4_K_M is mostly 5-bit Q5_0 there and
    # 14% larger than IQ4_NL); tiny LLMs of the four families, 16 and 32 tokens: BF16 5.4e-5-1.8e-4,
    # IQ4_NL 0.109-0.294 (Q4_0 0.19-0.28, Q4_K_M 0.043-0.071: its 64-wide rows fall back to Q5_0,
    # while IQ4_NL's 32-wide blocks fit; the worst, 0.294, is Fun-Audio-Chat's tiny LLM).
    "llm": {
        "F16": _tol(maxs={"mean_kl": 0.005}),
        "BF16": _tol(maxs={"mean_kl": 0.003}),  # 2.5x the worst measured (tiny TTS LM 0.0012)
        "Q8_0": _tol(maxs={"mean_kl": 0.02}),
        "Q6_K": _tol(maxs={"mean_kl": 0.04}),
        "Q5_K_M": _tol(maxs={"mean_kl": 0.12}),
        "Q4_K_M": _tol(maxs={"mean_kl": 0.15}),
        # IQ4_NL: 2x the worst measured (tiny 0.294); Q4_0's size, 35% less KL than Q4_0 on SmolLM2.
        "IQ4_NL": _tol(maxs={"mean_kl": 0.6}),
        # Q4_0 is the crudest type offered; its tolerance only catches breakage.
        "Q4_0": _tol(maxs={"mean_kl": 0.6}),
    },
    # Relative error of the CTC decoder's row-centred unit/blank logits. tiny: fp16 0.0004, int8
    # 0.030 (0.19 with 8-bit weights on this CPU, saturated), int4 with int8 input/output
    # projections 0.131-0.134 (frame agreement, reported: int8 0.92-0.97, int4 0.70-0.77). No trained
    # decoder is available to calibrate against.
    "decoder": {
        "fp16": _tol(maxs={"logit_rel_error": 0.005}),
        "int8": _tol(maxs={"logit_rel_error": 0.08}),
        "int4": _tol(maxs={"logit_rel_error": 0.25}),
    },
    # LLaMA-Omni2's TTS LM is a Qwen2.5-0.5B LM quantized by the same llama.cpp types as the LLM:
    # the LLM's bounds. tiny (teacher-forced on the reference TTS tokens, 82-164 tokens): Q8_0 KL
    # 0.0001-0.0086, Q4_K_M 0.0013-0.067 (48-wide rows: llama.cpp fell back to Q5_0/Q8_0), F16 2e-4,
    # BF16 0.0011-0.0012, IQ4_NL 0.112-0.139 (only the 2 tensors with 32-multiple rows get IQ4_NL,
    # the rest F16; Q4_0 0.34-0.41 likewise); Fun-Audio-Chat's tiny speech head (an explicit --tts):
    # BF16 4e-6, IQ4_NL 0.0025-0.0026. No trained TTS LM was available to calibrate against.
    "tts": {},  # filled from "llm" below
    # LLaMA-Omni2 flow, mel relative error of the whole 10-step solve. tiny: fp16 0.0031-0.0038, int8
    # 0.017-0.022 (with 8-bit weights, saturated: 0.052 on this CPU, 0.070-0.073 on another 2-core
    # machine; 0.013 on a VNNI CPU), int4 0.11; real shape (random weights, one estimator call):
    # int8 0.020, int4 0.20.
    "flow": {
        "fp16": _tol(maxs={"mel_rel_error": 0.01}),
        "int8": _tol(maxs={"mel_rel_error": 0.05}),
        "int4": _tol(maxs={"mel_rel_error": 0.3}),
    },
    # tiny: int8 (first/last conv float) 31 dB / 0.15 dB log-mel, fp16 62 dB / 0.005 dB.
    # LLaMA-Omni2's HiFT (tiny): fp16 54 dB / 0.010 dB, int8 21 dB / 0.41 dB.
    "vocoder": {
        "fp16": _tol({"snr_db": 40.0}, {"log_mel_distance_db": 0.5}),
        "int8": _tol({"snr_db": 15.0}, {"log_mel_distance_db": 3.0}),
    },
}


TOLERANCES["tts"] = dict(TOLERANCES["llm"])

# Which way each metric a tolerance can bound must go.
METRIC_KIND = {"cosine_mean": "min", "rel_rms_error": "max", "top1_agreement": "min", "mean_kl": "max",
               "frame_agreement": "min", "logit_rel_error": "max", "snr_db": "min", "log_mel_distance_db": "max",
               "mel_rel_error": "max"}
# The metrics a tolerance can bound per role (the defaults above bound a subset; `--tolerance` any).
ROLE_METRICS = {"encoder": ("cosine_mean", "rel_rms_error"), "llm": ("top1_agreement", "mean_kl"),
                "decoder": ("logit_rel_error", "frame_agreement"), "tts": ("top1_agreement", "mean_kl"),
                "flow": ("mel_rel_error",), "vocoder": ("snr_db", "log_mel_distance_db")}


def tolerance(role: str, precision: str, overrides: dict[str, float] | None = None) -> Tolerance:
    """The tolerance of `role` at `precision`, with user overrides `{"role.metric": value}`."""
    base = TOLERANCES.get(role, {}).get(precision, Tolerance())
    mins, maxs = dict(base.min), dict(base.max)
    for key, value in (overrides or {}).items():
        r, _, metric = key.partition(".")
        if r != role:
            continue
        if metric not in ROLE_METRICS.get(role, ()):
            raise OmniliteError(f"--tolerance {key}: {role} has no metric {metric!r} to bound; "
                                f"use one of: {', '.join(ROLE_METRICS.get(role, ()))}.")
        (mins if METRIC_KIND[metric] == "min" else maxs)[metric] = float(value)
    return Tolerance(mins, maxs)


def parse_tolerances(items: list[str] | None) -> dict[str, float]:
    """CLI `--tolerance role.metric=value` items -> {"role.metric": value}, checked."""
    out: dict[str, float] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        role, _, metric = key.partition(".")
        try:
            number = float(value)
        except ValueError:
            number = None
        if not sep or number is None or role not in ROLE_METRICS or metric not in ROLE_METRICS[role]:
            choices = ", ".join(f"{r}.{m}" for r, ms in ROLE_METRICS.items() for m in ms)
            raise OmniliteError(f"--tolerance {item!r} must be ROLE.METRIC=NUMBER with ROLE.METRIC one of: {choices}.")
        out[key] = number
    return out
