"""Fun-Audio-Chat foundation: the tiny release's layout, the loader's refusals, and the reference
encoder + grouping against the official length rules and windowed attention."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import jinja2
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from omnilite.export.fun_audio_chat.checkpoint import open_fun_audio_chat
from omnilite.export.fun_audio_chat.config import (
    AUDIO_TEMPLATE, CHAT_TEMPLATE, S2M_PROMPT, release_config,
)
from omnilite.export.fun_audio_chat.reference import expected_shapes, mel_frames, n_params
from omnilite.export.fun_audio_chat.tiny import make_tiny_fun_audio_chat
from omnilite.runtime.errors import CheckpointError, OmniliteError


@pytest.fixture(scope="module")
def fac_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fac") / "pretrained_models"
    make_tiny_fun_audio_chat(root)
    return root


@pytest.fixture(scope="module")
def fac_model(fac_root):
    return open_fun_audio_chat(fac_root).reference()


def _release_names(cfg: dict) -> set[str]:
    """Tensor names written down from funaudiochat/modeling_funaudiochat.py (FunAudioChatAudioEncoder
    lines 252-277, FunAudioChatDiscreteEncoder 502-516, FunAudioChatDecoder 563-592,
    FunAudioChatForConditionalGeneration 771-782) and transformers' Qwen3 module names. Not stored:
    the positional table (a non-persistent buffer), audio_invert_tower.lm_head (tied to
    audio_tower.embed_tokens), the speech head's token embedding (deleted at construction)."""
    audio, text = cfg["audio_config"], cfg["text_config"]
    names = {f"continuous_audio_tower.{n}" for n in (
        "conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias", "ln_post.weight", "ln_post.bias",
        "proj.weight", "proj.bias", "audio_bos_eos_token.weight")}
    for i in range(audio["encoder_layers"]):
        names |= {f"continuous_audio_tower.layers.{i}.{n}" for n in (
            "self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
            "self_attn.v_proj.bias", "self_attn.out_proj.weight", "self_attn.out_proj.bias",
            "self_attn_layer_norm.weight", "self_attn_layer_norm.bias", "fc1.weight", "fc1.bias", "fc2.weight",
            "fc2.bias", "final_layer_norm.weight", "final_layer_norm.bias")}
    names |= {"audio_tower.embed_tokens.weight", "audio_tower.output_matching.weight", "audio_tower.continual_output_matching.weight"}
    names |= {"audio_invert_tower.pre_matching.weight", "audio_invert_tower.pre_matching.bias",
              "audio_invert_tower.input_matching.weight", "audio_invert_tower.output_matching.weight",
              "audio_invert_tower.crq_transformer.norm.weight"}
    qwen_layer = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
                  "self_attn.q_norm.weight", "self_attn.k_norm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
                  "mlp.down_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight")
    for i in range(audio["crq_transformer_config"]["num_hidden_layers"]):
        names |= {f"audio_invert_tower.crq_transformer.layers.{i}.{n}" for n in qwen_layer}
    names |= {"language_model.model.embed_tokens.weight", "language_model.model.norm.weight", "language_model.lm_head.weight"}
    for i in range(text["num_hidden_layers"]):
        names |= {f"language_model.model.layers.{i}.{n}" for n in qwen_layer}
    return names


