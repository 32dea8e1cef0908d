"""Reference PyTorch CosyVoice3 vocoder as Fun-Audio-Chat runs it (``Fun-CosyVoice3-0.5B-2512``):
speech tokens (25 Hz) -> 80-bin mel (50 Hz) by ``CausalMaskedDiffWithDiT`` -> 24 kHz audio by
``CausalHiFTGenerator``. Facts and sources are in NOTES.md ("Vocoder stages (CosyVoice3)").

Module and parameter names follow the release, so ``flow.pt`` loads as-is and ``hift.pt`` once its
weight-norm pairs are folded. The maths, re-implemented from the official code:

* flow: token embedding (80-d) -> ``PreLookaheadLayer`` (conv over each token and the 3 after it,
  80 -> 1024 -> 80, residual) -> each token repeated twice = mu; no conformer encoder. Without
  ``finalize`` the last 3 tokens are only the lookahead's context (their frames are not made).
* estimator: an F5-TTS-style DiT: sinusoidal time -> MLP; input = Linear(x, cond, mu, spks) + two
  causal grouped convs (k31); blocks of adaLN-zero attention + tanh-GELU MLP; rotary positions from
  x_transformers applied to the *first head_dim channels* of the packed q/k only (as the official
  processor calls it before splitting heads); final adaLN + Linear. Full attention when the official
  call passes ``streaming=False`` (Fun-Audio-Chat always does), chunk attention of
  ``static_chunk_size`` frames otherwise.
* Euler ODE, 10 cosine-spaced steps, CFG 0.7 as a batch of two, from the fixed noise
  (randn(1, 80, 15000) after seeding 0, as ``CausalConditionalCFM``).
* HiFT: causal convs everywhere (left zero padding), except conv_pre (4 frames of right context) and
  the f0 predictor's first conv (3 frames); upsampling = nearest repeat + causal conv. Without
  ``finalize`` the right context is real mel and the last frame's 480 samples are dropped.
* source: ``SineGen2(causal=True)``; see `runtime/fun_audio_chat/vocoder.CausalSource` (torch-free, the runtime's).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from omnilite.runtime.fun_audio_chat.vocoder import CausalSource, SourceParams

from ..omni2.flow import PreLookahead, chunk_mask, fixed_noise, sinusoidal_time
from ..omni2.hift import HiFTConfig, HiFTDecode, HiFTF0, ResBlock, SourceMerge

NOISE_FRAMES = 15000


@dataclass(frozen=True)
class DiTFlowConfig:
    vocab_size: int = 6561
    input_size: int = 80  # token embedding width (= mel bins in CosyVoice3)
    output_size: int = 80
    spk_embed_dim: int = 192
    token_mel_ratio: int = 2
    pre_lookahead_len: int = 3
    lookahead_channels: int = 1024
    dim: int = 1024
    depth: int = 22
    heads: int = 16
    dim_head: int = 64
    ff_mult: int = 2
    static_chunk_size: int = 50  # frames; only used by streaming=True calls
    n_timesteps: int = 10
    inference_cfg_rate: float = 0.7
    t_scheduler: str = "cosine"


@dataclass(frozen=True)
class CausalHiFTConfig(HiFTConfig):
    conv_pre_look_right: int = 4
    f0_look_right: int = 3  # the f0 predictor's first conv: kernel 4, all of its padding on the right

    def source_params(self) -> SourceParams:
        return SourceParams(self.sampling_rate, self.hop, self.nb_harmonics + 1, self.nsf_alpha, self.nsf_sigma,
                            self.nsf_voiced_threshold)


# ----------------------------------------------------------------------------- DiT estimator


class _Rotary(nn.Module):
    """x_transformers ``RotaryEmbedding``: only the inv_freq buffer (stored in flow.pt)."""

    def __init__(self, dim_head: int):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, dim_head, 2).float() / dim_head)))

    def cos_sin(self, n: int, start: int | torch.Tensor = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotations of positions start .. start + n - 1."""
        pos = torch.arange(n, dtype=torch.float32, device=self.inv_freq.device) + start
        freqs = pos[:, None] * self.inv_freq[None]
        freqs = torch.stack([freqs, freqs], dim=-1).reshape(n, -1)  # each frequency twice, interleaved
        return freqs.cos(), freqs.sin()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.shape[-1] channels of x (B, T, C) in interleaved pairs; the rest pass."""
    d = cos.shape[-1]
    head, rest = x[..., :d], x[..., d:]
    pairs = head.reshape(*head.shape[:-1], d // 2, 2)
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).reshape(head.shape)
    return torch.cat([head * cos + rotated * sin, rest], dim=-1)


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.dim_head = heads, dim_head
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(dim, inner)
        self.to_v = nn.Linear(dim, inner)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(0.0)])

    def forward(self, x, bias, keep, cos, sin):
        b, n, _ = x.shape
        q, k = _rotate(self.to_q(x), cos, sin), _rotate(self.to_k(x), cos, sin)
        v = self.to_v(x)

        def heads(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, n, self.heads, self.dim_head).transpose(1, 2)

        scores = torch.matmul(heads(q), heads(k).transpose(-2, -1)) / math.sqrt(self.dim_head) + bias[:, None]
        out = torch.matmul(torch.softmax(scores, dim=-1), heads(v)).transpose(1, 2).reshape(b, n, -1)
        return self.to_out[0](out) * keep  # padded positions zeroed, as the official processor does

    def forward_cached(self, x, bias, cos, sin, past_k, past_v):
        """New frames x (B, n, D) attending to the cached keys / values (B, P, inner) of earlier frames
        (keys already rotated at their absolute positions) and to each other; bias (n, P + n).
        Returns the output and this call's keys / values (B, n, inner), to append to the cache."""
        b, n, _ = x.shape
        q, k_new = _rotate(self.to_q(x), cos, sin), _rotate(self.to_k(x), cos, sin)
        v_new = self.to_v(x)
        k, v = torch.cat([past_k, k_new], dim=1), torch.cat([past_v, v_new], dim=1)

        def heads(y: torch.Tensor) -> torch.Tensor:
            return y.reshape(b, y.shape[1], self.heads, self.dim_head).transpose(1, 2)

        scores = torch.matmul(heads(q), heads(k).transpose(-2, -1)) / math.sqrt(self.dim_head) + bias
        out = torch.matmul(torch.softmax(scores, dim=-1), heads(v)).transpose(1, 2).reshape(b, n, -1)
        return self.to_out[0](out), k_new, v_new


