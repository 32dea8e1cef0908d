"""The work accounting behind `omnilite bench --estimate`: FLOPs from ONNX Runtime's profile agree
with PyTorch's own FLOP counter on the same modules, and the roofline arithmetic is what it says."""

import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from omnilite.benchmarks.cost import (EFFICIENCY, Figures, Work, describe_speed, estimate, host_speed, llm_work,
                                      measure_work, node_flops, share_before_first_audio, stage_seconds)
from omnilite.cli import main
from omnilite.export.unit_vocoder import FrameVocoder
from omnilite.runtime import PipelineConfig
from omnilite.runtime.audio import read_wav

from conftest import QUESTION


def test_node_flops_of_matmul_conv_and_transposed_conv():
    assert node_flops("MatMul", [[1, 7, 64], [64, 32]], [[1, 7, 32]]) == 2 * 7 * 64 * 32
    assert node_flops("MatMulNBits", [[1, 7, 64], [32, 2, 16]], [[1, 7, 32]]) == 2 * 7 * 64 * 32
    # Conv1d: 8 -> 16 channels, kernel 3, 100 output steps.
    assert node_flops("Conv", [[1, 8, 102], [16, 8, 3]], [[1, 16, 100]]) == 2 * 16 * 100 * 8 * 3
    # ConvTranspose1d: 16 -> 8 channels, kernel 4, stride 2, 50 input steps: each input scatters 8 x 4.
    assert node_flops("ConvTranspose", [[1, 16, 50], [16, 8, 4]], [[1, 8, 100]]) == 2 * 16 * 50 * 8 * 4
    assert node_flops("Add", [[1, 8], [1, 8]], [[1, 8]]) == 0
    # ONNX Runtime pre-packs some weights and then leaves their shapes out of the profile (LLaMA-Omni2's
    # HiFT ConvTranspose): the cost comes from the input channels and the output (kernel = 2 x stride).
    assert node_flops("ConvTranspose", [[1, 16, 50]], [[1, 8, 100]]) == 2 * 8 * 100 * 16 * 2 == 2 * 16 * 50 * 8 * 4
    assert node_flops("Conv", [[1, 8, 102]], [[1, 16, 100]]) == 2 * 16 * 100 * 8


def test_llm_work_counts_body_head_and_kv():
    shape = {"n_params": 1000 + 2 * 50 * 8, "size_bytes": 4 * (1000 + 2 * 50 * 8), "n_layer": 2, "n_head": 2,
             "n_head_kv": 1, "n_embd": 8, "n_vocab": 50}
    w = llm_work(shape, "f32", prompt_tokens=10, decode_calls=4, context_after_prompt=10, kv_bytes_per_value=4)
    body, head = 1000, 400
    assert w["llm_prefill"].flops_fp32 == 2 * body * 10 + 2 * head + 4 * 2 * 8 * 100 / 2
    assert w["llm_decode"].flops_fp32 == 4 * (2 * (body + head) + 4 * 2 * 8 * 12)
    kv_per_pos = 2 * 2 * 1 * 4 * 4
    assert w["llm_decode"].bytes == pytest.approx(4 * (4 * (body + head) + kv_per_pos * 12))
    assert w["llm_decode"].flops_int8 == 0 and llm_work(shape, "Q4_K_M", 10, 4, 10, 2)["llm_decode"].flops_fp32 == 0


def test_roofline_takes_the_slower_of_compute_and_memory():
    f = Figures(fp32_gflops=100, int8_gops=400, bandwidth_gbps=10, source="test")
    compute_bound = Work(flops_fp32=60e9, bytes=1e9)
    assert stage_seconds(compute_bound, f) == pytest.approx(60e9 / (100e9 * EFFICIENCY["fp32"]))
    memory_bound = Work(flops_int8=1e9, bytes=7.5e9, calls=3)
    assert stage_seconds(memory_bound, f) == pytest.approx(1.0 + 3 * 3e-4)


@pytest.fixture(scope="module")
def measured(bundle):
    audio, rate = read_wav(QUESTION)
    return measure_work(bundle, PipelineConfig(max_new_tokens=20, ignore_eos=True, encoder_mode="exact"), audio, rate)


