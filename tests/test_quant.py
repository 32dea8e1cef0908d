"""Quantization of the tiny bundle: every preset's stages load and run in the runtime, the accuracy
report is measured and recorded, a corrupted quantized weight fails it, a failure is exit status 2
with nothing written unless --allow-fail, and requantization is refused or done as documented."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from omnilite.cli import build_parser, main
from omnilite.quant import QuantizeOptions, measure_accuracy, quantize_bundle
from omnilite.quant.accuracy import AccuracyOptions, kl_divergence, log_mel_distance_db, sequence_agreement
from omnilite.quant.gguf_quant import gguf_tensor_types
from omnilite.quant.onnx_quant import OnnxQuantConfig, quantize_onnx
from omnilite.runtime import Done, Pipeline, PipelineConfig
from omnilite.runtime.bundle import MANIFEST, load_bundle, sha256_file
from omnilite.runtime.encoder import SpeechEncoder
from omnilite.runtime.errors import OmniliteError
from omnilite.runtime.llm import LlamaCppLLM
from omnilite.runtime.units import StreamingUnitGenerator
from omnilite.runtime.vocoder import UnitVocoder

from conftest import QUESTION

TOKENS = 16  # report length in tests (the CLI default is 32)
STAGE_METRICS = {
    "encoder": ("cosine_min", "cosine_mean", "rel_rms_error", "rel_max_error"),
    "llm": ("top1_agreement", "mean_kl", "max_kl", "hidden_cosine_min", "greedy_text_changed"),
    "decoder": ("logit_rel_error", "frame_agreement", "unit_agreement", "units_identical"),
    "vocoder": ("snr_db", "log_mel_distance_db", "duration_agreement"),
}


def _quantize(src: Path, out: Path, preset: str, **kw) -> Path:
    return quantize_bundle(src, out, QuantizeOptions(preset=preset, progress=False, report_tokens=TOKENS, **kw)).path


@pytest.fixture(scope="module")
def quantized(bundle, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("quant")
    # small with --vocoder int8, so that the int8 convolution path is covered too
    return {p: _quantize(bundle, root / p, p, overrides={"vocoder": "int8"} if p == "small" else {})
            for p in ("balanced", "small", "gpu-fp16")}


EXPECTED = {
    "balanced": {"encoder": "int8", "llm": "Q8_0", "speech_generator": "int8", "unit_duration": "fp32", "vocoder": "fp32"},
    "small": {"encoder": "int4", "llm": "Q4_K_M", "speech_generator": "int4", "unit_duration": "fp32", "vocoder": "int8"},
    "gpu-fp16": {"encoder": "fp16", "llm": "F16", "speech_generator": "fp16", "unit_duration": "fp32", "vocoder": "fp16"},
}


@pytest.mark.parametrize("preset", list(EXPECTED))
def test_every_quantized_stage_loads_and_runs_in_the_runtime(quantized, preset, bundle, question_16k):
    b = load_bundle(quantized[preset])  # hashes of the new files verified
    assert {s.name: s.precision for s in b.stages.values()} == EXPECTED[preset]
    details = b["quantization"]["stages"]
    ops = details["encoder"]["quantized_ops"]
    if preset == "balanced":
        assert ops.get("MatMulInteger", 0) > 0 and ops.get("DynamicQuantizeLinear", 0) > 0
    if preset == "small":
        assert ops.get("MatMulNBits", 0) > 0
        assert details["encoder"]["int8_nodes"]  # the adapter stays int8
        assert details["vocoder"]["quantized_ops"].get("ConvInteger", 0) > 0
        assert len(details["vocoder"]["kept_float"]) == 2  # conv_pre and conv_post
        # 64-wide rows cannot take Q4_K: the tensor types read back from the file say so, and so
        # does the label `info` prints (every tensor of the source is counted).
        types = details["llm"]["tensor_types"]
        assert "fallback" in details["llm"] and "Q4_K" not in types and "Q8_0" in types
        assert sum(types.values()) == sum(gguf_tensor_types(Path(bundle) / "llm.gguf").values())
        assert details["llm"]["label"] == f"Q4_K_M (no tensor got Q4_K: rows too narrow, kept as {'/'.join(types)})"
    for name, d in details.items():
        if b.stages[name].precision != d["source_precision"]:
            assert d["bytes"] < d["source_bytes"], name

    # Each stage on its own...
    emb = SpeechEncoder(b)(question_16k)
    assert emb.ndim == 2 and np.isfinite(emb).all()
    prompt = b["llm"]["prompt"]
    with LlamaCppLLM(b.file("llm")) as llm:
        llm.eval_tokens(prompt["prefix_ids"])
        llm.eval_embeddings(emb)
        logits, hidden = llm.eval_tokens(prompt["suffix_ids"], want_last=True)
    assert np.isfinite(logits).all() and np.isfinite(hidden).all()
    gen = StreamingUnitGenerator(b)
    units = gen.push(np.repeat(hidden[None], 4, axis=0))
    assert all(0 <= u < 1000 for u in units)
    audio = UnitVocoder(b).offline(list(range(10, 30)))
    assert len(audio) > 0 and np.isfinite(audio).all()
    # ...and the whole pipeline.
    with Pipeline.load(b.path, PipelineConfig(max_new_tokens=12, ignore_eos=True)) as pipe:
        done = [e for e in pipe.respond(question_16k, 16000) if isinstance(e, Done)][0]
    assert len(done.tokens) == 12 and np.isfinite(done.audio).all()


@pytest.mark.parametrize("preset", list(EXPECTED))
def test_accuracy_report_fields_are_present_and_computed(quantized, preset, bundle):
    m = json.loads((quantized[preset] / MANIFEST).read_text())
    q = m["quantization"]
    assert q["preset"] == preset and q["requantized"] is False
    assert q["source"]["path"] == str(Path(bundle).resolve())
    report = q["accuracy"]
    assert report["input"]["audio"] == QUESTION.name and report["input"]["tokens"] == TOKENS
    for role, keys in STAGE_METRICS.items():
        rep = report["stages"][role]
        for k in keys:
            v = rep["metrics"][k]
            assert isinstance(v, bool) or (isinstance(v, float) and (math.isfinite(v) or k == "snr_db")), (role, k, v)
        assert set(rep) >= {"precision", "identical_file", "metrics", "tolerance", "ok", "failed_metrics"}
        if not rep["identical_file"]:
            assert rep["tolerance"], role  # every quantized stage is judged
    e = report["end_to_end"]
    for k in ("text_identical", "unit_agreement", "audio_snr_db", "audio_log_mel_distance_db"):
        assert k in e
    # Reduced precision leaves a measurable, bounded error; fp16 far less than int8, int8 less than int4.
    enc = report["stages"]["encoder"]["metrics"]
    assert 0 < enc["rel_rms_error"] < {"gpu-fp16": 1e-2, "balanced": 0.1, "small": 0.3}[preset]
    llm = report["stages"]["llm"]["metrics"]
    assert 0 < llm["mean_kl"] < 0.2 and 0.5 <= llm["top1_agreement"] <= 1
    assert report["stages"]["encoder"]["ok"] and report["stages"]["vocoder"]["ok"]


def test_presets_and_overrides():
    from omnilite.quant.presets import plan_for

    assert plan_for("small").as_dict("llama-omni") == {"encoder": "int4", "llm": "Q4_K_M", "decoder": "int4", "vocoder": "fp32"}
    assert plan_for("small", {"vocoder": "int8", "llm": None}).vocoder == "int8"
    with pytest.raises(OmniliteError, match="--vocoder int4 is not supported"):
        plan_for("balanced", {"vocoder": "int4"})
    with pytest.raises(OmniliteError, match="unknown preset"):
        plan_for("tiny")


def test_fp32_preset_is_an_identical_copy(bundle, tmp_path):
    out = _quantize(bundle, tmp_path / "fp32", "fp32")
    report = json.loads((out / MANIFEST).read_text())["quantization"]["accuracy"]
    assert report["ok"] and all(r["identical_file"] for r in report["stages"].values())
    assert report["end_to_end"]["text_identical"] and report["end_to_end"]["audio_snr_db"] == float("inf")


def _corrupt_onnx_weight(path: Path) -> str:
    """Overwrite the largest quantized (int8 / packed int4) weight of a graph with random values."""
    model = onnx.load(str(path))
    quant = [t for t in model.graph.initializer if t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)]
    target = max(quant, key=lambda t: len(t.raw_data))
    rng = np.random.default_rng(0)
    target.raw_data = rng.integers(0, 256, len(target.raw_data), dtype=np.uint8).tobytes()
    onnx.save(model, str(path))
    return target.name


def _coarser_gguf(bundle_dir: Path, source: Path) -> None:
    """Replace the bundle's Q8_0 LLM by a Q4_0 one, its manifest still saying Q8_0 (a quantizer that
    wrote the wrong type). Quicker than editing a tensor in place: gguf.GGUFReader decodes the
    whole vocabulary first (14 s on the tiny model)."""
    from omnilite.quant.gguf_quant import quantize_gguf

    (bundle_dir / "llm.gguf").unlink()
    quantize_gguf(source / "llm.gguf", bundle_dir / "llm.gguf", "Q4_0", progress=False)


def _rehash(bundle_dir: Path) -> None:
    """A broken quantizer would have recorded its broken output's hash: do the same."""
    m = json.loads((bundle_dir / MANIFEST).read_text())
    for s in m["stages"]:
        s["sha256"] = sha256_file(bundle_dir / s["file"])
    (bundle_dir / MANIFEST).write_text(json.dumps(m))


