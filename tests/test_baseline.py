"""The honest PyTorch baseline: bf16 only where the CPU computes it natively (from its cpuinfo flags),
both precisions then with the ratios on the faster, fp32 alone otherwise with the reason named; and
the CPU model, features and thread counts in every benchmark result."""

import json
from pathlib import Path

import pytest

from omnilite.benchmarks import bench as bench_module
from omnilite.benchmarks import omni2_bench
from omnilite.benchmarks.baseline import baseline_result, headline, plan_baseline
from omnilite.cli import main as cli_main
from omnilite.devices import host as host_module
from omnilite.devices.host import describe_cpu, detect_host

from omni2_fixtures import QUESTION

DATA = Path(__file__).parent / "data" / "devices"
# This project's AVX2-only machine (AMD EPYC, KVM), flags as /proc/cpuinfo lists them.
EPYC_FLAGS = ("fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ht "
              "syscall nx mmxext fxsr_opt pdpe1gb rdtscp lm constant_tsc rep_good nopl xtopology nonstop_tsc cpuid "
              "pni pclmulqdq ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt aes xsave avx f16c rdrand "
              "hypervisor lahf_lm abm sse4a misalignsse 3dnowprefetch bmi1 avx2 smep bmi2 erms invpcid rdseed adx "
              "smap clflushopt clwb sha_ni xsaveopt xsavec xgetbv1 xsaves vaes vpclmulqdq rdpid fsrm")
SPR_FLAGS = EPYC_FLAGS + " avx512f avx512bw avx512_vnni avx_vnni avx512_bf16 amx_tile amx_int8 amx_bf16"
AMX_ONLY_FLAGS = EPYC_FLAGS + " avx512f avx512bw amx_tile amx_bf16"  # bf16 through AMX tiles only


def _x86(flags: str, model: str = "AMD EPYC") -> str:
    return "".join(f"processor\t: {i}\nvendor_id\t: AuthenticAMD\nmodel name\t: {model}\nphysical id\t: 0\n"
                   f"core id\t\t: {i}\nflags\t\t: {flags}\n\n" for i in range(2))


def _arm(features: str) -> str:
    return "".join(f"processor\t: {i}\nFeatures\t: fp asimd {features}\nCPU part\t: 0xd4f\n\n" for i in range(2))


def fake_host(tmp_path: Path, cpuinfo: str | None, machine: str = "x86_64"):
    root = tmp_path / f"root-{machine}-{abs(hash(cpuinfo))}"
    (root / "proc").mkdir(parents=True, exist_ok=True)
    (root / "proc/meminfo").write_text(Path("/proc/meminfo").read_text())
    if cpuinfo is not None:
        (root / "proc/cpuinfo").write_text(cpuinfo)
    return detect_host(root, system="linux", machine=machine, env={})


@pytest.mark.parametrize("cpuinfo, machine, native, reason", [
    (_x86(EPYC_FLAGS), "x86_64", False, "no native bf16 (lacks avx512_bf16 and amx_bf16)"),
    ((DATA / "this-ci-xeon-cpuinfo.txt").read_text(), "x86_64", True, "native bf16 (avx512_bf16)"),
    (_x86(SPR_FLAGS, "Intel Xeon Platinum 8480+"), "x86_64", True, "native bf16 (avx512_bf16 and amx_bf16)"),
    (_x86(AMX_ONLY_FLAGS), "x86_64", True, "native bf16 (amx_bf16)"),
    (_arm("asimddp i8mm bf16"), "aarch64", True, "native bf16 (bf16)"),
    (_arm("asimddp"), "aarch64", False, "no native bf16 (lacks bf16)"),
    (None, "x86_64", False, "no native bf16 (lacks avx512_bf16 and amx_bf16; no /proc/cpuinfo: CPU features unknown)"),
])
def test_native_bf16_follows_the_cpuinfo_flags(tmp_path, cpuinfo, machine, native, reason):
    host = fake_host(tmp_path, cpuinfo, machine)
    assert host.native_bf16 is native and host.to_dict()["native_bf16"] is native
    assert host.bf16_reason() == reason


def test_cpu_record_lists_each_feature_present_and_absent(tmp_path):
    epyc = fake_host(tmp_path, _x86(EPYC_FLAGS)).cpu_record()
    assert epyc["model"] == "AMD EPYC" and epyc["arch"] == "x86_64" and epyc["logical_cores"] == 2
    assert {f for f, on in epyc["features"].items() if on} == {"avx", "avx2", "fma", "f16c"}
    assert not epyc["features"]["avx512f"] and not epyc["features"]["amx_bf16"] and epyc["native_bf16"] is False
    assert describe_cpu(epyc) == (
        "AMD EPYC (x86_64, 2 physical / 2 logical cores); features: avx avx2 fma f16c; absent: avx512f avx512bw "
        "avx512_vnni avx_vnni avx512_bf16 avx512_fp16 amx_tile amx_int8 amx_bf16; no native bf16")
    arm = fake_host(tmp_path, _arm("asimddp i8mm bf16"), "aarch64").cpu_record()
    assert arm["features"] == {"neon": True, "dotprod": True, "i8mm": True, "fp16": False, "bf16": True,
                               "sve": False, "sve2": False}


