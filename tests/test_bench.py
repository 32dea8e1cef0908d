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
    assert "| llm_decode |" in md and "omnilite (overlapped) / torch" in md
    assert b["llm_dtype"] == "float32" and set(b["stage_ratios"]) == {"encoder", "speech_generator", "vocoder", "llm"}
    assert (out / "waterfall.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_baseline_llm_precision_follows_free_memory():
    import torch

    from omnilite.benchmarks.bench import _baseline_llm_dtype

    eight_b, gib = 8_030_000_000, 2**30
    assert _baseline_llm_dtype(eight_b, 48 * gib) == torch.float32
    assert _baseline_llm_dtype(eight_b, 20 * gib) == torch.bfloat16  # this 24 GiB machine, after the other stages
    assert _baseline_llm_dtype(eight_b, 12 * gib) is None
