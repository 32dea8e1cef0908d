"""Fun-Audio-Chat release facts: ids, rates, the processor's prompt format, and the release's
config.json for a given shape. Sources are named in NOTES.md (same folder); values marked
"unverified" there come from ports, not from the official repository."""

from __future__ import annotations

from dataclasses import dataclass

FAMILY = "fun-audio-chat"
MODEL_TYPE = "funaudiochat"
AUDIO_MODEL_TYPE = "funaudiochat_audio_encoder"
MODEL_DIR = "Fun-Audio-Chat-8B"  # pretrained_models/<this> in the official README
SPK2INFO = "utils/new_spk2info.pt"  # in the GitHub repo, not in the HF model dir
SPK2INFO_VOICE = "中文女"  # the voice the official detokenizer loads by default
VOCODER_DIR = "Fun-CosyVoice3-0.5B-2512"  # pretrained_models/<this>, read by utils/cosyvoice_detokenizer.py
VOCODER_YAML = "cosyvoice3.yaml"
# The web demo's streaming token2wav (utils/constant.py): tokens per hop and the flow's lookahead.
STREAM_HOP_TOKENS = 15
STREAM_LOOKAHEAD_TOKENS = 3

SAMPLE_RATE = 16000
TOKEN_RATE = 25  # placeholders and speech tokens per second
GROUP = 5  # 25 Hz frames per LLM position (5 Hz)
MEL_HOP = 160
CHUNK_MEL_FRAMES = 200  # 2 * n_window: one attention window before the stride-2 conv

# Speech-token space (audio_config): CosyVoice3 codes 0..6560 plus four specials.
N_CODES = 6561
SPEECH_BOS, SPEECH_EOS, SPEECH_PAD = 6561, 6562, 6563
CODEBOOK = 6565

# Text ids: Qwen3's vocabulary, then this family's tokens.
IM_END, ENDOFTEXT = 151645, 151643
AUDIO_TOKEN, AUDIO_BOS, AUDIO_EOS, AUDIO_PAD, SIL = 151669, 151670, 151671, 151672, 151673
# (content, special) appended after Qwen2.5's 151643..151664: Qwen3's four extra tokens, then ours.
EXTRA_TOKENS = [
    ("<tool_response>", False), ("</tool_response>", False), ("<think>", False), ("</think>", False),
    ("<|AUDIO|>", True), ("<|audio_bos|>", True), ("<|audio_eos|>", True), ("<|audio_pad|>", True), ("<|SIL|>", True),
]

S2T_PROMPT = "You are asked to generate text tokens."
S2M_PROMPT = "You are asked to generate both text and speech tokens at the same time."
AUDIO_TEMPLATE = "<|audio_bos|><|AUDIO|><|audio_eos|>"

PROCESSOR_CONFIG = {
    "audio_bos_token": "<|audio_bos|>",
    "audio_eos_token": "<|audio_eos|>",
    "audio_group_size": GROUP,
    "audio_pad_token": "<|audio_pad|>",
    "audio_token": "<|AUDIO|>",
    "processor_class": "FunAudioChatProcessor",
}

# The processor's built-in chat template (used when the release ships none): a default system
# turn when the first message is not one, and "Audio N: <|audio_bos|><|AUDIO|><|audio_eos|>\n"
# for each audio item of a list-valued content.
CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if 'audio' in content or 'audio_url' in content or message['type'] == 'audio' %}"
    "{% set audio_count.value = audio_count.value + 1 %}Audio {{ audio_count.value }}: <|audio_bos|><|AUDIO|><|audio_eos|>\n"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class Qwen3Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    inter: int


@dataclass(frozen=True)
class EncoderShape:
    d_model: int
    heads: int
    ffn: int
    layers: int


@dataclass(frozen=True)
class VocoderShape:
    """The CosyVoice3 flow's DiT and pre-lookahead width, and HiFT's channel counts (cosyvoice3.yaml)."""
    dit_dim: int
    dit_depth: int
    dit_heads: int
    dit_dim_head: int
    lookahead_channels: int
    hift_channels: int
    f0_channels: int


@dataclass(frozen=True)
class Shape:
    llm: Qwen3Shape
    encoder: EncoderShape
    head: Qwen3Shape  # the speech refined head (crq_transformer)
    vocoder: VocoderShape


SHAPES = {
    "tiny": Shape(Qwen3Shape(64, 2, 4, 2, 16, 128), EncoderShape(64, 4, 128, 2), Qwen3Shape(32, 2, 4, 2, 8, 64),
                  VocoderShape(64, 2, 4, 16, 64, 32, 32)),
    "real": Shape(Qwen3Shape(4096, 36, 32, 8, 128, 12288), EncoderShape(1280, 20, 5120, 32), Qwen3Shape(1024, 28, 16, 8, 128, 3072),
                  VocoderShape(1024, 22, 16, 64, 1024, 512, 512)),
}


def _qwen3(s: Qwen3Shape, **over) -> dict:
    return {
        "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": ENDOFTEXT, "eos_token_id": ENDOFTEXT, "head_dim": s.head_dim, "hidden_act": "silu",
        "hidden_size": s.hidden, "initializer_range": 0.02, "intermediate_size": s.inter,
        "max_position_embeddings": 32768, "max_window_layers": s.layers, "model_type": "qwen3",
        "num_attention_heads": s.heads, "num_hidden_layers": s.layers, "num_key_value_heads": s.kv_heads,
        "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None,
        "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False,
        "vocab_size": 151936, **over,
    }


def release_config(shape: str) -> dict:
    """config.json as the release writes it, with `shape`'s dimensions."""
    s = SHAPES[shape]
    e = s.encoder
    audio = {
        "activation_dropout": 0, "activation_function": "gelu", "attention_dropout": 0,
        "bos_token_id": SPEECH_BOS, "codebook_size": CODEBOOK, "continuous_features_mode": "replace",
        "crq_transformer_config": _qwen3(s.head, transformers_version="4.51.0"),
        "d_model": e.d_model, "dropout": 0, "enable_audio_invert_tower": True, "encoder_attention_heads": e.heads,
        "encoder_ffn_dim": e.ffn, "encoder_layers": e.layers, "eos_token_id": SPEECH_EOS, "group_size": GROUP,
        "initializer_range": 0.02, "max_source_positions": 1500, "model_type": AUDIO_MODEL_TYPE, "n_window": 100,
        "num_hidden_layers": e.layers, "num_mel_bins": 128, "output_dim": s.llm.hidden, "pad_token_id": SPEECH_PAD,
        "scale_embedding": False,
    }
    text = _qwen3(s.llm, max_position_embeddings=262144, rope_theta=5000000, tie_word_embeddings=False, use_cache=False,
                  audio_bos_index=AUDIO_BOS, audio_eos_index=AUDIO_EOS, sil_index=SIL)
    return {
        "architectures": ["FunAudioChatForConditionalGeneration"], "audio_config": audio,
        "audio_token_index": AUDIO_TOKEN, "ignore_index": -100, "model_type": MODEL_TYPE, "text_config": text,
        "torch_dtype": "bfloat16", "transformers_version": "4.51.0", "use_cache": False,
    }