class _AdaLNLinear(nn.Module):
    def __init__(self, dim: int, n: int):
        super().__init__()
        self.linear = nn.Linear(dim, n * dim)


class _FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int):
        super().__init__()
        self.ff = nn.Sequential(nn.Sequential(nn.Linear(dim, dim * mult), nn.GELU(approximate="tanh")), nn.Dropout(0.0),
                                nn.Linear(dim * mult, dim))

    def forward(self, x):
        return self.ff(x)


def _layer_norm(x: torch.Tensor, dim: int) -> torch.Tensor:
    return F.layer_norm(x, (dim,), eps=1e-6)  # elementwise_affine=False


class DiTBlock(nn.Module):
    def __init__(self, c: DiTFlowConfig):
        super().__init__()
        self.dim = c.dim
        self.attn_norm = _AdaLNLinear(c.dim, 6)
        self.attn = _Attention(c.dim, c.heads, c.dim_head)
        self.ff = _FeedForward(c.dim, c.ff_mult)

    def forward(self, x, temb, bias, keep, cos, sin):
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.attn_norm.linear(F.silu(temb)).chunk(6, dim=1)
        h = _layer_norm(x, self.dim) * (1 + scale_a[:, None]) + shift_a[:, None]
        x = x + gate_a[:, None] * self.attn(h, bias, keep, cos, sin)
        h = _layer_norm(x, self.dim) * (1 + scale_m[:, None]) + shift_m[:, None]
        return x + gate_m[:, None] * self.ff(h)

    def forward_cached(self, x, temb, bias, cos, sin, past_k, past_v):
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.attn_norm.linear(F.silu(temb)).chunk(6, dim=1)
        h = _layer_norm(x, self.dim) * (1 + scale_a[:, None]) + shift_a[:, None]
        a, k, v = self.attn.forward_cached(h, bias, cos, sin, past_k, past_v)
        x = x + gate_a[:, None] * a
        h = _layer_norm(x, self.dim) * (1 + scale_m[:, None]) + shift_m[:, None]
        return x + gate_m[:, None] * self.ff(h), k, v


