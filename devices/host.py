"""Host detection: what CPU, memory, accelerators and OS flavour this machine has.

Every probe reads files under a root directory (``/`` normally; a fixture tree in tests) or asks
a library through an injectable function, so the detection of machines we cannot run here
(Jetson, Raspberry Pi, phones, Macs) is tested from recorded files.
"""

from __future__ import annotations

import os
import platform
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

# CPU feature flags worth knowing for inference kernels, with the /proc/cpuinfo spellings.
X86_FEATURES = {
    "avx": "avx", "avx2": "avx2", "fma": "fma", "f16c": "f16c",
    "avx512f": "avx512f", "avx512bw": "avx512bw", "avx512_vnni": "avx512_vnni", "avx_vnni": "avx_vnni",
    "avx512_bf16": "avx512_bf16", "avx512_fp16": "avx512_fp16",
    "amx_tile": "amx_tile", "amx_int8": "amx_int8", "amx_bf16": "amx_bf16",
}
ARM_FEATURES = {"asimd": "neon", "asimddp": "dotprod", "i8mm": "i8mm", "sve": "sve", "sve2": "sve2", "fphp": "fp16", "bf16": "bf16"}
# Features that let bfloat16 matmuls run natively (x86: AVX-512 BF16 or AMX-BF16; Arm: FEAT_BF16). Without
# one of them frameworks emulate bf16 through fp32 conversions, which is slower than plain fp32.
BF16_FEATURES = {"x86_64": ("avx512_bf16", "amx_bf16"), "arm64": ("bf16",)}
# Features every benchmark result records, present or absent, so results from different machines compare.
RECORDED_FEATURES = {
    "x86_64": ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16",
               "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16"),
    "arm64": ("neon", "dotprod", "i8mm", "fp16", "bf16", "sve", "sve2"),
}


@dataclass(frozen=True)
class HostInfo:
    os: str  # linux, darwin, windows, android
    arch: str  # x86_64, arm64
    cpu_model: str
    cpu_vendor: str
    physical_cores: int
    logical_cores: int
    features: frozenset[str]
    ram_bytes: int
    ort_providers: tuple[str, ...]
    cuda_gpus: tuple[str, ...] = ()
    jetson_model: str | None = None
    board_model: str | None = None  # device-tree model (Raspberry Pi, Jetson, other SBCs)
    apple_silicon: bool = False
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def ram_gb(self) -> float:
        return self.ram_bytes / 2**30

    @property
    def native_bf16(self) -> bool:
        """Whether the CPU computes bfloat16 natively (see BF16_FEATURES)."""
        return any(f in self.features for f in BF16_FEATURES.get(self.arch, ()))

    def bf16_reason(self) -> str:
        """`native bf16 (FLAGS)` or `no native bf16 (lacks FLAGS)`: the flags found or missing."""
        wanted = BF16_FEATURES.get(self.arch, ())
        if not wanted:
            return f"no native bf16 (no bf16 CPU feature known for {self.arch})"
        found = [f for f in wanted if f in self.features]
        if found:
            return f"native bf16 ({' and '.join(found)})"
        return f"no native bf16 (lacks {' and '.join(wanted)}" + "".join(f"; {n}" for n in self.notes) + ")"

    def cpu_record(self) -> dict:
        """What a benchmark result records about the CPU: model, cores and each feature that matters
        for inference kernels as present (True) or absent (False)."""
        recorded = RECORDED_FEATURES.get(self.arch, ())
        return {"model": self.cpu_model, "vendor": self.cpu_vendor, "arch": self.arch,
                "physical_cores": self.physical_cores, "logical_cores": self.logical_cores,
                "features": {f: f in self.features for f in recorded}, "native_bf16": self.native_bf16}

    def to_dict(self) -> dict:
        d = asdict(self)
        d["features"] = sorted(self.features)
        d["native_bf16"] = self.native_bf16
        return d


def describe_cpu(record: dict) -> str:
    """One line for reports from a stored `HostInfo.cpu_record()`: model, cores, features present and
    absent, and bf16 (read from the record, so a report re-rendered from JSON says the same)."""
    have = [f for f, on in record["features"].items() if on]
    missing = [f for f, on in record["features"].items() if not on]
    return (f"{record['model']} ({record['arch']}, {record['physical_cores']} physical / {record['logical_cores']} "
            f"logical cores); features: {' '.join(have) or 'none detected'}"
            + (f"; absent: {' '.join(missing)}" if missing else "")
            + ("; native bf16" if record["native_bf16"] else "; no native bf16"))


def _read(root: Path, rel: str) -> str | None:
    try:
        return (root / rel.lstrip("/")).read_text(errors="replace")
    except OSError:
        return None


