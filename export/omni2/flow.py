"""Reference PyTorch CosyVoice2 causal flow matching, as LLaMA-Omni2 runs it (tokens -> 80-bin mel).

Module and parameter names follow the CosyVoice2 release (``CausalMaskedDiffWithXvec`` with an
``UpsampleConformerEncoder`` and a ``CausalConditionalCFM`` whose estimator is the causal U-Net
``ConditionalDecoder``), so ``flow.pt`` loads as-is. Facts this relies on (read from the official
code, re-implemented here):

* tokens (25 Hz) -> Embedding -> encoder: Linear+LayerNorm, x sqrt(d), ESPnet relative positions;
  pre-lookahead conv (sees ``pre_lookahead_len`` tokens ahead); conformer layers (no macaron, no
  conv module) under a *chunk* attention mask; nearest x2 upsample + causal conv; 4 more layers at
  mel rate (50 Hz) under a 2x chunk mask; LayerNorm -> Linear to 80 = mu.
* Euler ODE with ``n_timesteps`` (10) steps on a cosine time schedule from a FIXED noise buffer
  (randn(1, 80, 15000) drawn after seeding 0), classifier-free guidance rate 0.7.
* The estimator's causal convs and chunk masks make mel frame t depend only on frames of its own
  attention chunk and earlier ones; that is what lets the runtime stream it chunk by chunk.

The official encoder hard-codes 512 channels for two of its layers; here they take the encoder
width (512 in every release), so small test models can be narrower.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

NOISE_FRAMES = 15000  # 50 Hz x 300 s, as the official buffer
NOISE_SEED = 0


@dataclass(frozen=True)
class FlowConfig:
    vocab_size: int = 6561
    input_size: int = 512  # token embedding width = encoder width
    output_size: int = 80  # mel bins
    spk_embed_dim: int = 192
    token_mel_ratio: int = 2
    pre_lookahead_len: int = 3
    input_frame_rate: int = 25
    # encoder
    attention_heads: int = 8
    linear_units: int = 2048
    num_blocks: int = 6
    num_up_blocks: int = 4  # hard-coded in the official UpsampleConformerEncoder
    # estimator
    channels: tuple[int, ...] = (256,)
    attention_head_dim: int = 64
    n_blocks: int = 4
    num_mid_blocks: int = 12
    num_heads: int = 8
    # flow matching
    n_timesteps: int = 10
    inference_cfg_rate: float = 0.7
    t_scheduler: str = "cosine"
    # chunking (LLaMA-Omni2 sets both at load time: 2 s chunks)
    chunk_tokens: int = 50

    @property
    def chunk_frames(self) -> int:
        return self.chunk_tokens * self.token_mel_ratio


def fixed_noise(frames: int = NOISE_FRAMES, mel: int = 80) -> torch.Tensor:
    """The flow's fixed initial noise: randn(1, 80, 15000) right after seeding 0."""
    g = torch.Generator().manual_seed(NOISE_SEED)
    return torch.randn(1, mel, frames, generator=g)


def chunk_mask(size: int, chunk: int | torch.Tensor, device=None) -> torch.Tensor:
    """(size, size) bool: position i sees every position before the end of its chunk. `chunk` may be
    a tensor (an input of the exported graphs: the chunk size is an inference setting, not a weight)."""
    idx = torch.arange(size, device=device)
    ends = (torch.div(idx, chunk, rounding_mode="floor") + 1) * chunk
    return idx[None, :] < ends[:, None]


# ----------------------------------------------------------------------------- encoder


class RelPositionalEncoding(nn.Module):
    """ESPnet relative positions: scales x by sqrt(d) and returns sin/cos rows for relative
    offsets T-1 ... -(T-1) (left part flipped), as ``EspnetRelPositionalEncoding``."""

    def __init__(self, d: int):
        super().__init__()
        self.d = d

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = x.shape[1]
        pos = torch.arange(t - 1, -t, -1, dtype=torch.float32, device=x.device)[:, None]  # T-1 .. -(T-1)
        div = torch.exp(torch.arange(0, self.d, 2, dtype=torch.float32, device=x.device) * -(math.log(10000.0) / self.d))
        # sin in even columns, cos in odd ones (stacked, not slice-assigned, so it exports to ONNX)
        pe = torch.stack([torch.sin(pos * div), torch.cos(pos * div)], dim=-1).reshape(2 * t - 1, self.d)
        return x * math.sqrt(self.d), pe[None]