class _TimeEmbed(nn.Module):
    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.time_mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):
        return self.time_mlp(sinusoidal_time(t, self.freq_dim))  # scale 1000, log(1e4)/(half-1): as official


class _ConvPos(nn.Module):
    """``CausalConvPositionEmbedding``: two grouped k31 convs with left padding, Mish after each."""

    def __init__(self, dim: int, kernel: int = 31, groups: int = 16):
        super().__init__()
        self.kernel = kernel
        self.conv1 = nn.Sequential(nn.Conv1d(dim, dim, kernel, groups=groups), nn.Mish())
        self.conv2 = nn.Sequential(nn.Conv1d(dim, dim, kernel, groups=groups), nn.Mish())

    def forward(self, x):
        y = self.conv1(F.pad(x.transpose(1, 2), (self.kernel - 1, 0)))
        return self.conv2(F.pad(y, (self.kernel - 1, 0))).transpose(1, 2)

    def forward_cached(self, x, ctx1, ctx2):
        """x (B, n, D) after the (kernel - 1) frames of each conv's input before it, ctx1 / ctx2
        (B, kernel - 1, D) (zeros at the start: the left padding). Returns the output and the new
        contexts (the last kernel - 1 frames of each conv's input)."""
        a = torch.cat([ctx1, x], dim=1)
        y = self.conv1(a.transpose(1, 2)).transpose(1, 2)
        b = torch.cat([ctx2, y], dim=1)
        k = self.kernel - 1
        return self.conv2(b.transpose(1, 2)).transpose(1, 2), a[:, a.shape[1] - k:], b[:, b.shape[1] - k:]


class _InputEmbed(nn.Module):
    def __init__(self, mel: int, mu: int, spk: int, dim: int):
        super().__init__()
        self.proj = nn.Linear(2 * mel + mu + spk, dim)
        self.conv_pos_embed = _ConvPos(dim)

    def forward(self, x, cond, mu, spks):
        h = self.proj(torch.cat([x, cond, mu, spks[:, None, :].expand(-1, x.shape[1], -1)], dim=-1))
        return self.conv_pos_embed(h) + h

    def forward_cached(self, x, cond, mu, spks, ctx1, ctx2):
        h = self.proj(torch.cat([x, cond, mu, spks[:, None, :].expand(-1, x.shape[1], -1)], dim=-1))
        p, ctx1, ctx2 = self.conv_pos_embed.forward_cached(h, ctx1, ctx2)
        return p + h, ctx1, ctx2


