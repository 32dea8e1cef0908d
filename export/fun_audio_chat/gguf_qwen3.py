"""Write a HF Qwen3 LM (``Qwen3ForCausalLM`` tensor names) with its tokenizer as a llama.cpp GGUF.

Facts of llama.cpp for the "qwen3" architecture (gguf-py ``MODEL_TENSORS[QWEN3]``, and its converter,
whose Qwen3 model derives from the Qwen2 one) that this follows:

* tensors ``token_embd``, ``blk.N.attn_{q,k,v}`` **without biases**, per-head RMS norms
  ``blk.N.attn_q_norm`` / ``attn_k_norm`` (head_dim wide), ``attn_output``, ``ffn_{gate,up,down}``,
  ``attn_norm``, ``ffn_norm``, ``output_norm``, ``output`` (absent when tied);
* ``head_dim`` is its own config value (not hidden / heads in general): written as
  ``attention.key_length`` / ``value_length`` when they differ;
* NEOX RoPE: Q and K rows stay in HF order; the tokenizer as for Qwen2 (model "gpt2", pre "qwen2").

Tensors are converted one at a time while writing, so peak memory is one tensor.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

from ..gguf_llm import _add_hparams, float_entries, write_gguf
from ..omni2.gguf_qwen2 import _add_tokenizer, plan_decoder

log = logging.getLogger(__name__)

ARCH = "qwen3"

_LAYER = {
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
}


def _plan(tensors: Mapping, config: Mapping, what: str) -> list[tuple[str, str, tuple[int, ...]]]:
    d, ff = config["hidden_size"], config["intermediate_size"]
    nh, nkv = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])
    hd = config.get("head_dim") or d // nh
    shapes = {
        "self_attn.q_proj.weight": (nh * hd, d), "self_attn.k_proj.weight": (nkv * hd, d),
        "self_attn.v_proj.weight": (nkv * hd, d), "self_attn.o_proj.weight": (d, nh * hd),
        "self_attn.q_norm.weight": (hd,), "self_attn.k_norm.weight": (hd,),
        "mlp.gate_proj.weight": (ff, d), "mlp.up_proj.weight": (ff, d), "mlp.down_proj.weight": (d, ff),
        "input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,),
    }
    return plan_decoder(tensors, config, what, _LAYER, shapes)


def write_qwen3_gguf(tensors: Mapping, config: dict, tokenizer_dir: Path, out_path: Path, *, eos_id: int,
                     dtype: str = "f32", name: str = "omnilite-qwen3", what: str = "Qwen3 LM", progress: bool = False) -> None:
    """Atomically write ``out_path``; ``tensors`` are HF-named (prefix already stripped), any
    array-like (a torch tensor or a lazily read safetensors slice converts with np.asarray)."""
    entries, file_type = float_entries(tensors, _plan(tensors, config, what), dtype)
    write_gguf(Path(out_path), ARCH, entries, lambda w: (_add_hparams(w, config, name, file_type),
               _add_tokenizer(w, Path(tokenizer_dir), int(config["vocab_size"]), eos_id)), progress)
    log.info("wrote %s (%s, %d tensors)", out_path, dtype, len(entries))
