"""Reference unit HiFi-GAN with duration predictor (fairseq CodeHiFiGAN, as LLaMA-Omni uses it).

Parameter names follow fairseq's CodeGenerator: ``dict`` (unit embedding), ``dur_predictor.{conv1.0,
ln1,conv2.0,ln2,proj}``, ``conv_pre``, ``ups.i``, ``resblocks.j.convs{1,2}.m``, ``conv_post``. The
released checkpoint stores weight-normed convs as ``weight_g``/``weight_v``; the loader folds them
(w = g * v / ||v||) into plain convolutions, which is what fairseq's remove_weight_norm does.

The vocoder is split in two exported graphs so that the runtime can stream it:
``UnitDuration`` (units -> frames per unit) and ``FrameVocoder`` (frame-level unit ids -> waveform).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

LRELU_SLOPE = 0.1


def _padding(kernel: int, dilation: int = 1) -> int:
    return (kernel * dilation - dilation) // 2


class ResBlock(nn.Module):
    def __init__(self, channels: int, kernel: int, dilations: list[int]):
        super().__init__()
        self.convs1 = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel, dilation=d, padding=_padding(kernel, d)) for d in dilations
        )
        self.convs2 = nn.ModuleList(nn.Conv1d(channels, channels, kernel, padding=_padding(kernel)) for _ in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for c1, c2 in zip(self.convs1, self.convs2):
            x = x + c2(F.leaky_relu(c1(F.leaky_relu(x, LRELU_SLOPE)), LRELU_SLOPE))
        return x


class DurationPredictor(nn.Module):
    """fairseq VariancePredictor: conv-ReLU-LN, conv-ReLU-LN, Linear -> log(1 + duration)."""

    def __init__(self, embed_dim: int, hidden: int, kernel: int):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv1d(embed_dim, hidden, kernel, padding=(kernel - 1) // 2), nn.ReLU())
        self.ln1 = nn.LayerNorm(hidden)
        self.conv2 = nn.Sequential(nn.Conv1d(hidden, hidden, kernel, padding=1), nn.ReLU())
        self.ln2 = nn.LayerNorm(hidden)
        self.proj = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, T, C)
        x = self.ln1(self.conv1(x.transpose(1, 2)).transpose(1, 2))
        x = self.ln2(self.conv2(x.transpose(1, 2)).transpose(1, 2))
        return self.proj(x).squeeze(-1)


class CodeHiFiGAN(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        rates, kernels = cfg["upsample_rates"], cfg["upsample_kernel_sizes"]
        ch0 = cfg["upsample_initial_channel"]
        self.num_kernels = len(cfg["resblock_kernel_sizes"])
        self.dict = nn.Embedding(cfg["num_embeddings"], cfg["embedding_dim"])
        dp = cfg.get("dur_predictor_params")
        self.dur_predictor = (
            DurationPredictor(dp["encoder_embed_dim"], dp["var_pred_hidden_dim"], dp["var_pred_kernel_size"]) if dp else None
        )
        self.conv_pre = nn.Conv1d(cfg.get("model_in_dim", 80), ch0, 7, padding=3)
        self.ups = nn.ModuleList(
            nn.ConvTranspose1d(ch0 // 2**i, ch0 // 2 ** (i + 1), k, u, padding=(k - u) // 2)
            for i, (u, k) in enumerate(zip(rates, kernels))
        )
        self.resblocks = nn.ModuleList(
            ResBlock(ch0 // 2 ** (i + 1), k, d)
            for i in range(len(rates))
            for k, d in zip(cfg["resblock_kernel_sizes"], cfg["resblock_dilation_sizes"])
        )
        self.conv_post = nn.Conv1d(ch0 // 2 ** len(rates), 1, 7, padding=3)
        self.hop = 1
        for r in rates:
            self.hop *= r

    def durations(self, units: torch.Tensor) -> torch.Tensor:
        """units (1, T) -> frames per unit (1, T) int64, as fairseq: clamp(round(exp(d) - 1), min=1)."""
        log_dur = self.dur_predictor(self.dict(units))
        return torch.clamp(torch.round(torch.exp(log_dur) - 1), min=1).long()

    def generate(self, frame_units: torch.Tensor) -> torch.Tensor:
        """frame-level unit ids (1, F) -> waveform (1, F * hop)."""
        x = self.conv_pre(self.dict(frame_units).transpose(1, 2))
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, LRELU_SLOPE))
            blocks = self.resblocks[i * self.num_kernels:(i + 1) * self.num_kernels]
            x = sum(b(x) for b in blocks) / self.num_kernels
        x = torch.tanh(self.conv_post(F.leaky_relu(x)))  # default slope 0.01 here, as in fairseq
        return x.squeeze(1)

    def forward(self, units: torch.Tensor) -> torch.Tensor:
        """Offline reference: units (1, T) -> waveform (1, samples), with duration prediction."""
        frame_units = torch.repeat_interleave(units, self.durations(units).view(-1), dim=1)
        return self.generate(frame_units)


class UnitDuration(nn.Module):
    def __init__(self, vocoder: CodeHiFiGAN):
        super().__init__()
        self.vocoder = vocoder

    def forward(self, units: torch.Tensor) -> torch.Tensor:
        return self.vocoder.durations(units)


class FrameVocoder(nn.Module):
    def __init__(self, vocoder: CodeHiFiGAN):
        super().__init__()
        self.vocoder = vocoder

    def forward(self, frame_units: torch.Tensor) -> torch.Tensor:
        return self.vocoder.generate(frame_units)


def fold_weight_norm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replace every (weight_g, weight_v) pair by the effective weight (norm over all dims but 0)."""
    out = {}
    for name, t in state.items():
        if name.endswith(".weight_g"):
            continue
        if name.endswith(".weight_v"):
            base = name[: -len(".weight_v")]
            g = state[base + ".weight_g"]
            norm = t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))
            out[base + ".weight"] = g * t / norm
        else:
            out[name] = t
    return out


def receptive_field_frames(cfg: dict) -> int:
    """One-sided receptive field of the generator, in input frames (rounded up, conservative).

    Outputs of a chunk vocoded with at least this many frames of context on each side equal the
    outputs of vocoding the whole sequence; the streaming vocoder relies on it.
    """
    radius = 3.0  # conv_pre, kernel 7
    rate = 1
    for u, k in zip(cfg["upsample_rates"], cfg["upsample_kernel_sizes"]):
        radius += math.ceil(k / u) / rate  # transposed conv, in its input's units
        rate *= u
        res = max(
            sum((kernel - 1) // 2 * d + (kernel - 1) // 2 for d in dils)
            for kernel, dils in zip(cfg["resblock_kernel_sizes"], cfg["resblock_dilation_sizes"])
        )
        radius += res / rate
    radius += 3 / rate  # conv_post, kernel 7
    return math.ceil(radius) + 1


def duration_receptive_field(cfg: dict) -> int:
    """Units on each side that a unit's predicted duration depends on (two convolutions)."""
    k = cfg["dur_predictor_params"]["var_pred_kernel_size"]
    return 2 * ((k - 1) // 2)
