"""`omnilite tune`: candidates judged by the accuracy report, timed on this host, the fastest accepted
ones written as a verified bundle whose "tuning" section the CLI applies on the same host only."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest

from omnilite.cli import _pipeline_config, build_parser, main
from omnilite.devices.host import detect_host
from omnilite.devices.tune import THREAD_STAGE, TuneConfig, host_fingerprint, tune_bundle, tuned_settings
from omnilite.runtime.bundle import load_bundle
from omnilite.runtime.errors import BundleError

QUESTION = Path(__file__).parents[1] / "omnilite" / "data" / "question.wav"
TIE = TuneConfig().tie


@pytest.fixture(scope="module")
def tuned(bundle, tmp_path_factory):
    """The tiny LLaMA-Omni bundle tuned through the CLI, with an encoder tolerance no reduced
    precision can meet (cosine above 1): int8 and int4 must be rejected with their metric; and an
    LLM bound of Q8_0's 0.02 for every LLM type, which Q8_0 meets (tiny: KL 0.002) and IQ4_NL misses
    (0.17), so a GGUF candidate is rejected too."""
    out = tmp_path_factory.mktemp("tune") / "tuned"
    rc = main(["-q", "tune", str(bundle), str(out), "--rounds", "2", "--try-threads", "1,2", "--mode-rounds", "1",
               "--only", "encoder=fp32,int8,int4", "--only", "llm=F32,Q8_0,IQ4_NL", "--only", "decoder=fp32,int8",
               "--only", "vocoder=fp32,fp16", "--tolerance", "encoder.cosine_mean=1.1", "--tolerance", "llm.mean_kl=0.02",
               "--report-tokens", "8", "--decode-tokens", "8"])
    assert rc == 0
    return out


def _rows(manifest: dict, role: str) -> list[dict]:
    return [c for c in manifest["tuning"]["candidates"] if c["role"] == role]


def _check_choice(section: dict) -> None:
    """Each chosen stage is, by the recorded table, the accepted candidate with the lowest
    first-audio time, or one tied with it (within the tie margin) with the lowest steady cost."""
    for role, chosen in section["chosen"].items():
        ok = [c for c in section["candidates"] if c["role"] == role and c["accepted"]]
        assert ok, role
        best = min(c["first_s"] for c in ok)
        tied = [c for c in ok if c["first_s"] <= best * (1 + TIE)]
        winner = min(tied, key=lambda c: (c["steady_s"], c["first_s"]))
        assert (chosen["precision"], chosen["flash_attn"]) == (winner["precision"], winner["flash_attn"]), role
        assert chosen["first_s"] == winner["first_s"]


def test_tuned_bundle_is_verified_and_holds_the_winners(tuned):
    b = load_bundle(tuned, verify=True)  # every stage file matches its recorded sha256
    section = b.manifest["tuning"]
    assert section["host"] == host_fingerprint(detect_host())
    assert "features" in section["cpu"]
    assert {"onnxruntime", "llama_cpp_python", "numpy"} <= set(section["versions"])
    stages = {"encoder": "encoder", "llm": "llm", "decoder": "speech_generator", "vocoder": "vocoder"}
    for role, chosen in section["chosen"].items():
        assert b.stages[stages[role]].precision.lower() == chosen["precision"].lower(), role
    assert b.stages["llm"].flash_attn == section["chosen"]["llm"]["flash_attn"]
    assert (tuned / "tune.json").is_file() and (tuned / "tune.md").is_file()
    report = json.loads((tuned / "tune.json").read_text())
    assert report["chosen"] == section["chosen"]
    _check_choice(section)


def test_timings_cover_every_accepted_candidate_and_thread_count(tuned):
    section = load_bundle(tuned, verify=False).manifest["tuning"]
    assert section["config"]["rounds"] == 2
    for c in section["candidates"]:
        if c["accepted"]:
            assert set(c["times"]) == {"1", "2"}, c
            assert c["first_s"] > 0 and c["steady_s"] > 0
        else:
            assert c["times"] == {} and c["first_s"] is None  # rejected: not timed
    llm = _rows(load_bundle(tuned, verify=False).manifest, "llm")
    assert {(c["precision"].upper(), c["flash_attn"]) for c in llm} == {
        ("F32", "off"), ("Q8_0", "on"), ("Q8_0", "off"), ("IQ4_NL", "on"), ("IQ4_NL", "off")}
    llm = [c for c in llm if c["accepted"]]  # IQ4_NL is rejected (see below): not timed
    assert {c["precision"].upper() for c in llm} == {"F32", "Q8_0"}
    for c in llm:  # prefill of the turn's positions and per-token decode, per thread count
        assert c["times"]["2"]["positions"] > 0
        assert c["first_s"] >= c["times"]["2"]["prefill_s"]
    assert set(section["stage_threads"]) == {THREAD_STAGE[r] for r in section["chosen"]}
    assert section["mode"] in ("overlapped", "sequential")
    assert set(section["mode_first_audio_s"]) == {"overlapped", "sequential"}


def test_candidate_outside_tolerance_is_rejected_with_its_metric(tuned):
    manifest = load_bundle(tuned, verify=False).manifest
    encoder = {c["precision"]: c for c in _rows(manifest, "encoder")}
    assert encoder["fp32"]["accepted"] and encoder["fp32"]["source"]
    for p in ("int8", "int4"):
        c = encoder[p]
        assert c["accepted"] is False
        assert "cosine_mean=" in c["rejected_because"] and "misses >= 1.1" in c["rejected_because"]
        assert c["metrics"]["cosine_mean"] < 1.1
    assert manifest["tuning"]["chosen"]["encoder"]["precision"] == "fp32"
    assert "| encoder | int4 |" in (tuned / "tune.md").read_text()
    for c in _rows(manifest, "llm"):
        if c["precision"] == "IQ4_NL":  # inside its own bound (0.6), outside the one asked for here
            assert c["accepted"] is False and c["tolerance"] == {"mean_kl<=": 0.02}
            assert c["rejected_because"].startswith("mean_kl=") and "misses <= 0.02" in c["rejected_because"]
            assert 0.02 < c["metrics"]["mean_kl"] <= 0.6
        else:
            assert c["accepted"], c
    assert manifest["tuning"]["chosen"]["llm"]["precision"].upper() in ("F32", "Q8_0")


def _run_args(bundle: Path, *extra: str):
    return build_parser().parse_args(["run", str(bundle), "-i", str(QUESTION), "-o", "reply.wav", *extra])


def test_run_uses_the_recorded_threads_and_mode(tuned):
    section = load_bundle(tuned, verify=False).manifest["tuning"]
    config = _pipeline_config(_run_args(tuned), tuned)
    for stage, n in section["stage_threads"].items():
        assert config.stage_threads[stage] == n
    assert config.mode == section["mode"]
    explicit = _pipeline_config(_run_args(tuned, "-t", "1"), tuned)  # an explicit flag still wins
    assert explicit.threads == 1 and explicit.stage_threads == {}


def test_another_host_gets_a_warning_and_the_profile(tuned, monkeypatch, caplog):
    import omnilite.devices.host as host_module
    from omnilite.devices.profiles import pipeline_settings, select_profile

    other = dataclasses.replace(detect_host(), cpu_model="Some Other CPU", logical_cores=64, physical_cores=32)
    monkeypatch.setattr(host_module, "detect_host", lambda *a, **k: other)
    with caplog.at_level(logging.WARNING, logger="omnilite.cli"):
        config = _pipeline_config(_run_args(tuned), tuned)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "tuned on another host" in warnings[0] and "omnilite tune" in warnings[0]
    profile, _ = select_profile(other)
    assert config.stage_threads == pipeline_settings(profile, other, "llama-omni")["stage_threads"]
    assert config.mode == "overlapped"


def test_damaged_tuning_section_is_one_sentence():
    with pytest.raises(BundleError, match=r"damaged 'tuning' section.*run `omnilite tune` again"):
        tuned_settings({"tuning": {"host": 3}}, detect_host())
    assert tuned_settings({}, detect_host()) is None


def test_bad_input_is_one_sentence_and_exit_2(tuned, bundle, tmp_path, capsys):
    assert main(["tune", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "is not a directory" in err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    assert main(["tune", str(bundle), str(busy)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "already exists and is not empty" in err and "--force" in err
    assert (busy / "keep.txt").read_text() == "x"
    assert main(["tune", str(bundle), str(tmp_path / "o"), "--only", "tts=Q8_0"]) == 2  # not a LLaMA-Omni role
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "stage roles" in err


def test_a_graph_the_cpu_provider_cannot_open_is_rejected(bundle, tmp_path, monkeypatch):
    """fp16 is a candidate only where onnxruntime's CPU path runs it: a graph it cannot open is
    rejected (with the reason) before any accuracy report or timing."""
    import omnilite.devices.tune as tune
    import omnilite.runtime.onnx_session as onnx_session

    src = load_bundle(bundle)
    cands = tune._expand({"encoder": ["fp32", "fp16"]})
    materials = tune._materials(src, cands, tmp_path, TuneConfig())
    real = onnx_session.open_session

    def no_fp16_kernels(path, options=onnx_session.SessionOptions()):
        if Path(path).parent == materials[("encoder", "fp16")]:
            raise BundleError(f"{path} cannot be loaded by onnxruntime (NotImplemented); re-export the bundle.")
        return real(path, options)

    monkeypatch.setattr(onnx_session, "open_session", no_fp16_kernels)
    tune._probe_onnx(src, cands, materials)
    fp16 = next(c for c in cands if c.precision == "fp16")
    assert fp16.accepted is False and fp16.reason == "onnxruntime's CPU provider cannot run the fp16 encoder graph"
    assert tune._groups(cands) == []  # neither measured nor timed


def test_a_failed_tune_leaves_nothing_behind(bundle, tmp_path, monkeypatch):
    import omnilite.devices.tune as tune

    def fault(*args, **kwargs):
        raise RuntimeError("injected fault while comparing modes")

    monkeypatch.setattr(tune, "_compare_modes", fault)
    only_sources = {"encoder": ("fp32",), "llm": ("F32",), "decoder": ("fp32",), "vocoder": ("fp32",)}
    with pytest.raises(RuntimeError, match="injected fault"):
        tune_bundle(bundle, tmp_path / "out", TuneConfig(rounds=1, threads=(1,), precisions=only_sources, decode_tokens=4))
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no OUT, no .out.partial, no work dir, no lock


def test_omni2_tune_shares_the_vocoder_threads(omni2_bundle, tmp_path):
    config = TuneConfig(rounds=1, threads=(1, 2), mode_rounds=1, report_tokens=8, decode_tokens=8,
                        precisions={"encoder": ("fp32",), "llm": ("F32",), "tts": ("F32",),
                                    "flow": ("fp32", "int8"), "vocoder": ("fp32",)},
                        report=tmp_path / "report")
    result = tune_bundle(omni2_bundle, tmp_path / "tuned", config)
    b = load_bundle(result.path, verify=True)
    section = b.manifest["tuning"]
    _check_choice(section)
    assert b.stages["tts_lm"].precision.lower() == section["chosen"]["tts"]["precision"].lower()
    assert b.stages["flow_estimator"].precision == section["chosen"]["flow"]["precision"]
    # flow and HiFT both run as the pipeline's "vocoder" stage: one thread count for both
    assert section["chosen"]["flow"]["threads"] == section["chosen"]["vocoder"]["threads"] == section["stage_threads"]["vocoder"]
    assert result.report_files == (tmp_path / "report" / "tune.json", tmp_path / "report" / "tune.md")
    assert not (result.path / "tune.json").exists()
    tts = [c for c in section["candidates"] if c["role"] == "tts"]
    assert all(c["accepted"] for c in tts) and all(c["times"]["1"]["tokens"] > 0 for c in tts)
    # --only named no BF16: a note says why it was not tried only where the CPU lacks native bf16.
    assert any("BF16" in n for n in section["notes"]) is (not detect_host().native_bf16)
    assert not any("offers no BF16" in n for n in section["notes"])


def _host(features: set[str]):
    from omnilite.devices.host import HostInfo

    return HostInfo("linux", "x86_64", "test CPU", "test", 2, 2, frozenset({"avx2", "fma", *features}), 8 << 30,
                    ("CPUExecutionProvider",))


def test_gguf_candidates_include_bf16_only_with_native_bf16(bundle):
    """Default GGUF candidates: BF16 only where the CPU computes bf16 natively (the notes say which
    applies), IQ4_NL never (4x Q4_K_M's KL on trained weights); `--only` can ask for either."""
    from omnilite.devices.tune import _candidate_precisions

    src = load_bundle(bundle, verify=False)
    have = src.stages["llm"].precision  # the source's own file comes first
    native, notes = _candidate_precisions(src, TuneConfig(), _host({"avx512f", "avx512_bf16"}))
    assert native["llm"] == [have, "F16", "BF16", "Q8_0", "Q6_K", "Q4_K_M"]
    assert [n for n in notes if "BF16" in n] == ["GGUF BF16: tried for llm; this CPU has native bf16 (avx512_bf16)"]
    emulated, notes = _candidate_precisions(src, TuneConfig(), _host({"avx512f"}))
    assert emulated["llm"] == [have, "F16", "Q8_0", "Q6_K", "Q4_K_M"]
    assert [n for n in notes if "BF16" in n] == [
        "GGUF BF16: not tried; this CPU has no native bf16 (lacks avx512_bf16 and amx_bf16), so llama.cpp would "
        "emulate bf16 through f32 conversions; `--only llm=BF16` times it anyway"]
    asked, notes = _candidate_precisions(src, TuneConfig(precisions={"llm": ("BF16", "IQ4_NL")}), _host(set()))
    assert asked["llm"] == [have, "BF16", "IQ4_NL"]
    assert [n for n in notes if "BF16" in n] == [
        "GGUF BF16: tried for llm (named by --only for llm); this CPU has no native bf16 (lacks avx512_bf16 and amx_bf16)"]