def _scale_quantized_weight(path: Path, factor: float) -> str:
    """Multiply the per-channel scales of a graph's first int8 matmul weight by `factor` (a
    quantizer that wrote a wrong scale); returns the scale's name."""
    model = onnx.load(str(path))
    target = next(t for t in model.graph.initializer if t.name.endswith("_scale") and len(t.dims) == 1 and t.dims[0] > 1)
    target.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(target) * np.float32(factor), target.name))
    onnx.save(model, str(path))
    return target.name


def test_a_corrupted_quantized_weight_fails_the_report(quantized, bundle, tmp_path):
    bad = shutil.copytree(quantized["balanced"], tmp_path / "bad")
    _corrupt_onnx_weight(bad / "encoder.onnx")
    _coarser_gguf(bad, Path(bundle))
    _scale_quantized_weight(bad / "speech_generator.onnx", 1.5)
    _rehash(bad)
    report = measure_accuracy(load_bundle(bad), load_bundle(bundle), AccuracyOptions(tokens=TOKENS))
    assert not report["ok"]
    assert report["failed"] == ["encoder", "llm", "decoder"]  # charged to the right stages: the vocoder passes
    assert report["stages"]["encoder"]["failed_metrics"] == ["cosine_mean", "rel_rms_error"]
    assert report["stages"]["llm"]["failed_metrics"] == ["mean_kl"]
    assert report["stages"]["decoder"]["failed_metrics"] == ["logit_rel_error"]
    # The intact bundle passed the same judgement (its report, measured when it was written).
    good = json.loads((quantized["balanced"] / MANIFEST).read_text())["quantization"]["accuracy"]
    assert good["ok"] and good["failed"] == []