def test_profiled_onnx_flops_match_torch_flop_counter(measured, reference):
    work, done = measured
    # Encoder: one call on the 30 s (3000-frame) window.
    mel = torch.zeros(1, reference.n_mels, 3000)
    # The math attention path: torch's counter has no formula for the fused CPU attention kernel.
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        reference.encoder(mel)
    assert work["encoder"].calls == 1
    assert work["encoder"].flops_fp32 == pytest.approx(counter.get_total_flops(), rel=0.02)
    # Vocoder: its calls saw every frame of the reply once plus the ring's left context, so the
    # profiled FLOPs are at least those of one offline pass, and not several times more.
    units = torch.tensor([done.units])
    with torch.no_grad():
        frames = torch.repeat_interleave(units, reference.vocoder.durations(units).view(-1), dim=1)
        with FlopCounterMode(display=False) as counter:
            FrameVocoder(reference.vocoder)(frames)
    offline = counter.get_total_flops()
    assert offline <= work["vocoder"].flops_fp32 <= 3 * offline
    for stage in ("speech_generator", "vocoder"):
        assert work[stage].flops_fp32 > 0 and work[stage].bytes > 0 and work[stage].calls >= 1


def test_share_before_first_audio_and_estimate(measured):
    work, done = measured
    share = share_before_first_audio(done)
    assert share["encoder"] == 1.0 and 0 < share["llm_decode"] < 1.0
    est = estimate(work, Figures(100, 400, 20, "test"), share, {"mel": 10.0}, scale=2.0)
    assert est["stages_ms"]["mel"] == 20.0
    assert est["ttfa_ms"] == pytest.approx(sum(ms * share.get(s, 0) for s, ms in est["stages_ms"].items()))
    assert est["ttfa_ms"] < sum(est["stages_ms"].values())


def test_bench_estimate_reports_profiles_and_its_error_here(bundle, tmp_path):
    out = tmp_path / "bench"
    assert main(["bench", str(bundle), "--runs", "2", "--max-new-tokens", "16", "--out-dir", str(out),
                 "--estimate", "raspberry-pi-5", "--estimate", "jetson-orin-nano-8gb"]) == 0
    e = json.loads((out / "bench.json").read_text())["estimates"]
    assert set(e["profiles"]) == {"raspberry-pi-5", "jetson-orin-nano-8gb"}
    check = e["check_on_this_host"]
    assert check["ttfa_error"] == pytest.approx(check["ttfa_ms"] / check["measured_ttfa_ms"] - 1)
    assert check["figures"]["fp32_gflops"] > 0 and check["figures"]["bandwidth_gbps"] > 0
    assert "Estimates (roofline over the measured work; not measurements)" in (out / "bench.md").read_text()


def test_llama_omni2_work_counts_the_flow_and_hift(omni2_bundle, question_16k):
    """LLaMA-Omni2's HiFT has transposed convolutions whose weights ONNX Runtime pre-packs (their
    shapes are missing from the profile); the vocoder's work must still be counted, not crash."""
    from omnilite.runtime.omni2.pipeline import Omni2PipelineConfig

    work, done = measure_work(omni2_bundle, Omni2PipelineConfig(max_new_tokens=6, ignore_eos=True, max_tts_tokens=30),
                              question_16k, 16000)
    assert len(done.audio) > 0
    assert work["vocoder"].flops_fp32 > 0 and work["vocoder"].nodes > 0 and work["speech_generator"].calls > 0


def test_host_speed_is_recorded_and_rendered_from_the_record():
    """Latency reports carry the instance's speed next to the CPU kind (one kind ran 2x apart on two
    machines); the line is rendered from the stored record, so a report re-rendered from JSON says the same."""
    speed = host_speed(seconds=0.1)
    assert set(speed) == {"fp32_gemm_gflops", "copy_gbps"} and all(v > 0 for v in speed.values())
    assert json.loads(json.dumps(speed)) == speed
    assert describe_speed({"fp32_gemm_gflops": 162.4, "copy_gbps": 21.66}) == \
        "fp32 GEMM 162 GFLOP/s, copy 21.7 GB/s (numpy, every core)"
    assert describe_speed(None) == "not measured"  # reports written before the field existed