class DiT(nn.Module):
    """v = f(x, mask, mu, t, spks, cond) with (B, 80, T) tensors, as the official estimator is called.
    `chunk_frames`: None = full attention (``streaming=False``), else chunk attention of that size."""

    def __init__(self, c: DiTFlowConfig):
        super().__init__()
        m, self.dim = c.output_size, c.dim
        self.time_embed = _TimeEmbed(c.dim)
        self.input_embed = _InputEmbed(m, m, m, c.dim)
        self.rotary_embed = _Rotary(c.dim_head)
        self.transformer_blocks = nn.ModuleList(DiTBlock(c) for _ in range(c.depth))
        self.norm_out = _AdaLNLinear(c.dim, 2)
        self.proj_out = nn.Linear(c.dim, m)

    def forward(self, x, mask, mu, t, spks, cond, chunk_frames: int | torch.Tensor | None = None):
        x, mu, cond = x.transpose(1, 2), mu.transpose(1, 2), cond.transpose(1, 2)
        temb = self.time_embed(t)
        h = self.input_embed(x, cond, mu, spks)
        n = h.shape[1]
        keys = mask[:, 0, :] > 0  # (B, T)
        allowed = keys[:, None, :]
        if chunk_frames is not None:
            allowed = allowed & chunk_mask(n, chunk_frames, h.device)[None]
        bias = (1.0 - allowed.to(h.dtype)) * torch.finfo(h.dtype).min
        keep = keys[:, :, None].to(h.dtype)
        cos, sin = self.rotary_embed.cos_sin(n)
        for block in self.transformer_blocks:
            h = block(h, temb, bias, keep, cos, sin)
        scale, shift = self.norm_out.linear(F.silu(temb)).chunk(2, dim=1)
        h = _layer_norm(h, self.dim) * (1 + scale[:, None]) + shift[:, None]
        return self.proj_out(h).transpose(1, 2)

    def forward_cached(self, x, mu, t, spks, cond, past_k, past_v, ctx1, ctx2, chunk_frames):
        """The estimator on the frames after P earlier ones whose attention is closed (block-causal chunk
        attention with P a multiple of `chunk_frames`: they never see these frames), no padding.

        x, mu, cond (B, 80, n); past_k / past_v (depth, B, P, inner): the earlier frames' keys (rotated
        at their absolute positions) and values; ctx1 / ctx2 (B, 30, D): the last inputs of the two
        position convs (zeros when P = 0). Returns the velocity (B, 80, n), this call's keys and values
        (depth, B, n, inner) and the new conv contexts. With P = 0 and zero contexts it is `forward`
        with chunk attention (and full attention for chunk_frames >= n)."""
        x, mu, cond = x.transpose(1, 2), mu.transpose(1, 2), cond.transpose(1, 2)
        temb = self.time_embed(t)
        h, ctx1, ctx2 = self.input_embed.forward_cached(x, cond, mu, spks, ctx1, ctx2)
        n, p = h.shape[1], past_k.shape[2]
        q_pos = torch.arange(n, device=h.device) + p  # absolute frame indices
        k_pos = torch.arange(p + n, device=h.device)
        ends = (torch.div(q_pos, chunk_frames, rounding_mode="floor") + 1) * chunk_frames
        allowed = k_pos[None, :] < ends[:, None]
        bias = (1.0 - allowed.to(h.dtype)) * torch.finfo(h.dtype).min
        cos, sin = self.rotary_embed.cos_sin(n, p)
        ks, vs = [], []
        for i, block in enumerate(self.transformer_blocks):
            h, k, v = block.forward_cached(h, temb, bias, cos, sin, past_k[i], past_v[i])
            ks.append(k)
            vs.append(v)
        scale, shift = self.norm_out.linear(F.silu(temb)).chunk(2, dim=1)
        h = _layer_norm(h, self.dim) * (1 + scale[:, None]) + shift[:, None]
        return self.proj_out(h).transpose(1, 2), torch.stack(ks), torch.stack(vs), ctx1, ctx2


class _CFM(nn.Module):
    """Holds the estimator under the released name ``decoder.estimator``."""

    def __init__(self, c: DiTFlowConfig):
        super().__init__()
        self.estimator = DiT(c)


def cosine_span(n_timesteps: int, scheduler: str = "cosine") -> torch.Tensor:
    t = torch.linspace(0, 1, n_timesteps + 1)
    return 1 - torch.cos(t * 0.5 * torch.pi) if scheduler == "cosine" else t