@pytest.fixture(scope="module")
def gguf_types(bundle, tmp_path_factory) -> dict[str, Path]:
    """The tiny bundle with only its LLM changed, to IQ4_NL and to BF16 (64-wide rows: IQ4_NL's
    32-wide blocks fit, so unlike Q4_K_M every matrix gets the asked type)."""
    root = tmp_path_factory.mktemp("gguf-types")
    return {t: _quantize(bundle, root / t, "fp32", overrides={"llm": t}) for t in ("IQ4_NL", "BF16")}


@pytest.mark.parametrize("qtype", ["IQ4_NL", "BF16"])
def test_iq4_nl_and_bf16_llms_load_and_meet_their_tolerance(gguf_types, qtype, bundle):
    from omnilite.quant.presets import GGUF_PRECISIONS, tolerance

    assert qtype in GGUF_PRECISIONS and build_parser().parse_args(["quantize", "B", "O", "--llm", qtype]).q_llm == qtype
    b = load_bundle(gguf_types[qtype])
    assert b.stages["llm"].precision == qtype and b.stages["encoder"].precision == "fp32"
    details = b["quantization"]["stages"]["llm"]
    types = details["tensor_types"]
    assert types[qtype] >= 14 and "fallback" not in details and details["label"] == qtype, details
    assert sum(types.values()) == sum(gguf_tensor_types(Path(bundle) / "llm.gguf").values())
    # F32 source 73.8 MB -> IQ4_NL 21.2 MB (llama.cpp keeps the output matrix at Q8_0), BF16 40.8 MB
    # (the tokenizer's metadata is the same in both).
    assert details["bytes"] < details["source_bytes"] * {"IQ4_NL": 0.3, "BF16": 0.56}[qtype]
    prompt = b["llm"]["prompt"]
    with LlamaCppLLM(b.file("llm")) as llm:
        logits, hidden = llm.eval_tokens(prompt["prefix_ids"] + prompt["suffix_ids"], want_last=True)
    assert np.isfinite(logits).all() and np.isfinite(hidden).all()
    rep = b["quantization"]["accuracy"]["stages"]["llm"]
    bound = tolerance("llm", qtype).max["mean_kl"]
    assert rep["ok"] and rep["tolerance"] == {"mean_kl<=": bound}
    # Measured on this tiny LLM (16 tokens): IQ4_NL 0.178 (bound 0.45), BF16 1.8e-4 (bound 0.003).
    kl = rep["metrics"]["mean_kl"]
    assert {"IQ4_NL": 0.05, "BF16": 1e-6}[qtype] < kl <= bound


