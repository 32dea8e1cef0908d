"""Each bad input of issue 13 ends in one sentence on stderr and exit status 2 (130 for Ctrl-C), with
no traceback and nothing partial left behind; output paths are checked before any work; manifest
paths stay inside the bundle; concurrent exports lock their target; and the CLI flags follow
whisper.cpp / llama.cpp (-m, -i, -o, -t, -n, `-`, -q)."""

import json
import logging
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading

import pytest

from omnilite.cli import build_parser, main
from omnilite.runtime.audio import decode_wav, read_wav

from conftest import DATA, QUESTION

CONVERSATION = DATA / "conversation_2turns_11k.wav"


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err and "error:" in lines[0], err
    return lines[0]


def _fails(argv, capsys) -> str:
    """Runs the CLI in this process; the one line it printed on stderr for exit status 2."""
    assert main(argv) == 2
    return _one_error_line(capsys.readouterr().err)


def _argparse_fails(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    return _one_error_line(capsys.readouterr().err)


# --- the manifest ---------------------------------------------------------------------------------

@pytest.fixture()
def bundle_copy(bundle, tmp_path):
    return shutil.copytree(bundle, tmp_path / "b")


def _edit_manifest(bundle_dir, edit) -> None:
    path = bundle_dir / "omnilite.json"
    m = json.loads(path.read_text())
    edit(m)
    path.write_text(json.dumps(m))


def _stage(m, name):
    return next(s for s in m["stages"] if s["name"] == name)


@pytest.mark.parametrize("edit,message", [
    (lambda m: _stage(m, "vocoder").pop("sha256"), "(stage 'vocoder' has no 'sha256' string)"),
    (lambda m: m.update(stages=None), "('stages' is missing or not a non-empty list)"),
    (lambda m: m["stages"].__setitem__(0, "encoder.onnx"), "(stage 0 is not an object)"),
    (lambda m: _stage(m, "llm").update(inputs=["n"]), "(stage 'llm' has no 'inputs' object)"),
    (lambda m: _stage(m, "encoder").update(extra_files=["encoder_padding.npy"]),
     "(stage 'encoder' has 'extra_files' that is not a map of file name to sha256)"),
    (lambda m: m.update(format_version="one"), "(not a valid manifest)"),
    (lambda m: m.pop("family"), "('family' is missing or not a string)"),
])
def test_a_damaged_manifest_is_one_sentence(bundle_copy, tmp_path, capsys, edit, message):
    _edit_manifest(bundle_copy, edit)
    out = tmp_path / "o.wav"
    line = _fails(["run", str(bundle_copy), "-i", str(QUESTION), "-o", str(out), "-n", "2"], capsys)
    assert f"omnilite.json is damaged {message}; re-export the bundle" in line
    assert not out.exists()


@pytest.fixture()
def outside_vocoder(bundle, tmp_path):
    """A byte-identical vocoder.onnx outside the bundle (its sha256 matches the manifest)."""
    other = tmp_path / "other"
    other.mkdir()
    return shutil.copy(bundle / "vocoder.onnx", other / "vocoder.onnx")


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_manifest_paths_are_confined_to_the_bundle(bundle_copy, outside_vocoder, tmp_path, capsys, how):
    if how == "symlink":  # the name is inside, the file it resolves to is not
        (bundle_copy / "vocoder.onnx").unlink()
        (bundle_copy / "vocoder.onnx").symlink_to(outside_vocoder)
        name = "vocoder.onnx"
    else:
        name = "../other/vocoder.onnx" if how == "dotdot" else str(outside_vocoder)
        _edit_manifest(bundle_copy, lambda m: _stage(m, "vocoder").update(file=name))
    line = _fails(["info", str(bundle_copy)], capsys)
    assert f"names {name!r} for stage 'vocoder', which is outside the bundle; bundle files must be inside" in line


def test_the_padding_cache_path_is_confined_too(bundle_copy, capsys):
    _edit_manifest(bundle_copy, lambda m: m["encoder"]["padding_cache"].update(file="/etc/passwd"))
    assert "names '/etc/passwd' for encoder.padding_cache, which is outside the bundle" in _fails(["info", str(bundle_copy)], capsys)


def test_a_symlink_that_stays_inside_is_fine(bundle_copy, capsys):
    (bundle_copy / "blobs").mkdir()
    (bundle_copy / "vocoder.onnx").rename(bundle_copy / "blobs" / "vocoder.onnx")
    (bundle_copy / "vocoder.onnx").symlink_to(bundle_copy / "blobs" / "vocoder.onnx")
    assert main(["info", str(bundle_copy)]) == 0


# --- output paths, checked before any work ----------------------------------------------------------
# The bundle and the input do not exist: an error about them would mean the output was checked too late.

MISSING = ["-i", "missing-question.wav"]


@pytest.fixture()
def a_file(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("not a directory")
    return f


def test_run_output_is_a_directory(tmp_path, capsys):
    line = _fails(["run", str(tmp_path / "no-bundle"), *MISSING, "-o", str(tmp_path)], capsys)
    assert line == f"error: --output {tmp_path} is a directory; pass a file path, e.g. {tmp_path / 'reply.wav'}."


def test_run_output_under_a_file(tmp_path, a_file, capsys):
    out = a_file / "sub" / "reply.wav"
    line = _fails(["run", str(tmp_path / "no-bundle"), *MISSING, "-o", str(out)], capsys)
    assert line == f"error: --output {out} cannot be created: {a_file} is a file, not a directory; choose another path."


def test_run_output_in_a_directory_that_is_not_writable(tmp_path, monkeypatch, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    # Tests may run as root, which may write anywhere; os.access answers for the user.
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(locked) else real_access(p, mode))
    line = _fails(["run", str(tmp_path / "no-bundle"), *MISSING, "-o", str(locked / "r.wav")], capsys)
    assert line == (f"error: --output {locked / 'r.wav'} cannot be written: {locked} is not writable; "
                    "choose another directory or fix its permissions.")


def test_text_output_is_a_directory_before_the_reply(tmp_path, capsys):
    out = tmp_path / "o.wav"
    line = _fails(["run", str(tmp_path / "no-bundle"), *MISSING, "-o", str(out), "--text-output", str(tmp_path)], capsys)
    assert f"--text-output {tmp_path} is a directory" in line
    assert not out.exists()


def test_chat_output_is_a_directory(tmp_path, capsys):
    line = _fails(["chat", str(tmp_path / "no-bundle"), *MISSING, "-o", str(tmp_path)], capsys)
    assert f"--output {tmp_path} is a directory" in line


def test_demo_out_dir_is_a_file(tmp_path, a_file, monkeypatch, capsys):
    monkeypatch.setenv("OMNILITE_CACHE", str(tmp_path / "cache"))
    line = _fails(["demo", "-o", str(a_file)], capsys)
    assert line == f"error: --out-dir {a_file} is a file, not a directory; pass a directory path (or remove the file)."
    assert not (tmp_path / "cache").exists()  # no checkpoint made, nothing exported


@pytest.mark.parametrize("command", ["export", "quantize"])
def test_export_and_quantize_out_under_a_file(tmp_path, a_file, capsys, command):
    out = a_file / "bundle"
    line = _fails([command, str(tmp_path / "no-source"), str(out)], capsys)
    assert line == f"error: OUT {out} cannot be created: {a_file} is a file, not a directory; choose another path."


# --- checkpoint config.json --------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["Llama-3.1-8B-Omni/config.json", "models/LLaMA-Omni2-0.5B/config.json"])
def test_invalid_checkpoint_config_json(tmp_path, capsys, layout):
    cfg = tmp_path / "ckpt" / layout
    cfg.parent.mkdir(parents=True)
    cfg.write_text('{"model_type": "omni_speech2s_llama",')  # cut short
    out = tmp_path / "bundle"
    line = _fails(["export", str(tmp_path / "ckpt"), str(out)], capsys)
    assert line.startswith(f"error: {cfg} is not valid JSON (") and line.endswith("download it again from the release.")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


# --- Ctrl-C -----------------------------------------------------------------------------------------

def test_ctrl_c_during_chat_with_files(bundle, tmp_path, monkeypatch, capsys):
    """Chosen behaviour: a simulated conversation cut short writes no WAV (not even the part so far)."""
    from omnilite.runtime.session import Session

    polls = {"n": 0}
    real_poll = Session.poll

    def poll(self, timeout=None):
        polls["n"] += 1
        if polls["n"] == 20:  # about a second into the conversation, as a user's Ctrl-C
            raise KeyboardInterrupt
        return real_poll(self, timeout)

    monkeypatch.setattr(Session, "poll", poll)
    out = tmp_path / "out.wav"
    assert main(["chat", str(bundle), "-i", str(CONVERSATION), "-o", str(out), "--pace", "2", "-n", "4"]) == 130
    assert _one_error_line(capsys.readouterr().err) == "error: interrupted (Ctrl-C); unfinished outputs were not written."
    assert list(tmp_path.iterdir()) == []  # no WAV, no temp file
    assert not [t for t in threading.enumerate() if t.name == "omnilite-simmic"]  # the simulated microphone stopped


def test_sigint_in_a_real_process(bundle, tmp_path):
    out = tmp_path / "out.wav"
    proc = subprocess.Popen([sys.executable, "-m", "omnilite", "chat", str(bundle), "-i", str(CONVERSATION), "-o", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in proc.stdout:
        if line.startswith("simulated microphone"):
            break
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert _one_error_line(stderr) == "error: interrupted (Ctrl-C); unfinished outputs were not written."
    assert list(tmp_path.iterdir()) == []


# --- concurrent exports -----------------------------------------------------------------------------

HOLD_LOCK = """
import sys
from pathlib import Path
from omnilite.export.bundle_dir import target_lock
with target_lock(Path(sys.argv[1])):
    print("locked", flush=True)
    sys.stdin.read()
"""


@pytest.fixture()
def lock_held_elsewhere(tmp_path):
    """Another process writing tmp_path/out (it holds the lock until its stdin closes)."""
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "locked\n"
    yield out, proc.pid
    proc.stdin.close()
    assert proc.wait(timeout=30) == 0
    assert not (tmp_path / ".out.lock").exists()  # released and removed by its holder


@pytest.mark.parametrize("command", ["export", "quantize"])
def test_a_second_export_to_the_same_target(lock_held_elsewhere, tiny_checkpoint, bundle, capsys, command):
    out, pid = lock_held_elsewhere
    source = tiny_checkpoint if command == "export" else bundle
    line = _fails([command, str(source), str(out), "--no-parity" if command == "export" else "--no-report"], capsys)
    assert line == f"error: another export is writing {out} (pid {pid}); wait for it or choose another directory."
    assert not out.exists()
    assert (out.parent / ".out.lock").read_text() == f"{pid}\n"  # the holder's lock is left alone


def test_a_killed_exports_leftovers_are_removed_and_named(bundle, tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "out"
    (tmp_path / ".out.lock").write_text(f"{dead.pid}\n")  # as SIGKILL leaves them
    (tmp_path / ".out.partial").mkdir()
    (tmp_path / ".out.partial" / "llm.gguf").write_bytes(b"half")
    with caplog.at_level(logging.WARNING):
        assert main(["quantize", str(bundle), str(out), "--preset", "fp32", "--no-report"]) == 0
    assert f"removing {tmp_path / '.out.partial'}, left by an interrupted export (pid {dead.pid})" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (out / "omnilite.json").is_file()


# --- a WAV cut short ----------------------------------------------------------------------------------

def test_a_wav_cut_short_warns_and_plays_what_is_there(bundle, tmp_path, caplog):
    data = QUESTION.read_bytes()
    cut = tmp_path / "cut.wav"
    cut.write_bytes(data[:len(data) - 1001])  # also mid-sample: the odd byte is dropped
    with caplog.at_level(logging.WARNING):
        audio, rate = read_wav(cut)
    full, _ = read_wav(QUESTION)
    assert len(audio) == len(full) - 501
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    size = struct.unpack("<I", data[40:44])[0]  # the question's data chunk follows a 16-byte fmt chunk
    assert warnings == [f"{cut} is cut short: its data chunk lacks 1001 of {size} bytes; using the {size - 1001} bytes that are there"]
    caplog.clear()
    out = tmp_path / "reply.wav"
    with caplog.at_level(logging.WARNING):
        assert main(["run", str(bundle), "-i", str(cut), "-o", str(out), "-n", "2", "-q"]) == 0
    assert "is cut short" in caplog.text and read_wav(out)[0].size > 0


def test_a_pipe_wav_with_unknown_size_does_not_warn(caplog):
    data = bytearray(QUESTION.read_bytes())
    data[40:44] = struct.pack("<I", 0xFFFFFFFF)  # what a writer that cannot seek back leaves
    with caplog.at_level(logging.WARNING):
        audio, _ = decode_wav(bytes(data), "stdin")
    assert len(audio) == len(read_wav(QUESTION)[0]) and not caplog.records


def test_the_cut_short_warning_is_one_line_in_a_real_process(tmp_path):
    data = QUESTION.read_bytes()
    cut = tmp_path / "cut.wav"
    cut.write_bytes(data[:-1000])
    r = subprocess.run([sys.executable, "-m", "omnilite", "run", str(tmp_path / "no-bundle"), "-i", str(cut), "-o",
                        str(tmp_path / "o.wav")], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    warning, error = r.stderr.splitlines()
    assert warning.startswith("WARNING ") and f"{cut} is cut short: its data chunk lacks 1000 of" in warning
    assert error.startswith("error: ") and "no-bundle is not a directory" in error


# --- flags: names, short forms, numbers ---------------------------------------------------------------

@pytest.mark.parametrize("argv,flag", [
    (["run", "B", "-i", "q.wav", "-o", "r.wav", "--threads", "-1"], "-t/--threads"),
    (["run", "B", "-i", "q.wav", "-o", "r.wav", "-t", "two"], "-t/--threads"),
    (["run", "B", "-i", "q.wav", "-o", "r.wav", "--omega", "0"], "--omega"),
    (["run", "B", "-i", "q.wav", "-o", "r.wav", "--max-new-tokens", "0"], "-n/--max-new-tokens"),
    (["chat", "B", "--pace", "0"], "--pace"),
    (["chat", "B", "--block-ms", "-20"], "--block-ms"),
    (["chat", "B", "--n-ctx", "0"], "--n-ctx"),
    (["bench", "B", "--runs", "0"], "--runs"),
    (["bench", "B", "--warmup", "-1"], "--warmup"),
    (["export", "C", "OUT", "--omega", "0"], "--omega"),
    (["quantize", "B", "OUT", "-t", "0"], "-t/--threads"),
])
def test_numbers_are_validated(argv, flag, capsys):
    line = _argparse_fails(argv, capsys)
    assert f"error: argument {flag}: " in line and "is not allowed; pass a" in line


def test_missing_required_flag_is_one_line(capsys):
    line = _argparse_fails(["run", "B", "-i", "q.wav"], capsys)
    assert line == "omnilite run: error: the following arguments are required: -o/--output (see `omnilite run --help`)."


def test_the_same_names_in_every_command():
    parse = build_parser().parse_args
    run = parse(["run", "-m", "B", "-i", "q.wav", "-o", "r.wav", "-t", "3", "-n", "7", "-q"])
    assert (run.model, run.input, run.output, run.threads, run.max_new_tokens, run.quiet) == ("B", "q.wav", "r.wav", 3, 7, True)
    chat = parse(["chat", "B", "-i", "q.wav", "-o", "r.wav", "-t", "3", "-n", "7"])
    old = parse(["chat", "B", "--input-file", "q.wav", "--output-file", "r.wav"])  # the spellings before -i/-o
    assert (chat.input, chat.output, old.input, old.output) == ("q.wav", "r.wav", "q.wav", "r.wav")
    bench = parse(["bench", "-m", "B", "-i", "q.wav", "-n", "7", "-o", "outdir"])
    assert (bench.model, bench.input, bench.max_new_tokens, bench.out_dir) == ("B", "q.wav", 7, "outdir")
    demo = parse(["demo", "-i", "q.wav", "-o", "outdir", "-n", "7", "-t", "2"])
    assert (demo.input, demo.out_dir, demo.max_new_tokens, demo.threads) == ("q.wav", "outdir", 7, 2)
    export = parse(["export", "C", "OUT", "--llm-precision", "Q8_0"])
    quantize = parse(["quantize", "B", "OUT", "--llm-precision", "Q8_0", "-t", "2"])
    assert export.q_llm == quantize.q_llm == parse(["quantize", "B", "OUT", "--llm", "Q8_0"]).q_llm == "Q8_0"
    assert parse(["-q", "info", "B"]).quiet and not parse(["info", "B"]).quiet


def test_model_flag_names_the_bundle(tmp_path, capsys):
    line = _fails(["run", "-m", str(tmp_path / "nowhere"), "-i", str(QUESTION), "-o", str(tmp_path / "o.wav")], capsys)
    assert f"{tmp_path / 'nowhere'} is not a directory" in line
    assert "not both" in _argparse_fails(["info", "B", "-m", "B"], capsys)
    assert "needs a bundle directory: BUNDLE or -m/--model" in _argparse_fails(["info"], capsys)


def test_quiet_prints_nothing_on_stdout(bundle, tmp_path, capsys):
    out = tmp_path / "r.wav"
    assert main(["run", str(bundle), "-i", str(QUESTION), "-o", str(out), "-n", "4", "--text-output", str(tmp_path / "r.txt"), "-q"]) == 0
    assert capsys.readouterr().out == ""
    assert read_wav(out)[0].size > 0 and (tmp_path / "r.txt").read_text()


def test_stdin_to_stdout(bundle):
    r = subprocess.run([sys.executable, "-m", "omnilite", "run", str(bundle), "-i", "-", "-o", "-", "-n", "4", "--ignore-eos"],
                       input=QUESTION.read_bytes(), capture_output=True)
    assert r.returncode == 0, r.stderr
    audio, rate = decode_wav(r.stdout, "stdout")  # stdout holds the WAV and nothing else
    assert rate == 16000 and audio.size > 0
    err = r.stderr.decode()
    assert "reply: " in err and "TTFA" in err and "wrote the reply to stdout" in err


def test_chat_refuses_dash(bundle, capsys):
    assert "'-' (stdin/stdout) is for `omnilite run`" in _fails(["chat", str(bundle), "-i", "-", "-o", "x.wav"], capsys)
