"""CLI behaviour: the run command, and one clear sentence with exit status 2 for each bad input."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from omnilite.cli import main
from omnilite.runtime.audio import read_wav, write_wav

from conftest import QUESTION, QUESTION_STEREO_44K


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]  # progress bars may share stderr
    assert len(lines) == 1 and "Traceback" not in err, err  # one sentence, no traceback
    return lines[0]


def test_run_writes_wav_text_and_timing_table(bundle, tmp_path, capsys):
    out = tmp_path / "reply.wav"
    code = main(["run", str(bundle), "--input", str(QUESTION_STEREO_44K), "--output", str(out),
                 "--text-output", str(tmp_path / "reply.txt"), "--max-new-tokens", "20", "--ignore-eos"])
    assert code == 0
    printed = capsys.readouterr().out
    for row in ("encoder", "llm_decode", "speech_generator", "vocoder", "TTFA", "RTF"):
        assert row in printed
    audio, rate = read_wav(out)
    assert rate == 16000 and len(audio) > 0
    assert (tmp_path / "reply.txt").read_bytes().decode().strip() in printed


@pytest.fixture()
def bundle_copy(bundle, tmp_path):
    return shutil.copytree(bundle, tmp_path / "b")


def _run(bundle, wav, tmp_path):
    return main(["run", str(bundle), "--input", str(wav), "--output", str(tmp_path / "o.wav"), "--max-new-tokens", "2"])


def test_bundle_missing_file(bundle_copy, tmp_path, capsys):
    (bundle_copy / "vocoder.onnx").unlink()
    assert _run(bundle_copy, QUESTION, tmp_path) == 2
    assert "is missing vocoder.onnx (stage 'vocoder'); re-export" in _error_line(capsys)
    assert not (tmp_path / "o.wav").exists()


def test_bundle_altered_file(bundle_copy, tmp_path, capsys):
    with open(bundle_copy / "encoder.onnx", "ab") as f:
        f.write(b"\0")
    assert _run(bundle_copy, QUESTION, tmp_path) == 2
    assert "encoder.onnx does not match the sha256" in _error_line(capsys)


def test_bundle_newer_format(bundle_copy, tmp_path, capsys):
    m = json.loads((bundle_copy / "omnilite.json").read_text())
    m["format_version"] = 7
    (bundle_copy / "omnilite.json").write_text(json.dumps(m))
    assert _run(bundle_copy, QUESTION, tmp_path) == 2
    assert "format version 7, newer than this omnilite reads (1); upgrade omnilite" in _error_line(capsys)


def test_not_a_bundle(tmp_path, capsys):
    assert _run(tmp_path, QUESTION, tmp_path) == 2
    assert "is not an omnilite bundle (no omnilite.json)" in _error_line(capsys)


@pytest.mark.parametrize("kind,message", [
    ("empty", "is empty"),
    ("silent", "is silent"),
    ("text", "is not a WAV file"),
])
def test_bad_audio(bundle, tmp_path, capsys, kind, message):
    wav = tmp_path / "q.wav"
    if kind == "text":
        wav.write_text("not audio")
    else:
        write_wav(wav, np.zeros(0 if kind == "empty" else 16000, np.float32), 16000)
    assert _run(bundle, wav, tmp_path) == 2
    assert message in _error_line(capsys)


def test_export_of_incomplete_checkpoint_leaves_nothing(tiny_checkpoint, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    root = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    shard = root / "Llama-3.1-8B-Omni" / "model-00002-of-00002.safetensors"
    tensors = load_file(shard)
    del tensors["speech_generator.output_proj.bias"]
    save_file(tensors, shard)
    out = tmp_path / "bundle"
    assert main(["export", str(root), str(out)]) == 2
    assert "is missing tensor 'speech_generator.output_proj.bias'" in _error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no bundle, no partial dir


def test_export_refuses_to_overwrite(tiny_checkpoint, bundle, capsys):
    assert main(["export", str(tiny_checkpoint), str(bundle)]) == 2
    assert "already exists and is not empty" in _error_line(capsys)


def test_cli_exit_code_in_a_real_process(tmp_path):
    r = subprocess.run([sys.executable, "-m", "omnilite", "info", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr


def test_full_disk_is_one_sentence(bundle, tmp_path, capsys, monkeypatch):
    """A full disk while writing the reply: exit 2, one sentence naming the problem and the fix, and no
    half-written WAV (the write goes to a temp file that is removed)."""
    import errno
    import os

    real_fdopen = os.fdopen

    class _Full:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()
            return False

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("omnilite.runtime.audio.os.fdopen", lambda fd, mode: _Full(real_fdopen(fd, mode)))
    code = main(["run", str(bundle), "--input", str(QUESTION), "--output", str(tmp_path / "o.wav"), "--max-new-tokens", "2"])
    assert code == 2
    assert "the disk is full; free space on it" in _error_line(capsys)
    assert list(tmp_path.iterdir()) == []
