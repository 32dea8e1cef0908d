"""The loader reads the official layout and names the tensor, file and shape on a mismatch."""

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from omnilite.export.checkpoint import LlamaOmniCheckpoint
from omnilite.runtime.errors import CheckpointError


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit_shard(root, name, edit):
    model = root / "Llama-3.1-8B-Omni"
    index = json.loads((model / "model.safetensors.index.json").read_text())
    shard = model / index["weight_map"][name]
    tensors = load_file(shard)
    edit(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})
    return shard


def test_official_layout_is_complete(tiny_checkpoint):
    files = {p.relative_to(tiny_checkpoint).as_posix() for p in tiny_checkpoint.rglob("*") if p.is_file()}
    assert {
        "Llama-3.1-8B-Omni/config.json", "Llama-3.1-8B-Omni/model.safetensors.index.json",
        "Llama-3.1-8B-Omni/tokenizer.json", "Llama-3.1-8B-Omni/tokenizer_config.json",
        "models/speech_encoder/large-v3.pt", "vocoder/g_00500000", "vocoder/config.json",
    } <= files
    cfg = json.loads((tiny_checkpoint / "Llama-3.1-8B-Omni" / "config.json").read_text())
    assert cfg["model_type"] == "omni_speech2s_llama" and cfg["ctc_upsample_factor"] == 25
    assert cfg["vocab_size"] == 128256  # the real Llama-3 vocabulary rides along


def test_missing_tensor_is_named(tiny_checkpoint, tmp_path):
    root = _copy(tiny_checkpoint, tmp_path / "ckpt")
    name = "speech_generator.layers.1.mlp.down_proj.weight"
    shard = _edit_shard(root, name, lambda t: t.pop(name))
    ckpt = LlamaOmniCheckpoint.open(root)
    with pytest.raises(CheckpointError) as e:
        ckpt.speech_generator()
    msg = str(e.value)
    assert f"is missing tensor '{name}'" in msg and shard.name in msg and "(64, 128)" in msg


def test_misshaped_tensor_is_named(tiny_checkpoint, tmp_path):
    root = _copy(tiny_checkpoint, tmp_path / "ckpt")
    name = "model.speech_projector.linear2.weight"
    _edit_shard(root, name, lambda t: t.__setitem__(name, t[name][:, :100].clone()))
    with pytest.raises(CheckpointError, match=r"'model.speech_projector.linear2.weight' has shape \(64, 100\), expected \(64, 2048\)"):
        LlamaOmniCheckpoint.open(root).speech_encoder()


def test_missing_vocoder_is_refused(tiny_checkpoint, tmp_path):
    root = _copy(tiny_checkpoint, tmp_path / "ckpt")
    (root / "vocoder" / "g_00500000").unlink()
    with pytest.raises(CheckpointError, match=r"g_00500000 \(unit vocoder checkpoint\) is missing"):
        LlamaOmniCheckpoint.open(root)


def test_not_a_checkpoint_dir(tmp_path):
    with pytest.raises(CheckpointError, match="has no config.json"):
        LlamaOmniCheckpoint.open(tmp_path)


def test_real_shape_matches_the_release():
    from omnilite.export.tiny import SHAPES, llm_config, vocoder_config, whisper_dims

    s = SHAPES["real"]
    cfg = llm_config(s)
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["intermediate_size"]) == (4096, 32, 32, 8, 14336)
    assert cfg["ctc_decoder_config"] == "(2,4096,32,11008)" and cfg["speech_encoder_hidden_size"] == 1280
    d = whisper_dims(s)
    assert (d["n_mels"], d["n_audio_ctx"], d["n_audio_state"], d["n_audio_head"], d["n_audio_layer"]) == (128, 1500, 1280, 20, 32)
    v = vocoder_config(s)
    assert v["upsample_initial_channel"] == 512 and v["embedding_dim"] == 128 and v["num_embeddings"] == 1000