def _arch(machine: str) -> str:
    m = machine.lower()
    if m in ("x86_64", "amd64"):
        return "x86_64"
    if m in ("aarch64", "arm64", "armv8l"):
        return "arm64"
    return m


def parse_cpuinfo(text: str) -> tuple[str, str, frozenset[str], int, int]:
    """(model, vendor, features, physical cores, logical cores) from /proc/cpuinfo text."""
    blocks = [b for b in text.strip().split("\n\n") if b.strip()]
    model = vendor = ""
    flags: set[str] = set()
    cores: set[tuple[str, str]] = set()
    logical = 0
    arm_parts: set[str] = set()
    for block in blocks:
        fields = {}
        for line in block.splitlines():
            if ":" in line:
                k, v = line.split(":", 1)
                fields[k.strip()] = v.strip()
        if "processor" in fields and fields["processor"].isdigit():
            logical += 1
        model = model or fields.get("model name") or fields.get("Model") or fields.get("Hardware", "")
        vendor = vendor or fields.get("vendor_id", "")
        flags |= set(fields.get("flags", "").split()) | set(fields.get("Features", "").split())
        if "physical id" in fields and "core id" in fields:
            cores.add((fields["physical id"], fields["core id"]))
        if "CPU part" in fields:
            arm_parts.add(fields["CPU part"])
    features = {name for flag, name in X86_FEATURES.items() if flag in flags}
    features |= {name for flag, name in ARM_FEATURES.items() if flag in flags}
    if not vendor and arm_parts:
        vendor = "ARM"
    physical = len(cores) or logical
    return model, vendor, frozenset(features), physical, logical


def _meminfo_bytes(text: str | None) -> int:
    m = re.search(r"^MemTotal:\s+(\d+)\s+kB", text or "", re.M)
    return int(m.group(1)) * 1024 if m else 0


def _jetson_model(root: Path, board: str | None) -> str | None:
    if board and "jetson" in board.lower():
        return board
    release = _read(root, "/etc/nv_tegra_release")
    if release:
        m = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", release)
        return f"NVIDIA Jetson (L4T R{m.group(1)}.{m.group(2)})" if m else "NVIDIA Jetson"
    return None


def _cuda_gpus(root: Path) -> tuple[str, ...]:
    base = root / "proc/driver/nvidia/gpus"
    names = []
    if base.is_dir():
        for info in sorted(base.glob("*/information")):
            m = re.search(r"^Model:\s*(.+)$", info.read_text(errors="replace"), re.M)
            if m:
                names.append(m.group(1).strip())
    return tuple(names)


def _default_providers() -> tuple[str, ...]:
    try:
        import onnxruntime

        return tuple(onnxruntime.get_available_providers())
    except ImportError:
        return ()


def detect_host(
    root: Path = Path("/"),
    system: str | None = None,
    machine: str | None = None,
    providers: Callable[[], tuple[str, ...]] = _default_providers,
    env: dict[str, str] | None = None,
) -> HostInfo:
    """Detect the host. In tests, `root` is a fixture tree and `system`/`machine` fake `platform`."""
    env = dict(os.environ) if env is None else env
    system = (system or platform.system()).lower()
    arch = _arch(machine or platform.machine())
    notes = []
    board = _read(root, "/proc/device-tree/model") or _read(root, "/sys/firmware/devicetree/base/model")
    board = board.strip("\x00\n ") if board else None
    is_android = "ANDROID_ROOT" in env or (root / "system/build.prop").is_file()
    if system == "darwin":
        # No /proc on macOS: sysctl values, recorded by the caller into env in tests.
        model = env.get("OMNILITE_SYSCTL_BRAND", platform.processor() or "Apple")
        logical = os.cpu_count() or 1
        apple = arch == "arm64"
        features = frozenset({"neon", "dotprod", "fp16"} if apple else set())
        return HostInfo("darwin", arch, model, "Apple" if apple else "Intel", logical, logical, features,
                        int(env.get("OMNILITE_SYSCTL_MEMSIZE", "0")), providers(), apple_silicon=apple)
    cpuinfo = _read(root, "/proc/cpuinfo") or ""
    model, vendor, features, physical, logical = parse_cpuinfo(cpuinfo)
    if not cpuinfo:
        notes.append("no /proc/cpuinfo: CPU features unknown")
        logical = physical = os.cpu_count() or 1
    if not model and board:
        model = board
    return HostInfo(
        os="android" if is_android else system,
        arch=arch,
        cpu_model=model or "unknown",
        cpu_vendor=vendor or "unknown",
        physical_cores=physical,
        logical_cores=logical,
        features=features,
        ram_bytes=_meminfo_bytes(_read(root, "/proc/meminfo")),
        ort_providers=providers(),
        cuda_gpus=_cuda_gpus(root),
        jetson_model=_jetson_model(root, board),
        board_model=board,
        notes=tuple(notes),
    )
