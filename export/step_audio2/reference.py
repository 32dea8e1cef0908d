"""Reference PyTorch stages of Step-Audio 2, written from the official code (facts in NOTES.md):
the audio front end (25 s pieces, log-mel with 479 samples of right padding), the audio encoder
(Whisper-like, with a padding mask, a 2x avg-pool and ``after_norm``), the adapter (conv stride 2,
GELU, Linear-ReLU-Linear) and the LLM (transformers' Qwen2ForCausalLM built as the official
StepAudio2TextConfig builds its Qwen2Config), with the audio features spliced after each
``<audio_start>``. Module and parameter names are the release's, so its tensors load as they are.
The parity reference runs in float32 (the release is bf16, which the loaders also give for benchmarks).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Qwen2Config, Qwen2ForCausalLM

from omnilite.runtime.errors import AudioError, OmniliteError

from ..speech_encoder import MultiHeadAttention, ResidualAttentionBlock, log_mel_torch
from .checkpoint import ADAPTER_INNER, AUDIO_START_ID, AudioEncoderConfig, StepAudio2Checkpoint, TextConfig

SAMPLE_RATE = 16000
CHUNK_SAMPLES = 25 * SAMPLE_RATE  # stepaudio2.py apply_chat_template: one <audio_start>..<audio_end> per 25 s
MEL_RIGHT_PAD = 479  # utils.log_mel_spectrogram(padding=479)
MASK_BIAS = -1.0e10  # utils/modeling mask_to_bias


def chunk_audio(audio: torch.Tensor) -> list[torch.Tensor]:
    """The 25 s pieces the official prompt code cuts 16 kHz audio into (the last one shorter)."""
    if audio.numel() == 0:
        raise AudioError("the audio is empty; pass a recording with speech in it.")
    return [audio[i:i + CHUNK_SAMPLES] for i in range(0, audio.numel(), CHUNK_SAMPLES)]


def log_mel(piece: torch.Tensor, n_mels: int = 128) -> torch.Tensor:
    """Step-Audio 2's log-mel of one piece: Whisper's transform on the piece plus 479 zeros, no 30 s
    padding; (n_mels, (samples + 479) // 160)."""
    return log_mel_torch(F.pad(piece.to(torch.float32), (0, MEL_RIGHT_PAD)), n_mels, pad_to_30s=False)


def audio_positions(mel_frames: int) -> int:
    """LLM positions (``<audio_patch>`` count) for a piece of `mel_frames`: the encoder's valid length
    (mel_frames - 2, then conv2 and the avg-pool: /4) through the adapter conv (k3, s2, pad 1)."""
    encoded = (mel_frames - 2 + 1) // 2 // 2
    return (encoded - 1) // 2 + 1


class _MaskedAttention(MultiHeadAttention):
    """Whisper attention with an additive key bias (the official encoder masks padded frames)."""

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        b, t, d = x.shape
        h = self.n_head

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, h, d // h).transpose(1, 2)

        o = F.scaled_dot_product_attention(split(self.query(x)), split(self.key(x)), split(self.value(x)), attn_mask=bias)
        return self.out(o.transpose(1, 2).reshape(b, t, d))


class _MaskedBlock(ResidualAttentionBlock):
    def __init__(self, n_state: int, n_head: int):
        super().__init__(n_state, n_head)
        self.attn = _MaskedAttention(n_state, n_head)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x = x + self.attn(self.attn_ln(x), bias)
        return x + self.mlp(self.mlp_ln(x))


class StepAudio2Encoder(nn.Module):
    """The release's ``encoder``: mel (B, n_mels, T) and valid mel lengths (B,) -> (B, T', n_state), lengths."""

    def __init__(self, c: AudioEncoderConfig):
        super().__init__()
        s = c.n_audio_state
        self.conv1 = nn.Conv1d(c.n_mels, s, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(s, s, kernel_size=3, stride=2, padding=1)
        self.positional_embedding = nn.Embedding(c.n_audio_ctx, s)  # learned, unlike openai-whisper's buffer
        self.blocks = nn.ModuleList(_MaskedBlock(s, c.n_audio_head) for _ in range(c.n_audio_layer))
        self.avg_pooler = nn.AvgPool1d(2, stride=2)
        self.after_norm = nn.LayerNorm(s)

    def forward(self, mel: torch.Tensor, mel_len: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = mel.shape[-1]
        x = F.gelu(self.conv1(mel))
        x = F.gelu(self.conv2(x)).permute(0, 2, 1)
        if x.shape[1] > self.positional_embedding.num_embeddings:
            raise AudioError(f"an audio piece of {t} mel frames is longer than the encoder's "
                             f"{self.positional_embedding.num_embeddings} positions allow; cut the audio into 25 s pieces.")
        # Frame j of conv2 covers mel frame (t + 1) % 2 + 2j; it is a key only if that frame is valid.
        valid = torch.arange(t, device=mel.device)[None, :] < mel_len[:, None]
        bias = (~valid[:, (t + 1) % 2::2]).to(x.dtype) * MASK_BIAS
        x = x + self.positional_embedding.weight[: x.shape[1]]
        for block in self.blocks:
            x = block(x, bias[:, None, None, :])
        x = self.avg_pooler(x.permute(0, 2, 1)).permute(0, 2, 1)
        return self.after_norm(x), (mel_len + 1) // 2 // 2


class StepAudio2Adapter(nn.Module):
    """The release's ``adapter``: conv (k, stride, pad 1) + GELU, then Linear(n_state, 2048)-ReLU-Linear(2048, llm_dim)."""

    def __init__(self, c: AudioEncoderConfig):
        super().__init__()
        self.conv = nn.Conv1d(c.n_audio_state, c.n_audio_state, c.kernel_size, c.adapter_stride, padding=1)
        self.linear1 = nn.Linear(c.n_audio_state, ADAPTER_INNER)
        self.linear2 = nn.Linear(ADAPTER_INNER, c.llm_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.conv(x.permute(0, 2, 1))).permute(0, 2, 1)
        return self.linear2(torch.relu(self.linear1(x)))


class EncoderWithAdapter(nn.Module):
    """One audio piece's mel (1, n_mels, T) -> its LLM input rows (audio_positions(T), llm_dim).
    The official model passes mel length T - 2 (utils.padding_mels) and keeps the first
    ``(len - 1) // 2 + 1`` adapter rows."""

    def __init__(self, c: AudioEncoderConfig):
        super().__init__()
        self.encoder = StepAudio2Encoder(c)
        self.adapter = StepAudio2Adapter(c)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        enc, enc_len = self.encoder(mel, torch.tensor([mel.shape[-1] - 2], device=mel.device))
        rows = (int(enc_len[0]) - 1) // 2 + 1
        return self.adapter(enc)[0, :rows]


def encode_pieces(module: EncoderWithAdapter, mels: list[torch.Tensor]) -> list[torch.Tensor]:
    """All audio pieces of one prompt as the official forward encodes them: zero-padded to the longest
    into one batch (utils.padding_mels, lengths T_i - 2), rows cut to each piece's count. A shorter last
    piece therefore sees zeros after its end and the key mask of the batch's length parity, so its rows
    can differ from encoding it alone (`EncoderWithAdapter`), which is exact for a single piece."""
    t = max(m.shape[-1] for m in mels)
    batch = torch.stack([F.pad(m, (0, t - m.shape[-1])) for m in mels])
    enc, enc_len = module.encoder(batch, torch.tensor([m.shape[-1] - 2 for m in mels]))
    out = module.adapter(enc)
    return [out[i, : (int(n) - 1) // 2 + 1] for i, n in enumerate(enc_len)]


def qwen2_config(t: TextConfig) -> Qwen2Config:
    """The Qwen2Config the official StepAudio2TextConfig builds from config.json's text_config."""
    return Qwen2Config(vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                       num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
                       num_key_value_heads=t.num_key_value_heads, hidden_act="silu",
                       max_position_embeddings=t.max_position_embeddings, rms_norm_eps=t.rms_norm_eps,
                       rope_theta=t.rope_theta, rope_scaling=t.rope_scaling, tie_word_embeddings=False)


def _load(module: nn.Module, ckpt: StepAudio2Checkpoint, prefix: str, dtype: torch.dtype) -> nn.Module:
    # Names and shapes were checked when the checkpoint was opened; strict loading still guards drift.
    state = {name: ckpt.tensors[prefix + name].to(dtype) for name in module.state_dict()}
    module.to(dtype).load_state_dict(state, strict=True)
    return module.eval()


def load_encoder(ckpt: StepAudio2Checkpoint, dtype: torch.dtype = torch.float32) -> EncoderWithAdapter:
    """Encoder + adapter in `dtype` (float32: the parity reference; bfloat16: the release's own dtype)."""
    m = EncoderWithAdapter(ckpt.config.audio)
    _load(m.encoder, ckpt, "encoder.", dtype)
    _load(m.adapter, ckpt, "adapter.", dtype)
    return m.eval()


def load_llm(ckpt: StepAudio2Checkpoint, dtype: torch.dtype = torch.float32) -> Qwen2ForCausalLM:
    """The LLM in `dtype`; bfloat16 keeps the release's tensors as they are (16.6 GB at the real shape)."""
    with torch.device("meta"):
        llm = Qwen2ForCausalLM(qwen2_config(ckpt.config.text))
    state = {n: ckpt.tensors[n].to(dtype) for n in llm.state_dict()}
    llm.load_state_dict(state, strict=True, assign=True)
    # The rotary frequencies are a non-persistent buffer (not in the release): rebuild them off the meta device.
    llm.model.rotary_emb = type(llm.model.rotary_emb)(config=llm.config)
    return llm.eval()


def splice_audio(input_ids: torch.Tensor, embeds: torch.Tensor, pieces: list[torch.Tensor]) -> torch.Tensor:
    """The official forward's splice: piece i's rows overwrite the positions right after the i-th
    ``<audio_start>`` (its ``<audio_patch>`` run). input_ids (T,), embeds (T, hidden)."""
    starts = (input_ids == AUDIO_START_ID).nonzero().flatten().tolist()
    if len(starts) != len(pieces):
        raise OmniliteError(f"the prompt has {len(starts)} <audio_start> tokens for {len(pieces)} audio pieces; "
                              "render one <audio_start><audio_patch>...<audio_end> per 25 s piece.")
    out = embeds.clone()
    for s, rows in zip(starts, pieces):
        out[s + 1:s + 1 + rows.shape[0]] = rows.to(out.dtype)
    return out
