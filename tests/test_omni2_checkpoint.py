"""The LLaMA-Omni2 release layout: what make-tiny writes, what the loader accepts and refuses."""

import json
import shutil

import pytest
import torch

from omnilite.export.omni2.checkpoint import Omni2Checkpoint, parse_stream_params
from omnilite.runtime.errors import CheckpointError


def test_tiny_writes_the_official_layout(omni2_checkpoint):
    models = omni2_checkpoint / "models"
    model_dir = models / "LLaMA-Omni2-0.5B"
    for f in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
              "vocab.json", "merges.txt", "tts_tokenizer/tokenizer.json", "tts_tokenizer/tokenizer_config.json"):
        assert (model_dir / f).is_file(), f
    assert (models / "speech_encoder" / "large-v3.pt").is_file()
    dec = models / "cosy2_decoder"
    for f in ("cosyvoice.yaml", "flow.pt", "hift.pt", "campplus.onnx", "speech_tokenizer_v2.onnx", "spk2info.pt",
              "CosyVoice-BlankEN/config.json"):
        assert (dec / f).is_file(), f
    cfg = json.loads((model_dir / "config.json").read_text())
    assert cfg["model_type"] == "omni2_speech2s_qwen2" and cfg["stream_params"] == "(3,10)"
    assert cfg["speech_generator"]["model_type"] == "qwen2" and cfg["speech_encoder_ds_rate"] == 5
    hift = torch.load(dec / "hift.pt", weights_only=True)
    assert all(k.startswith("generator.") for k in hift)
    assert "generator.conv_pre.weight_g" in hift and "generator.source_downs.0.weight" in hift
    flow = torch.load(dec / "flow.pt", weights_only=True)
    assert {"input_embedding.weight", "encoder.embed.out.0.weight", "encoder.pre_lookahead_layer.conv1.weight",
            "encoder.encoders.0.self_attn.pos_bias_u", "encoder.up_layer.conv.weight",
            "decoder.estimator.time_mlp.linear_1.weight", "decoder.estimator.mid_blocks.0.1.0.attn1.to_q.weight"} <= set(flow)


def test_qwen_tokenizer_is_the_real_one(omni2_checkpoint):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(omni2_checkpoint / "models" / "LLaMA-Omni2-0.5B" / "tokenizer.json"))
    assert tok.encode("Hello, world!").ids == [9707, 11, 1879, 0]  # Qwen2.5's ids
    assert tok.token_to_id("<|im_start|>") == 151644 and tok.token_to_id("<|im_end|>") == 151645
    assert tok.token_to_id("<speech>") == 151665


def test_loader_reads_configs_and_speech_units(omni2_checkpoint):
    ck = Omni2Checkpoint.open(omni2_checkpoint)
    assert ck.stream_params == (3, 10)
    assert ck.flow_config.chunk_tokens == 50 and ck.flow_config.pre_lookahead_len == 3
    assert ck.hift_config.hop == 480 and ck.hift_config.sampling_rate == 24000
    sp = ck.tts_specials()
    assert len(sp["units"]) == 6561 and sorted(sp["units"].values()) == list(range(6561))
    # The .pt gives the dims, the full save's model.speech_encoder.* copy the weights (official precedence).
    assert ck.encoder_path.name == "large-v3.pt" and ck.encoder_source == "safetensors (model.speech_encoder.*)"


@pytest.mark.parametrize("value,expected", [("(3,10)", (3, 10)), (" ( 1 , 5 ) ", (1, 5))])
def test_stream_params(value, expected):
    assert parse_stream_params(value) == expected


def test_stream_params_garbage_is_named():
    with pytest.raises(CheckpointError, match="stream_params 'fast'"):
        parse_stream_params("fast")


def _copy(src, dst):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model.safetensors"))
    (dst / "models" / "LLaMA-Omni2-0.5B" / "model.safetensors").symlink_to(src / "models" / "LLaMA-Omni2-0.5B" / "model.safetensors")
    return dst


