"""Device profiles: one JSON file per hardware class, validated on load, chosen from the host.

A profile names the execution providers in order, llama.cpp GPU offload, threads per stage, the
precision preset, chunk sizes, a memory budget, and the memory bandwidth and peak compute that
benchmark estimates use for hardware we cannot run.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from omnilite.runtime.errors import DeviceError

from .host import HostInfo

log = logging.getLogger(__name__)

PRESETS = ("fp32", "balanced", "small")
STAGES = ("encoder", "llm", "speech_generator", "vocoder")
# Which package provides each onnxruntime execution provider (named when one is missing).
PROVIDER_PACKAGES = {
    "CUDAExecutionProvider": "onnxruntime-gpu",
    "TensorrtExecutionProvider": "onnxruntime-gpu (with TensorRT libraries installed)",
    "CoreMLExecutionProvider": "onnxruntime (the macOS wheel)",
    "XnnpackExecutionProvider": "onnxruntime-android or an onnxruntime build with --use_xnnpack",
    "NnapiExecutionProvider": "onnxruntime-android",
    "QNNExecutionProvider": "onnxruntime-qnn",
    "CPUExecutionProvider": "onnxruntime",
}
MATCH_KEYS = {"os", "arch", "features_all", "cuda", "jetson_model_contains", "board_model_contains"}


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    priority: int
    match: dict
    providers: tuple[str, ...]
    n_gpu_layers: int
    threads: dict[str, int | str]
    precision: str
    omega: int
    read: int
    write: int
    memory_budget_mb: int
    memory_bandwidth_gbps: float
    peak_gflops: dict[str, float]

    def threads_for(self, stage: str, host: HostInfo) -> int:
        value = self.threads[stage]
        return max(1, host.physical_cores) if value == "physical" else int(value)


def _profile_from_dict(d: dict, source: str) -> Profile:
    def need(key: str, kind, where: dict = d):
        if key not in where:
            raise DeviceError(f"profile {source} has no '{key}'; add it (see the other files in devices/profiles).")
        if not isinstance(where[key], kind):
            raise DeviceError(f"profile {source}: '{key}' must be {getattr(kind, '__name__', kind)}, got {where[key]!r}.")
        return where[key]

    match = need("match", dict)
    unknown = set(match) - MATCH_KEYS
    if unknown:
        raise DeviceError(f"profile {source}: unknown match key(s) {sorted(unknown)}; use {sorted(MATCH_KEYS)}.")
    providers = need("providers", list)
    if not providers or providers[-1] != "CPUExecutionProvider":
        raise DeviceError(f"profile {source}: providers must end with CPUExecutionProvider, the fallback of last resort.")
    unknown_p = [p for p in providers if p not in PROVIDER_PACKAGES]
    if unknown_p:
        raise DeviceError(f"profile {source}: unknown execution provider(s) {unknown_p}; use names from {sorted(PROVIDER_PACKAGES)}.")
    threads = need("threads", dict)
    for stage in STAGES:
        t = need(stage, (int, str), threads)
        if t != "physical" and not (isinstance(t, int) and t >= 1):
            raise DeviceError(f"profile {source}: threads.{stage} must be a positive integer or 'physical', got {t!r}.")
    precision = need("precision", str)
    if precision not in PRESETS:
        raise DeviceError(f"profile {source}: precision {precision!r} is not a preset; use one of {', '.join(PRESETS)}.")
    chunks = need("chunks", dict)
    peak = need("peak_gflops", dict)
    for k in ("fp32", "int8"):
        if not isinstance(peak.get(k), (int, float)) or peak[k] <= 0:
            raise DeviceError(f"profile {source}: peak_gflops.{k} must be a positive number.")
    bandwidth = need("memory_bandwidth_gbps", (int, float))
    if bandwidth <= 0:
        raise DeviceError(f"profile {source}: memory_bandwidth_gbps must be positive.")
    name = need("name", str)
    if Path(source).stem != name and source.endswith(".json"):
        raise DeviceError(f"profile {source}: name {name!r} must match the file name.")
    return Profile(
        name=name, description=need("description", str), priority=need("priority", int), match=match,
        providers=tuple(providers), n_gpu_layers=need("n_gpu_layers", int, need("llm", dict)), threads=threads,
        precision=precision, omega=need("omega", int, chunks), read=need("read", int, chunks),
        write=need("write", int, chunks), memory_budget_mb=need("memory_budget_mb", int),
        memory_bandwidth_gbps=float(bandwidth), peak_gflops={k: float(v) for k, v in peak.items()},
    )


def load_profile_file(path: Path) -> Profile:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise DeviceError(f"profile {path} cannot be read as JSON ({e}); fix or remove the file.") from None
    return _profile_from_dict(data, str(path))


def builtin_profiles() -> dict[str, Profile]:
    folder = resources.files("omnilite.devices") / "profiles"
    out = {}
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".json"):
            p = _profile_from_dict(json.loads(entry.read_text()), entry.name)
            out[p.name] = p
    return out


def get_profile(name_or_path: str) -> Profile:
    """A built-in profile by name, or a profile JSON file by path (for --profile)."""
    profiles = builtin_profiles()
    if name_or_path in profiles:
        return profiles[name_or_path]
    if name_or_path.endswith(".json"):
        return load_profile_file(Path(name_or_path))
    raise DeviceError(f"unknown device profile {name_or_path!r}; use one of: {', '.join(profiles)} (or a .json file).")


def _matches(p: Profile, host: HostInfo) -> tuple[bool, list[str]]:
    m, why = p.match, []
    checks = [
        ("os", lambda v: host.os in v, lambda v: f"os {host.os}"),
        ("arch", lambda v: host.arch == v, lambda v: f"arch {host.arch}"),
        ("features_all", lambda v: set(v) <= host.features, lambda v: "CPU features " + "+".join(v)),
        ("cuda", lambda v: bool(host.cuda_gpus) == v, lambda v: f"CUDA GPU {host.cuda_gpus[0]}" if v else "no CUDA GPU"),
        ("jetson_model_contains", lambda v: v.lower() in (host.jetson_model or "").lower(), lambda v: f"Jetson model '{host.jetson_model}'"),
        ("board_model_contains", lambda v: v.lower() in (host.board_model or "").lower(), lambda v: f"board '{host.board_model}'"),
    ]
    for key, test, say in checks:
        if key in m:
            if not test(m[key]):
                return False, []
            why.append(say(m[key]))
    return True, why


def select_profile(host: HostInfo, profiles: dict[str, Profile] | None = None) -> tuple[Profile, str]:
    """The matching profile with the highest priority, and a sentence saying why."""
    profiles = profiles or builtin_profiles()
    best, reason = None, ""
    for p in sorted(profiles.values(), key=lambda p: -p.priority):
        ok, why = _matches(p, host)
        if ok:
            best, reason = p, ", ".join(why) or "no more specific profile matched"
            break
    if best is None:
        raise DeviceError("no device profile matches this host and generic-cpu is missing; reinstall omnilite.")
    return best, reason


def resolve_providers(profile: Profile, available: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """Providers to use (the profile's, in order, that are installed) and one warning per missing one."""
    use = [p for p in profile.providers if p in available] or ["CPUExecutionProvider"]
    warnings = [
        f"profile {profile.name} asks for {p}, which is not installed; falling back to {use[0]} "
        f"(install {PROVIDER_PACKAGES[p]} to use it)."
        for p in profile.providers if p not in available
    ]
    for w in warnings:
        log.warning(w)
    return use, warnings


def choose_profile(name_or_path: str | None, host: HostInfo) -> tuple[Profile, str]:
    """`--profile` when given, else the detected one; with the reason."""
    if name_or_path:
        return get_profile(name_or_path), "chosen with --profile"
    return select_profile(host)


def pipeline_settings(profile: Profile, host: HostInfo, family: str) -> dict:
    """The PipelineConfig fields a profile sets: installed providers in its order, llama.cpp offload,
    threads per stage and the chunk size (omega; for LLaMA-Omni2 the read size R, with `write`)."""
    providers, _ = resolve_providers(profile, host.ort_providers)
    settings = {"providers": tuple(providers), "n_gpu_layers": profile.n_gpu_layers,
                "stage_threads": {s: profile.threads_for(s, host) for s in STAGES}}
    if family == "llama-omni2":
        settings.update(omega=profile.read, write=profile.write)
    else:
        settings["omega"] = profile.omega
    return settings