def test_iq4_nl_judged_as_q8_0_fails_the_report(gguf_types, bundle, tmp_path):
    """Injected fault: the IQ4_NL file recorded as Q8_0 (a quantizer that wrote the wrong type) is
    judged by Q8_0's bound, mean KL <= 0.02, and fails it (tiny: KL 0.178), on the LLM alone."""
    bad = shutil.copytree(gguf_types["IQ4_NL"], tmp_path / "bad")
    m = json.loads((bad / MANIFEST).read_text())
    next(s for s in m["stages"] if s["name"] == "llm")["precision"] = "Q8_0"
    (bad / MANIFEST).write_text(json.dumps(m))
    report = measure_accuracy(load_bundle(bad), load_bundle(bundle), AccuracyOptions(tokens=TOKENS))
    good = json.loads((gguf_types["IQ4_NL"] / MANIFEST).read_text())["quantization"]["accuracy"]["stages"]["llm"]
    assert report["failed"] == ["llm"] and report["stages"]["llm"]["failed_metrics"] == ["mean_kl"]
    assert report["stages"]["llm"]["tolerance"] == {"mean_kl<=": 0.02}
    assert report["stages"]["llm"]["metrics"]["mean_kl"] == pytest.approx(good["metrics"]["mean_kl"], rel=1e-3)


def _error_line(capsys) -> str:
    return _error_line_of(capsys.readouterr().err)


