"""Fun-Audio-Chat's vocoder (CosyVoice3 flow + causal HiFT): the tiny release's vocoder dir, the
loader's refusals, the reference against the official maths, and the exported stages' parity,
whole and streamed."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from omnilite.export.fun_audio_chat.checkpoint import open_cosyvoice3, vocoder_configs
from omnilite.export.fun_audio_chat.config import SHAPES, VOCODER_DIR
from omnilite.export.fun_audio_chat.tiny import make_tiny_fun_audio_chat, vocoder_shape_configs
from omnilite.export.fun_audio_chat.vocoder_reference import CausalHiFT, CausalMaskedDiffWithDiT, token2wav, token2wav_stream
from omnilite.export.fun_audio_chat.vocoder_stage import export_vocoder, parity_tokens
from omnilite.export.omni2.cosy_yaml import load_cosyvoice_yaml
from omnilite.runtime.errors import CheckpointError, OmniliteError
from omnilite.runtime.fun_audio_chat.vocoder import OnnxVocoder
from omnilite.runtime.metrics import snr_db


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("facv") / "pretrained_models"
    make_tiny_fun_audio_chat(root)
    return root


@pytest.fixture(scope="module")
def ckpt(root):
    return open_cosyvoice3(root)


@pytest.fixture(scope="module")
def models(ckpt):
    return ckpt.flow(), ckpt.hift(), ckpt.speaker_embedding()


@pytest.fixture(scope="module")
def exported(root, tmp_path_factory):
    out = tmp_path_factory.mktemp("facv-out") / "vocoder"
    report = export_vocoder(root, out, strict=False)  # each threshold is asserted by a test below
    return out, report


def _official_flow_names(depth: int) -> set[str]:
    """flow.pt keys written down from cosyvoice/flow/flow.py (CausalMaskedDiffWithDiT), upsample_encoder.py
    (PreLookaheadLayer) and flow/DiT/{dit,modules}.py (DiT, DiTBlock, x_transformers' RotaryEmbedding buffer)."""
    names = {"input_embedding.weight", "spk_embed_affine_layer.weight", "spk_embed_affine_layer.bias"}
    names |= {f"pre_lookahead_layer.conv{i}.{p}" for i in (1, 2) for p in ("weight", "bias")}
    e = "decoder.estimator."
    mods = ["time_embed.time_mlp.0", "time_embed.time_mlp.2", "input_embed.proj", "input_embed.conv_pos_embed.conv1.0",
            "input_embed.conv_pos_embed.conv2.0", "norm_out.linear", "proj_out"]
    for i in range(depth):
        mods += [f"transformer_blocks.{i}.{m}" for m in ("attn_norm.linear", "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                                                          "ff.ff.0.0", "ff.ff.2")]
    names |= {e + m + "." + p for m in mods for p in ("weight", "bias")}
    return names | {e + "rotary_embed.inv_freq"}


def _official_hift_names(n_ups: int = 3, n_res: int = 3) -> set[str]:
    """hift.pt keys from cosyvoice/hifigan/generator.py (CausalHiFTGenerator) and f0_predictor.py
    (CausalConvRNNF0Predictor): weight norm on every conv but source_downs, as torch's parametrization."""
    wn = lambda m: {f"{m}.parametrizations.weight.original0", f"{m}.parametrizations.weight.original1", f"{m}.bias"}  # noqa: E731
    names = {"m_source.l_linear.weight", "m_source.l_linear.bias", "f0_predictor.classifier.weight", "f0_predictor.classifier.bias"}
    names |= wn("conv_pre") | wn("conv_post")
    for i in (0, 2, 4, 6, 8):
        names |= wn(f"f0_predictor.condnet.{i}")
    blocks = [f"resblocks.{i}" for i in range(n_ups * n_res)] + [f"source_resblocks.{i}" for i in range(n_ups)]
    for i in range(n_ups):
        names |= wn(f"ups.{i}") | {f"source_downs.{i}.weight", f"source_downs.{i}.bias"}
    for b in blocks:
        for j in range(3):
            names |= wn(f"{b}.convs1.{j}") | wn(f"{b}.convs2.{j}") | {f"{b}.activations1.{j}.alpha", f"{b}.activations2.{j}.alpha"}
    return names


# ----------------------------------------------------------------------------- layout and loader


def test_tiny_writes_the_vocoder_dir_in_the_released_layout(root):
    vdir = root / VOCODER_DIR
    assert {p.name for p in vdir.iterdir()} == {"cosyvoice3.yaml", "flow.pt", "hift.pt"}
    y = load_cosyvoice_yaml(vdir / "cosyvoice3.yaml")
    assert y["flow"]["__class__"] == "cosyvoice.flow.flow.CausalMaskedDiffWithDiT"
    assert y["flow"]["decoder"]["estimator"]["__class__"] == "cosyvoice.flow.DiT.dit.DiT"
    assert y["hift"]["__class__"] == "cosyvoice.hifigan.generator.CausalHiFTGenerator"
    assert y["flow"]["decoder"]["estimator"]["static_chunk_size"] == 50  # !ref <chunk_size> * <token_mel_ratio>
    assert (y["sample_rate"], y["hift"]["conv_pre_look_right"], y["hift"]["upsample_rates"]) == (24000, 4, [8, 5, 3])
    flow = torch.load(vdir / "flow.pt", weights_only=True)
    hift = torch.load(vdir / "hift.pt", weights_only=True)
    assert set(flow) == _official_flow_names(SHAPES["tiny"].vocoder.dit_depth)
    assert set(hift) == _official_hift_names()
    assert {t.dtype for t in [*flow.values(), *hift.values()]} == {torch.float32}
    inv = flow["decoder.estimator.rotary_embed.inv_freq"]
    assert torch.allclose(inv, 1.0 / 10000 ** (torch.arange(0, 16, 2) / 16.0))
    spk = torch.load(root / "utils" / "new_spk2info.pt", weights_only=True)
    assert spk["中文女"]["embedding"].shape == (1, 192)


def test_real_shape_has_the_released_dimensions():
    flow_c, hift_c = vocoder_shape_configs(SHAPES["real"].vocoder)
    with torch.device("meta"):
        flow, hift = CausalMaskedDiffWithDiT(flow_c), CausalHiFT(hift_c)
    fs = {k: tuple(v.shape) for k, v in flow.state_dict().items()}
    hs = {k: tuple(v.shape) for k, v in hift.state_dict().items()}
    e = "decoder.estimator."
    assert fs["input_embedding.weight"] == (6561, 80) and fs["pre_lookahead_layer.conv1.weight"] == (1024, 80, 4)
    assert fs[e + "input_embed.proj.weight"] == (1024, 320)  # x, cond, mu, spks: 4 x 80
    assert fs[e + "transformer_blocks.21.attn_norm.linear.weight"] == (6 * 1024, 1024)
    assert fs[e + "transformer_blocks.21.ff.ff.0.0.weight"] == (2048, 1024) and fs[e + "rotary_embed.inv_freq"] == (32,)
    assert fs[e + "input_embed.conv_pos_embed.conv1.0.weight"] == (1024, 64, 31)
    assert hs["conv_pre.weight"] == (512, 80, 5) and hs["ups.0.weight"] == (256, 512, 16) and hs["conv_post.weight"] == (18, 64, 7)
    assert hs["source_downs.0.weight"] == (256, 18, 30) and hs["f0_predictor.condnet.0.weight"] == (512, 80, 4)
    n_flow = sum(math.prod(s) for s in fs.values())
    assert round(n_flow / 1e6) == 332  # the DiT (22 x 1024) is nearly all of it
    assert round(sum(math.prod(s) for s in hs.values()) / 1e6, 1) == 20.8


def test_yaml_of_the_real_shape_reads_back_as_the_official_settings(tmp_path):
    from omnilite.export.fun_audio_chat.tiny import cosyvoice3_yaml

    flow_c, hift_c = vocoder_shape_configs(SHAPES["real"].vocoder)
    (tmp_path / "c.yaml").write_text(cosyvoice3_yaml(flow_c, hift_c))
    f, h = vocoder_configs(load_cosyvoice_yaml(tmp_path / "c.yaml"), tmp_path / "c.yaml")
    assert (f.dim, f.depth, f.heads, f.dim_head, f.ff_mult, f.lookahead_channels) == (1024, 22, 16, 64, 2, 1024)
    assert (f.inference_cfg_rate, f.pre_lookahead_len, f.token_mel_ratio, f.static_chunk_size) == (0.7, 3, 2, 50)
    assert (h.base_channels, h.upsample_rates, h.n_fft, h.hop_len, h.conv_pre_look_right, h.hop) == (512, (8, 5, 3), 16, 4, 4, 480)


def _copy_vocoder(root: Path, dst: Path) -> Path:
    shutil.copytree(root / VOCODER_DIR, dst / VOCODER_DIR)
    shutil.copytree(root / "utils", dst / "utils")
    return dst / VOCODER_DIR


def _one_sentence(e: pytest.ExceptionInfo, *parts: str) -> None:
    msg = str(e.value)
    assert "\n" not in msg and msg.endswith(".") and msg.count(". ") == 0, msg
    for p in parts:
        assert p in msg, msg


def test_loader_refusals_name_the_file_and_the_tensor(root, tmp_path):
    with pytest.raises(CheckpointError) as e:
        open_cosyvoice3(tmp_path / "nowhere")
    _one_sentence(e, "does not exist")
    vdir = _copy_vocoder(root, tmp_path / "a")
    (vdir / "flow.pt").unlink()
    with pytest.raises(CheckpointError) as e:
        open_cosyvoice3(vdir)
    _one_sentence(e, str(vdir / "flow.pt"), "missing")

    vdir = _copy_vocoder(root, tmp_path / "b")
    state = torch.load(vdir / "hift.pt", weights_only=True)
    key = "conv_post.parametrizations.weight.original1"
    state[key] = state[key][:, :-1]
    torch.save(state, vdir / "hift.pt")
    with pytest.raises(CheckpointError) as e:
        open_cosyvoice3(vdir)
    _one_sentence(e, str(vdir / "hift.pt"), key, "cosyvoice3.yaml")

    vdir = _copy_vocoder(root, tmp_path / "c")
    state = torch.load(vdir / "flow.pt", weights_only=True)
    state.pop("decoder.estimator.transformer_blocks.1.attn.to_k.weight")
    torch.save(state, vdir / "flow.pt")
    with pytest.raises(CheckpointError) as e:
        open_cosyvoice3(vdir.parent)  # the folder holding the vocoder dir works too
    _one_sentence(e, str(vdir / "flow.pt"), "decoder.estimator.transformer_blocks.1.attn.to_k.weight")

    vdir = _copy_vocoder(root, tmp_path / "d")
    y = (vdir / "cosyvoice3.yaml").read_text().replace("CausalHiFTGenerator", "HiFTGenerator")
    (vdir / "cosyvoice3.yaml").write_text(y)
    with pytest.raises(CheckpointError) as e:
        open_cosyvoice3(vdir)
    _one_sentence(e, "cosyvoice3.yaml", "CausalHiFTGenerator")

    ck = open_cosyvoice3(root)
    with pytest.raises(CheckpointError) as e:
        ck.speaker_embedding("nobody")
    _one_sentence(e, "new_spk2info.pt", "nobody")


def test_hift_loads_either_weight_norm_naming(root, tmp_path, models):
    """A HiFiGan save (``generator.`` prefix, weight_g / weight_v) loads to the same generator."""
    vdir = _copy_vocoder(root, tmp_path)
    state = torch.load(vdir / "hift.pt", weights_only=True)
    old = {"generator." + k.replace(".parametrizations.weight.original0", ".weight_g").replace(".parametrizations.weight.original1", ".weight_v"): v
           for k, v in state.items()}
    torch.save(old, vdir / "hift.pt")
    hift = open_cosyvoice3(vdir).hift()
    for k, v in models[1].state_dict().items():
        assert torch.equal(v, hift.state_dict()[k]), k


# ----------------------------------------------------------------------------- reference vs the official maths


def test_source_follows_sinegen2_causal(models):
    """The numpy source against SineGen2(causal=True) written with the official torch ops: per-sample
    radians, linear resampling by 1/480, cumsum x 2 pi, x 480 and nearest resampling back."""
    hift = models[1]
    src = hift.source()
    p = src.p
    f0 = np.concatenate([np.full(7, 180.0), np.zeros(3), np.linspace(90, 260, 10)])  # voiced, unvoiced, glide
    f0_up = torch.from_numpy(np.repeat(f0, p.hop))[None, :, None]  # f0_upsamp (nearest)
    fn = f0_up * torch.arange(1, p.harmonics + 1, dtype=torch.float64)
    rad = (fn / p.sample_rate) % 1
    rad[:, 0, 1:] += torch.rand(p.harmonics - 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)  # rand_ini: no effect
    rad = F.interpolate(rad.transpose(1, 2), scale_factor=1 / p.hop, mode="linear").transpose(1, 2)
    phase = torch.cumsum(rad, dim=1) * 2 * np.pi
    phase = F.interpolate(phase.transpose(1, 2) * p.hop, scale_factor=p.hop, mode="nearest").transpose(1, 2)
    sines = torch.sin(phase) * p.sine_amp
    uv = (f0_up > p.voiced_threshold).double()
    noise = (uv * p.noise_std + (1 - uv) * p.sine_amp / 3) * torch.from_numpy(src.uniform(0, len(f0) * p.hop))[None]
    merged = torch.tanh((sines * uv + noise) @ torch.from_numpy(src.weight) + src.bias)[0].numpy()
    np.testing.assert_allclose(src(f0), merged, atol=1e-5)
    # The noise buffer is indexed by absolute sample: any window of it can be drawn on its own.
    np.testing.assert_array_equal(src.uniform(1000, 50), src.uniform(0, 1050)[1000:])


def test_streaming_forms_equal_the_whole_forms(models):
    """The official non-finalize calls: the flow's lookahead context equals the whole call's frames
    minus the lookahead's; HiFT's call returns a prefix of the whole-utterance audio (causal)."""
    flow, hift, emb = models
    tokens = torch.tensor([parity_tokens(30)])
    torch.testing.assert_close(flow.mu(tokens, finalize=False), flow.mu(tokens)[:, :, :-6], atol=1e-6, rtol=0)
    mel = flow.inference(tokens, emb)
    whole = hift.inference(mel)[0]
    part = hift.inference(mel[:, :, :40], finalize=False)[0]
    assert part.shape[0] == (40 - 3 - 4 - 1) * 480
    assert snr_db(whole[: part.shape[0]].numpy(), part.numpy()) > 60


# ----------------------------------------------------------------------------- exported stages


def test_export_writes_the_stages_and_meets_every_threshold(exported):
    out, report = exported
    record = json.loads((out / "vocoder.json").read_text())
    assert record["parity"] == report
    from omnilite.runtime.bundle import sha256_file

    for stage in record["stages"]:
        assert sha256_file(out / stage["file"]) == stage["sha256"]
        assert all(sha256_file(out / f) == h for f, h in stage.get("extra_files", {}).items())
    assert {s["name"] for s in record["stages"]} == {"flow_encoder", "flow_estimator", "flow_estimator_cached", "flow_noise", "hift_f0",
                                                    "hift"}
    assert report["flow"]["max_abs"] <= 1e-3
    assert report["hift"]["snr_db"] >= 40
    assert report["stream_vs_reference"]["snr_db"] >= 40 and report["stream_vs_reference"]["hop_tokens"] == 15
    assert report["stream_vs_whole"]["snr_db"] >= 25
    assert all(v["ok"] for v in report.values())
    # Drift of the official hop-15 schedule: the exported path drifts exactly as the PyTorch loop does.
    s = report["stream_vs_whole"]
    assert abs(s["official_hop_snr_db"] - s["official_hop_reference_snr_db"]) < 0.5


def test_stream_is_independent_of_burst_sizes(exported):
    voc = OnnxVocoder(exported[0])
    tokens = parity_tokens(50, seed=3)
    a = voc.stream()
    one = np.concatenate([a.push(tokens), a.flush()])
    b = voc.stream()
    parts = [b.push(tokens[i:i + 7]) for i in range(0, len(tokens), 7)]
    many = np.concatenate([*parts, b.flush()])
    np.testing.assert_array_equal(one, many)
    assert len(one) == len(tokens) * 2 * 480 and a.calls == (50 - 3) // 15 + 1


def test_stream_matches_the_official_loop_on_another_reply(exported, models):
    flow, hift, emb = models
    voc = OnnxVocoder(exported[0])
    tokens = parity_tokens(41, seed=7)
    ref = torch.cat(token2wav_stream(flow, hift, tokens, emb)).numpy()
    s = voc.stream()
    got = np.concatenate([s.push(tokens), s.flush()])
    assert snr_db(ref, got) >= 40
    assert snr_db(token2wav(flow, hift, tokens, emb).numpy(), voc.offline(tokens)) >= 40


def test_web_demo_windows_match_the_official_loop(exported, models):
    """The web demo's restarts (scaled down: flow window 30 tokens, HiFT restart after 60 cut) bound
    each call's work; the driver follows the PyTorch loop through both, and each HiFT restart loses
    the 8 frames the last call held back, as there."""
    flow, hift, emb = models
    voc = OnnxVocoder(exported[0])
    tokens = parity_tokens(100, seed=11)
    ref = torch.cat(token2wav_stream(flow, hift, tokens, emb, flow_window=30, hift_restart=60)).numpy()
    s = voc.stream(flow_window_tokens=30, hift_restart_tokens=60)
    got = np.concatenate([*(s.push(tokens[i:i + 9]) for i in range(0, len(tokens), 9)), s.flush()])
    assert snr_db(ref, got) >= 40
    assert len(got) == (len(tokens) * 2 - 8) * 480  # one restart (after 60 tokens cut), 8 frames lost
    assert len(s.tokens) <= 30 + 15 + 3 + 9 and s.mel.shape[1] <= 2 * (len(tokens) - 60)


def test_bad_stream_settings_are_refused(exported):
    voc = OnnxVocoder(exported[0])
    with pytest.raises(OmniliteError, match="hop >= 1"):
        voc.stream(hop_tokens=-1)
    with pytest.raises(OmniliteError, match="at least one hop"):
        voc.stream(flow_window_tokens=10)
    with pytest.raises(OmniliteError, match="vocoder.json is missing"):
        OnnxVocoder(exported[0].parent)


def test_driver_imports_without_torch(exported):
    code = ("import sys; sys.modules['torch'] = None; "
            "from omnilite.runtime.fun_audio_chat.vocoder import OnnxVocoder; "
            f"v = OnnxVocoder({str(exported[0])!r}); a = v.offline(list(range(20))); assert len(a) == 20 * 960")
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/tmp")
