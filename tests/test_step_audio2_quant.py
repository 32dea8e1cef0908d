"""Quantization of the tiny Step-Audio 2 bundle: `omnilite quantize --preset small` and `omnilite export
--preset` write the presets' precisions, an accuracy report with each stage's metric against the fp32
bundle, a stage outside its tolerance fails the command in one sentence (exit 2, nothing written) unless
--allow-fail, and the quantized bundle plays through `omnilite run` without torch."""

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
from omnilite.quant.presets import PRESETS, ROLE_METRICS, plan_for, tolerance
from omnilite.runtime.audio import read_wav
from omnilite.runtime.bundle import MANIFEST, load_bundle
from omnilite.runtime.errors import OmniliteError

QUESTION = Path(omnilite.__file__).parent / "data" / "question.wav"
TOKENS = 16  # report length: enough for KL and top-1, quick on the tiny


def expected(preset: str) -> dict[str, str]:
    p = PRESETS[preset]
    return {"encoder": p.encoder, "llm": p.llm, "flow_encoder": p.flow, "flow_estimator": p.flow, "flow_noise": "fp32",
            "hift_f0": "fp32", "hift": p.vocoder, "token2wav_config": "fp32", "voice_prompt": "fp32"}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("sa2q") / "ckpt"
    assert main(["make-tiny", "step-audio2", str(d), "-q"]) == 0
    return d


@pytest.fixture(scope="module")
def fp32(ckpt) -> Path:
    from omnilite.export.step_audio2.export import StepAudio2ExportOptions, export_step_audio2

    # The parity against PyTorch has its own tests (test_step_audio2_pipeline.py); here it is the source.
    return export_step_audio2(ckpt, ckpt.parent / "fp32", StepAudio2ExportOptions(parity=False), QUESTION)


@pytest.fixture(scope="module")
def small(fp32) -> Path:
    out = fp32.parent / "small"
    assert main(["quantize", str(fp32), str(out), "--preset", "small", "--report-tokens", str(TOKENS)]) == 0
    return out


def _ops(path: Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}


def test_small_writes_the_stated_precisions(small, fp32):
    assert expected("small") == {"encoder": "int4", "llm": "Q4_K_M", "flow_encoder": "int8", "flow_estimator": "int8",
                                 "flow_noise": "fp32", "hift_f0": "fp32", "hift": "fp32", "token2wav_config": "fp32",
                                 "voice_prompt": "fp32"}
    b = load_bundle(small)  # verifies every file's hash
    assert {s.name: s.precision for s in b.stages.values()} == expected("small")
    q = b.manifest["quantization"]
    assert q["plan"] == {"encoder": "int4", "llm": "Q4_K_M", "flow": "int8", "vocoder": "fp32"}
    assert q["source"]["path"] == str(fp32.resolve())
    # The graphs hold what the precision says: 4-bit matmuls (the first block float, the adapter int8), int8 flow.
    enc = q["stages"]["encoder"]
    assert "MatMulNBits" in _ops(small / "encoder.onnx") and enc["quantized_ops"]["MatMulNBits"] > 0
    assert enc["kept_float"] and all("/blocks.0/" in n for n in enc["kept_float"])
    assert enc["int8_nodes"] and all("/adapter/" in n for n in enc["int8_nodes"])
    for f in ("flow_encoder.onnx", "flow_estimator.onnx"):
        assert _ops(small / f) & {"DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMulInteger"}, f
        assert "MatMulNBits" not in _ops(small / f)
    assert q["stages"]["llm"]["source_precision"] == "f32" and q["stages"]["llm"]["size_ratio"] < 0.5
    # Unchanged stages are the source's files.
    for name in ("hift", "hift_f0", "flow_noise", "voice_prompt", "token2wav_config"):
        assert b.stages[name].sha256 == load_bundle(fp32, verify=False).stages[name].sha256


def test_the_report_lists_each_stage_with_its_metric(small, capsys):
    report = json.loads((small / MANIFEST).read_text())["quantization"]["accuracy"]
    assert report["ok"] and report["failed"] == [] and set(report["stages"]) == {"encoder", "llm", "flow", "vocoder"}
    for role in ("encoder", "llm", "flow"):
        rep = report["stages"][role]
        assert not rep["identical_file"] and rep["ok"], (role, rep)
        tol = tolerance(role, rep["precision"])
        assert (set(tol.min) | set(tol.max)) and tol.check(rep["metrics"]) == []
        for metric in ROLE_METRICS[role]:
            assert np.isfinite(rep["metrics"][metric]), (role, metric)
    m = {r: report["stages"][r]["metrics"] for r in report["stages"]}
    # Quantization leaves a measurable error, not a copy.
    assert 0.9 < m["encoder"]["cosine_mean"] < 1 and 0 < m["llm"]["mean_kl"] and 0 < m["flow"]["mel_rel_error"]
    assert m["encoder"]["positions"] == 45  # question.wav, 3.6 s: one piece, the official count
    assert m["flow"]["mel_frames"] == 2 * m["flow"]["codes"]
    assert report["stages"]["vocoder"]["identical_file"] and m["vocoder"]["snr_db"] == float("inf")
    e = report["end_to_end"]
    assert np.isfinite(e["audio_snr_db"]) and e["audio_seconds_quantized"] == e["audio_seconds_reference"] > 0
    assert report["input"]["pieces_used"] == 1 and report["input"]["tokens"] == TOKENS
    assert main(["info", str(small)]) == 0
    out = capsys.readouterr().out
    for line in (r"ok   encoder  int4 .*cosine_mean=", r"ok   llm      Q4_K_M .*mean_kl=", r"ok   flow     int8 .*mel_rel_error=",
                 r"same vocoder  fp32 .*snr_db=inf", r"end-to-end: .*audio SNR="):
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
    printed = capsys.readouterr()
    assert "WARNING: quantized stage flow misses its tolerance" in printed.err
    report = json.loads((out / MANIFEST).read_text())["quantization"]["accuracy"]
    assert report["failed"] == ["flow"] and report["stages"]["flow"]["metrics"]["mel_rel_error"] > 0.05