def test_avx2_only_runs_fp32_alone_and_names_the_missing_flags(tmp_path):
    plan = plan_baseline(fake_host(tmp_path, _x86(EPYC_FLAGS)), {"mkldnn_bf16_supported": False})
    assert plan.precisions == ("fp32",)
    assert plan.reason == ("bf16 skipped because this CPU has no native bf16 (lacks avx512_bf16 and amx_bf16): "
                           "PyTorch would emulate it, slower than fp32 and not a fair baseline.")


def test_native_bf16_runs_both_unless_pytorch_has_no_bf16(tmp_path):
    spr = fake_host(tmp_path, _x86(SPR_FLAGS))
    both = plan_baseline(spr, {"mkldnn_bf16_supported": True})
    assert both.precisions == ("fp32", "bf16")
    assert both.reason == "fp32 and bf16 both run because the CPU has native bf16 (avx512_bf16 and amx_bf16)."
    assert plan_baseline(spr, {"mkldnn_bf16_supported": None}).precisions == ("fp32", "bf16")  # no probe: flags decide
    vetoed = plan_baseline(spr, {"mkldnn_bf16_supported": False})
    assert vetoed.precisions == ("fp32",) and "reports no oneDNN bf16 support" in vetoed.reason


def test_the_ratios_use_the_faster_precision(tmp_path):
    assert headline({"fp32": 2.0, "bf16": 1.25}) == (
        "bf16", "The ratios use PyTorch bf16, the faster by TTFA p50 (bf16 1.250 s vs fp32 2.000 s).")
    assert headline({"fp32": 2.0, "bf16": 2.5})[0] == "fp32"
    plan = plan_baseline(fake_host(tmp_path, _x86(SPR_FLAGS)), {})
    stored = baseline_result({"fp32": {"x": 1}, "bf16": {"x": 2}}, plan, {"fp32": 3.0, "bf16": 1.0})
    assert stored["precision"] == "bf16" and stored["x"] == 2 and set(stored["by_precision"]) == {"fp32", "bf16"}
    assert stored["plan"]["precisions"] == ("fp32", "bf16")


def _as_host(monkeypatch, host, torch_bf16: bool):
    """Benchmarks see `host` as this machine and PyTorch's bf16 probe answers `torch_bf16`."""
    monkeypatch.setattr(host_module, "detect_host", lambda *a, **k: host)
    monkeypatch.setattr(bench_module, "detect_host", lambda *a, **k: host)
    view = {"torch": "test", "cpu_capability": "test", "mkldnn_bf16_supported": torch_bf16}
    monkeypatch.setattr(omni2_bench, "torch_bf16_view", lambda: view)
    monkeypatch.setattr(bench_module, "torch_bf16_view", lambda: view)


def _omni2_bench(omni2_bundle, omni2_checkpoint, out: Path) -> tuple[dict, str]:
    assert omni2_bench.main([str(omni2_bundle), "--checkpoint", str(omni2_checkpoint), "--question", str(QUESTION),
                             "--name", "t", "--rw", "3,10", "--runs", "1", "--tokens", "6", "--tts-tail", "10",
                             "--no-exact", "--out-dir", str(out), "--no-progress"]) == 0
    return json.loads((out / "omni2-t.json").read_text()), (out / "omni2-t.md").read_text()


def test_omni2_bench_on_native_bf16_runs_both_and_uses_the_faster(omni2_bundle, omni2_checkpoint, tmp_path, monkeypatch):
    host = fake_host(tmp_path, _x86(SPR_FLAGS, "Intel Xeon Platinum 8480+"))
    _as_host(monkeypatch, host, torch_bf16=True)
    r, md = _omni2_bench(omni2_bundle, omni2_checkpoint, tmp_path / "out")
    t = r["torch"]
    assert set(t["by_precision"]) == {"fp32", "bf16"}
    ttfa = {p: x["ttfa"]["p50"] for p, x in t["by_precision"].items()}
    assert t["precision"] == min(ttfa, key=ttfa.get) and t["ttfa"] == t["by_precision"][t["precision"]]["ttfa"]
    assert t["by_precision"]["bf16"]["stage_precisions"] == {
        "encoder": "bf16", "llm": "bf16", "speech_generator": "bf16", "flow": "bf16 (autocast, fp32 weights)", "hift": "fp32"}
    assert r["targets"]["ttfa_speedup_vs_torch"]["measured"] == pytest.approx(
        ttfa[t["precision"]] / r["omnilite"][0]["overlapped"]["ttfa"]["p50"])
    assert r["host"]["cpu_record"]["features"]["amx_bf16"] and r["host"]["torch_threads"] >= 1
    assert f"Baseline precision: PyTorch **{t['precision']}**. The ratios use PyTorch {t['precision']}, the faster" in md
    assert "fp32 and bf16 both run because the CPU has native bf16 (avx512_bf16 and amx_bf16)." in md
    assert f"TTFA speed-up vs PyTorch {t['precision']}" in md and "| bf16 |" in md and "| fp32 |" in md
    assert "CPU: Intel Xeon Platinum 8480+ (x86_64, 2 physical / 2 logical cores); features: avx avx2 fma f16c avx512f" in md


