"""The LLaMA-Omni2 benchmark script on the tiny bundle: its files and report structure (no timing asserts)."""

import json

from omnilite.benchmarks.omni2_bench import main

from omni2_fixtures import QUESTION


def test_omni2_bench_writes_rows_baseline_targets_and_waterfall(omni2_bundle, omni2_checkpoint, tmp_path):
    assert main([str(omni2_bundle), "--checkpoint", str(omni2_checkpoint), "--question", str(QUESTION), "--name", "t",
                 "--rw", "3,10", "--runs", "1", "--tokens", "6", "--tts-tail", "10", "--out-dir", str(tmp_path),
                 "--no-progress"]) == 0
    r = json.loads((tmp_path / "omni2-t.json").read_text())
    assert [(x["read"], x["write"], x["encoder_mode"]) for x in r["omnilite"]] == [(3, 10, "default"), (3, 10, "exact")]
    for row in r["omnilite"]:
        assert row["peak_rss_mb"] > 0 and row["reply"]["text_tokens"] == 6
        assert {"ttft", "ttfa", "rtf"} <= set(row["overlapped"]) and row["sequential"]["ttfa"]["n"] == 1
        assert set(row["before_first_audio"]) == set(row["stages"]) - {"vocoder"}
    assert r["torch"]["ttfa"]["n"] == 1 and set(r["targets"]) == {"ttfa_p50_s", "rtf_p50", "peak_rss_gb", "ttfa_speedup_vs_torch"}
    assert "start" in r["load"] and "after_torch" in r["load"]
    assert r["host"]["cpu_record"]["model"] and r["host"]["torch_threads"] == r["torch"]["threads"]
    assert r["torch"]["precision"] in r["torch"]["by_precision"] and "fp32" in r["torch"]["by_precision"]
    assert (tmp_path / "omni2-t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = tmp_path / "omni2-t.md"
    text = md.read_text()
    assert f"PyTorch {r['torch']['precision']} baseline" in text and "Baseline precision: PyTorch **" in text
    assert f"- CPU: {r['host']['cpu_record']['model']} (" in text
    md.write_text(md.read_text() + "<!-- notes -->\nhand-written\n")  # re-rendering keeps the notes
    assert main(["--from-json", str(tmp_path / "omni2-t.json")]) == 0 and md.read_text().endswith("hand-written\n")