class LinearEmbed(nn.Module):
    """``LinearNoSubsampling``: Linear + LayerNorm (+ dropout), then relative positions."""

    def __init__(self, idim: int, odim: int):
        super().__init__()
        self.out = nn.Sequential(nn.Linear(idim, odim), nn.LayerNorm(odim, eps=1e-5), nn.Dropout(0.0))
        self.pos_enc = RelPositionalEncoding(odim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pos_enc(self.out(x))


class RelSelfAttention(nn.Module):
    """``RelPositionMultiHeadedAttention`` (Transformer-XL scores with pos_bias_u / pos_bias_v)."""

    def __init__(self, heads: int, d: int):
        super().__init__()
        self.h, self.d_k = heads, d // heads
        self.linear_q = nn.Linear(d, d)
        self.linear_k = nn.Linear(d, d)
        self.linear_v = nn.Linear(d, d)
        self.linear_out = nn.Linear(d, d)
        self.linear_pos = nn.Linear(d, d, bias=False)
        self.pos_bias_u = nn.Parameter(torch.zeros(heads, self.d_k))
        self.pos_bias_v = nn.Parameter(torch.zeros(heads, self.d_k))

    def forward(self, x: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.linear_q(x).view(b, t, self.h, self.d_k)
        k = self.linear_k(x).view(b, t, self.h, self.d_k).transpose(1, 2)
        v = self.linear_v(x).view(b, t, self.h, self.d_k).transpose(1, 2)
        p = self.linear_pos(pos).view(1, -1, self.h, self.d_k).transpose(1, 2)  # (1, h, 2t-1, d_k)
        ac = torch.matmul((q + self.pos_bias_u).transpose(1, 2), k.transpose(-2, -1))
        bd = torch.matmul((q + self.pos_bias_v).transpose(1, 2), p.transpose(-2, -1))  # (b, h, t, 2t-1)
        # Row i, column j needs offset i - j, found at index (t - 1) - (i - j) of the pos rows.
        i = torch.arange(t, device=x.device)
        idx = (t - 1) - i[:, None] + i[None, :]
        bd = torch.gather(bd, 3, idx.expand(b, self.h, t, t))
        scores = (ac + bd) / math.sqrt(self.d_k)
        scores = scores.masked_fill(~mask[:, None], float("-inf"))
        attn = torch.softmax(scores, dim=-1).masked_fill(~mask[:, None], 0.0)
        out = torch.matmul(attn, v).transpose(1, 2).reshape(b, t, self.h * self.d_k)
        return self.linear_out(out)


class FeedForward(nn.Module):
    def __init__(self, d: int, units: int):
        super().__init__()
        self.w_1 = nn.Linear(d, units)
        self.w_2 = nn.Linear(units, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(F.silu(self.w_1(x)))  # "swish", the encoder's default activation


class ConformerLayer(nn.Module):
    """``ConformerEncoderLayer`` as configured for the flow: pre-norm attention + pre-norm FFN."""

    def __init__(self, d: int, heads: int, units: int):
        super().__init__()
        self.self_attn = RelSelfAttention(heads, d)
        self.feed_forward = FeedForward(d, units)
        self.norm_ff = nn.LayerNorm(d, eps=1e-12)
        self.norm_mha = nn.LayerNorm(d, eps=1e-12)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.norm_mha(x), mask, pos)
        return x + self.feed_forward(self.norm_ff(x))


class PreLookahead(nn.Module):
    """``PreLookaheadLayer``: conv over each position and `lookahead` later ones (zero past the end),
    leaky ReLU, causal conv k3, residual. `hidden`: conv1's output width (CosyVoice3 widens 80 -> 1024)."""

    def __init__(self, channels: int, lookahead: int, hidden: int | None = None):
        super().__init__()
        self.lookahead = lookahead
        hidden = hidden or channels
        self.conv1 = nn.Conv1d(channels, hidden, lookahead + 1)
        self.conv2 = nn.Conv1d(hidden, channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.pad(x.transpose(1, 2), (0, self.lookahead))
        y = F.leaky_relu(self.conv1(y))
        y = self.conv2(F.pad(y, (2, 0))).transpose(1, 2)
        return y + x


class UpsampleConv(nn.Module):
    """Nearest x2 then a causal (left-padded) conv of kernel 2*stride+1."""

    def __init__(self, channels: int, stride: int = 2):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv1d(channels, channels, stride * 2 + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        y = x[:, :, None, :].expand(b, t, self.stride, c).reshape(b, t * self.stride, c).transpose(1, 2)
        return self.conv(F.pad(y, (self.stride * 2, 0))).transpose(1, 2)


class UpsampleConformerEncoder(nn.Module):
    def __init__(self, c: FlowConfig):
        super().__init__()
        d = c.input_size
        self.chunk = c.chunk_tokens
        self.embed = LinearEmbed(d, d)
        self.pre_lookahead_layer = PreLookahead(d, c.pre_lookahead_len)
        self.encoders = nn.ModuleList(ConformerLayer(d, c.attention_heads, c.linear_units) for _ in range(c.num_blocks))
        self.up_layer = UpsampleConv(d, c.token_mel_ratio)
        self.up_embed = LinearEmbed(d, d)
        self.up_encoders = nn.ModuleList(ConformerLayer(d, c.attention_heads, c.linear_units) for _ in range(c.num_up_blocks))
        self.after_norm = nn.LayerNorm(d, eps=1e-5)

    def forward(self, x: torch.Tensor, chunk: int | torch.Tensor | None = None) -> torch.Tensor:
        chunk = self.chunk if chunk is None else chunk
        x, pos = self.embed(x)
        mask = chunk_mask(x.shape[1], chunk, x.device)[None]
        x = self.pre_lookahead_layer(x)
        for layer in self.encoders:
            x = layer(x, mask, pos)
        x = self.up_layer(x)
        x, pos = self.up_embed(x)
        mask = chunk_mask(x.shape[1], chunk * self.up_layer.stride, x.device)[None]
        for layer in self.up_encoders:
            x = layer(x, mask, pos)
        return self.after_norm(x)


# ----------------------------------------------------------------------------- estimator


class CausalConv1d(nn.Conv1d):
    def __init__(self, cin: int, cout: int, k: int):
        super().__init__(cin, cout, k)
        self.left = k - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, (self.left, 0)))


class _Transpose(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2)


class CausalBlock1D(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.block = nn.Sequential(CausalConv1d(cin, cout, 3), _Transpose(), nn.LayerNorm(cout), _Transpose(), nn.Mish())

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.block(x * mask) * mask


class CausalResnetBlock1D(nn.Module):
    def __init__(self, cin: int, cout: int, time_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Mish(), nn.Linear(time_dim, cout))
        self.block1 = CausalBlock1D(cin, cout)
        self.block2 = CausalBlock1D(cout, cout)
        self.res_conv = nn.Conv1d(cin, cout, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = self.block1(x, mask) + self.mlp(t)[:, :, None]
        h = self.block2(h, mask)
        return h + self.res_conv(x * mask)


class _GELUProj(nn.Module):
    def __init__(self, d: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(d, inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x))


class _Attention(nn.Module):
    """diffusers ``Attention`` as the estimator uses it: no q/k/v bias, additive mask."""

    def __init__(self, d: int, heads: int, head_dim: int):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.to_q = nn.Linear(d, inner, bias=False)
        self.to_k = nn.Linear(d, inner, bias=False)
        self.to_v = nn.Linear(d, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, d), nn.Dropout(0.0)])

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.heads, self.head_dim).transpose(1, 2)

        q, k, v = split(self.to_q(x)), split(self.to_k(x)), split(self.to_v(x))
        scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(self.head_dim) + bias[:, None]
        out = torch.matmul(torch.softmax(scores, dim=-1), v).transpose(1, 2).reshape(b, t, -1)
        return self.to_out[0](out)


class TransformerBlock(nn.Module):
    """matcha ``BasicTransformerBlock`` (self-attention + GELU feed-forward, pre-norm)."""

    def __init__(self, d: int, heads: int, head_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(d)
        self.attn1 = _Attention(d, heads, head_dim)
        self.norm3 = nn.LayerNorm(d)
        self.ff = nn.Module()
        self.ff.net = nn.ModuleList([_GELUProj(d, 4 * d), nn.Dropout(0.0), nn.Linear(4 * d, d)])

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x), bias)
        h = self.norm3(x)
        for m in self.ff.net:
            h = m(h)
        return x + h


