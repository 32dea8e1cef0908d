"""Host detection and profile choice, from recorded files for every hardware class."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from omnilite.devices.host import detect_host, parse_cpuinfo
from omnilite.devices.profiles import builtin_profiles, get_profile, load_profile_file, resolve_providers, select_profile
from omnilite.runtime.errors import DeviceError

DATA = Path(__file__).parent / "data" / "devices"

ARM_A78AE = """processor\t: 0
BogoMIPS\t: 62.50
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp uscat ilrcpc flagm paca pacg
CPU implementer\t: 0x41
CPU architecture: 8
CPU part\t: 0xd42

processor\t: 1
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp uscat ilrcpc flagm paca pacg
CPU part\t: 0xd42
"""
ARM_A76 = ARM_A78AE.replace("0xd42", "0xd0b").replace(" uscat ilrcpc flagm paca pacg", "")
ARM_X3_ANDROID = ARM_A78AE.replace("paca pacg", "paca pacg dcpodp sve2 i8mm bf16")
X86_AVX2 = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: 11th Gen Intel(R) Core(TM) i5-1135G7 @ 2.40GHz
physical id\t: 0
core id\t\t: 0
flags\t\t: fpu sse sse2 ssse3 sse4_1 sse4_2 avx f16c fma avx2

processor\t: 1
vendor_id\t: GenuineIntel
model name\t: 11th Gen Intel(R) Core(TM) i5-1135G7 @ 2.40GHz
physical id\t: 0
core id\t\t: 0
flags\t\t: fpu sse sse2 ssse3 sse4_1 sse4_2 avx f16c fma avx2
"""
MEMINFO_8G = "MemTotal:        7999956 kB\nMemFree:  100 kB\n"


def _tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root


CASES = {
    "laptop-x86-avx512": ("linux", "x86_64", {"proc/cpuinfo": (DATA / "this-ci-xeon-cpuinfo.txt").read_text(), "proc/meminfo": MEMINFO_8G}),
    "laptop-x86-avx2": ("linux", "x86_64", {"proc/cpuinfo": X86_AVX2, "proc/meminfo": MEMINFO_8G}),
    "server-cuda": ("linux", "x86_64", {"proc/cpuinfo": X86_AVX2, "proc/meminfo": MEMINFO_8G,
                                         "proc/driver/nvidia/gpus/0000:01:00.0/information": "Model: \t\t NVIDIA H100 80GB HBM3\nIRQ: 1\n"}),
    "jetson-orin-nano-8gb": ("linux", "aarch64", {"proc/cpuinfo": ARM_A78AE, "proc/meminfo": MEMINFO_8G,
                                                  "proc/device-tree/model": "NVIDIA Jetson Orin Nano Developer Kit\x00",
                                                  "etc/nv_tegra_release": "# R36 (release), REVISION: 3.0, GCID: 36923193, BOARD: generic, EABI: aarch64\n"}),
    "jetson-agx-orin": ("linux", "aarch64", {"proc/cpuinfo": ARM_A78AE, "proc/meminfo": MEMINFO_8G,
                                             "proc/device-tree/model": "NVIDIA Jetson AGX Orin Developer Kit\x00"}),
    "raspberry-pi-5": ("linux", "aarch64", {"proc/cpuinfo": ARM_A76, "proc/meminfo": MEMINFO_8G,
                                            "proc/device-tree/model": "Raspberry Pi 5 Model B Rev 1.0\x00"}),
    "android-arm64": ("linux", "aarch64", {"proc/cpuinfo": ARM_X3_ANDROID, "system/build.prop": "ro.product.model=Pixel 8\n"}),
    "generic-cpu": ("linux", "aarch64", {"proc/cpuinfo": ARM_A76}),  # an unknown arm64 board
}


@pytest.mark.parametrize("expected", sorted(CASES))
def test_each_profile_is_chosen_for_its_hardware(tmp_path, expected):
    system, machine, files = CASES[expected]
    host = detect_host(_tree(tmp_path, files), system=system, machine=machine, providers=lambda: ("CPUExecutionProvider",), env={})
    profile, reason = select_profile(host)
    assert profile.name == expected, reason
    assert reason


