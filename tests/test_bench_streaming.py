"""The streaming benchmark runs end to end and reports every mode (no timing is asserted)."""

import json

from omnilite.benchmarks.streaming import StreamingBench, run, write


def test_streaming_benchmark_reports_both_modes(bundle, tmp_path):
    results = run(bundle, StreamingBench(runs=1, warmup=0, omegas=(10,), max_new_tokens=12))
    entry = results["omega"]["10"]
    assert entry["identical_output"] is True
    for mode in ("sequential", "overlapped", "staged"):
        assert entry[mode]["ttfa"]["p50_ms"] > 0 and entry[mode]["ttft"]["p50_ms"] > 0
    assert entry["ttfa_ratio_p50"] > 0 and entry["staged_ttfa_ratio_p50"] > 0
    js, md = write(results, tmp_path, "bench")
    assert json.loads(js.read_text())["omega"]["10"]["identical_output"] is True
    assert "| 10 |" in md.read_text()