def sinusoidal_time(t: torch.Tensor, dim: int, scale: float = 1000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=t.device) * -(math.log(10000) / (half - 1)))
    e = scale * t[:, None] * freqs[None]
    return torch.cat([e.sin(), e.cos()], dim=-1)


class TimestepEmbedding(nn.Module):
    def __init__(self, cin: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(cin, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class ConditionalDecoder(nn.Module):
    """The causal U-Net estimator: v = f(x, mask, mu, t, spks, cond); (B, 80, T) in and out.

    Only the single-resolution layout of the releases (``channels`` of length 1) is supported:
    the down and up blocks end in a causal conv instead of resampling."""

    def __init__(self, c: FlowConfig, in_channels: int = 320, out_channels: int = 80):
        super().__init__()
        if len(c.channels) != 1:
            raise ValueError("only a single-level estimator (channels of length 1, as released) is supported")
        ch = c.channels[0]
        self.in_channels = in_channels
        self.chunk = c.chunk_frames
        time_dim = ch * 4
        self.time_mlp = TimestepEmbedding(in_channels, time_dim)

        def blocks() -> nn.ModuleList:
            return nn.ModuleList(TransformerBlock(ch, c.num_heads, c.attention_head_dim) for _ in range(c.n_blocks))

        self.down_blocks = nn.ModuleList([nn.ModuleList([CausalResnetBlock1D(in_channels, ch, time_dim), blocks(), CausalConv1d(ch, ch, 3)])])
        self.mid_blocks = nn.ModuleList(nn.ModuleList([CausalResnetBlock1D(ch, ch, time_dim), blocks()]) for _ in range(c.num_mid_blocks))
        self.up_blocks = nn.ModuleList([nn.ModuleList([CausalResnetBlock1D(2 * ch, ch, time_dim), blocks(), CausalConv1d(ch, ch, 3)])])
        self.final_block = CausalBlock1D(ch, ch)
        self.final_proj = nn.Conv1d(ch, out_channels, 1)

    def _attend(self, x: torch.Tensor, blocks: nn.ModuleList, bias: torch.Tensor) -> torch.Tensor:
        x = x.transpose(1, 2)
        for block in blocks:
            x = block(x, bias)
        return x.transpose(1, 2)

    def forward(self, x, mask, mu, t, spks, cond, chunk: int | torch.Tensor | None = None):
        chunk = self.chunk if chunk is None else chunk
        temb = self.time_mlp(sinusoidal_time(t, self.in_channels))
        x = torch.cat([x, mu, spks[:, :, None].expand(-1, -1, x.shape[-1]), cond], dim=1)
        keep = chunk_mask(x.shape[-1], chunk, x.device)[None] & (mask > 0)  # (B, T, T) with key padding
        bias = (1.0 - keep.to(x.dtype)) * torch.finfo(x.dtype).min
        resnet, blocks, down = self.down_blocks[0]
        x = resnet(x, mask, temb)
        x = self._attend(x, blocks, bias)
        skip = x
        x = down(x * mask)
        for resnet, blocks in self.mid_blocks:
            x = self._attend(resnet(x, mask, temb), blocks, bias)
        resnet, blocks, up = self.up_blocks[0]
        x = resnet(torch.cat([x[:, :, : skip.shape[-1]], skip], dim=1), mask, temb)
        x = self._attend(x, blocks, bias)
        x = up(x * mask)
        x = self.final_block(x, mask)
        return self.final_proj(x * mask) * mask


class CausalCFM(nn.Module):
    """Holds the estimator (named ``decoder.estimator`` in flow.pt) and solves the ODE."""

    def __init__(self, c: FlowConfig):
        super().__init__()
        self.c = c
        self.estimator = ConditionalDecoder(c, in_channels=4 * c.output_size, out_channels=c.output_size)

    def t_span(self) -> torch.Tensor:
        t = torch.linspace(0, 1, self.c.n_timesteps + 1)
        return 1 - torch.cos(t * 0.5 * torch.pi) if self.c.t_scheduler == "cosine" else t

    def solve(self, z: torch.Tensor, mu: torch.Tensor, spks: torch.Tensor, cond: torch.Tensor, chunk_frames: int | None = None) -> torch.Tensor:
        """Euler steps with classifier-free guidance, batch of 2 (conditioned, unconditioned)."""
        span = self.t_span()
        mask = torch.ones(2, 1, z.shape[-1])
        x = z
        zeros_mu, zeros_spk, zeros_cond = torch.zeros_like(mu), torch.zeros_like(spks), torch.zeros_like(cond)
        for step in range(1, len(span)):
            t, dt = span[step - 1], span[step] - span[step - 1]
            v = self.estimator(torch.cat([x, x]), mask, torch.cat([mu, zeros_mu]), t.repeat(2),
                               torch.cat([spks, zeros_spk]), torch.cat([cond, zeros_cond]), chunk_frames)
            r = self.c.inference_cfg_rate
            x = x + dt * ((1.0 + r) * v[:1] - r * v[1:])
        return x


class CausalMaskedDiffWithXvec(nn.Module):
    def __init__(self, c: FlowConfig):
        super().__init__()
        self.c = c
        self.input_embedding = nn.Embedding(c.vocab_size, c.input_size)
        self.spk_embed_affine_layer = nn.Linear(c.spk_embed_dim, c.output_size)
        self.encoder = UpsampleConformerEncoder(c)
        self.encoder_proj = nn.Linear(c.input_size, c.output_size)
        self.decoder = CausalCFM(c)
        self.register_buffer("noise", fixed_noise(NOISE_FRAMES, c.output_size), persistent=False)

    def speaker(self, xvector: torch.Tensor) -> torch.Tensor:
        """(1, 192) x-vector -> (1, 80) speaker conditioning (L2-normalised first, as official)."""
        return self.spk_embed_affine_layer(F.normalize(xvector, dim=1))

    def mu(self, tokens: torch.Tensor, chunk_tokens: int | torch.Tensor | None = None) -> torch.Tensor:
        """(1, T) token ids -> (1, 80, 2T) encoder output projected to mel space."""
        h = self.encoder(self.input_embedding(tokens.clamp(min=0)), chunk_tokens)
        return self.encoder_proj(h).transpose(1, 2)

    @torch.no_grad()
    def inference(self, tokens: torch.Tensor, xvector: torch.Tensor, finalize: bool = True, chunk_tokens: int | None = None) -> torch.Tensor:
        """Whole-utterance (or official streaming-call) mel (1, 80, frames); no prompt speech, as
        LLaMA-Omni2 runs it. Without ``finalize`` the frames of the trailing lookahead tokens are
        dropped, as in the official streaming calls."""
        mu = self.mu(tokens, chunk_tokens)
        if not finalize:
            mu = mu[:, :, : -self.c.pre_lookahead_len * self.c.token_mel_ratio]
        t = mu.shape[-1]
        if t > self.noise.shape[-1]:
            raise ValueError(f"{t} mel frames exceed the flow's fixed noise of {self.noise.shape[-1]} frames (300 s)")
        frames = None if chunk_tokens is None else chunk_tokens * self.c.token_mel_ratio
        return self.decoder.solve(self.noise[:, :, :t], mu, self.speaker(xvector), torch.zeros_like(mu), frames)


class FlowEncoderStage(nn.Module):
    """Exported encoder stage: token ids (1, T), attention chunk in tokens () -> mu (1, 80, 2T)."""

    def __init__(self, flow: CausalMaskedDiffWithXvec):
        super().__init__()
        self.flow = flow

    def forward(self, tokens: torch.Tensor, chunk_tokens: torch.Tensor) -> torch.Tensor:
        return self.flow.mu(tokens, chunk_tokens)


class EstimatorStage(nn.Module):
    """Exported estimator: the official inputs (x, mask, mu, t, spks, cond) plus the attention chunk
    in mel frames (the official code sets it as an attribute at load time: 2 s = 100 frames)."""

    def __init__(self, flow: CausalMaskedDiffWithXvec):
        super().__init__()
        self.estimator = flow.decoder.estimator

    def forward(self, x, mask, mu, t, spks, cond, chunk_frames: torch.Tensor) -> torch.Tensor:
        return self.estimator(x, mask, mu, t, spks, cond, chunk_frames)


# ----------------------------------------------------------------------------- cached estimator


def _causal_convs(est: ConditionalDecoder) -> list[CausalConv1d]:
    """The estimator's causal (k=3) convs in the order the forward runs them: each resnet's two block
    convs, the down conv, ..., the up conv, the final block's conv. Their last inputs are the conv
    part of the flow cache."""
    convs: list[CausalConv1d] = []

    def resnet(r: CausalResnetBlock1D) -> None:
        convs.extend([r.block1.block[0], r.block2.block[0]])

    resnet(est.down_blocks[0][0])
    convs.append(est.down_blocks[0][2])
    for r, _ in est.mid_blocks:
        resnet(r)
    resnet(est.up_blocks[0][0])
    convs.append(est.up_blocks[0][2])
    convs.append(est.final_block.block[0])
    return convs


def cache_layout(est: ConditionalDecoder) -> tuple[int, int, int, int]:
    """(transformer blocks, their width, conv context channels in all, conv context frames) of the
    flow cache of `est`: ``past`` is (blocks, 2, P, width), ``conv_context`` (2, channels, frames)."""
    convs = _causal_convs(est)
    blocks = sum(len(b[1]) for b in (*est.down_blocks, *est.mid_blocks, *est.up_blocks))
    width = est.down_blocks[0][1][0].norm1.normalized_shape[0]
    ctx = {c.left for c in convs}
    if len(ctx) != 1:
        raise ValueError(f"the estimator's causal convs have different left contexts {sorted(ctx)}")
    return blocks, width, sum(c.in_channels for c in convs), ctx.pop()


def _mish(x: torch.Tensor) -> torch.Tensor:
    """Mish, x tanh(softplus(x)), as x n / (n + 2) with n = e^x (e^x + 2): one Exp instead of
    onnxruntime's scalar Softplus + Tanh (14% of the estimator's time at the released shape). e^x is
    capped at e^20, past which the ratio is 1 in float32."""
    e = torch.exp(torch.clamp(x, max=20.0))
    n = e * (e + 2.0)
    return x * n / (n + 2.0)


class CachedEstimatorStage(nn.Module):
    """The estimator on the N new frames of a chunk-attention solve after P frames solved before
    (whole chunks: the new frames start a chunk), exactly as the frames of a whole-utterance call.

    Inputs: x, mu, cond (2, 80, N); t (2,); spks (2, 80) (the CFG batch, as `EstimatorStage`);
    ``past`` (blocks, 2, P, width): every transformer block's *normed input* (``norm1(x)``, what its
    attention projects keys and values from) at the P past frames; ``conv_context`` (2, C, 2): the last
    2 inputs before the new frames of every causal conv, concatenated over the convs in forward order
    (zeros at the utterance start = the convs' zero padding); ``chunk_frames`` (); ``keep`` (): how
    many of the new frames the next call may cache (those of chunks now complete).
    Outputs: ``velocity`` (2, 80, N); ``new_past`` (blocks, 2, keep, width): the normed inputs of the
    first `keep` new frames, to append to ``past``; ``conv_context_out`` (2, C, 2): the convs' 2 inputs
    before new frame `keep` (the context of a call starting there).

    New frames attend to all P past frames (the caller trims P to its window) and to the new frames
    of their own chunk and earlier ones. Keys and values of the past frames are re-projected per call:
    the cache holds 256 channels per block and frame instead of 2 x 512."""

    def __init__(self, flow: CausalMaskedDiffWithXvec):
        super().__init__()
        self.estimator = flow.decoder.estimator
        self.convs = _causal_convs(self.estimator)

    @staticmethod
    def _attention(block: TransformerBlock, x: torch.Tensor, past: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (2, N, D), past (2, P, D) normed inputs, bias (N, P + N) -> (block output, normed new inputs)."""
        a = block.attn1
        b, n, _ = x.shape
        xn = block.norm1(x)
        kv = torch.cat([past, xn], dim=1)
        q = a.to_q(xn).view(b, n, a.heads, a.head_dim).transpose(1, 2)
        k = a.to_k(kv).view(b, -1, a.heads, a.head_dim).transpose(1, 2)
        v = a.to_v(kv).view(b, -1, a.heads, a.head_dim).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(a.head_dim) + bias
        out = torch.matmul(torch.softmax(scores, dim=-1), v).transpose(1, 2).reshape(b, n, -1)
        x = x + a.to_out[0](out)
        h = block.norm3(x)
        for m in block.ff.net:
            h = m(h)
        return x + h, xn

    def forward(self, x, mu, t, spks, cond, past, conv_context, chunk_frames, keep):
        est = self.estimator
        n = x.shape[-1]
        temb = est.time_mlp(sinusoidal_time(t, est.in_channels))
        h = torch.cat([x, mu, spks[:, :, None].expand(-1, -1, n), cond], dim=1)
        new_keep = chunk_mask(n, chunk_frames, x.device)  # (N, N): the new frames' own chunks
        seen = torch.cat([torch.ones(n, past.shape[2], dtype=torch.bool, device=x.device), new_keep], dim=1)
        bias = (1.0 - seen.to(x.dtype)) * torch.finfo(x.dtype).min
        ctx_out, new_past = [], []
        offset = [0]
        convs = iter(self.convs)

        def conv(y: torch.Tensor) -> torch.Tensor:
            c = next(convs)
            lo = offset[0]
            offset[0] += c.in_channels
            full = torch.cat([conv_context[:, lo:offset[0]], y], dim=2)  # (2, C, 2 + N)
            ctx_out.append(full[:, :, keep:keep + c.left])
            return F.conv1d(full, c.weight, c.bias)

        def block1d(blk: CausalBlock1D, y: torch.Tensor) -> torch.Tensor:
            _, _, norm, _, _ = blk.block
            return _mish(norm(conv(y).transpose(1, 2)).transpose(1, 2))

        def resnet(r: CausalResnetBlock1D, y: torch.Tensor) -> torch.Tensor:
            z = block1d(r.block1, y) + r.mlp(temb)[:, :, None]
            return block1d(r.block2, z) + r.res_conv(y)

        def attend(y: torch.Tensor, blocks: nn.ModuleList) -> torch.Tensor:
            y = y.transpose(1, 2)
            for blk in blocks:
                y, xn = self._attention(blk, y, past[len(new_past)], bias)
                new_past.append(xn[:, :keep])
            return y.transpose(1, 2)

        r, blocks, _ = est.down_blocks[0]
        h = attend(resnet(r, h), blocks)
        skip = h
        h = conv(h)
        for r, blocks in est.mid_blocks:
            h = attend(resnet(r, h), blocks)
        r, blocks, _ = est.up_blocks[0]
        h = attend(resnet(r, torch.cat([h, skip], dim=1)), blocks)
        h = conv(h)
        h = block1d(est.final_block, h)
        return est.final_proj(h), torch.stack(new_past), torch.cat(ctx_out, dim=1)
