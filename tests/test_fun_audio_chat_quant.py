"""Quantization of the tiny Fun-Audio-Chat bundle: `omnilite quantize --preset small` and `omnilite export
--preset` write the presets' precisions (the speech head capped at Q8_0), an accuracy report with each stage's
metric against the fp32 bundle, a stage outside its tolerance fails the command in one sentence (exit 2,
nothing written) unless --allow-fail, and the quantized bundle answers through `omnilite run` without torch."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import omnilite
from omnilite.cli import main
from omnilite.quant.presets import ROLE_METRICS, plan_for, tolerance
from omnilite.runtime.audio import read_wav
from omnilite.runtime.bundle import MANIFEST, load_bundle
from omnilite.runtime.fun_audio_chat.speech_head import HeadSpec

QUESTION = Path(omnilite.__file__).parent / "data" / "question.wav"
TOKENS = 16  # report length: enough for KL and top-1, quick on the tiny
FLOAT = {"text_embeddings": "fp32", "speech_head_input": "fp32", "speech_head_codes": "fp32", "speech_feedback": "fp32",
         "flow_noise": "fp32", "hift_f0": "fp32", "hift": "fp32", "vocoder_config": "fp32"}
SMALL = {"audio_input": "int4", "llm": "Q4_K_M", "speech_head": "Q8_0", "flow_encoder": "int8", "flow_estimator": "int8",
         "flow_estimator_cached": "int8", **FLOAT}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("facq") / "ckpt"
    assert main(["make-tiny", "fun-audio-chat", str(d), "-q"]) == 0
    return d


@pytest.fixture(scope="module")
def fp32(ckpt) -> Path:
    from omnilite.export.fun_audio_chat.bundle import FunAudioChatExportOptions, export_fun_audio_chat

    # The parity against PyTorch has its own tests (test_fun_audio_chat_*.py); here it is the source.
    return export_fun_audio_chat(ckpt, ckpt.parent / "fp32", FunAudioChatExportOptions(parity=False))


@pytest.fixture(scope="module")
def small(fp32) -> Path:
    out = fp32.parent / "small"
    assert main(["quantize", str(fp32), str(out), "--preset", "small", "--report-tokens", str(TOKENS)]) == 0
    return out


def _ops(path: Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}


def test_small_writes_the_stated_precisions(small, fp32):
    b = load_bundle(small)  # verifies every file's hash
    assert {s.name: s.precision for s in b.stages.values()} == SMALL
    q = b.manifest["quantization"]
    # The preset's tts role (Q4_K_M) is capped at Q8_0 for the speech head; an explicit --tts still wins.
    assert q["plan"] == {"encoder": "int4", "llm": "Q4_K_M", "tts": "Q8_0", "flow": "int8", "vocoder": "fp32"}
    assert plan_for("small", {"tts": "Q4_K_M"}, "fun-audio-chat").tts == "Q4_K_M"
    assert plan_for("balanced", None, "fun-audio-chat").tts == "Q8_0"
    assert "MatMulNBits" in _ops(small / "audio_input.onnx")
    for flow in ("flow_estimator.onnx", "flow_estimator_cached.onnx"):  # the chunk-aligned stream runs the cached one
        assert _ops(small / flow) & {"DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMulInteger"}, flow
    # CosyVoice3's flow encoder is a token embedding and the pre-lookahead convolutions: no MatMul to quantize.
    assert q["stages"]["flow_encoder"]["quantized_ops"] == {}
    assert q["stages"]["llm"]["size_ratio"] < 0.5 and q["stages"]["speech_head"]["size_ratio"] < 0.5
    src = load_bundle(fp32, verify=False)
    for name in FLOAT:  # unchanged stages are the source's files, the head's codes table included
        assert b.stages[name].sha256 == src.stages[name].sha256, name


def test_the_report_lists_each_stage_with_its_metric(small, capsys):
    report = json.loads((small / MANIFEST).read_text())["quantization"]["accuracy"]
    assert report["ok"] and report["failed"] == [] and set(report["stages"]) == {"encoder", "llm", "tts", "flow", "vocoder"}
    for role in ("encoder", "llm", "tts", "flow"):
        rep = report["stages"][role]
        assert not rep["identical_file"] and rep["ok"], (role, rep)
        tol = tolerance(role, rep["precision"])
        assert (set(tol.min) | set(tol.max)) and tol.check(rep["metrics"]) == []
        for metric in ROLE_METRICS[role]:
            assert np.isfinite(rep["metrics"][metric]), (role, metric)
    m = {r: report["stages"][r]["metrics"] for r in report["stages"]}
    # Quantization leaves a measurable error, not a copy.
    assert 0.9 < m["encoder"]["cosine_mean"] < 1 and 0 < m["llm"]["mean_kl"] and 0 < m["tts"]["mean_kl"]
    assert 0 < m["flow"]["mel_rel_error"]
    assert m["llm"]["positions"] == TOKENS  # the suffix's prediction and every fed reply step but the last
    assert m["tts"]["code_positions"] == 5 * TOKENS  # one group of 5 per LLM step (the prefill's included)
    assert report["stages"]["vocoder"]["identical_file"] and m["vocoder"]["snr_db"] == float("inf")
    e = report["end_to_end"]
    assert np.isfinite(e["audio_snr_db"]) and e["audio_seconds_reference"] > 0 and e["audio_seconds_quantized"] > 0
    assert main(["info", str(small)]) == 0
    out = capsys.readouterr().out
    for line in (r"ok   encoder  int4 .*cosine_mean=", r"ok   llm      Q4_K_M .*mean_kl=", r"ok   tts      Q8_0 .*mean_kl=",
                 r"ok   flow     int8 .*mel_rel_error=", r"same vocoder  fp32 .*snr_db=inf", r"end-to-end: .*audio SNR="):
        assert re.search(line, out), (line, out)


def _corrupt_flow(path: Path) -> None:
    """Overwrite the largest int8 weight of the estimator with random values (a broken quantizer)."""
    model = onnx.load(str(path))
    quant = [t for t in model.graph.initializer if t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)]
    target = max(quant, key=lambda t: len(t.raw_data))
    target.raw_data = np.random.default_rng(0).integers(0, 256, len(target.raw_data), dtype=np.uint8).tobytes()
    onnx.save(model, str(path))


def test_a_stage_outside_its_tolerance_exits_2_in_one_sentence_unless_allow_fail(fp32, tmp_path, capsys, monkeypatch):
    import omnilite.quant.onnx_quant as onnx_quant

    real = onnx_quant.quantize_onnx

    def corrupting(src, dst, config):
        extra, info = real(src, dst, config)
        if Path(dst).name == "flow_estimator.onnx":
            _corrupt_flow(Path(dst))
        return extra, info

    monkeypatch.setattr(onnx_quant, "quantize_onnx", corrupting)
    out = tmp_path / "q"
    capsys.readouterr()
    assert main(["quantize", str(fp32), str(out), "--preset", "small", "--report-tokens", str(TOKENS)]) == 2
    printed = capsys.readouterr()
    assert printed.out.count("FAIL") == 1 and "FAIL flow " in printed.out  # charged to the flow alone
    lines = [x for x in printed.err.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in printed.err, printed.err
    assert re.fullmatch(r"error: quantized stage flow misses its tolerance \(flow mel_rel_error=[0-9.e+]+, limit <= 0\.05\); "
                        r"no bundle was written \(pass --allow-fail to keep it anyway, or --tolerance ROLE\.METRIC=VALUE "
                        r"to change a limit\)\.", lines[0]), lines[0]
    assert list(tmp_path.iterdir()) == []  # no bundle, no partial dir

    assert main(["quantize", str(fp32), str(out), "--preset", "small", "--allow-fail", "--report-tokens", str(TOKENS)]) == 0
    assert "WARNING: quantized stage flow misses its tolerance" in capsys.readouterr().err
    report = json.loads((out / MANIFEST).read_text())["quantization"]["accuracy"]
    assert report["failed"] == ["flow"] and report["stages"]["flow"]["metrics"]["mel_rel_error"] > 0.05


def test_the_quantized_bundle_answers_without_torch(small, tmp_path):
    wav, txt = tmp_path / "reply.wav", tmp_path / "reply.txt"
    code = (
        "import sys\n"
        "from omnilite.cli import main\n"
        f"rc = main(['run', {str(small)!r}, '--input', {str(QUESTION)!r}, '--output', {str(wav)!r}, "
        f"'--text-output', {str(txt)!r}, '--max-new-tokens', '30', '-q'])\n"
        "bad = [m for m in ('torch', 'transformers', 'safetensors', 'onnx') if m in sys.modules]\n"
        "print(rc, bad); sys.exit(1 if rc or bad else 0)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    audio, rate = read_wav(wav)
    assert rate == 24000 and audio.size > 0 and np.isfinite(audio).all() and np.abs(audio).max() > 1e-3
    assert txt.read_text().strip()


def test_export_with_a_preset(ckpt, tmp_path, capsys):
    out = tmp_path / "small"
    assert main(["export", str(ckpt), str(out), "--preset", "small", "--no-parity", "--report-tokens", str(TOKENS)]) == 0
    m = json.loads((out / MANIFEST).read_text())
    assert {s["name"]: s["precision"] for s in m["stages"]} == SMALL
    # The runtime reads the head's precision (its cache type) from the stage, which quantizing changed.
    assert HeadSpec.from_bundle(load_bundle(out)).precision == "Q8_0" and "precision" not in m["speech"]
    q = m["quantization"]
    assert q["source"]["path"] is None and q["accuracy"]["ok"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small"]  # the unquantized export is gone
    assert "wrote bundle" in capsys.readouterr().out
    # The front end and the voice stay the release's.
    for flag in (["--encoder-mode", "exact"], ["--speaker-wav", str(QUESTION)]):
        assert main(["export", str(ckpt), str(tmp_path / "x"), "--preset", "small", *flag]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: Fun-Audio-Chat bundles are exported with") and err.count("\n") == 1, err
    assert not (tmp_path / "x").exists()
