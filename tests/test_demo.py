"""The README's first command, `omnilite demo`, end to end in a fresh cache."""

from omnilite.cli import main
from omnilite.runtime.audio import read_wav


def test_demo_makes_exports_and_answers(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OMNILITE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    assert main(["demo", "--out-dir", str(out), "--max-new-tokens", "16"]) == 0
    printed = capsys.readouterr().out
    assert "RANDOM weights" in printed and "TTFA" in printed
    audio, rate = read_wav(out / "reply.wav")
    assert rate == 16000 and len(audio) > 0
    reply = (out / "reply.txt").read_text()
    timings = (out / "timings.txt").read_text()  # the printed table, beside the reply text
    assert "TTFA" in timings and timings in printed and "TTFA" not in reply
    assert (tmp_path / "cache" / "demo" / "tiny-llama-omni-bundle" / "omnilite.json").exists()
    # Second run reuses the cached bundle.
    assert main(["demo", "--out-dir", str(out), "--max-new-tokens", "4"]) == 0