class CausalMaskedDiffWithDiT(nn.Module):
    def __init__(self, c: DiTFlowConfig):
        super().__init__()
        self.c = c
        self.input_embedding = nn.Embedding(c.vocab_size, c.input_size)
        self.spk_embed_affine_layer = nn.Linear(c.spk_embed_dim, c.output_size)
        self.pre_lookahead_layer = PreLookahead(c.input_size, c.pre_lookahead_len, c.lookahead_channels)
        self.decoder = _CFM(c)
        self.register_buffer("noise", fixed_noise(NOISE_FRAMES, c.output_size), persistent=False)

    def speaker(self, embedding: torch.Tensor) -> torch.Tensor:
        """(1, 192) CAM++ embedding -> (1, 80): L2-normalised, then the affine layer."""
        return self.spk_embed_affine_layer(F.normalize(embedding, dim=1))

    def mu(self, tokens: torch.Tensor, finalize: bool = True) -> torch.Tensor:
        """(1, T) ids -> (1, 80, ratio * T) (or ratio * (T - lookahead) without `finalize`: the last
        tokens then only feed the lookahead conv, as the official ``context`` argument)."""
        emb = self.input_embedding(tokens.clamp(min=0))
        if finalize:
            h = self.pre_lookahead_layer(emb)
        else:
            la = self.c.pre_lookahead_len
            layer, body = self.pre_lookahead_layer, emb[:, :-la]
            y = F.leaky_relu(layer.conv1(torch.cat([body, emb[:, -la:]], dim=1).transpose(1, 2)))
            h = layer.conv2(F.pad(y, (2, 0))).transpose(1, 2) + body
        return h.repeat_interleave(self.c.token_mel_ratio, dim=1).transpose(1, 2)

    def solve(self, mu: torch.Tensor, spks: torch.Tensor, chunk_frames: int | None = None) -> torch.Tensor:
        """Euler steps with classifier-free guidance (batch of two: conditioned, all conditions zero)."""
        n = mu.shape[-1]
        if n > self.noise.shape[-1]:
            raise ValueError(f"{n} mel frames exceed the flow's fixed noise of {self.noise.shape[-1]} frames (300 s)")
        span = cosine_span(self.c.n_timesteps, self.c.t_scheduler)
        x = self.noise[:, :, :n]
        est, r = self.decoder.estimator, self.c.inference_cfg_rate
        mask = torch.ones(2, 1, n)
        mu_in, spks_in, cond_in = torch.cat([mu, torch.zeros_like(mu)]), torch.cat([spks, torch.zeros_like(spks)]), torch.zeros(2, mu.shape[1], n)
        t, dt = span[0], span[1] - span[0]
        for step in range(1, len(span)):
            v = est(torch.cat([x, x]), mask, mu_in, t.repeat(2), spks_in, cond_in, chunk_frames)
            x = x + dt * ((1.0 + r) * v[:1] - r * v[1:])
            t = t + dt
            if step < len(span) - 1:
                dt = span[step + 1] - t
        return x

    def solve_cached(self, mu: torch.Tensor, spks: torch.Tensor, cache: "FlowCache", chunk_frames: int) -> torch.Tensor:
        """`solve` for the frames after the `cache.frames` already solved (a multiple of `chunk_frames`):
        mu (1, 80, n) of the new frames only; the cache (per Euler step and CFG half: every DiT layer's
        keys / values, the position convs' last inputs) grows by these frames. Equals the new frames of
        `solve` over all frames with chunk attention, at a cost independent of the frames before."""
        n, p = mu.shape[-1], cache.frames
        if p % chunk_frames:
            raise ValueError(f"a cached solve needs whole chunks before it; {p} frames are not a multiple of {chunk_frames}")
        if p + n > self.noise.shape[-1]:
            raise ValueError(f"{p + n} mel frames exceed the flow's fixed noise of {self.noise.shape[-1]} frames (300 s)")
        span = cosine_span(self.c.n_timesteps, self.c.t_scheduler)
        x = self.noise[:, :, p:p + n]  # the noise of these frames' absolute indices
        est, r = self.decoder.estimator, self.c.inference_cfg_rate
        mu_in, spks_in, cond_in = torch.cat([mu, torch.zeros_like(mu)]), torch.cat([spks, torch.zeros_like(spks)]), torch.zeros(2, mu.shape[1], n)
        chunk = torch.tensor(chunk_frames)
        t, dt = span[0], span[1] - span[0]
        for step in range(1, len(span)):
            k, v, c1, c2 = cache.step(step - 1, est)
            v_, k_new, v_new, c1, c2 = est.forward_cached(torch.cat([x, x]), mu_in, t.repeat(2), spks_in, cond_in, k, v, c1, c2, chunk)
            cache.update(step - 1, torch.cat([k, k_new], dim=2), torch.cat([v, v_new], dim=2), c1, c2)
            x = x + dt * ((1.0 + r) * v_[:1] - r * v_[1:])
            t = t + dt
            if step < len(span) - 1:
                dt = span[step + 1] - t
        cache.frames = p + n
        return x

    @torch.no_grad()
    def inference(self, tokens: torch.Tensor, embedding: torch.Tensor, finalize: bool = True, streaming: bool = False) -> torch.Tensor:
        """Official ``inference`` without prompt speech: (1, T) tokens, (1, 192) embedding -> (1, 80, frames)."""
        mu = self.mu(tokens, finalize)
        chunk = self.c.static_chunk_size if streaming else None
        return self.solve(mu, self.speaker(embedding), chunk)


