"""Step-Audio 2 mini foundation: the tiny checkpoint has the release's layout, the loader refuses a
damaged one in one sentence, and the reference encoder + adapter give the official positions count."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from omnilite.export.step_audio2 import reference as R
from omnilite.export.step_audio2.checkpoint import (expected_shapes, index_weight_map, open_step_audio2,
                                                    token2wav_missing)
from omnilite.export.step_audio2.tiny import SHAPES, _shards, make_tiny_step_audio2
from omnilite.runtime.errors import CheckpointError, OmniliteError


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_step_audio2(tmp_path_factory.mktemp("sa2") / "Step-Audio-2-mini", seed=0)


@pytest.fixture
def damaged(tiny, tmp_path) -> Path:
    """A private copy of the tiny checkpoint to break."""
    return Path(shutil.copytree(tiny, tmp_path / "Step-Audio-2-mini"))


# --- layout --------------------------------------------------------------------------------------

def test_tiny_has_the_released_files(tiny):
    # HF stepfun-ai/Step-Audio-2-mini tree/main and tree/main/token2wav (token2wav.py reads the latter).
    released = {"config.json", "model.safetensors.index.json", "added_tokens.json", "merges.txt", "vocab.json",
                "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                *(f"model-{i:05d}-of-00004.safetensors" for i in range(1, 5)),
                "token2wav/speech_tokenizer_v2_25hz.onnx", "token2wav/campplus.onnx", "token2wav/flow.yaml",
                "token2wav/flow.pt", "token2wav/hift.pt"}
    written = {str(p.relative_to(tiny)) for p in tiny.rglob("*") if p.is_file()}
    assert written == released
    assert token2wav_missing(tiny) == []


def test_config_has_the_released_keys(tiny):
    # Keys of the released config.json (same-architecture configs; configuration_step_audio_2.py reads them).
    cfg = json.loads((tiny / "config.json").read_text())
    assert set(cfg) == {"architectures", "auto_map", "model_type", "text_config", "audio_encoder_config"}
    assert cfg["architectures"] == ["StepAudio2ForCausalLM"] and cfg["model_type"] == "step_audio_2"
    assert set(cfg["text_config"]) == {
        "hidden_size", "intermediate_size", "num_attention_heads", "num_attention_groups", "num_key_value_heads",
        "num_hidden_layers", "max_seq_len", "vocab_size", "rms_norm_eps", "eos_token_id", "pad_token_id", "rope_theta",
        "max_position_embeddings", "rope_scaling", "torch_dtype"}
    assert set(cfg["audio_encoder_config"]) == {"n_mels", "n_audio_ctx", "n_audio_state", "n_audio_head", "n_audio_layer",
                                                "n_codebook_size", "llm_dim", "kernel_size", "adapter_stride"}
    assert cfg["text_config"]["vocab_size"] == 158720 and cfg["audio_encoder_config"]["n_mels"] == 128


def _official_names(layers: int, blocks: int) -> set[str]:
    """Tensor names from the official StepAudio2ForCausalLM (HF modeling_step_audio_2.py): self.model =
    transformers Qwen2Model, self.encoder = AudioEncoder (conv1, conv2, positional_embedding Embedding,
    blocks[ResidualAttentionBlock: attn.query/key(no bias)/value/out, attn_ln, mlp.0, mlp.2, mlp_ln],
    avg_pooler, after_norm), self.adapter = Adaptor (conv, linear1, relu, linear2), self.lm_head."""
    names = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
             "encoder.conv1.weight", "encoder.conv1.bias", "encoder.conv2.weight", "encoder.conv2.bias",
             "encoder.positional_embedding.weight", "encoder.after_norm.weight", "encoder.after_norm.bias",
             "adapter.conv.weight", "adapter.conv.bias", "adapter.linear1.weight", "adapter.linear1.bias",
             "adapter.linear2.weight", "adapter.linear2.bias"}
    for i in range(layers):
        for p in ("q_proj", "k_proj", "v_proj"):
            names |= {f"model.layers.{i}.self_attn.{p}.weight", f"model.layers.{i}.self_attn.{p}.bias"}
        names |= {f"model.layers.{i}.self_attn.o_proj.weight", f"model.layers.{i}.input_layernorm.weight",
                  f"model.layers.{i}.post_attention_layernorm.weight",
                  *(f"model.layers.{i}.mlp.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj"))}
    for i in range(blocks):
        b = f"encoder.blocks.{i}."
        names |= {b + "attn.key.weight", *(b + f"attn.{p}.{w}" for p in ("query", "value", "out") for w in ("weight", "bias")),
                  *(b + f"{m}.{w}" for m in ("attn_ln", "mlp.0", "mlp.2", "mlp_ln") for w in ("weight", "bias"))}
    return names


def test_tiny_tensors_have_the_official_names_dtype_and_index(tiny):
    wmap = index_weight_map(tiny)
    assert set(wmap) == _official_names(layers=2, blocks=2)
    for shard in sorted(set(wmap.values())):
        with safe_open(tiny / shard, "pt") as f:
            assert set(f.keys()) == {n for n, s in wmap.items() if s == shard}
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}  # released in bf16


def test_real_shape_matches_the_released_shard_sizes():
    # HF tree/main: model-0000{1..4}-of-00004.safetensors are 4.93, 4.93, 4.99, 1.78 GB.
    shapes = expected_shapes(SHAPES["real"].config)
    assert set(shapes) == _official_names(layers=28, blocks=32)
    sizes = [round(sum(2 * math.prod(shapes[n]) for n in shard) / 1e9, 2) for shard in _shards(shapes, tiny=False)]
    assert sizes == [4.93, 4.93, 4.99, 1.78]


def test_reference_modules_load_the_tiny_strictly(tiny):
    ckpt = open_step_audio2(tiny)
    enc, llm = R.load_encoder(ckpt), R.load_llm(ckpt)  # strict load_state_dict: every name and shape agrees
    assert {f"encoder.{k}" for k in enc.encoder.state_dict()} | {f"adapter.{k}" for k in enc.adapter.state_dict()} \
        | set(llm.state_dict()) == set(expected_shapes(ckpt.config))
    assert not llm.config.tie_word_embeddings
    assert torch.equal(llm.lm_head.weight, ckpt.tensors["lm_head.weight"].float())


def test_tokenizer_is_qwen25_with_the_step_audio_tokens(tiny):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(tiny / "tokenizer.json"))
    ids = open_step_audio2(tiny).token_ids
    # stepaudio2.py: text < 151688, audio code = id - 151696; vLLM fork: <audio_patch> 151690, <tts_start> 151693, <tts_end> 151694.
    assert [ids[t] for t in ("<audio_start>", "<audio_patch>", "<tts_start>", "<tts_end>", "<audio_0>")] == \
        [151688, 151690, 151693, 151694, 151696]
    assert tok.convert_tokens_to_ids("<audio_6561>") == 151696 + 6561
    prompt = "<|BOT|>system\nYou are a helpful assistant.<|EOT|><|BOT|>assistant\n<tts_start>"
    got = tok(prompt)["input_ids"]
    # Qwen2.5's BPE ids for "system", "\n", "You are a helpful assistant." and "assistant".
    assert got == [ids["<|BOT|>"], 8948, 198, 2610, 525, 264, 10950, 17847, 13, ids["<|EOT|>"], ids["<|BOT|>"], 77091, 198,
                   151693]


# --- refusals ------------------------------------------------------------------------------------

def _refusal(root: Path) -> str:
    with pytest.raises(CheckpointError) as e:
        open_step_audio2(root)
    return str(e.value)


def test_missing_files_are_refused_in_one_sentence(damaged):
    (damaged / "token2wav" / "hift.pt").unlink()
    assert _refusal(damaged) == (f"{damaged / 'token2wav' / 'hift.pt'} is missing; download the token2wav/ folder of the "
                                 "Step-Audio-2-mini release.")
    (damaged / "model-00003-of-00004.safetensors").unlink()
    assert _refusal(damaged) == f"{damaged / 'model-00003-of-00004.safetensors'} is missing (listed in the index); download it again."
    (damaged / "tokenizer_config.json").unlink()
    assert _refusal(damaged) == (f"{damaged / 'tokenizer_config.json'} is missing; download the tokenizer files of the "
                                 "Step-Audio-2-mini release.")
    (damaged / "config.json").unlink()
    assert _refusal(damaged) == (f"{damaged / 'config.json'} is missing; pass the Step-Audio-2-mini model directory (the one "
                                 "holding config.json and the safetensors).")


def _rewrite_shard(root: Path, shard: str, edit) -> Path:
    path = root / shard
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


def test_misshaped_tensor_is_refused_naming_file_tensor_and_shapes(damaged):
    shard = index_weight_map(damaged)["encoder.conv2.weight"]
    path = _rewrite_shard(damaged, shard, lambda t: t.update({"encoder.conv2.weight": torch.zeros(64, 64, 5, dtype=torch.bfloat16)}))
    assert _refusal(damaged) == (f"{path}: tensor 'encoder.conv2.weight' has shape (64, 64, 5), expected (64, 64, 3) from "
                                 "config.json; the checkpoint does not match its config.json.")


def test_missing_and_foreign_tensors_are_refused(damaged):
    shard = index_weight_map(damaged)["adapter.linear2.bias"]
    path = _rewrite_shard(damaged, shard, lambda t: t.update({"adapter.extra.weight": t.pop("adapter.linear2.bias")}))
    assert _refusal(damaged) == (f"{path} is missing tensor 'adapter.linear2.bias' (expected shape (64,)); the checkpoint is "
                                 "incomplete or not a Step-Audio 2 release.")
    _rewrite_shard(damaged, shard, lambda t: t.update({"adapter.linear2.bias": torch.zeros(64, dtype=torch.bfloat16)}))
    assert _refusal(damaged) == (f"{path} holds tensor 'adapter.extra.weight', which Step-Audio 2 does not have; the "
                                 "checkpoint is not a Step-Audio-2-mini release.")


def test_config_of_another_model_or_inconsistent_dims_is_refused(damaged):
    path = damaged / "config.json"
    cfg = json.loads(path.read_text())
    path.write_text(json.dumps(cfg | {"model_type": "qwen2"}))
    assert _refusal(damaged) == f"{path}: model_type is 'qwen2', not 'step_audio_2'; this is not a Step-Audio 2 checkpoint."
    cfg["audio_encoder_config"]["llm_dim"] = 32
    path.write_text(json.dumps(cfg))
    assert _refusal(damaged) == (f"{path}: audio_encoder_config.llm_dim 32 differs from text_config.hidden_size 64, so the "
                                 "adapter output cannot enter the LLM; the config.json is damaged.")
    del cfg["text_config"]["num_hidden_layers"]
    path.write_text(json.dumps(cfg))
    assert _refusal(damaged) == (f"{path} has no 'text_config.num_hidden_layers'; download config.json again from the "
                                 "Step-Audio-2-mini release.")


# --- audio positions -----------------------------------------------------------------------------

def _official_token_num(mel_frames: int) -> int:
    """utils.py compute_token_num as released: remove 2 padding frames, conv2 + avg-pool, adapter conv k3 s2 p1."""
    encoder_output_dim = (mel_frames - 2 + 1) // 2 // 2
    return (encoder_output_dim + 2 * 1 - 3) // 2 + 1


@pytest.mark.parametrize("seconds", [0.3, 1.0, 12345 / 16000, 7.77, 25.0, 31.0])
def test_encoder_adapter_positions_match_the_official_count(tiny, seconds):
    enc = R.load_encoder(open_step_audio2(tiny))
    audio = 0.1 * torch.randn(int(seconds * 16000), generator=torch.Generator().manual_seed(1))
    pieces = R.chunk_audio(audio)
    assert len(pieces) == math.ceil(audio.numel() / (25 * 16000))  # one <audio_start>...<audio_end> per 25 s
    for piece in pieces:
        mel = R.log_mel(piece)
        assert mel.shape == (128, (piece.numel() + 479) // 160)
        with torch.no_grad():
            rows = enc(mel[None])
        assert rows.shape == (_official_token_num(mel.shape[1]), 64)
        assert R.audio_positions(mel.shape[1]) == rows.shape[0]
    if seconds == 25.0:
        assert rows.shape[0] == 313  # 12.5 Hz


def test_splice_overwrites_the_patch_run_after_each_audio_start():
    ids = torch.tensor([5, 151688, 151690, 151690, 151690, 151689, 7, 151688, 151690, 151689])
    embeds = torch.zeros(10, 4)
    a, b = torch.ones(3, 4), 2 * torch.ones(1, 4)
    out = R.splice_audio(ids, embeds, [a, b])
    assert out[:, 0].tolist() == [0, 0, 1, 1, 1, 0, 0, 0, 2, 0]
    with pytest.raises(OmniliteError, match=r"^the prompt has 2 <audio_start> tokens for 1 audio pieces; "):
        R.splice_audio(ids, embeds, [a])


def test_make_tiny_refuses_a_full_directory_and_an_unknown_shape(tiny, tmp_path):
    with pytest.raises(OmniliteError) as e:
        make_tiny_step_audio2(tiny)
    assert str(e.value) == f"{tiny} already exists and is not empty; choose another directory or pass --force."
    with pytest.raises(OmniliteError) as e:
        make_tiny_step_audio2(tmp_path / "x", shape="7B")
    assert str(e.value) == "unknown Step-Audio 2 shape '7B'; use one of: tiny, real."
    assert not (tmp_path / "x").exists()


def test_pieces_are_encoded_as_the_official_padded_batch(tiny):
    """stepaudio2.py pads all 25 s pieces of a prompt into one batch (utils.padding_mels). The long piece
    and a last piece of even frame count come out as when encoded alone; an odd one does not (the key mask
    follows the batch's length parity), so runtime parity for > 25 s inputs is measured against the batch."""
    enc = R.load_encoder(open_step_audio2(tiny))
    g = torch.Generator().manual_seed(3)
    for extra, same in ((96000, True), (96160, False)):  # last piece: 602 and 603 mel frames
        mels = [R.log_mel(p) for p in R.chunk_audio(0.1 * torch.randn(400000 + extra, generator=g))]
        with torch.no_grad():
            batched = R.encode_pieces(enc, mels)
            alone = [enc(m[None]) for m in mels]
        assert torch.equal(batched[0], alone[0])
        assert batched[1].shape == alone[1].shape == (_official_token_num(mels[1].shape[1]), 64)
        rel = float((batched[1] - alone[1]).norm() / alone[1].norm())
        assert (rel < 1e-5) if same else (rel > 1e-4), rel
    with torch.no_grad():
        assert torch.equal(R.encode_pieces(enc, mels[1:])[0], enc(mels[1][None]))


def test_cli_makes_a_tiny_checkpoint_and_export_without_a_voice_is_refused_in_one_sentence(tmp_path, capsys):
    from omnilite.cli import main

    assert main(["make-tiny", "step-audio2", str(tmp_path / "ckpt"), "-q"]) == 0
    assert (tmp_path / "ckpt" / "config.json").is_file()
    capsys.readouterr()
    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "bundle")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: Step-Audio 2 speaks in the voice of a prompt recording; pass --speaker-wav")
    assert not (tmp_path / "bundle").exists()
