"""Reference PyTorch HiFT vocoder (CosyVoice2's NSF + iSTFTNet generator), 80-bin mel at 50 Hz -> 24 kHz.

Parameter names follow the release (``hift.pt`` holds them under ``generator.`` with weight-norm
pairs), so the state dict loads once the prefix is stripped and the weight norms are folded.

The official source module is stochastic: each harmonic above the fundamental starts at a random
phase and Gaussian noise is added (strong in unvoiced frames). Parity needs a fixed source, so
here (and in the runtime) the source is **deterministic**: every harmonic starts at phase 0 and
the noise is drawn from a seeded numpy generator (PCG64, seed 0) in sample order. Only these two
random draws change; the noise level, harmonics and voicing rule are the official ones. The
source is computed outside the exported graph (the runtime's numpy ``SourceGenerator``), so a streaming runtime keeps
the phase and the noise stream continuous across chunks.

The exported graph replaces ``torch.stft``/``torch.istft`` (no ONNX iSTFT op) with convolutions
by the same DFT basis and Hann window; ``HiFT.decode_reference`` keeps the torch calls, and
export parity measures the difference.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from omnilite.runtime.omni2.hift import SourceConfig, SourceGenerator

SOURCE_NOISE_SEED = 0


@dataclass(frozen=True)
class HiFTConfig:
    in_channels: int = 80
    base_channels: int = 512
    nb_harmonics: int = 8
    sampling_rate: int = 24000
    nsf_alpha: float = 0.1
    nsf_sigma: float = 0.003
    nsf_voiced_threshold: float = 10.0
    upsample_rates: tuple[int, ...] = (8, 5, 3)
    upsample_kernel_sizes: tuple[int, ...] = (16, 11, 7)
    n_fft: int = 16
    hop_len: int = 4
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    source_resblock_kernel_sizes: tuple[int, ...] = (7, 7, 11)
    source_resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    lrelu_slope: float = 0.1
    audio_limit: float = 0.99
    f0_cond_channels: int = 512

    @property
    def hop(self) -> int:
        """Output samples per mel frame (480 at 24 kHz)."""
        return int(np.prod(self.upsample_rates)) * self.hop_len


class Snake(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.alpha[None, :, None]
        return x + (1.0 / (a + 1e-9)) * torch.sin(x * a) ** 2


def _centred_conv(ch: int, k: int, dilation: int) -> nn.Conv1d:
    """A length-keeping conv with its padding split evenly on both sides (HiFTGenerator's resblocks)."""
    return nn.Conv1d(ch, ch, k, dilation=dilation, padding=(k * dilation - dilation) // 2)


class ResBlock(nn.Module):
    """Snake -> dilated conv -> Snake -> conv, residual, once per dilation. `conv(ch, k, dilation)`
    makes each conv (CosyVoice3's causal HiFT passes its left-padded one)."""

    def __init__(self, ch: int, k: int, dilations: tuple[int, ...],
                 conv: Callable[[int, int, int], nn.Module] = _centred_conv):
        super().__init__()
        self.convs1 = nn.ModuleList(conv(ch, k, d) for d in dilations)
        self.convs2 = nn.ModuleList(conv(ch, k, 1) for _ in dilations)
        self.activations1 = nn.ModuleList(Snake(ch) for _ in dilations)
        self.activations2 = nn.ModuleList(Snake(ch) for _ in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for c1, c2, a1, a2 in zip(self.convs1, self.convs2, self.activations1, self.activations2):
            x = x + c2(a2(c1(a1(x))))
        return x


class F0Predictor(nn.Module):
    """``ConvRNNF0Predictor``: 5 x (conv k3 + ELU), Linear to 1, abs."""

    def __init__(self, cin: int, cond: int):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(5):
            layers += [nn.Conv1d(cin if i == 0 else cond, cond, 3, padding=1), nn.ELU()]
        self.condnet = nn.Sequential(*layers)
        self.classifier = nn.Linear(cond, 1)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        return torch.abs(self.classifier(self.condnet(mel).transpose(1, 2)).squeeze(-1))


class SourceMerge(nn.Module):
    """``m_source``: the harmonics are merged by Linear(9 -> 1) + tanh (the sines themselves are
    made by `SourceGenerator`)."""

    def __init__(self, harmonics: int):
        super().__init__()
        self.l_linear = nn.Linear(harmonics + 1, 1)


class STFTConv(nn.Module):
    """torch.stft(center=True, reflect pad, periodic Hann) as a strided conv with the real DFT basis."""

    def __init__(self, n_fft: int, hop: int):
        super().__init__()
        self.n_fft, self.hop = n_fft, hop
        n = torch.arange(n_fft, dtype=torch.float64)
        k = torch.arange(n_fft // 2 + 1, dtype=torch.float64)
        window = 0.5 - 0.5 * torch.cos(2 * math.pi * n / n_fft)
        ang = 2 * math.pi * k[:, None] * n[None, :] / n_fft
        basis = torch.cat([torch.cos(ang), -torch.sin(ang)]) * window[None]
        self.register_buffer("basis", basis[:, None, :].float(), persistent=False)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        """(B, S) -> (B, n_fft + 2, frames): real parts then imaginary parts."""
        x = F.pad(s[:, None], (self.n_fft // 2, self.n_fft // 2), mode="reflect")
        return F.conv1d(x, self.basis, stride=self.hop)


class ISTFTConv(nn.Module):
    """torch.istft(center=True, periodic Hann, no length) as a transposed conv (overlap-add) divided
    by the summed squared window."""

    def __init__(self, n_fft: int, hop: int):
        super().__init__()
        self.n_fft, self.hop = n_fft, hop
        n = torch.arange(n_fft, dtype=torch.float64)
        k = torch.arange(n_fft // 2 + 1, dtype=torch.float64)
        window = 0.5 - 0.5 * torch.cos(2 * math.pi * n / n_fft)
        scale = torch.full((n_fft // 2 + 1,), 2.0, dtype=torch.float64)
        scale[0] = 1.0
        scale[-1] = 1.0  # DC and Nyquist appear once in the one-sided spectrum
        ang = 2 * math.pi * k[:, None] * n[None, :] / n_fft
        basis = torch.cat([scale[:, None] * torch.cos(ang), -scale[:, None] * torch.sin(ang)]) / n_fft * window[None]
        self.register_buffer("basis", basis[:, None, :].float(), persistent=False)
        self.register_buffer("window_sq", (window**2).float()[None, None, :], persistent=False)

    def forward(self, real: torch.Tensor, imag: torch.Tensor) -> torch.Tensor:
        spec = torch.cat([real, imag], dim=1)  # (B, 2F, frames)
        y = F.conv_transpose1d(spec, self.basis, stride=self.hop)  # (B, 1, (frames-1)*hop + n_fft)
        env = F.conv_transpose1d(torch.ones_like(spec[:1, :1]), self.window_sq, stride=self.hop)  # ones_like: dynamic in ONNX
        half = self.n_fft // 2
        y = y[:, 0, half:y.shape[-1] - half]
        env = env[:, 0, half:env.shape[-1] - half]
        return y / env


class HiFTDecode(nn.Module):
    """The decode HiFT generators share (CosyVoice2's here, CosyVoice3's causal one in
    export/fun_audio_chat): conv_pre, each upsampling stage plus the source's STFT through its down
    conv and resblock, the resblocks' mean, conv_post, then magnitude and phase -> iSTFT. A subclass
    builds `c`, `conv_pre`, `ups`, `source_downs`, `source_resblocks`, `resblocks`, `conv_post` its
    own way (padding, causality) and calls `_add_stfts`."""

    c: HiFTConfig

    def _add_stfts(self) -> None:
        c = self.c
        self.stft = STFTConv(c.n_fft, c.hop_len)
        self.istft = ISTFTConv(c.n_fft, c.hop_len)
        n = torch.arange(c.n_fft, dtype=torch.float64)
        self.register_buffer("window", (0.5 - 0.5 * torch.cos(2 * math.pi * n / c.n_fft)).float(), persistent=False)

    def _body(self, mel: torch.Tensor, s_stft: torch.Tensor, *pre: torch.Tensor | None) -> torch.Tensor:
        """`pre`: conv_pre's further inputs (the causal HiFT's right context)."""
        c = self.c
        x = self.conv_pre(mel, *pre)
        nk = len(c.resblock_kernel_sizes)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, c.lrelu_slope))
            if i == len(self.ups) - 1:
                x = F.pad(x, (1, 0), mode="reflect")
            x = x + self.source_resblocks[i](self.source_downs[i](s_stft))
            xs = self.resblocks[i * nk](x)
            for j in range(1, nk):
                xs = xs + self.resblocks[i * nk + j](x)
            x = xs / nk
        return self.conv_post(F.leaky_relu(x))  # default slope 0.01, as official

    def forward(self, mel: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """mel (1, 80, T), source (1, T*hop) -> audio (1, T*hop)."""
        x = self._body(mel, self.stft(source))
        nf = self.c.n_fft // 2 + 1
        magnitude = torch.clamp(torch.exp(x[:, :nf]), max=1e2)
        phase = torch.sin(x[:, nf:])
        audio = self.istft(magnitude * torch.cos(phase), magnitude * torch.sin(phase))
        return torch.clamp(audio, -self.c.audio_limit, self.c.audio_limit)

    def _stft_reference(self, source: torch.Tensor) -> torch.Tensor:
        """The source's STFT by torch.stft, as the official code computes it: real parts then imaginary."""
        c = self.c
        spec = torch.view_as_real(torch.stft(source, c.n_fft, c.hop_len, c.n_fft, window=self.window, return_complex=True))
        return torch.cat([spec[..., 0], spec[..., 1]], dim=1)

    def _istft_reference(self, x: torch.Tensor) -> torch.Tensor:
        """conv_post's output -> audio (not yet clamped) by torch.istft, as the official code computes it."""
        c = self.c
        nf = c.n_fft // 2 + 1
        magnitude = torch.clip(torch.exp(x[:, :nf]), max=1e2)
        phase = torch.sin(x[:, nf:])
        spec = torch.complex(magnitude * torch.cos(phase), magnitude * torch.sin(phase))
        return torch.istft(spec, c.n_fft, c.hop_len, c.n_fft, window=self.window)


class HiFT(HiFTDecode):
    """``HiFTGenerator``. ``forward(mel, source)`` is the exported decode (graph-friendly STFTs);
    ``f0_predictor`` is exported on its own; the source is made in between by `SourceGenerator`."""

    def __init__(self, c: HiFTConfig):
        super().__init__()
        self.c = c
        self.m_source = SourceMerge(c.nb_harmonics)
        self.conv_pre = nn.Conv1d(c.in_channels, c.base_channels, 7, padding=3)
        self.ups = nn.ModuleList(
            nn.ConvTranspose1d(c.base_channels // 2**i, c.base_channels // 2 ** (i + 1), k, u, padding=(k - u) // 2)
            for i, (u, k) in enumerate(zip(c.upsample_rates, c.upsample_kernel_sizes))
        )
        self.source_downs = nn.ModuleList()
        self.source_resblocks = nn.ModuleList()
        down_rates = [1] + list(c.upsample_rates[::-1][:-1])
        cum = np.cumprod(down_rates)
        for i, (u, k, d) in enumerate(zip(cum[::-1], c.source_resblock_kernel_sizes, c.source_resblock_dilation_sizes)):
            ch = c.base_channels // 2 ** (i + 1)
            u = int(u)
            self.source_downs.append(nn.Conv1d(c.n_fft + 2, ch, 1) if u == 1 else nn.Conv1d(c.n_fft + 2, ch, u * 2, u, padding=u // 2))
            self.source_resblocks.append(ResBlock(ch, k, d))
        self.resblocks = nn.ModuleList()
        for i in range(len(self.ups)):
            ch = c.base_channels // 2 ** (i + 1)
            for k, d in zip(c.resblock_kernel_sizes, c.resblock_dilation_sizes):
                self.resblocks.append(ResBlock(ch, k, d))
        self.conv_post = nn.Conv1d(ch, c.n_fft + 2, 7, padding=3)
        self.f0_predictor = F0Predictor(c.in_channels, c.f0_cond_channels)
        self._add_stfts()

    def source_generator(self) -> SourceGenerator:
        """The runtime's deterministic source (one implementation for reference and runtime)."""
        c = self.c
        cfg = SourceConfig(c.sampling_rate, c.hop, c.nb_harmonics + 1, c.nsf_alpha, c.nsf_sigma, c.nsf_voiced_threshold)
        lin = self.m_source.l_linear
        return SourceGenerator(cfg, lin.weight.detach().numpy(), float(lin.bias.detach()), SOURCE_NOISE_SEED)

    def decode_reference(self, mel: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """The same decode with torch.stft / torch.istft, as the official code computes it."""
        audio = self._istft_reference(self._body(mel, self._stft_reference(source)))
        return torch.clamp(audio, -self.c.audio_limit, self.c.audio_limit)

    @torch.no_grad()
    def inference(self, mel: torch.Tensor, reference: bool = True) -> tuple[torch.Tensor, np.ndarray]:
        """Whole utterance: mel (1, 80, T) -> (audio (1, T*hop), f0 (T,)), with a fresh deterministic source."""
        f0 = self.f0_predictor(mel)[0].numpy()
        source = torch.from_numpy(self.source_generator()(f0))[None]
        decode = self.decode_reference if reference else self.forward
        return decode(mel, source), f0


class HiFTF0(nn.Module):
    """Exported f0 stage: mel (1, 80, T) -> f0 (1, T)."""

    def __init__(self, hift: HiFTDecode):
        super().__init__()
        self.f0_predictor = hift.f0_predictor

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        return self.f0_predictor(mel)


def measured_receptive_field(hift: "HiFTDecode", frames: int = 96) -> int:
    """One-sided receptive field of the decode graph in mel frames, measured: one mel frame and one
    frame of source in the middle of a random input are changed, and the farthest output sample
    that changes at all (bit for bit: outside the field the same operations see the same values)
    gives the field, rounded up. Frames vocoded with this much mel and source context on each side
    equal whole-utterance ones exactly. At the released shape: 15 (mel 13.1, source 14.3 frames);
    the layer-by-layer bound `receptive_field_frames` says 21, and every frame of context streaming
    holds back is latency (the ring holds this many frames back at every seam)."""
    hop = hift.c.hop
    g = torch.Generator().manual_seed(0)
    mel = torch.randn(1, hift.c.in_channels, frames, generator=g)
    source = 0.1 * torch.randn(1, frames * hop, generator=g)
    p = frames // 2
    reach = 0.0
    nf = hift.c.n_fft // 2 + 1

    def unclamped(m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:  # forward without its clamps, which could hide a change
        x = hift._body(m, hift.stft(s))
        magnitude, phase = torch.exp(x[:, :nf].double()), torch.sin(x[:, nf:].double())
        return hift.istft((magnitude * torch.cos(phase)).float(), (magnitude * torch.sin(phase)).float())

    with torch.no_grad():
        y0 = unclamped(mel, source)
        for bumped in ("mel", "source"):
            m, s = mel.clone(), source.clone()
            if bumped == "mel":
                m[0, :, p] += 3.0
            else:
                s[0, p * hop:(p + 1) * hop] += 0.5
            changed = torch.nonzero((unclamped(m, s) - y0).reshape(-1)).reshape(-1)
            lo, hi = int(changed.min()), int(changed.max())
            reach = max(reach, p - lo / hop, (hi + 1) / hop - (p + 1))
    field = math.ceil(reach)
    if field >= p:
        raise ValueError(f"HiFT's receptive field reaches the edge of the {frames}-frame probe; measure with more frames")
    return field


def receptive_field_frames(c: HiFTConfig) -> int:
    """An upper bound of the decode graph's one-sided receptive field in mel frames, layer by layer
    (conservative, rounded up); `measured_receptive_field` is the exact one the bundle records."""
    radius = 3.0  # conv_pre k7, in frames
    rate = 1
    for i, (u, k) in enumerate(zip(c.upsample_rates, c.upsample_kernel_sizes)):
        rate *= u
        radius += math.ceil(k / u) / (rate / u)  # transposed conv, in its input's units
        rb = max(sum((kk - 1) // 2 * d + (kk - 1) // 2 for d in dil) for kk, dil in zip(c.resblock_kernel_sizes, c.resblock_dilation_sizes))
        radius += rb / rate
        if i == len(c.upsample_rates) - 1:
            radius += 1 / rate  # the reflection pad
    radius += 3 / rate  # conv_post
    radius += (c.n_fft // 2 + c.n_fft) / (rate * c.hop_len)  # the source STFT and the iSTFT overlap
    # The source branch reaches as far as the main one through its resblocks at each rate.
    src = max(sum((kk - 1) // 2 * d + (kk - 1) // 2 for d in dil) for kk, dil in zip(c.source_resblock_kernel_sizes, c.source_resblock_dilation_sizes))
    radius += src / (rate / max(c.upsample_rates))
    return int(math.ceil(radius)) + 1


F0_RECEPTIVE_FIELD = 5  # five k3 convs: +-5 frames