def test_tiny_writes_the_released_layout(fac_root):
    model_dir = fac_root / "Fun-Audio-Chat-8B"
    files = {p.name for p in model_dir.iterdir()}
    assert {"config.json", "processor_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "vocab.json", "merges.txt"} <= files
    cfg = json.loads((model_dir / "config.json").read_text())
    # Keys of the release's config.json (HF FunAudioLLM/Fun-Audio-Chat-8B, audio_config shown in full there).
    assert set(cfg) >= {"architectures", "audio_config", "audio_token_index", "model_type", "text_config"}
    assert cfg["architectures"] == ["FunAudioChatForConditionalGeneration"] and cfg["model_type"] == "funaudiochat"
    assert {"bos_token_id", "codebook_size", "continuous_features_mode", "crq_transformer_config", "d_model",
            "enable_audio_invert_tower", "encoder_attention_heads", "encoder_ffn_dim", "encoder_layers", "eos_token_id",
            "group_size", "max_source_positions", "n_window", "num_mel_bins", "output_dim", "pad_token_id"} <= set(cfg["audio_config"])
    a = cfg["audio_config"]
    assert (a["codebook_size"], a["bos_token_id"], a["eos_token_id"], a["group_size"]) == (6565, 6561, 6562, 5)
    assert (cfg["audio_token_index"], cfg["text_config"]["audio_bos_index"], cfg["text_config"]["audio_eos_index"],
            cfg["text_config"]["sil_index"]) == (151669, 151670, 151671, 151673)
    with safe_open(model_dir / "model.safetensors", "pt") as f:
        stored = set(f.keys())
        assert {f.get_slice(k).get_dtype() for k in stored} == {"BF16"}
    assert stored == _release_names(cfg)
    spk = torch.load(fac_root / "utils" / "new_spk2info.pt", weights_only=True)
    assert set(spk) == {"中文女", "中文男"}
    assert spk["中文女"]["embedding"].shape == (1, 192) and spk["中文女"]["speech_feat"].shape[2] == 80
    assert int(spk["中文男"]["speech_token"].max()) < 6561


def test_tokenizer_and_prompt_are_the_releases(fac_root):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(fac_root / "Fun-Audio-Chat-8B")
    ids = tok.convert_tokens_to_ids(["<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>", "<|SIL|>", "<|im_end|>", "<|endoftext|>"])
    assert ids == [151669, 151670, 151671, 151673, 151645, 151643]
    assert tok.encode(AUDIO_TEMPLATE) == [151670, 151669, 151671]
    assert tok.encode("Hello world") == [9707, 1879]  # Qwen's BPE, not a stand-in vocabulary
    text = jinja2.Environment().from_string(CHAT_TEMPLATE).render(
        messages=[{"role": "system", "content": S2M_PROMPT}, {"role": "user", "content": AUDIO_TEMPLATE}], add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are asked to generate both text and speech tokens at the same time.<|im_end|>\n"
                    "<|im_start|>user\n<|audio_bos|><|AUDIO|><|audio_eos|><|im_end|>\n<|im_start|>assistant\n")


def test_real_shape_has_the_released_sizes():
    shapes = expected_shapes(release_config("real"))
    assert shapes["language_model.model.embed_tokens.weight"] == (151936, 4096)
    assert shapes["audio_invert_tower.pre_matching.weight"] == (5 * 4096, 4096)
    assert shapes["audio_invert_tower.crq_transformer.layers.27.self_attn.k_proj.weight"] == (8 * 128, 1024)
    assert shapes["continuous_audio_tower.proj.weight"] == (4096, 1280)
    assert shapes["audio_tower.embed_tokens.weight"] == (6565, 4096)
    # Qwen3-8B backbone, Whisper-large-v3 encoder, Qwen3-0.6B-shaped head without embeddings.
    assert round(n_params(shapes, "language_model.") / 1e9, 2) == 8.19
    assert round(n_params(shapes, "continuous_audio_tower.") / 1e9, 2) == 0.64
    assert round(n_params(shapes, "audio_invert_tower.") / 1e9, 2) == 0.53


# ----------------------------------------------------------------------------- loader refusals


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst / "Fun-Audio-Chat-8B"


def test_missing_root_and_file_are_named(fac_root, tmp_path):
    with pytest.raises(CheckpointError) as e:
        open_fun_audio_chat(tmp_path / "nowhere")
    assert str(e.value) == f"{tmp_path / 'nowhere'} does not exist; pass the downloaded Fun-Audio-Chat-8B directory or the folder that holds it."
    model_dir = _copy(fac_root, tmp_path / "r")
    (model_dir / "processor_config.json").unlink()
    with pytest.raises(CheckpointError) as e:
        open_fun_audio_chat(tmp_path / "r")
    assert str(e.value) == f"{model_dir / 'processor_config.json'} is missing; download the complete Fun-Audio-Chat-8B directory."


def _rewrite(model_dir: Path, edit) -> None:
    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_missing_tensor_is_named(fac_root, tmp_path):
    model_dir = _copy(fac_root, tmp_path / "r")
    _rewrite(model_dir, lambda t: t.pop("audio_tower.continual_output_matching.weight"))
    with pytest.raises(CheckpointError) as e:
        open_fun_audio_chat(model_dir)
    assert str(e.value) == (f"{model_dir / 'model.safetensors'} is missing tensor 'audio_tower.continual_output_matching.weight' "
                            "(expected shape (64, 64)); the Fun-Audio-Chat-8B download is incomplete, download it again.")


def test_misshaped_tensor_names_tensor_file_and_shapes(fac_root, tmp_path):
    model_dir = _copy(fac_root, tmp_path / "r")
    name = "audio_invert_tower.crq_transformer.layers.1.self_attn.k_proj.weight"
    _rewrite(model_dir, lambda t: t.__setitem__(name, torch.zeros(32, 32, dtype=torch.bfloat16)))
    with pytest.raises(CheckpointError) as e:
        open_fun_audio_chat(model_dir)
    assert str(e.value) == (f"{model_dir / 'model.safetensors'}: tensor '{name}' has shape (32, 32), expected (16, 32) from config.json; "
                            "the weights do not match their config, download both again.")


def test_foreign_or_inconsistent_config_is_refused(fac_root, tmp_path):
    model_dir = _copy(fac_root, tmp_path / "r")
    cfg_path = model_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps(cfg | {"model_type": "qwen2_audio"}))
    with pytest.raises(CheckpointError) as e:
        open_fun_audio_chat(model_dir)
    assert str(e.value) == f"{cfg_path} has model_type 'qwen2_audio', not 'funaudiochat'; this loader reads Fun-Audio-Chat releases."
    cfg["audio_config"]["output_dim"] = 128
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as e:
        open_fun_audio_chat(model_dir)
    assert str(e.value) == (f"{cfg_path} has audio_config.output_dim 128 but text_config.hidden_size 64; "
                            "audio features must have the LLM's width, download the config again.")