class FlowCache:
    """What a cached solve keeps per Euler step (CFG halves batched): keys / values (depth, 2, P, inner)
    and the two position convs' last (kernel - 1) inputs (2, kernel - 1, D)."""

    def __init__(self):
        self.frames = 0
        self.steps: dict[int, tuple[torch.Tensor, ...]] = {}

    def step(self, i: int, est: "DiT") -> tuple[torch.Tensor, ...]:
        if i not in self.steps:
            blk = est.transformer_blocks[0].attn
            inner, d, k = blk.heads * blk.dim_head, est.dim, est.input_embed.conv_pos_embed.kernel - 1
            empty = torch.zeros(len(est.transformer_blocks), 2, 0, inner)
            return empty, empty, torch.zeros(2, k, d), torch.zeros(2, k, d)
        return self.steps[i]

    def update(self, i: int, *state: torch.Tensor) -> None:
        self.steps[i] = state


@torch.no_grad()
def mu_window(flow: CausalMaskedDiffWithDiT, tokens: list[int], start: int, finalize: bool) -> torch.Tensor:
    """mu of the frames of tokens[start:] (without the lookahead tokens' unless `finalize`), from the
    tokens from start - (conv2 kernel - 1) on: the pre-lookahead conv's left receptive field, so it
    equals the slice of `mu` over all tokens."""
    left = flow.pre_lookahead_layer.conv2.kernel_size[0] - 1
    lo = max(0, start - left)
    mu = flow.mu(torch.tensor([tokens[lo:]]), finalize)
    return mu[:, :, (start - lo) * flow.c.token_mel_ratio:]


# ----------------------------------------------------------------------------- causal HiFT


class _Conv(nn.Conv1d):
    """CosyVoice's ``CausalConv1d``: (k - 1) * dilation zeros on the left (causal) or on the right
    (lookahead), where a ``context`` of real frames may take the zeros' place."""

    def __init__(self, cin: int, cout: int, k: int, dilation: int = 1, right: bool = False):
        super().__init__(cin, cout, k, dilation=dilation)
        self.pad, self.right = (k - 1) * dilation, right

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if not self.right:
            return super().forward(F.pad(x, (self.pad, 0)))
        return super().forward(torch.cat([x, context], dim=2) if context is not None else F.pad(x, (0, self.pad)))


class _UpConv(nn.Conv1d):
    """``CausalConv1dUpsample``: nearest x stride, then a causal conv."""

    def __init__(self, cin: int, cout: int, k: int, stride: int):
        super().__init__(cin, cout, k)
        self.factor = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t = x.shape
        x = x[:, :, :, None].expand(b, c, t, self.factor).reshape(b, c, t * self.factor)
        return super().forward(F.pad(x, (self.kernel_size[0] - 1, 0)))


class _DownConv(nn.Conv1d):
    """``CausalConv1dDownSample``: stride-`u` conv of kernel 2u after u - 1 zeros on the left."""

    def __init__(self, cin: int, cout: int, k: int, stride: int):
        super().__init__(cin, cout, k, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, (self.stride[0] - 1, 0)))


class CausalResBlock(ResBlock):
    """The HiFT resblock with causal convs."""

    def __init__(self, ch: int, k: int, dilations: tuple[int, ...]):
        super().__init__(ch, k, dilations, conv=lambda ch, k, d: _Conv(ch, ch, k, d))


class CausalF0Predictor(nn.Module):
    """``CausalConvRNNF0Predictor``: conv k4 (3 frames of right context), 4 causal k3 convs, ELU after
    each, Linear to 1, abs."""

    def __init__(self, cin: int, cond: int, look_right: int = 3):
        super().__init__()
        layers: list[nn.Module] = [_Conv(cin, cond, look_right + 1, right=True), nn.ELU()]
        for _ in range(4):
            layers += [_Conv(cond, cond, 3), nn.ELU()]
        self.condnet = nn.Sequential(*layers)
        self.classifier = nn.Linear(cond, 1)

    def forward(self, mel: torch.Tensor, finalize: bool = True) -> torch.Tensor:
        la = self.condnet[0].pad
        x = self.condnet[0](mel) if finalize else self.condnet[0](mel[:, :, :-la], mel[:, :, -la:])
        for layer in self.condnet[1:]:
            x = layer(x)
        return torch.abs(self.classifier(x.transpose(1, 2)).squeeze(-1))