def test_missing_decoder_file_is_named(omni2_checkpoint, tmp_path):
    ck = _copy(omni2_checkpoint, tmp_path / "c")
    (ck / "models" / "cosy2_decoder" / "hift.pt").unlink()
    with pytest.raises(CheckpointError, match=r"hift\.pt \(HiFT vocoder weights\) is missing; download ICTNLP/cosy2_decoder"):
        Omni2Checkpoint.open(ck)


def test_misshaped_flow_tensor_names_tensor_file_and_shapes(omni2_checkpoint, tmp_path):
    ck = _copy(omni2_checkpoint, tmp_path / "c")
    path = ck / "models" / "cosy2_decoder" / "flow.pt"
    state = torch.load(path, weights_only=True)
    state["encoder_proj.weight"] = torch.zeros(80, 7)
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"flow\.pt: tensor 'encoder_proj.weight' has shape \(80, 7\), expected \(80, 64\)"):
        Omni2Checkpoint.open(ck).flow()


def test_speech_to_text_release_is_refused_with_a_reason(omni2_checkpoint, tmp_path):
    ck = _copy(omni2_checkpoint, tmp_path / "c")
    cfg_path = ck / "models" / "LLaMA-Omni2-0.5B" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["model_type"] = "omni2_speech_qwen2"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="speech-to-text LLaMA-Omni2"):
        Omni2Checkpoint.open(ck)


@pytest.mark.parametrize("size,params_b", [("0.5B", 0.49), ("1.5B", 1.54), ("7B", 7.6)])
def test_real_shapes_match_the_released_llms(size, params_b):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from omnilite.export.omni2.tiny import SHAPES, omni2_config

    cfg = omni2_config(SHAPES[size], 158272)
    with torch.device("meta"):
        llm = Qwen2ForCausalLM(Qwen2Config(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type", "speech_generator")}))
    n = sum(p.numel() for p in llm.parameters()) / 1e9  # tied heads are counted once
    assert abs(n - params_b) / params_b < 0.03
    assert cfg["speech_generator"]["hidden_size"] == 896 and cfg["speech_generator"]["num_hidden_layers"] == 24


def test_slow_tokenizer_files_without_tokenizer_json(omni2_checkpoint, tmp_path):
    """A checkpoint saved with a slow tokenizer (vocab.json + merges.txt + tokenizer_config.json, no
    tokenizer.json) gets the fast tokenizer built as AutoTokenizer builds it: the same ids on the chat
    template, the speech/<sep> tokens and the units map as the tokenizer.json it was saved from."""
    from tokenizers import Tokenizer

    from omnilite.export.omni2.checkpoint import Omni2Checkpoint
    from omnilite.export.omni2.reference import render_prompt

    copy = tmp_path / "ckpt"
    shutil.copytree(omni2_checkpoint, copy)
    model_dir = next((copy / "models").glob("LLaMA-Omni2-*"))
    (model_dir / "tokenizer.json").unlink()
    (model_dir / "tts_tokenizer" / "tokenizer.json").unlink()
    original = Omni2Checkpoint.open(omni2_checkpoint)
    slow = Omni2Checkpoint.open(copy)
    assert slow.tokenizer_dir != model_dir and slow.tts_tokenizer_dir != model_dir / "tts_tokenizer"
    assert render_prompt(slow.tokenizer_dir) == render_prompt(original.tokenizer_dir)
    assert slow.tts_specials() == original.tts_specials()
    text = "<|im_start|>user\nHello, world 123 <sep><|s_0|><|s_6560|> naïve 😀<|im_end|>"
    for a, b in ((slow.tokenizer_dir, original.tokenizer_dir), (slow.tts_tokenizer_dir, original.tts_tokenizer_dir)):
        ids = Tokenizer.from_file(str(a / "tokenizer.json")).encode(text, add_special_tokens=False).ids
        assert ids == Tokenizer.from_file(str(b / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    (model_dir / "merges.txt").unlink()
    with pytest.raises(CheckpointError, match=r"has no tokenizer.json and no merges.txt to build it from; download the complete"):
        Omni2Checkpoint.open(copy)