def test_omni2_bench_on_avx2_runs_fp32_only_and_says_why(omni2_bundle, omni2_checkpoint, tmp_path, monkeypatch):
    _as_host(monkeypatch, fake_host(tmp_path, _x86(EPYC_FLAGS)), torch_bf16=False)
    r, md = _omni2_bench(omni2_bundle, omni2_checkpoint, tmp_path / "out")
    assert set(r["torch"]["by_precision"]) == {"fp32"} and r["torch"]["precision"] == "fp32"
    assert ("Baseline precision: PyTorch **fp32**. The ratios use PyTorch fp32, the only precision run. Precisions "
            "run: fp32; bf16 skipped because this CPU has no native bf16 (lacks avx512_bf16 and amx_bf16): PyTorch "
            "would emulate it, slower than fp32 and not a fair baseline.") in md
    assert "## PyTorch fp32 baseline" in md and "TTFA speed-up vs PyTorch fp32" in md
    assert "absent: avx512f avx512bw avx512_vnni avx_vnni avx512_bf16 avx512_fp16 amx_tile amx_int8 amx_bf16" in md


def test_cli_bench_torch_baseline_on_omni2_native_bf16(omni2_bundle, tmp_path, monkeypatch, capsys):
    """`omnilite bench --baseline torch` on a LLaMA-Omni2 bundle: the streaming reference to its first
    audio sample in both precisions, the ratios on the faster, the CPU and threads recorded."""
    host = fake_host(tmp_path, _x86(SPR_FLAGS, "Intel Xeon Platinum 8480+"))
    _as_host(monkeypatch, host, torch_bf16=True)
    out = tmp_path / "bench"
    assert cli_main(["bench", str(omni2_bundle), "--runs", "1", "--warmup", "0", "--input", str(QUESTION), "-n", "6",
                     "--out-dir", str(out), "--baseline", "torch"]) == 0
    r = json.loads((out / "bench.json").read_text())
    b = r["baseline"]
    assert set(b["by_precision"]) == {"fp32", "bf16"} and b["schedule"].startswith("all precisions loaded")
    ttfa = {p: x["ttfa"]["p50_ms"] for p, x in b["by_precision"].items()}
    assert b["precision"] == min(ttfa, key=ttfa.get)
    assert b["ratio_ttfa"] == pytest.approx(r["latency"]["overlapped"]["ttfa"]["p50_ms"] / ttfa[b["precision"]])
    assert set(b["stage_ratios"]) == {"encoder", "llm_prefill"} and "ratio_rtf" not in b
    assert r["cpu"]["features"]["avx512_bf16"] and r["cpu"]["native_bf16"]
    assert r["threads"]["torch_baseline"] == b["threads"] and set(r["threads"]["stages"]) >= {"encoder", "llm"}
    md = (out / "bench.md").read_text()
    assert f"Baseline precision: PyTorch **{b['precision']}**." in md and "- PyTorch bf16 (same checkpoint" in md
    assert "CPU: Intel Xeon Platinum 8480+ (x86_64, 2 physical / 2 logical cores)" in md


def test_cli_bench_torch_baseline_on_llama_omni_native_bf16(bundle, tmp_path, monkeypatch):
    """LLaMA-Omni's offline reference in both precisions, one after the other: bf16 holds the encoder,
    LLM and speech generator in bfloat16 and keeps the vocoder in fp32; the ratios use the faster."""
    _as_host(monkeypatch, fake_host(tmp_path, _x86(SPR_FLAGS)), torch_bf16=True)
    out = tmp_path / "bench"
    assert cli_main(["bench", str(bundle), "--runs", "1", "--warmup", "0", "--input", str(QUESTION), "-n", "8",
                     "--out-dir", str(out), "--baseline", "torch"]) == 0
    b = json.loads((out / "bench.json").read_text())["baseline"]
    assert b["schedule"].startswith("one precision after the other")
    assert b["by_precision"]["bf16"]["stage_precisions"] == {"encoder": "bf16", "llm": "bf16",
                                                              "speech_generator": "bf16", "vocoder": "fp32"}
    assert b["by_precision"]["bf16"]["llm_dtype"] == "bfloat16" and b["by_precision"]["fp32"]["llm_dtype"] == "float32"
    ttfa = {p: x["ttfa"]["p50_ms"] for p, x in b["by_precision"].items()}
    assert b["precision"] == min(ttfa, key=ttfa.get) and b["ratio_ttfa"] == b["by_precision"][b["precision"]]["ratio_ttfa"]
    md = (out / "bench.md").read_text()
    assert f"Baseline precision: PyTorch **{b['precision']}**. The ratios use PyTorch {b['precision']}, the faster" in md
    assert "- measured one precision after the other, each loading its stages one at a time" in md
