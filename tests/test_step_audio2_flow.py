"""Step-Audio 2 token2wav flow + HiFT on the tiny checkpoint: flow.yaml/flow.pt in the released layout,
the PyTorch reference's streaming against its whole-utterance form, the ONNX stages (through the
torch-free runtime driver) against the reference, injected faults the thresholds must catch, and
refusals of a broken flow.yaml / flow.pt."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from omnilite.export.step_audio2.checkpoint import open_step_audio2
from omnilite.export.step_audio2.flow_checkpoint import expected_flow_shapes, load_flow, load_hift, read_flow_config
from omnilite.export.step_audio2.flow_reference import StepFlowConfig, stream_schedule
from omnilite.export.step_audio2.flow_stage import THRESHOLDS, export_flow, flow_parity, hift_parity, parity_case
from omnilite.export.step_audio2.tiny import SHAPES, make_tiny_step_audio2
from omnilite.runtime.errors import CheckpointError
from omnilite.runtime.metrics import snr_db
from omnilite.runtime.step_audio2.flow import StepAudio2FlowRuntime
from omnilite.runtime.step_audio2.vocoder import Token2Wav


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_step_audio2(tmp_path_factory.mktemp("sa2f") / "Step-Audio-2-mini", seed=0)


@pytest.fixture(scope="module")
def models(tiny):
    return load_flow(tiny / "token2wav"), load_hift(tiny / "token2wav")


@pytest.fixture(scope="module")
def stages(tiny, models) -> Path:
    out = tiny.parent / "flow_stages"
    out.mkdir()
    export_flow(*models, out)
    return out


@pytest.fixture(scope="module")
def parity(models, stages) -> dict:
    return flow_parity(models[0], stages)


@pytest.fixture
def damaged(tiny, tmp_path) -> Path:
    return Path(shutil.copytree(tiny, tmp_path / "Step-Audio-2-mini"))


# --- layout --------------------------------------------------------------------------------------

def test_flow_yaml_and_pt_have_the_released_layout(tiny):
    t2w = tiny / "token2wav"
    text = (t2w / "flow.yaml").read_text()
    for tag in ("!new:cosyvoice2.flow.flow.CausalMaskedDiffWithXvec", "!new:cosyvoice2.transformer.upsample_encoder_v2."
                "UpsampleConformerEncoderV2", "!new:cosyvoice2.flow.flow_matching.CausalConditionalCFM",
                "!new:cosyvoice2.flow.decoder_dit.DiT"):
        assert tag in text
    assert read_flow_config(t2w / "flow.yaml") == SHAPES["tiny"].flow
    state = torch.load(t2w / "flow.pt", weights_only=True)
    assert {k: tuple(v.shape) for k, v in state.items()} == expected_flow_shapes(SHAPES["tiny"].flow)
    assert all(v.dtype == torch.float32 for v in state.values())
    assert open_step_audio2(tiny).flow_config == SHAPES["tiny"].flow


def test_real_flow_shapes_add_up_to_the_released_flow_pt():
    # The release's token2wav/flow.pt is 623 MB of fp32: the real shape's tensors hold 155,802,352 values.
    shapes = expected_flow_shapes(StepFlowConfig())
    assert sum(math.prod(s) for s in shapes.values()) == 155_802_352
    assert shapes["decoder.estimator.blocks.15.adaLN_modulation.1.weight"] == (9 * 512, 512)
    assert shapes["decoder.estimator.blocks.0.attn.k_norm.weight"] == (64,)
    assert shapes["encoder.up_encoders.3.self_attn.pos_bias_u"] == (8, 64)


# --- reference: streaming --------------------------------------------------------------------------

def test_stream_schedule_is_25_plus_3_lookahead():
    assert stream_schedule(63) == [(0, 28, False), (25, 53, False), (50, 63, True)]
    assert stream_schedule(52) == [(0, 28, False), (25, 52, True)]
    assert stream_schedule(10) == [(0, 10, True)]


def test_streamed_equals_the_whole_pass_masked_like_the_stream(models):
    # The caches (encoder conv/attention, estimator conv/attention per Euler step, noise offset) must
    # reproduce a whole pass that sees exactly what each streaming window sees.
    flow, c = models[0], parity_case()
    masked = flow.inference(c["tokens"], c["prompt_tokens"], c["prompt_mel"], c["xvector"], masked_like_stream=True)
    streamed = flow.stream(c["tokens"], c["prompt_tokens"], c["prompt_mel"], c["xvector"], lookahead=c["tokens"][:, :3])
    assert streamed.shape == masked.shape == (1, 80, 126)
    assert float((streamed - masked).abs().max()) <= 1e-4


def test_streamed_is_close_to_the_whole_utterance(parity):
    p = parity["flow_stream_vs_whole"]
    assert p["ok"] and p["snr_db"] >= THRESHOLDS["stream_vs_whole_snr_db"]
    assert p["prompt_lookahead_snr_db"] < p["snr_db"]  # the prompt's own tokens as lookahead drift more


# --- ONNX vs reference -----------------------------------------------------------------------------

def test_flow_onnx_matches_the_reference_whole_and_streamed(parity):
    for k in ("flow_whole", "flow_stream"):
        assert parity[k]["ok"] and parity[k]["max_abs_error"] <= THRESHOLDS["flow_max_abs"]
    assert parity["flow_whole"]["mel_frames"] == 126 and parity["flow_stream"]["windows"] == 3


def test_hift_onnx_matches_the_reference(models, stages):
    flow, hift = models
    c = parity_case()
    mel = flow.inference(c["tokens"], c["prompt_tokens"], c["prompt_mel"], c["xvector"])[0].numpy()
    h = hift_parity(hift, stages, mel)["hift"]
    assert h["ok"] and h["snr_db"] >= THRESHOLDS["hift_snr_db"]


# --- injected faults -------------------------------------------------------------------------------

def test_a_cache_off_by_one_fails_the_stream_check(models, stages, monkeypatch):
    # Fault: the runtime drops the oldest frame of the encoder's first attention cache before each window.
    real = StepAudio2FlowRuntime.mu

    def shifted(self, tokens, last, state):
        state.att1 = state.att1[:, :, :, 1:]
        return real(self, tokens, last, state)

    monkeypatch.setattr(StepAudio2FlowRuntime, "mu", shifted)
    p = flow_parity(models[0], stages)
    assert not p["flow_stream"]["ok"] and p["flow_stream"]["max_abs_error"] > THRESHOLDS["flow_max_abs"]


def test_a_transposed_weight_fails_the_whole_check(tiny, models, tmp_path):
    # Fault: one DiT attention projection exported transposed.
    flow, hift = load_flow(tiny / "token2wav"), models[1]
    w = flow.decoder.estimator.blocks[0].attn.to_q.weight
    w.data = w.data.t().contiguous()
    export_flow(flow, hift, tmp_path)
    p = flow_parity(models[0], tmp_path)
    assert not p["flow_whole"]["ok"] and p["flow_whole"]["max_abs_error"] > THRESHOLDS["flow_max_abs"]


# --- refusals --------------------------------------------------------------------------------------

def _refusal(root: Path) -> str:
    with pytest.raises(CheckpointError) as e:
        open_step_audio2(root)
    return str(e.value)


def test_missing_or_misshaped_flow_tensors_are_refused_naming_tensor_and_file(damaged):
    path = damaged / "token2wav" / "flow.pt"
    state = torch.load(path, weights_only=True)
    name = "decoder.estimator.blocks.1.attn.to_k.weight"
    state[name] = state[name][:, :32].clone()
    torch.save(state, path)
    assert _refusal(damaged) == (f"{path}: tensor '{name}' has shape (64, 32), expected (64, 64) from flow.yaml; flow.pt and "
                                 "flow.yaml do not belong together.")
    del state[name]
    torch.save(state, path)
    assert _refusal(damaged) == (f"{path} is missing tensor '{name}' (expected shape (64, 64)); the file is incomplete or "
                                 "not the Step-Audio 2 flow, download it again.")


def test_missing_or_foreign_flow_yaml_is_refused(damaged):
    path = damaged / "token2wav" / "flow.yaml"
    text = path.read_text()
    path.write_text(text.replace("cosyvoice2.flow.decoder_dit.DiT", "cosyvoice.flow.decoder.ConditionalDecoder"))
    assert _refusal(damaged) == (f"{path}: 'flow.decoder.estimator' is not a DiT; download token2wav/flow.yaml again from "
                                 "the Step-Audio-2-mini release.")
    path.write_text(text.replace("in_channels: 320", "in_channels: 240"))
    assert _refusal(damaged) == (f"{path}: estimator in_channels is not 4 x output_size (x, mu, spks, cond), which the "
                                 "official flow cannot be built with; download token2wav/flow.yaml again from the "
                                 "Step-Audio-2-mini release.")
    path.unlink()
    assert _refusal(damaged) == f"{path} is missing; download the token2wav/ folder of the Step-Audio-2-mini release."


def test_runtime_flow_imports_no_torch():
    code = "import sys, omnilite.runtime.step_audio2.vocoder; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], cwd="/tmp").returncode == 0


def test_runtime_token2wav_streams_what_the_reference_vocodes(models, stages):
    # Stretch: flow windows + HiFT stream through ONNX Runtime only, against HiFT (torch STFTs) of the
    # reference's streamed mel with the same deterministic source.
    flow, hift = models
    c = parity_case()
    t2w = Token2Wav(stages)
    chunks = list(t2w.stream(c["tokens"][0].numpy(), c["prompt_tokens"][0].numpy(), c["prompt_mel"][0].numpy(),
                             c["xvector"].numpy()))
    audio = np.concatenate(chunks)
    mel = flow.stream(c["tokens"], c["prompt_tokens"], c["prompt_mel"], c["xvector"], lookahead=c["tokens"][:, :3])
    with torch.no_grad():
        ref, _ = hift.inference(mel)
    assert len(chunks) == 4 and audio.shape == ref[0].shape == (126 * 480,)
    assert snr_db(ref[0].numpy(), audio) >= THRESHOLDS["hift_snr_db"]
    assert sum(len(x) for x in chunks[:2]) > 0  # audio comes out before the last window
