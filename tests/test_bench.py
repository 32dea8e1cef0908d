"""`omnilite bench` on the tiny bundle: the report's schema, its arithmetic and its files."""

import json

from omnilite.cli import main

from conftest import QUESTION


def test_bench_writes_json_markdown_and_waterfall(bundle, tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", str(bundle), "--runs", "3", "--input", str(QUESTION), "--max-new-tokens", "24",
                 "--out-dir", str(out), "--baseline", "torch"]) == 0
    r = json.loads((out / "bench.json").read_text())
    assert r["schema"] == "omnilite.bench/1" and r["runs"] == 3 and r["forced_tokens"] == 24
    assert {"omnilite", "onnxruntime", "llama_cpp_python"} <= set(r["versions"])
    assert r["profile"]["name"] and r["host"]["logical_cores"] >= 1
    # The CPU and its features, present or absent, and the thread counts travel with every result.
    assert r["cpu"]["model"] and r["cpu"]["logical_cores"] >= 1 and r["cpu"]["native_bf16"] == r["host"]["native_bf16"]
    if r["cpu"]["arch"] == "x86_64":
        assert {"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "f16c", "fma"} <= set(r["cpu"]["features"])
    assert set(r["threads"]["stages"]) >= {"encoder", "llm"} and r["threads"]["torch_baseline"] == r["profile"]["threads"]
    assert set(r["bundle"]["precisions"]) >= {"encoder", "llm", "speech_generator", "vocoder"}
    assert r["bundle"]["size_bytes"] > 0 and r["bundle"]["load_seconds"] > 0 and r["peak_rss_bytes"] > 0
    for stage in ("mel", "encoder", "llm_prefill", "llm_decode", "speech_generator", "vocoder"):
        s = r["stages"][stage]
        assert 0 < s["p50_ms"] <= s["p95_ms"] and s["n"] == 3
    for mode in ("sequential", "overlapped"):
        lat = r["latency"][mode]
        assert 0 < lat["ttft"]["p50_ms"] <= lat["ttfa"]["p50_ms"] <= lat["total"]["p50_ms"]
    # Sequential stage times account for the wall time of a turn.
    assert 0.9 <= r["stage_sum_over_wall"] <= 1.1
    b = r["baseline"]
    assert b["ttfa"]["p50_ms"] > 0 and b["ratio_ttfa"] > 0 and b["threads"] == r["profile"]["threads"]
    md = (out / "bench.md").read_text()
    assert "| llm_decode |" in md and "omnilite (overlapped) / torch" in md and f"CPU: {r['cpu']['model']} (" in md
    # fp32 always runs; bf16 too where this CPU has it natively; the ratios use the faster.
    assert set(b["by_precision"]) == ({"fp32", "bf16"} if r["cpu"]["native_bf16"] else {"fp32"})
    ttfa = {p: x["ttfa"]["p50_ms"] for p, x in b["by_precision"].items()}
    assert b["precision"] == min(ttfa, key=ttfa.get) and f"Baseline precision: PyTorch **{b['precision']}**." in md
    fp32 = b["by_precision"]["fp32"]
    assert fp32["llm_dtype"] == "float32" and set(fp32["stage_precisions"].values()) == {"fp32"}
    assert set(b["stage_ratios"]) == {"encoder", "speech_generator", "vocoder", "llm"}
    assert (out / "waterfall.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_baseline_llm_precision_follows_free_memory():
    import torch

    from omnilite.benchmarks.bench import _baseline_llm_dtype

    eight_b, gib = 8_030_000_000, 2**30
    assert _baseline_llm_dtype(eight_b, 48 * gib) == torch.float32
    assert _baseline_llm_dtype(eight_b, 20 * gib) == torch.bfloat16  # this 24 GiB machine, after the other stages
    assert _baseline_llm_dtype(eight_b, 12 * gib) is None
