"""Reference PyTorch speech front-end: Whisper log-mel, Whisper audio encoder, concat adapter.

Module and parameter names follow openai-whisper's AudioEncoder (``conv1``, ``blocks.N.attn.query``...)
and LLaMA-Omni's EncoderProjectorConcat (``linear1``/``linear2``) so official state dicts load as-is.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from omnilite.runtime import mel as np_mel


def log_mel_torch(audio: torch.Tensor, n_mels: int = 128, pad_to_30s: bool = True) -> torch.Tensor:
    """Whisper's log-mel with torch.stft; audio (samples,) float at 16 kHz -> (n_mels, frames)."""
    audio = audio.to(torch.float32)
    if pad_to_30s:
        audio = F.pad(audio[: np_mel.N_SAMPLES], (0, max(0, np_mel.N_SAMPLES - audio.numel())))
    window = torch.hann_window(np_mel.N_FFT)
    stft = torch.stft(audio, np_mel.N_FFT, np_mel.HOP, window=window, return_complex=True)
    power = stft[..., :-1].abs() ** 2
    filters = torch.from_numpy(np_mel.mel_filters(n_mels))
    log_spec = torch.clamp(filters @ power, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    return (log_spec + 4.0) / 4.0


class MultiHeadAttention(nn.Module):
    def __init__(self, n_state: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.query = nn.Linear(n_state, n_state)
        self.key = nn.Linear(n_state, n_state, bias=False)
        self.value = nn.Linear(n_state, n_state)
        self.out = nn.Linear(n_state, n_state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.n_head

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, h, d // h).transpose(1, 2)

        o = F.scaled_dot_product_attention(split(self.query(x)), split(self.key(x)), split(self.value(x)))
        return self.out(o.transpose(1, 2).reshape(b, t, d))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, n_state: int, n_head: int):
        super().__init__()
        self.attn = MultiHeadAttention(n_state, n_head)
        self.attn_ln = nn.LayerNorm(n_state)
        self.mlp = nn.Sequential(nn.Linear(n_state, 4 * n_state), nn.GELU(), nn.Linear(4 * n_state, n_state))
        self.mlp_ln = nn.LayerNorm(n_state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_ln(x))
        return x + self.mlp(self.mlp_ln(x))


class AudioEncoder(nn.Module):
    """Whisper encoder. Accepts any mel length up to n_ctx*2; positions are sliced to the length
    (the official module asserts exactly 3000 frames, which is our `exact` mode)."""

    def __init__(self, n_mels: int, n_ctx: int, n_state: int, n_head: int, n_layer: int):
        super().__init__()
        self.conv1 = nn.Conv1d(n_mels, n_state, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(n_state, n_state, kernel_size=3, stride=2, padding=1)
        self.register_buffer("positional_embedding", torch.zeros(n_ctx, n_state))
        self.blocks = nn.ModuleList(ResidualAttentionBlock(n_state, n_head) for _ in range(n_layer))
        self.ln_post = nn.LayerNorm(n_state)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.conv1(mel))
        x = F.gelu(self.conv2(x)).permute(0, 2, 1)
        x = x + self.positional_embedding[: x.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.ln_post(x)


class ConcatAdapter(nn.Module):
    """Stack k consecutive frames (dropping the remainder), then Linear-ReLU-Linear."""

    def __init__(self, k: int, encoder_dim: int, llm_dim: int, inner_dim: int = 2048):
        super().__init__()
        self.k = k
        self.linear1 = nn.Linear(encoder_dim * k, inner_dim)
        self.linear2 = nn.Linear(inner_dim, llm_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        n = t // self.k
        x = x[:, : n * self.k].reshape(b, n, d * self.k)
        return self.linear2(torch.relu(self.linear1(x)))


class EncoderWithAdapter(nn.Module):
    """The exported speech stage: mel (1, n_mels, T) -> LLM input embeddings (1, T // 10, llm_dim)."""

    def __init__(self, encoder: AudioEncoder, adapter: ConcatAdapter):
        super().__init__()
        self.encoder = encoder
        self.adapter = adapter

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.encoder(mel))


# --- encoder modes on the export side -----------------------------------------------------------

PADDING_CACHE_FILE = "encoder_padding.npy"


@torch.no_grad()
def padding_cache(module: nn.Module, n_mels: int, max_mel_frames: int) -> "np.ndarray":
    """The stage's output for a 30 s window of pure padding: what `+fill` encoder modes splice in
    after the encoded audio. Stored in the bundle so the runtime need not spend an exact-mode run on it."""
    from omnilite.runtime.encoder import padding_mel

    return module(torch.from_numpy(padding_mel(n_mels, max_mel_frames))[None])[0].float().numpy()


@torch.no_grad()
def reference_mode_embeddings(module: nn.Module, audio_16k: "np.ndarray", mode: str, n_mels: int,
                              frames_per_position: int, padding: "np.ndarray | None" = None) -> "np.ndarray":
    """What the runtime's SpeechEncoder returns in `mode`, computed with the PyTorch stage: the same
    windows and numpy log-mel, each window through `module`, concatenated, filled for `+fill`."""
    from omnilite.runtime.encoder import EncoderMode, fill_window, window_mel
    from omnilite.runtime.mel import HOP

    m = EncoderMode.parse(mode)
    log_mel = np_mel.LogMel(n_mels)
    outs = [module(torch.from_numpy(window_mel(log_mel, audio_16k, w, frames_per_position))[None])[0].float().numpy()
            for w in m.windows(len(audio_16k), frames_per_position * HOP)]
    out = np.concatenate(outs)
    if m.fill:
        out = fill_window(out, padding if padding is not None else padding_cache(module, n_mels, np_mel.N_FRAMES))
    return out


def encoder_manifest(n_mels: int, max_mel_frames: int, frames_per_position: int, mode: str,
                     padding_file: str | None = PADDING_CACHE_FILE) -> dict:
    """The manifest's "encoder" section, shared by the Whisper-encoder families."""
    from omnilite.runtime.encoder import ENCODER_MODES, PADDING_FILL_LEVEL, EncoderMode

    default = EncoderMode.parse(mode)
    names = list(dict.fromkeys([default.name, *ENCODER_MODES]))
    section = {
        "n_mels": n_mels,
        "mode": default.name,  # the runtime's default; `--encoder-mode exact` (or any listed mode) overrides it
        "modes": {n: EncoderMode.parse(n).describe() for n in names},
        "speech_positions": {
            "exact": max_mel_frames // frames_per_position,
            "+fill modes": max_mel_frames // frames_per_position,
            "other modes": "fewer: one per 100 ms of encoded window (see modes); the LLM prefill is shorter",
        },
        "max_mel_frames": max_mel_frames,
        "frames_per_position": frames_per_position,
    }
    if padding_file:
        section["padding_cache"] = {"file": padding_file, "level": PADDING_FILL_LEVEL,
                                    "what": "encoder + adapter output for a 30 s window of padding, used by +fill modes"}
    return section
