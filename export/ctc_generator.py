"""Reference LLaMA-Omni speech generator: non-autoregressive CTC over upsampled LLM hidden states.

Official structure (ictnlp/LLaMA-Omni ``SpeechGeneratorCTC``): ``input_proj`` Linear(H_llm -> d),
``layers.{i}`` Llama decoder layers (MHA, d, heads, ffn from ``ctc_decoder_config``; RoPE and RMSNorm
eps inherited from the LLM config), ``output_proj`` Linear(d -> units + 1), blank = last index.
Each hidden state is repeated ``ctc_upsample_factor`` times; attention is causal (flash-attention 2).

`SpeechGeneratorCTC.predict` is the offline reference. `CachedCTCStep` is the same computation
for a chunk of new hidden states with a KV cache: because attention is causal, running it chunk by
chunk gives the units of the offline pass (the official streaming loop instead re-runs every step).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding


def parse_ctc_decoder_config(value: str) -> tuple[int, int, int, int]:
    """'(n_layers,n_dims,n_heads,n_inter)' -> ints."""
    parts = [int(p) for p in value.strip().strip("()").split(",")]
    if len(parts) != 4:
        raise ValueError(f"ctc_decoder_config {value!r} must have 4 integers")
    return parts[0], parts[1], parts[2], parts[3]


def ctc_layer_config(llm_config: LlamaConfig, ctc_decoder_config: str) -> LlamaConfig:
    n_layers, dims, heads, inter = parse_ctc_decoder_config(ctc_decoder_config)
    cfg = copy.deepcopy(llm_config)
    cfg.hidden_size, cfg.num_hidden_layers = dims, n_layers
    cfg.num_attention_heads = cfg.num_key_value_heads = heads
    cfg.intermediate_size = inter
    cfg.head_dim = dims // heads
    cfg._attn_implementation = "eager"  # we pass an explicit causal mask
    return cfg


def ctc_collapse(preds: list[int], blank: int, previous: int | None = None) -> list[int]:
    """Merge repeats, then drop blanks. `previous` is the last raw prediction before this chunk."""
    out = []
    for p in preds:
        if p != previous and p != blank:
            out.append(p)
        previous = p
    return out


class SpeechGeneratorCTC(nn.Module):
    def __init__(self, llm_config: LlamaConfig, ctc_decoder_config: str, upsample_factor: int, unit_vocab_size: int):
        super().__init__()
        self.config = ctc_layer_config(llm_config, ctc_decoder_config)
        self.upsample_factor = upsample_factor
        self.blank = unit_vocab_size
        self.input_proj = nn.Linear(llm_config.hidden_size, self.config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(self.config, i) for i in range(self.config.num_hidden_layers))
        self.output_proj = nn.Linear(self.config.hidden_size, unit_vocab_size + 1)
        self.rotary = LlamaRotaryEmbedding(self.config)

    def frame_predictions(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (L, H_llm) -> argmax unit/blank id for each of the L * factor positions."""
        x = self.input_proj(hidden.repeat_interleave(self.upsample_factor, dim=0)).unsqueeze(0)
        t = x.shape[1]
        pos = torch.arange(t).unsqueeze(0)
        mask = torch.full((t, t), float("-inf")).triu(1)[None, None]
        cos_sin = self.rotary(x, pos)
        for layer in self.layers:
            out = layer(x, attention_mask=mask, position_ids=pos, position_embeddings=cos_sin)
            x = out[0] if isinstance(out, tuple) else out
        logits = self.output_proj(x)
        return torch.log_softmax(logits.float(), dim=-1).argmax(dim=-1)[0]

    def predict(self, hidden: torch.Tensor) -> list[int]:
        return ctc_collapse(self.frame_predictions(hidden).tolist(), self.blank)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class CachedCTCStep(nn.Module):
    """One streaming step, exported to ONNX.

    Inputs: hidden (1, n, H_llm) new LLM hidden states; past_key / past_value
    (layers, 1, heads, P, head_dim). Outputs: frame predictions (1, n * factor) int64 and the
    updated caches (P + n * factor positions).
    """

    def __init__(self, gen: SpeechGeneratorCTC):
        super().__init__()
        self.gen = gen
        cfg = gen.config
        self.heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.register_buffer("inv_freq", gen.rotary.inv_freq.detach().clone().float(), persistent=False)
        self.attention_scaling = float(gen.rotary.attention_scaling)

    def forward(self, hidden: torch.Tensor, past_key: torch.Tensor, past_value: torch.Tensor):
        g = self.gen
        x = g.input_proj(hidden.repeat_interleave(g.upsample_factor, dim=1))
        n = x.shape[1]
        p = past_key.shape[3]
        pos = torch.arange(n, dtype=torch.float32) + p
        freqs = pos[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling
        # New position i (absolute p + i) sees cached positions and new positions j <= i.
        key_pos = torch.arange(n + p)[None, :]
        query_pos = (torch.arange(n) + p)[:, None]
        mask = torch.where(key_pos > query_pos, float("-inf"), 0.0)
        keys, values = [], []
        for i, layer in enumerate(g.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)

            def heads(y: torch.Tensor) -> torch.Tensor:
                return y.view(1, n, self.heads, self.head_dim).transpose(1, 2)

            q, k, v = heads(attn.q_proj(h)), heads(attn.k_proj(h)), heads(attn.v_proj(h))
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            k = torch.cat((past_key[i], k), dim=2)
            v = torch.cat((past_value[i], v), dim=2)
            keys.append(k)
            values.append(v)
            scores = (q @ k.transpose(2, 3)) / (self.head_dim ** 0.5) + mask
            o = torch.softmax(scores, dim=-1) @ v
            x = x + attn.o_proj(o.transpose(1, 2).reshape(1, n, self.heads * self.head_dim))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        preds = g.output_proj(x).argmax(dim=-1)
        return preds, torch.stack(keys), torch.stack(values)