def test_apple_silicon(tmp_path):
    host = detect_host(tmp_path, system="Darwin", machine="arm64", providers=lambda: ("CoreMLExecutionProvider", "CPUExecutionProvider"),
                       env={"OMNILITE_SYSCTL_BRAND": "Apple M2", "OMNILITE_SYSCTL_MEMSIZE": str(16 * 2**30)})
    assert host.apple_silicon and host.cpu_model == "Apple M2" and "dotprod" in host.features
    profile, _ = select_profile(host)
    assert profile.name == "apple-silicon"
    assert resolve_providers(profile, host.ort_providers) == (["CoreMLExecutionProvider", "CPUExecutionProvider"], [])


def test_cpuinfo_features_and_cores():
    model, vendor, features, physical, logical = parse_cpuinfo((DATA / "this-ci-xeon-cpuinfo.txt").read_text())
    assert {"avx2", "avx512f", "avx512_vnni", "f16c"} <= features and vendor == "GenuineIntel"
    assert logical >= physical >= 1
    _, _, arm, _, n = parse_cpuinfo(ARM_X3_ANDROID)
    assert {"neon", "dotprod", "i8mm", "sve2", "fp16"} <= arm and n == 2
    _, _, x, phys, log = parse_cpuinfo(X86_AVX2)
    assert "avx512f" not in x and (phys, log) == (1, 2)  # hyperthreads are not cores


def test_jetson_release_file_alone_identifies_a_jetson(tmp_path):
    host = detect_host(_tree(tmp_path, {"proc/cpuinfo": ARM_A78AE, "etc/nv_tegra_release": "# R35 (release), REVISION: 4.1, GCID: 1\n"}),
                       system="Linux", machine="aarch64", providers=lambda: (), env={})
    assert host.jetson_model == "NVIDIA Jetson (L4T R35.4.1)"


def test_missing_provider_falls_back_with_the_package_to_install():
    profile = get_profile("jetson-orin-nano-8gb")
    use, warnings = resolve_providers(profile, ("CPUExecutionProvider",))
    assert use == ["CPUExecutionProvider"]
    assert len(warnings) == 2 and "install onnxruntime-gpu" in warnings[1] and "TensorrtExecutionProvider" in warnings[0]


def test_all_builtin_profiles_are_valid_and_complete():
    profiles = builtin_profiles()
    assert set(CASES) | {"apple-silicon"} <= set(profiles)
    for p in profiles.values():
        assert p.providers[-1] == "CPUExecutionProvider" and p.memory_bandwidth_gbps > 0 and p.peak_gflops["int8"] > 0


@pytest.mark.parametrize("edit,message", [
    (lambda d: d.pop("threads"), "has no 'threads'"),
    (lambda d: d.update(precision="tiny"), "precision 'tiny' is not a preset"),
    (lambda d: d.update(providers=["CUDAExecutionProvider"]), "must end with CPUExecutionProvider"),
    (lambda d: d["match"].update(gpu_vendor="x"), "unknown match key"),
])
def test_invalid_profile_files_are_refused_with_a_sentence(tmp_path, edit, message):
    d = json.loads((Path(__file__).parents[1] / "devices" / "profiles" / "server-cuda.json").read_text())
    d["name"] = "custom"
    edit(d)
    path = tmp_path / "custom.json"
    path.write_text(json.dumps(d))
    with pytest.raises(DeviceError, match=message):
        load_profile_file(path)


def test_unknown_profile_name():
    with pytest.raises(DeviceError, match="unknown device profile 'nokia-3310'; use one of: "):
        get_profile("nokia-3310")


def test_devices_command_on_this_machine():
    r = subprocess.run([sys.executable, "-m", "omnilite", "devices", "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["profile"] in ("laptop-x86-avx512", "laptop-x86-avx2", "server-cuda", "generic-cpu")
    assert out["reason"] and out["host"]["logical_cores"] >= 1
    r = subprocess.run([sys.executable, "-m", "omnilite", "devices", "--profile", "nokia-3310"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown device profile" in r.stderr
