"""Reference PyTorch token2wav flow of Step-Audio 2 (speech tokens -> 80-bin mel at 50 Hz), written from
the official maths (facts and sources in NOTES.md, "token2wav flow"):

* ``CausalMaskedDiffWithXvec`` with an ``UpsampleConformerEncoderV2`` (same layers and tensor names as
  CosyVoice2's ``UpsampleConformerEncoder``, reused from ``export/omni2/flow.py``) and a
  ``CausalConditionalCFM`` whose estimator is the "DiT-v5" ``DiT`` (adaLN-zero blocks: attention with
  q/k LayerNorm, a causal conv block, a tanh-GELU MLP).
* Whole utterance (``token2wav.py``): prompt tokens + generated tokens through the encoder with full
  attention (no chunk mask), prompt mel as ``cond`` on the prompt frames, 10 cosine-scheduled Euler
  steps with classifier-free guidance 0.7 from a fixed noise buffer; the prompt frames are cut off.
* Streaming (``forward_chunk``): the encoder and the estimator carry attention caches (keys/values
  of every earlier frame) and conv caches (the causal convs' left context); a chunk sees its own
  frames and the cached ones, never later chunks. ``setup`` runs the prompt (its mel as ``cond``)
  to fill the caches; each later chunk has ``cond`` zero. The estimator keeps one cache per Euler
  step; a chunk's noise starts at the estimator cache's length (the frames before it).

Every path runs through the chunk functions: a whole utterance is one chunk without caches and with
its lookahead padded (the official whole forward equals that). ``keep`` masks (test only) restrict
a whole pass to what streaming sees, which makes streamed == masked whole exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..omni2.flow import FlowConfig as CosyFlowConfig
from ..omni2.flow import RelSelfAttention, UpsampleConformerEncoder, _Transpose

NOISE_FRAMES = 30000  # 50 Hz x 600 s, the official buffer's length
NOISE_SEED = 0  # the official buffer is torch.randn at construction, unseeded; ours is fixed
TIME_FREQ_DIM = 256  # TimestepEmbedder's frequency_embedding_size (not a yaml key)
CHUNK_TOKENS = 25  # streaming hop in tokens (the token2wav streaming call sites)


@dataclass(frozen=True)
class StepFlowConfig:
    """flow.yaml values (defaults: the release's)."""

    input_size: int = 512
    output_size: int = 80
    spk_embed_dim: int = 192
    vocab_size: int = 6561
    # encoder (UpsampleConformerEncoderV2); output_size == input_size in the release
    pre_lookahead_len: int = 3
    num_blocks: int = 6
    num_up_blocks: int = 4
    up_stride: int = 2
    attention_heads: int = 8
    linear_units: int = 2048
    # estimator (DiT)
    in_channels: int = 320
    mlp_ratio: float = 4.0
    depth: int = 16
    num_heads: int = 8
    head_dim: int = 64
    hidden_size: int = 512
    # CausalConditionalCFM
    inference_cfg_rate: float = 0.7
    n_timesteps: int = 10  # token2wav.py passes 10; not in flow.yaml

    def encoder_config(self) -> CosyFlowConfig:
        """The omni2 encoder's config: same layers; full attention (the chunk mask is never applied)."""
        return CosyFlowConfig(vocab_size=self.vocab_size, input_size=self.input_size, output_size=self.output_size,
                              spk_embed_dim=self.spk_embed_dim, token_mel_ratio=self.up_stride,
                              pre_lookahead_len=self.pre_lookahead_len, attention_heads=self.attention_heads,
                              linear_units=self.linear_units, num_blocks=self.num_blocks, num_up_blocks=self.num_up_blocks,
                              chunk_tokens=1 << 30)


def fixed_noise(frames: int = NOISE_FRAMES, mel: int = 80) -> torch.Tensor:
    g = torch.Generator().manual_seed(NOISE_SEED)
    return torch.randn(1, mel, frames, generator=g)


def t_span(n_timesteps: int) -> torch.Tensor:
    t = torch.linspace(0, 1, n_timesteps + 1)
    return 1 - torch.cos(t * 0.5 * torch.pi)


def stream_schedule(n_tokens: int, chunk: int = CHUNK_TOKENS, lookahead: int = 3) -> list[tuple[int, int, bool]]:
    """(start, end, last) token windows of the streaming loop: while 25 + 3 tokens are buffered, vocode
    them (the 3 lookahead tokens only feed the pre-lookahead conv) and drop 25; the rest is the last
    chunk, its lookahead padded with zeros. Output frames of a window: [start, end - lookahead), or
    [start, end) for the last."""
    out, start = [], 0
    while n_tokens - start >= chunk + lookahead:
        out.append((start, start + chunk + lookahead, False))
        start += chunk
    out.append((start, n_tokens, True))
    return out


def block_keep(ids_q: torch.Tensor, ids_k: torch.Tensor) -> torch.Tensor:
    """(Tq, Tk) bool: a query sees keys of its own block and earlier ones (what streaming sees)."""
    return ids_k[None, :] <= ids_q[:, None]


# ----------------------------------------------------------------------------- encoder


def rel_attention(attn: RelSelfAttention, x: torch.Tensor, pos: torch.Tensor, cache: torch.Tensor,
                  keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """ESPnet relative-position attention over cached + current frames. cache (B, h, Tc, 2 d_k) holds
    keys then values of earlier frames (cache first, as wenet concatenates); pos has 2(Tc+T)-1 rows
    for offsets Tc+T-1 .. -(Tc+T-1). The official rel_shift picks, for query i and key j, row
    (T-1) - i + j: offset (Tc + i) - j."""
    b, t, _ = x.shape
    h, dk = attn.h, attn.d_k
    q = attn.linear_q(x).view(b, t, h, dk)
    k = torch.cat([cache[..., :dk], attn.linear_k(x).view(b, t, h, dk).transpose(1, 2)], dim=2)
    v = torch.cat([cache[..., dk:], attn.linear_v(x).view(b, t, h, dk).transpose(1, 2)], dim=2)
    t2 = k.shape[2]
    p = attn.linear_pos(pos).view(1, -1, h, dk).transpose(1, 2)
    ac = torch.matmul((q + attn.pos_bias_u).transpose(1, 2), k.transpose(-2, -1))
    bd = torch.matmul((q + attn.pos_bias_v).transpose(1, 2), p.transpose(-2, -1))
    i = torch.arange(t, device=x.device)
    j = torch.arange(t2, device=x.device)
    idx = (t - 1) - i[:, None] + j[None, :]
    bd = torch.gather(bd, 3, idx.expand(b, h, t, t2))
    scores = (ac + bd) / math.sqrt(dk)
    if keep is not None:
        scores = scores.masked_fill(~keep[None, None], float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1), v).transpose(1, 2).reshape(b, t, h * dk)
    return attn.linear_out(out), torch.cat([k, v], dim=-1)


def _positions(enc: UpsampleConformerEncoder, size: int | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The relative position rows for `size` key frames (the encoder's own sin/cos table)."""
    return enc.embed.pos_enc(like.new_zeros(1, size, like.shape[-1]))[1]


def encoder_chunk(enc: UpsampleConformerEncoder, xs: torch.Tensor, valid: torch.Tensor, cnn_cache: torch.Tensor,
                  att1: torch.Tensor, att2: torch.Tensor, keep1: torch.Tensor | None = None,
                  keep2: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """UpsampleConformerEncoderV2.forward_chunk on token embeddings xs (B, T, d) whose last
    ``pre_lookahead_len`` rows are lookahead. valid (B, T): 0 rows become the zero padding the official
    last chunk appends after the embedding. cnn_cache (B, d, 2 + 2 stride): the pre-lookahead conv2's
    and the upsample conv's left context; att1 (layers, B, h, Tc, 2 d_k) / att2 (up layers, B, h,
    stride Tc, 2 d_k): keys/values of earlier frames. Returns (h (B, stride (T - L), d), cnn, att1, att2)."""
    d = xs.shape[-1]
    la = enc.pre_lookahead_layer.lookahead
    stride = enc.up_layer.stride
    x = enc.embed.out(xs) * math.sqrt(d) * valid[..., None]
    pl = enc.pre_lookahead_layer
    y = F.leaky_relu(pl.conv1(x.transpose(1, 2)))  # T - L frames: each sees its L lookahead frames
    y = torch.cat([cnn_cache[:, :, :2], y], dim=2)
    new_pl = y[:, :, -2:]
    x = pl.conv2(y).transpose(1, 2) + x[:, : x.shape[1] - la]
    pos = _positions(enc, att1.shape[3] + x.shape[1], x)
    new1 = []
    for i, layer in enumerate(enc.encoders):
        a, c = rel_attention(layer.self_attn, layer.norm_mha(x), pos, att1[i], keep1)
        x = x + a
        x = x + layer.feed_forward(layer.norm_ff(x))
        new1.append(c)
    b, t, _ = x.shape
    u = x[:, :, None, :].expand(b, t, stride, d).reshape(b, t * stride, d).transpose(1, 2)  # nearest x stride
    u = torch.cat([cnn_cache[:, :, 2:], u], dim=2)
    new_up = u[:, :, -2 * stride:]
    x = enc.up_layer.conv(u).transpose(1, 2)
    x = enc.up_embed.out(x) * math.sqrt(d)
    pos = _positions(enc, att2.shape[3] + x.shape[1], x)
    new2 = []
    for i, layer in enumerate(enc.up_encoders):
        a, c = rel_attention(layer.self_attn, layer.norm_mha(x), pos, att2[i], keep2)
        x = x + a
        x = x + layer.feed_forward(layer.norm_ff(x))
        new2.append(c)
    return enc.after_norm(x), torch.cat([new_pl, new_up], dim=2), torch.stack(new1), torch.stack(new2)


# ----------------------------------------------------------------------------- DiT estimator


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(TIME_FREQ_DIM, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = TIME_FREQ_DIM // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = (t * 1000.0)[:, None] * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(dim, inner)
        self.to_v = nn.Linear(dim, inner)
        self.q_norm = nn.LayerNorm(head_dim)
        self.k_norm = nn.LayerNorm(head_dim)
        self.proj = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor, cache: torch.Tensor, keep: torch.Tensor | None = None):
        """cache (B, heads, Tc, 2 head_dim): normed keys then values; the new frames go FIRST (the
        official forward_chunk concatenates [new, cache]), which only matters for how a cache is cut."""
        b, t, _ = x.shape

        def heads(y: torch.Tensor) -> torch.Tensor:
            return y.reshape(b, t, self.heads, self.head_dim).transpose(1, 2)

        q = self.q_norm(heads(self.to_q(x)))
        k = torch.cat([self.k_norm(heads(self.to_k(x))), cache[..., : self.head_dim]], dim=2)
        v = torch.cat([heads(self.to_v(x)), cache[..., self.head_dim:]], dim=2)
        scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(self.head_dim)
        if keep is not None:
            scores = scores.masked_fill(~keep[None, None], float("-inf"))
        out = torch.matmul(torch.softmax(scores, dim=-1), v).transpose(1, 2).reshape(b, t, -1)
        return self.proj(out), torch.cat([k, v], dim=-1)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class CausalConvBlock(nn.Module):
    """Two causal k3 convs with LayerNorm + Mish between; ``block`` indices 1, 3, 6 hold the weights
    (the official Sequential interleaves transposes)."""

    def __init__(self, ch: int, k: int = 3):
        super().__init__()
        self.ch, self.k = ch, k
        self.block = nn.Sequential(_Transpose(), nn.Conv1d(ch, ch, k), _Transpose(), nn.LayerNorm(ch), nn.Mish(),
                                   _Transpose(), nn.Conv1d(ch, ch, k), _Transpose())

    def forward(self, x: torch.Tensor, cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, C); cache (B, 2C, k-1): each conv's last k-1 input frames (zeros at the start)."""
        y = torch.cat([cache[:, : self.ch], x.transpose(1, 2)], dim=2)
        c1 = y[:, :, -(self.k - 1):]
        y = self.block[4](self.block[3](self.block[1](y).transpose(1, 2))).transpose(1, 2)
        y = torch.cat([cache[:, self.ch:], y], dim=2)
        c2 = y[:, :, -(self.k - 1):]
        return self.block[6](y).transpose(1, 2), torch.cat([c1, c2], dim=1)


class DiTBlock(nn.Module):
    def __init__(self, hidden: int, heads: int, head_dim: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, heads, head_dim)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = MLP(hidden, int(hidden * mlp_ratio))
        self.norm3 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.conv = CausalConvBlock(hidden)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 9 * hidden))

    def forward(self, x, c, cnn_cache, att_cache, keep=None):
        (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp,
         shift_conv, scale_conv, gate_conv) = self.adaLN_modulation(c).chunk(9, dim=-1)
        a, new_att = self.attn(modulate(self.norm1(x), shift_msa, scale_msa), att_cache, keep)
        x = x + gate_msa * a
        v, new_cnn = self.conv(modulate(self.norm3(x), shift_conv, scale_conv), cnn_cache)
        x = x + gate_conv * v
        x = x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x, new_cnn, new_att


class FinalLayer(nn.Module):
    def __init__(self, hidden: int, out: int):
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, out)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    def __init__(self, c: StepFlowConfig):
        super().__init__()
        self.c = c
        self.t_embedder = TimestepEmbedder(c.hidden_size)
        self.in_proj = nn.Linear(c.in_channels, c.hidden_size)
        self.blocks = nn.ModuleList(DiTBlock(c.hidden_size, c.num_heads, c.head_dim, c.mlp_ratio) for _ in range(c.depth))
        self.final_layer = FinalLayer(c.hidden_size, c.output_size)

    def empty_caches(self, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.c
        return (torch.zeros(c.depth, batch, 2 * c.hidden_size, 2),
                torch.zeros(c.depth, batch, c.num_heads, 0, 2 * c.head_dim))

    def forward(self, x, mu, t, spks, cond, cnn_cache, att_cache, keep=None):
        """forward_chunk: x, mu, cond (B, 80, T); t (B,); spks (B, 80); cnn_cache (depth, B, 2 hidden, 2);
        att_cache (depth, B, heads, Tc, 2 head_dim) -> (v (B, 80, T), cnn, att)."""
        temb = self.t_embedder(t)[:, None]
        h = torch.cat([x, mu, spks[:, :, None].expand(-1, -1, x.shape[-1]), cond], dim=1).transpose(1, 2)
        h = self.in_proj(h)
        cnn, att = [], []
        for i, block in enumerate(self.blocks):
            h, c, a = block(h, temb, cnn_cache[i], att_cache[i], keep)
            cnn.append(c)
            att.append(a)
        return self.final_layer(h, temb).transpose(1, 2), torch.stack(cnn), torch.stack(att)


class CFM(nn.Module):
    """CausalConditionalCFM: holds ``estimator`` and the Euler solver with classifier-free guidance."""

    def __init__(self, c: StepFlowConfig):
        super().__init__()
        self.c = c
        self.estimator = DiT(c)

    def guided(self, x, mu, t, spks, cond, cnn_cache, att_cache, keep=None):
        """One CFG velocity: the estimator on a batch of (conditioned, unconditioned: mu, spks, cond
        zero), combined as (1 + r) v_c - r v_u."""
        v, cnn, att = self.estimator(torch.cat([x, x]), torch.cat([mu, torch.zeros_like(mu)]), t.reshape(1).repeat(2),
                                     torch.cat([spks, torch.zeros_like(spks)]), torch.cat([cond, torch.zeros_like(cond)]),
                                     cnn_cache, att_cache, keep)
        r = self.c.inference_cfg_rate
        return (1.0 + r) * v[:1] - r * v[1:], cnn, att

    def solve(self, z, mu, spks, cond, cnn_cache=None, att_cache=None, keep=None):
        """Euler from noise z (1, 80, T). Caches: one per step, (steps, depth, 2, ...), or None (none yet).
        Time advances as the official loop does it (t += dt; dt = span[k+1] - t)."""
        span = t_span(self.c.n_timesteps)
        t, dt = span[0], span[1] - span[0]
        x = z
        new_cnn, new_att = [], []
        for step in range(1, len(span)):
            cnn0, att0 = self.estimator.empty_caches() if cnn_cache is None else (cnn_cache[step - 1], att_cache[step - 1])
            v, c, a = self.guided(x, mu, t, spks, cond, cnn0, att0, keep)
            x = x + dt * v
            t = t + dt
            if step < len(span) - 1:
                dt = span[step + 1] - t
            new_cnn.append(c)
            new_att.append(a)
        return x, torch.stack(new_cnn), torch.stack(new_att)


@dataclass
class FlowCache:
    """Streaming state: encoder conv/attention caches and the estimator's, one per Euler step."""

    cnn: torch.Tensor  # (1, d, 6)
    att1: torch.Tensor  # (blocks, 1, h, Tc, 2 d_k)
    att2: torch.Tensor  # (up blocks, 1, h, 2 Tc, 2 d_k)
    est_cnn: torch.Tensor  # (steps, depth, 2, 2 hidden, 2)
    est_att: torch.Tensor  # (steps, depth, 2, heads, Tm, 2 head_dim)


class StepAudio2Flow(nn.Module):
    """``CausalMaskedDiffWithXvec`` with the DiT estimator; tensor names as in flow.pt."""

    def __init__(self, c: StepFlowConfig):
        super().__init__()
        self.c = c
        self.input_embedding = nn.Embedding(c.vocab_size, c.input_size)
        self.spk_embed_affine_layer = nn.Linear(c.spk_embed_dim, c.output_size)
        self.encoder = UpsampleConformerEncoder(c.encoder_config())
        self.encoder_proj = nn.Linear(c.input_size, c.output_size)
        self.decoder = CFM(c)
        self.register_buffer("noise", fixed_noise(NOISE_FRAMES, c.output_size), persistent=False)

    def speaker(self, xvector: torch.Tensor) -> torch.Tensor:
        """(1, 192) CAM++ x-vector -> (1, 80): L2-normalised, then the affine layer."""
        return self.spk_embed_affine_layer(F.normalize(xvector, dim=1))

    def empty_encoder_cache(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c = self.c
        dk = c.input_size // c.attention_heads
        return (torch.zeros(1, c.input_size, 2 + 2 * c.up_stride),
                torch.zeros(c.num_blocks, 1, c.attention_heads, 0, 2 * dk),
                torch.zeros(c.num_up_blocks, 1, c.attention_heads, 0, 2 * dk))

    def mu_chunk(self, tokens: torch.Tensor, valid: torch.Tensor, cnn, att1, att2, keep1=None, keep2=None):
        """(1, T) tokens (last L are lookahead) -> mu (1, 80, stride (T - L)) and the new encoder caches."""
        h, cnn, att1, att2 = encoder_chunk(self.encoder, self.input_embedding(tokens.clamp(min=0)), valid, cnn, att1, att2,
                                           keep1, keep2)
        return self.encoder_proj(h).transpose(1, 2), cnn, att1, att2

    def _noise(self, start: int, n: int) -> torch.Tensor:
        if start + n > self.noise.shape[-1]:
            raise ValueError(f"{start + n} mel frames exceed the flow's fixed noise of {self.noise.shape[-1]} frames (600 s)")
        return self.noise[:, :, start:start + n]

    @torch.no_grad()
    def inference(self, tokens: torch.Tensor, prompt_tokens: torch.Tensor, prompt_mel: torch.Tensor, xvector: torch.Tensor,
                  masked_like_stream: bool = False) -> torch.Tensor:
        """Whole utterance as token2wav.py: (1, N) tokens after (1, P) prompt tokens whose mel (1, 2P, 80)
        conditions the prompt frames -> mel (1, 80, 2N). ``masked_like_stream``: attention restricted to
        what `stream` sees (prompt block, then the streaming windows), for testing the caches."""
        c = self.c
        all_tokens = torch.cat([prompt_tokens, tokens], dim=1)
        la, s = c.pre_lookahead_len, c.up_stride
        p, n = prompt_tokens.shape[1], tokens.shape[1]
        keep1 = keep2 = None
        if masked_like_stream:
            ids = torch.zeros(p + n, dtype=torch.long)
            for k, (a, b, last) in enumerate(stream_schedule(n, lookahead=la), start=1):
                ids[p + a:p + (b if last else b - la)] = k
            keep1 = block_keep(ids, ids)
            ids2 = ids.repeat_interleave(s)
            keep2 = block_keep(ids2, ids2)
        padded = torch.cat([all_tokens, torch.zeros(1, la, dtype=all_tokens.dtype)], dim=1)
        valid = torch.ones(padded.shape, dtype=torch.float32)
        valid[:, -la:] = 0
        cnn, att1, att2 = self.empty_encoder_cache()
        mu, *_ = self.mu_chunk(padded, valid, cnn, att1, att2, keep1, keep2)
        cond = torch.zeros_like(mu)
        cond[:, :, : prompt_mel.shape[1]] = prompt_mel.transpose(1, 2)
        mel, _, _ = self.decoder.solve(self._noise(0, mu.shape[-1]), mu, self.speaker(xvector), cond, keep=keep2)
        return mel[:, :, prompt_mel.shape[1]:]

    @torch.no_grad()
    def setup(self, prompt_tokens: torch.Tensor, lookahead: torch.Tensor, prompt_mel: torch.Tensor,
              xvector: torch.Tensor) -> FlowCache:
        """``setup_cache``: the prompt (its mel as cond) through encoder and estimator to fill the caches.
        ``lookahead`` (1, L): tokens after the prompt (the streaming code passes the prompt's first L)."""
        cnn, att1, att2 = self.empty_encoder_cache()
        tokens = torch.cat([prompt_tokens, lookahead], dim=1)
        mu, cnn, att1, att2 = self.mu_chunk(tokens, torch.ones(tokens.shape), cnn, att1, att2)
        _, est_cnn, est_att = self.decoder.solve(self._noise(0, mu.shape[-1]), mu, self.speaker(xvector),
                                                 prompt_mel.transpose(1, 2))
        return FlowCache(cnn, att1, att2, est_cnn, est_att)

    @torch.no_grad()
    def chunk(self, tokens: torch.Tensor, xvector: torch.Tensor, cache: FlowCache, last: bool) -> tuple[torch.Tensor, FlowCache]:
        """``inference_chunk``: (1, T) tokens incl. L lookahead (the last chunk: none, zero-padded) ->
        mel (1, 80, stride x (T - L) or stride x T for the last) and the new cache."""
        la = self.c.pre_lookahead_len
        valid = torch.ones(tokens.shape)
        if last:
            tokens = torch.cat([tokens, torch.zeros(1, la, dtype=tokens.dtype)], dim=1)
            valid = torch.cat([valid, torch.zeros(1, la)], dim=1)
        mu, cnn, att1, att2 = self.mu_chunk(tokens, valid, cache.cnn, cache.att1, cache.att2)
        start = cache.est_att.shape[4]
        mel, est_cnn, est_att = self.decoder.solve(self._noise(start, mu.shape[-1]), mu, self.speaker(xvector),
                                                   torch.zeros_like(mu), cache.est_cnn, cache.est_att)
        return mel, FlowCache(cnn, att1, att2, est_cnn, est_att)

    @torch.no_grad()
    def stream(self, tokens: torch.Tensor, prompt_tokens: torch.Tensor, prompt_mel: torch.Tensor, xvector: torch.Tensor,
               lookahead: torch.Tensor | None = None) -> torch.Tensor:
        """The streaming loop over (1, N) tokens (25 + 3 windows); ``lookahead`` for `setup` defaults to
        the prompt's first L tokens, as the streaming code does. Returns the concatenated mel (1, 80, 2N)."""
        la = self.c.pre_lookahead_len
        cache = self.setup(prompt_tokens, prompt_tokens[:, :la] if lookahead is None else lookahead, prompt_mel, xvector)
        mels = []
        for a, b, last in stream_schedule(tokens.shape[1], lookahead=la):
            mel, cache = self.chunk(tokens[:, a:b], xvector, cache, last)
            mels.append(mel)
        return torch.cat(mels, dim=2)