def test_the_quantized_bundle_runs_without_torch(small, tmp_path):
    wav, txt = tmp_path / "reply.wav", tmp_path / "reply.txt"
    code = (
        "import sys\n"
        "from omnilite.cli import main\n"
        f"rc = main(['run', {str(small)!r}, '--input', {str(QUESTION)!r}, '--output', {str(wav)!r}, "
        f"'--text-output', {str(txt)!r}, '-n', '400', '-q'])\n"
        "bad = [m for m in ('torch', 'transformers', 'safetensors', 'onnx') if m in sys.modules]\n"
        "print(rc, bad); sys.exit(1 if rc or bad else 0)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    audio, rate = read_wav(wav)
    assert rate == 24000 and audio.size > 0 and np.isfinite(audio).all() and np.abs(audio).max() > 1e-3
    assert txt.read_text().strip()


def test_export_with_a_preset_and_an_f16_source(ckpt, tmp_path, capsys):
    out = tmp_path / "balanced"
    assert main(["export", str(ckpt), str(out), "--preset", "balanced", "--llm-dtype", "f16", "--no-parity",
                 "--speaker-wav", str(QUESTION), "--report-tokens", str(TOKENS)]) == 0
    m = json.loads((out / MANIFEST).read_text())
    assert {s["name"]: s["precision"] for s in m["stages"]} == expected("balanced")
    q = m["quantization"]
    assert q["source"]["path"] is None and q["source"]["precisions"]["llm"] == "f16"
    assert q["accuracy"]["ok"] and q["accuracy"]["reference"]["precisions"]["llm"] == "f16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["balanced"]  # the unquantized export is gone
    assert "wrote bundle" in capsys.readouterr().out
    # The front end stays the official one.
    assert main(["export", str(ckpt), str(tmp_path / "x"), "--preset", "small", "--encoder-mode", "exact",
                 "--speaker-wav", str(QUESTION)]) == 2
    assert capsys.readouterr().err == ("error: Step-Audio 2 bundles have the official front end only (25 s pieces); "
                                       "drop --encoder-mode.\n")
    assert not (tmp_path / "x").exists()


def test_an_override_the_family_lacks_is_one_sentence():
    with pytest.raises(OmniliteError, match=r"^--tts does not apply to a step-audio2 bundle, whose stage roles are "
                                            r"encoder, llm, flow, vocoder; drop it\.$"):
        plan_for("small", {"tts": "Q8_0"}, "step-audio2")
    with pytest.raises(OmniliteError, match=r"^--decoder does not apply to a step-audio2 bundle"):
        plan_for("balanced", {"decoder": "int8"}, "step-audio2")


def test_the_benchmark_runs_both_sides_to_the_same_first_window(small, ckpt, tmp_path):
    """benchmarks/step_audio2_bench.py on the tiny: the scripted 1:4 reply puts the first flow window (28 codes)
    after 35 ids on both sides; the result records the CPU features and each stage of the waterfall."""
    from omnilite.benchmarks.step_audio2_bench import main as bench

    assert bench([str(small), "--checkpoint", str(ckpt), "--name", "t", "--reply", "45", "--runs", "1",
                  "--out-dir", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "step-audio2-t.json").read_text())
    o = r["omnilite"]
    assert o["ids_before_first_window"] == 35 and o["codes"] == 36 and r["torch"]["ids_before_audio"] == 35
    assert o["audio_s"] == pytest.approx(36 * 0.04)  # 2 mel frames of 480 samples at 24 kHz per code
    assert 0 < o["overlapped"]["ttfa"]["p50"] < o["overlapped"]["total"]["p50"] and r["torch"]["ttfa"]["p50"] > 0
    assert set(r["torch"]["waterfall"]) == {"mel", "encoder", "llm_prefill", "llm_decode", "flow", "hift"}
    assert "flow (in vocoder)" in o["waterfall_sequential"] and "avx512f" in r["host"]["cpu_record"]["features"]
    assert "| TTFA p50 (s) |" in (tmp_path / "step-audio2-t.md").read_text()
