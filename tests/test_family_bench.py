"""The measurements the per-family latency benchmarks report: a speaker's underruns and the busy
time / waterfall before the first audio sample."""

from omnilite.benchmarks.fun_audio_chat_bench import playback
from omnilite.benchmarks.turn_stats import busy_before, first_last, stats


def test_playback_counts_each_late_chunk_and_its_stall():
    rate = 1000
    # 0.5 s chunks: the second arrives while the first plays, the third 0.3 s after the buffer ran dry,
    # the fourth in time again (the playhead restarted at the third's arrival).
    chunks = [(1.0, 500), (1.4, 500), (2.3, 500), (2.5, 500)]
    assert playback(chunks, rate) == {"underruns": 1, "stall_s": 2.3 - 2.0}


def test_playback_in_time_and_empty():
    assert playback([(0.2, 1000), (1.1, 1000), (2.0, 1000)], 1000) == {"underruns": 0, "stall_s": 0.0}
    assert playback([], 24000) == {"underruns": 0, "stall_s": 0.0}


def test_busy_and_waterfall_are_clipped_at_the_first_sample():
    spans = [("encoder", 0.0, 0.5), ("llm_decode", 0.5, 0.7), ("llm_decode", 0.9, 1.3), ("vocoder", 1.5, 2.0)]
    busy = busy_before(spans, 1.0)
    assert busy.keys() == {"encoder", "llm_decode"}
    assert abs(busy["llm_decode"] - 0.3) < 1e-12
    assert first_last(spans, 1.0) == {"encoder": [0.0, 0.5], "llm_decode": [0.5, 1.0]}
    assert stats([3.0, 1.0, 2.0])["p50"] == 2.0