# ----------------------------------------------------------------------------- reference vs official rules


def _official_positions(n_samples: int) -> int:
    """processing_funaudiochat.py: 25 Hz placeholders = int(len / 16000 * 25) (lines 188-199), and
    <|AUDIO|> positions = ceil(placeholders / audio_group_size) (line 235)."""
    placeholders = int(n_samples / 16000 * 25)
    return (placeholders + 5 - 1) // 5


@pytest.mark.parametrize("n_samples", [640, 16000, 32001, 33000, 16000 * 4 + 7, 116800, 16000 * 12 + 159, 16000 * 31])
def test_reference_gives_the_official_position_count(fac_model, n_samples):
    # Valid frames as WhisperFeatureExtractor's attention mask counts them (one per started
    # 160-sample hop, 30 s at most), written out here rather than taken from the module under test.
    frames = min(math.ceil(n_samples / 160), 3000)
    assert mel_frames(n_samples) == frames
    mel = torch.randn(128, frames, generator=torch.Generator().manual_seed(n_samples))
    with torch.no_grad():
        emb = fac_model.user_audio_embeddings(mel, n_samples)
    assert emb.shape == (_official_positions(n_samples), 64)
    assert torch.isfinite(emb).all()


def _official_batched_encoder(enc, mel: torch.Tensor) -> torch.Tensor:
    """The official forward (modeling_funaudiochat.py 357-431): windows padded into one batch,
    conv with a validity mask, every window's frames in one sequence with block-diagonal attention."""
    lens = [w.shape[1] for w in mel.split(200, dim=1)]
    padded = torch.zeros(len(lens), mel.shape[0], max(lens))
    mask = torch.zeros(len(lens), 1, max(lens))
    for i, w in enumerate(mel.split(200, dim=1)):
        padded[i, :, : w.shape[1]] = w
        mask[i, :, : w.shape[1]] = 1
    x = F.gelu(enc.conv1(padded)) * mask
    x = F.gelu(enc.conv2(x)).transpose(1, 2)
    x = x + enc.positional_embedding[: x.shape[1]]
    after = [(n - 1) // 2 + 1 for n in lens]
    valid = torch.zeros(len(lens), x.shape[1], dtype=torch.bool)
    for i, n in enumerate(after):
        valid[i, :n] = True
    h = x[valid]
    bias = torch.full((h.shape[0], h.shape[0]), torch.finfo(h.dtype).min)
    start = 0
    for n in after:
        bias[start:start + n, start:start + n] = 0
        start += n
    for layer in enc.layers:
        a = layer.self_attn
        y = layer.self_attn_layer_norm(h)
        q, k, v = (p(y).view(len(y), a.heads, -1).transpose(0, 1) for p in (a.q_proj, a.k_proj, a.v_proj))
        w = torch.softmax(q @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5) + bias, dim=-1)
        h = h + a.out_proj((w @ v).transpose(0, 1).reshape(len(y), -1))
        h = h + layer.fc2(F.gelu(layer.fc1(layer.final_layer_norm(h))))
    h = F.avg_pool1d(h.T[None], 2, 2)[0].T
    return enc.proj(enc.ln_post(h))


def test_windowed_encoder_matches_the_official_batched_path(fac_model):
    mel = torch.randn(128, 537, generator=torch.Generator().manual_seed(1))  # two full windows and a partial one
    with torch.no_grad():
        ours = fac_model.continuous_audio_tower(mel)
        official = _official_batched_encoder(fac_model.continuous_audio_tower, mel)
    assert ours.shape == official.shape == (134, 64)
    torch.testing.assert_close(ours, official, rtol=1e-5, atol=1e-5)