class CausalHiFT(HiFTDecode):
    """``CausalHiFTGenerator``. ``forward(mel, source)`` is the exported decode (whole-utterance
    semantics, STFTs as convolutions); ``decode`` is the official one (torch.stft / torch.istft, and
    the non-``finalize`` trimming)."""

    def __init__(self, c: CausalHiFTConfig):
        super().__init__()
        self.c = c
        self.m_source = SourceMerge(c.nb_harmonics)
        self.conv_pre = _Conv(c.in_channels, c.base_channels, c.conv_pre_look_right + 1, right=True)
        self.ups = nn.ModuleList(_UpConv(c.base_channels // 2**i, c.base_channels // 2 ** (i + 1), k, u)
                                 for i, (u, k) in enumerate(zip(c.upsample_rates, c.upsample_kernel_sizes)))
        self.source_downs = nn.ModuleList()
        self.source_resblocks = nn.ModuleList()
        cum = np.cumprod([1] + list(c.upsample_rates[::-1][:-1]))
        for i, (u, k, d) in enumerate(zip(cum[::-1], c.source_resblock_kernel_sizes, c.source_resblock_dilation_sizes)):
            ch, u = c.base_channels // 2 ** (i + 1), int(u)
            self.source_downs.append(_Conv(c.n_fft + 2, ch, 1) if u == 1 else _DownConv(c.n_fft + 2, ch, 2 * u, u))
            self.source_resblocks.append(CausalResBlock(ch, k, d))
        self.resblocks = nn.ModuleList()
        for i in range(len(self.ups)):
            ch = c.base_channels // 2 ** (i + 1)
            for k, d in zip(c.resblock_kernel_sizes, c.resblock_dilation_sizes):
                self.resblocks.append(CausalResBlock(ch, k, d))
        self.conv_post = _Conv(ch, c.n_fft + 2, 7)
        self.f0_predictor = CausalF0Predictor(c.in_channels, c.f0_cond_channels, c.f0_look_right)
        self._add_stfts()

    @property
    def frames_per_mel(self) -> int:
        """STFT frames per mel frame (120)."""
        return int(np.prod(self.c.upsample_rates))

    def source(self) -> CausalSource:
        lin = self.m_source.l_linear
        return CausalSource(self.c.source_params(), lin.weight.detach().numpy(), float(lin.bias.detach()))

    def decode(self, mel: torch.Tensor, source: torch.Tensor, finalize: bool = True) -> torch.Tensor:
        """The official decode: torch.stft / torch.istft; without `finalize` the last
        conv_pre_look_right frames are context and the last frame's samples are dropped."""
        c = self.c
        s_stft = self._stft_reference(source)
        context = None
        if not finalize:
            la = c.conv_pre_look_right
            mel, context = mel[:, :, :-la], mel[:, :, -la:]
            s_stft = s_stft[:, :, : -self.frames_per_mel * la]
        audio = self._istft_reference(self._body(mel, s_stft, context))
        if not finalize:
            audio = audio[:, : -c.hop]
        return torch.clamp(audio, -c.audio_limit, c.audio_limit)

    @torch.no_grad()
    def inference(self, mel: torch.Tensor, finalize: bool = True) -> torch.Tensor:
        """Official ``inference``: f0 in float64 (as the official code moves the predictor there),
        the causal source from frame 0, then `decode`. mel (1, 80, T) -> audio (1, samples)."""
        f0_net = copy.deepcopy(self.f0_predictor).double()
        f0 = f0_net(mel.double(), finalize)[0].numpy()
        src = torch.from_numpy(self.source()(f0))[None]
        if not finalize:
            mel = mel[:, :, : -self.c.f0_look_right]
        return self.decode(mel, src, finalize)


# ----------------------------------------------------------------------------- official token2wav


@torch.no_grad()
def token2wav(flow: CausalMaskedDiffWithDiT, hift: CausalHiFT, tokens: list[int], embedding: torch.Tensor,
              streaming: bool = False) -> torch.Tensor:
    """Whole utterance, as Fun-Audio-Chat's offline detokenizer for a reply under 30 s: one
    ``finalize`` call, ``streaming=False``. -> (samples,)"""
    mel = flow.inference(torch.tensor([tokens]), embedding, finalize=True, streaming=streaming)
    return hift.inference(mel, finalize=True)[0]


@torch.no_grad()
def token2wav_stream(flow: CausalMaskedDiffWithDiT, hift: CausalHiFT, tokens: list[int], embedding: torch.Tensor,
                     hop: int = 15, lookahead: int = 3, streaming: bool = False, flow_window: int | None = None,
                     hift_restart: int | None = None) -> list[torch.Tensor]:
    """The web demo's streaming (``CosyVoice3Model.token2wav`` per hop, web_demo/server/server.py): a
    call whenever hop + lookahead tokens past the offset exist, each on every token of the window
    (``streaming=False``, not ``finalize``), keeping the mel from the offset; the mel so far goes
    through HiFT again and only the samples past the last call's are kept. One ``finalize`` call ends
    the reply. `streaming`: the flow's chunk attention in every call. `flow_window` (200 there): once
    the offset reaches it, the window's first `flow_window` tokens are dropped; `hift_restart` (500):
    once that many tokens were dropped, the HiFT cache restarts."""
    ratio = flow.c.token_mel_ratio
    window = list(tokens)
    offset, cut, mel_cache, speech_offset, chunks = 0, 0, None, 0, []

    def call(n: int, finalize: bool) -> None:
        nonlocal mel_cache, speech_offset
        mel = flow.inference(torch.tensor([window[:n]]), embedding, finalize=finalize, streaming=streaming)[:, :, offset * ratio:]
        mel_cache = mel if mel_cache is None else torch.cat([mel_cache, mel], dim=2)
        audio = hift.inference(mel_cache, finalize=finalize)[0, speech_offset:]
        speech_offset += audio.shape[0]
        chunks.append(audio)

    while offset + hop + lookahead <= len(window):
        call(offset + hop + lookahead, False)
        offset += hop
        if flow_window and offset >= flow_window:
            offset, window, cut = offset - flow_window, window[flow_window:], cut + flow_window
            if hift_restart and cut >= hift_restart:
                cut, mel_cache, speech_offset = 0, None, 0
    if len(window) > offset:
        call(len(window), True)
    return chunks


# ----------------------------------------------------------------------------- exported stages


class FlowEncoderStage(nn.Module):
    """tokens (1, T) -> mu (1, 80, ratio * T), zeros past the last token (``finalize``)."""

    def __init__(self, flow: CausalMaskedDiffWithDiT):
        super().__init__()
        self.flow = flow

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.flow.mu(tokens)


class EstimatorStage(nn.Module):
    """The DiT with the official inputs plus the attention chunk in frames (>= T: full attention)."""

    def __init__(self, flow: CausalMaskedDiffWithDiT):
        super().__init__()
        self.estimator = flow.decoder.estimator

    def forward(self, x, mask, mu, t, spks, cond, chunk_frames: torch.Tensor) -> torch.Tensor:
        return self.estimator(x, mask, mu, t, spks, cond, chunk_frames)


class CachedEstimatorStage(nn.Module):
    """`DiT.forward_cached`: the new frames after P cached ones (chunk attention, P whole chunks)."""

    def __init__(self, flow: CausalMaskedDiffWithDiT):
        super().__init__()
        self.estimator = flow.decoder.estimator

    def forward(self, x, mu, t, spks, cond, past_k, past_v, conv1_context, conv2_context, chunk_frames):
        return self.estimator.forward_cached(x, mu, t, spks, cond, past_k, past_v, conv1_context, conv2_context, chunk_frames)


class F0Stage(HiFTF0):
    """mel (1, 80, T) -> f0 (1, T), zeros past the last frame (``finalize``)."""