def _error_line_of(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_a_stage_over_its_tolerance_exits_2_and_writes_nothing_unless_allow_fail(bundle, tmp_path, capsys, monkeypatch):
    import omnilite.quant.onnx_quant as onnx_quant

    real = onnx_quant.quantize_onnx

    def corrupting(src, dst, config):  # a quantizer that damages the encoder's weights
        extra, info = real(src, dst, config)
        if Path(dst).name == "encoder.onnx":
            _corrupt_onnx_weight(Path(dst))
        return extra, info

    monkeypatch.setattr(onnx_quant, "quantize_onnx", corrupting)
    out = tmp_path / "q"
    # --strict, the default now, is still accepted.
    code = main(["quantize", str(bundle), str(out), "--preset", "balanced", "--strict", "--report-tokens", str(TOKENS)])
    assert code == 2
    printed = capsys.readouterr()
    assert printed.out.count("FAIL") == 1 and "FAIL encoder" in printed.out
    line = _error_line_of(printed.err)
    assert re.fullmatch(r"error: quantized stage encoder misses its tolerance \(encoder cosine_mean=[-0-9.e]+, limit >= 0\.98; "
                        r"encoder rel_rms_error=[0-9.e]+, limit <= 0\.2\); no bundle was written \(pass --allow-fail to "
                        r"keep it anyway, or --tolerance ROLE\.METRIC=VALUE to change a limit\)\.", line), line
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no bundle, no partial dir

    # With --allow-fail the bundle is written, the status is 0 and the failure is said once.
    assert main(["quantize", str(bundle), str(out), "--preset", "balanced", "--allow-fail", "--report-tokens", str(TOKENS)]) == 0
    printed = capsys.readouterr()
    assert printed.out.count("FAIL") == 1 and "FAIL encoder" in printed.out
    warnings = [x for x in printed.err.splitlines() if "tolerance" in x]
    assert len(warnings) == 1 and warnings[0].startswith("WARNING: quantized stage encoder misses its tolerance (encoder "), printed.err
    assert warnings[0].endswith("; kept with --allow-fail.")
    assert json.loads((out / MANIFEST).read_text())["quantization"]["accuracy"]["failed"] == ["encoder"]
    assert main(["info", str(out)]) == 0
    assert "FAIL encoder" in capsys.readouterr().out


def test_the_default_exit_status_in_a_real_process(bundle, tmp_path):
    out = tmp_path / "q"
    r = subprocess.run([sys.executable, "-m", "omnilite", "quantize", str(bundle), str(out), "--preset", "small",
                        "--tolerance", "encoder.cosine_mean=0.999999", "--report-tokens", str(TOKENS)],
                       capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert "error: quantized stage encoder misses its tolerance (encoder cosine_mean=0.99" in r.stderr
    assert ", limit >= 0.999999); no bundle was written" in r.stderr and "Traceback" not in r.stderr and not out.exists()
    bad = subprocess.run([sys.executable, "-m", "omnilite", "quantize", str(bundle), str(out), "--tolerance", "encoder.snr=3"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "must be ROLE.METRIC=NUMBER" in bad.stderr


def test_info_prints_the_quantization_report(quantized, capsys):
    assert main(["info", str(quantized["small"])]) == 0
    out = capsys.readouterr().out
    assert "quantization: preset small" in out and "accuracy against" in out
    for role in ("encoder", "llm", "decoder", "vocoder"):
        assert f" {role} " in out
    assert "int4" in out and "% of" in out
    # The LLM's label says what llama.cpp wrote: no tensor of the tiny model is wide enough for Q4_K.
    assert re.search(r"\n +Q4_K_M \(no tensor got Q4_K: rows too narrow, kept as [A-Z0-9_/]+\); tensors written: "
                     r"\d+ F32, \d+ Q5_0, \d+ Q8_0\n", out), out


def test_quantizing_a_quantized_bundle_is_refused(quantized, bundle, tmp_path, capsys):
    assert main(["quantize", str(quantized["balanced"]), str(tmp_path / "again"), "--preset", "small"]) == 2
    line = _error_line(capsys)
    assert "is already quantized (preset balanced" in line and f"quantize its unquantized source {Path(bundle).resolve()}" in line
    assert not (tmp_path / "again").exists()
    # The same OUT twice: refused without --force.
    assert main(["quantize", str(bundle), str(quantized["balanced"]), "--preset", "balanced"]) == 2
    assert "already exists and is not empty" in _error_line(capsys)


def test_requantization_when_allowed_is_measured_against_the_unquantized_bundle(quantized, bundle, tmp_path, capsys):
    src = quantized["balanced"]
    # Going up in precision, or requantizing an ONNX graph, stays refused.
    assert main(["quantize", str(src), str(tmp_path / "up"), "--preset", "fp32", "--allow-requantize"]) == 2
    assert "cannot restore the lost precision" in _error_line(capsys)
    assert main(["quantize", str(src), str(tmp_path / "i4"), "--preset", "small", "--allow-requantize"]) == 2
    assert "onnxruntime's quantizers need the float32 graph" in _error_line(capsys)
    # Q8_0 -> Q4_K_M through llama.cpp, other stages kept: documented requantization.
    out = tmp_path / "rq"
    assert main(["quantize", str(src), str(out), "--preset", "balanced", "--llm", "Q4_K_M", "--allow-requantize",
                 "--report-tokens", str(TOKENS)]) == 0
    m = json.loads((out / MANIFEST).read_text())
    q = m["quantization"]
    assert q["requantized"] is True and q["stages"]["llm"]["source_precision"] == "Q8_0"
    assert q["accuracy"]["reference"]["path"] == str(load_bundle(bundle).path)  # total error vs fp32
    assert q["accuracy"]["stages"]["llm"]["precision"] == "Q4_K_M" and not q["accuracy"]["stages"]["llm"]["identical_file"]


def test_export_with_a_preset(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "small"
    assert main(["export", str(tiny_checkpoint), str(out), "--preset", "small", "--no-parity",
                 "--decoder-precision", "int8", "--report-tokens", str(TOKENS)]) == 0
    m = json.loads((out / MANIFEST).read_text())
    precisions = {s["name"]: s["precision"] for s in m["stages"]}
    assert precisions["encoder"] == "int4" and precisions["speech_generator"] == "int8" and precisions["llm"] == "Q4_K_M"
    # The f32 export ran the LLM without flash attention; its Q4_K_M copy keeps llama.cpp's choice
    # (benchmarks/results/flash_attn.md: same KL, faster prefill).
    assert next(s for s in m["stages"] if s["name"] == "llm")["flash_attn"] == "auto"
    assert m["quantization"]["source"]["path"] is None and "not kept" in m["quantization"]["source"]["note"]
    assert m["quantization"]["accuracy"]["stages"]["encoder"]["metrics"]["cosine_min"] > 0.9
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small"]  # the unquantized export is gone
    assert "wrote bundle" in capsys.readouterr().out
    # A stage over its tolerance: status 2, and neither the bundle nor the unquantized export is left.
    failing = tmp_path / "failing"
    assert main(["export", str(tiny_checkpoint), str(failing), "--preset", "small", "--no-parity",
                 "--tolerance", "encoder.cosine_mean=0.999999", "--report-tokens", str(TOKENS)]) == 2
    assert _error_line(capsys).startswith("error: quantized stage encoder misses its tolerance (encoder cosine_mean=")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small"]


def test_onnx_quantizer_refuses_an_already_quantized_graph(quantized, tmp_path):
    with pytest.raises(OmniliteError, match="already reduced-precision"):
        quantize_onnx(quantized["balanced"] / "encoder.onnx", tmp_path / "x.onnx", OnnxQuantConfig("int4"))


def test_metric_helpers():
    assert sequence_agreement([1, 2, 3], [1, 2, 3]) == 1.0 and sequence_agreement([], []) == 1.0
    assert sequence_agreement([1, 2, 3, 4], [1, 3, 4]) == 0.75
    logits = np.random.default_rng(0).standard_normal((3, 50))
    assert np.allclose(kl_divergence(logits, logits), 0) and (kl_divergence(logits, logits[:, ::-1]) > 0).all()
    noise = np.random.default_rng(1).standard_normal(16000)
    assert log_mel_distance_db(noise, noise) == 0.0
    assert log_mel_distance_db(noise, 0.5 * noise) == pytest.approx(20 * np.log10(2), rel=0.01)  # -6 dB in every bin


def test_quant_package_does_not_import_torch():
    code = "import sys, omnilite.quant, omnilite.quant.bundle_quant; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