def test_grouping_averages_five_frames_with_zero_padding(fac_model):
    tower = fac_model.audio_tower
    feats = torch.randn(12, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = tower.user_audio(feats, 14)  # 14 placeholders -> 3 positions over 15 frames, the last 3 of them zeros
        padded = torch.cat([feats, torch.zeros(3, 64)])
        want = torch.stack([tower.continual_output_matching(padded[i:i + 5].mean(0)) for i in (0, 5, 10)])
    torch.testing.assert_close(got, want)
    codes = torch.tensor([[1, 2, 3, 4, 5, 6560, 0, 7, 8, 9]])
    with torch.no_grad():
        fed = tower.speech_groups(codes)
        manual = tower.output_matching(tower.embed_tokens(codes[0, 5:]).mean(0))
    assert fed.shape == (1, 2, 64)
    torch.testing.assert_close(fed[0, 1], manual)


def test_prompt_splice_and_llm_forward(fac_model, fac_root):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(fac_root / "Fun-Audio-Chat-8B")
    n = 33000
    positions = _official_positions(n)
    prompt = jinja2.Environment().from_string(CHAT_TEMPLATE).render(
        messages=[{"role": "system", "content": S2M_PROMPT},
                  {"role": "user", "content": AUDIO_TEMPLATE.replace("<|AUDIO|>", "<|AUDIO|>" * positions)}],
        add_generation_prompt=True)
    ids = torch.tensor(tok.encode(prompt))
    mel = torch.randn(128, mel_frames(n), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        audio = fac_model.user_audio_embeddings(mel, n)
        x = fac_model.prompt_embeddings(ids, audio)
        out = fac_model.language_model(inputs_embeds=x[None], output_hidden_states=True)
    where = (ids == 151669).nonzero()[:, 0]
    torch.testing.assert_close(x[where], audio)
    assert out.logits.shape == (1, len(ids), 151936) and out.hidden_states[-1].shape == (1, len(ids), 64)
    with pytest.raises(OmniliteError) as e:
        fac_model.prompt_embeddings(ids, audio[:-1])
    assert str(e.value) == (f"the prompt has {positions} <|AUDIO|> positions but the audio gives {positions - 1}; "
                            "expand the placeholders with llm_positions(placeholder_count(samples)).")


def _head_without_cache(head, steps: list[torch.Tensor]) -> list[list[int]]:
    """crq_generate_forward (modeling_funaudiochat.py 615-683) re-run over the whole input history at
    every sub-step, greedy: what the head's KV cache must reproduce."""
    fed, prev, out = [], head.lm_head.weight[6561], []
    for x in steps:
        h = head.pre_matching(x).reshape(-1, x.shape[-1])
        n, codes = len(h), []
        for i in range(5):
            rows = h[: n - 4] if i == 0 else h[n - 5 + i: n - 4 + i]
            fed.append(head.input_matching(rows + prev))
            last = head.crq_transformer(inputs_embeds=torch.cat(fed)[None], use_cache=False).last_hidden_state[0, -1]
            code = int(head.lm_head(head.output_matching(last)).argmax())
            codes.append(code)
            prev = head.lm_head.weight[code]
        out.append(codes)
    return out


def test_speech_head_cache_matches_recompute(fac_model):
    from omnilite.export.fun_audio_chat.reference import HeadState

    g = torch.Generator().manual_seed(4)
    steps = [torch.randn(6, 64, generator=g), torch.randn(1, 64, generator=g), torch.randn(1, 64, generator=g)]
    head, state = fac_model.audio_invert_tower, HeadState()
    with torch.no_grad():
        cached = [head.step(x, state) for x in steps]
        recomputed = _head_without_cache(head, steps)
    assert cached == recomputed
    assert all(0 <= c < 6565 for group in cached for c in group)
    assert state.cache.get_seq_length() == 5 * (6 + 1 + 1)  # the prompt's sub-positions stay in the cache


def test_cli_makes_a_tiny_checkpoint_and_refuses_to_export_it_without_the_voice_file(tmp_path, capsys):
    from omnilite.cli import main

    assert main(["make-tiny", "fun-audio-chat", str(tmp_path / "ckpt"), "-q"]) == 0
    assert (tmp_path / "ckpt" / "Fun-Audio-Chat-8B" / "model.safetensors").is_file()
    assert {p.name for p in (tmp_path / "ckpt" / "Fun-CosyVoice3-0.5B-2512").iterdir()} == {"cosyvoice3.yaml", "flow.pt", "hift.pt"}
    (tmp_path / "ckpt" / "utils" / "new_spk2info.pt").unlink()  # the export itself is tested in test_fun_audio_chat_pipeline.py
    capsys.readouterr()
    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "bundle")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: neither {tmp_path / 'ckpt' / 'utils' / 'new_spk2info.pt'} nor {tmp_path / 'utils' / 'new_spk2info.pt'} "
                   f"exists; copy utils/new_spk2info.pt from the Fun-Audio-Chat GitHub repository to "
                   f"{tmp_path / 'ckpt' / 'utils' / 'new_spk2info.pt'}."]
    assert not (tmp_path / "bundle").exists()
