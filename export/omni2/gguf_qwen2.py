"""Write a HF Qwen2 LM (``Qwen2ForCausalLM`` tensor names) with its tokenizer as a llama.cpp GGUF.

Facts of llama.cpp's converter for the "qwen2" architecture that this follows:

* tensors ``token_embd``, ``blk.N.attn_{q,k,v}`` with their **biases**, ``attn_output``,
  ``ffn_{gate,up,down}``, ``attn_norm``, ``ffn_norm``, ``output_norm``, ``output`` (absent when the
  embeddings are tied: llama.cpp then reuses ``token_embd``);
* NEOX-style RoPE, so Q and K rows are written as HF has them (no permutation, unlike "llama");
* the byte-level BPE tokenizer as model "gpt2" with pre-tokenizer "qwen2"; added special tokens
  are CONTROL, other added tokens USER_DEFINED, unused embedding rows ``[PADn]``.

Used for both LLaMA-Omni2 language models: the Qwen2.5 LLM and the TTS LM (whose vocabulary adds
the speech tokens and ``<sep>``). Tensors are converted one at a time while writing.

``vocabulary=False`` writes tokenizer model "none" (llama.cpp's "no vocab": token ids and embeddings
in, logits out) instead of the BPE vocabulary. The TTS LM never sees text, only ids and fused
embeddings, and llama.cpp builds its tokenizer tables from the vocabulary at load: 56 MiB of heap
for the 158k-token TTS vocabulary, with the same tensors and logits (measured: identical).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

import gguf

from omnilite.runtime.errors import CheckpointError

from ..gguf_llm import _add_hparams, add_bpe_vocab, float_entries, ids_past_rows, write_gguf, writer_tokens

log = logging.getLogger(__name__)

ARCH = "qwen2"

_LAYER = {
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
}


def _plan(tensors: Mapping, config: Mapping, what: str) -> list[tuple[str, str, tuple[int, ...]]]:
    d, ff = config["hidden_size"], config["intermediate_size"]
    nh, nkv = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])
    hd = d // nh
    shapes = {
        "self_attn.q_proj.weight": (nh * hd, d), "self_attn.q_proj.bias": (nh * hd,),
        "self_attn.k_proj.weight": (nkv * hd, d), "self_attn.k_proj.bias": (nkv * hd,),
        "self_attn.v_proj.weight": (nkv * hd, d), "self_attn.v_proj.bias": (nkv * hd,),
        "self_attn.o_proj.weight": (d, nh * hd), "mlp.gate_proj.weight": (ff, d), "mlp.up_proj.weight": (ff, d),
        "mlp.down_proj.weight": (d, ff), "input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,),
    }
    return plan_decoder(tensors, config, what, _LAYER, shapes)


def plan_decoder(tensors: Mapping, config: Mapping, what: str, layer_names: Mapping[str, str],
                 layer_shapes: Mapping[str, tuple[int, ...]]) -> list[tuple[str, str, tuple[int, ...]]]:
    """(HF name, GGUF name, shape) of a Qwen-style decoder's tensors, each checked against the checkpoint:
    embeddings, every layer's `layer_names` (HF suffix -> GGUF suffix), final norm, untied LM head."""
    d, vocab = config["hidden_size"], config["vocab_size"]
    plan = [("model.embed_tokens.weight", "token_embd.weight", (vocab, d))]
    for i in range(config["num_hidden_layers"]):
        plan += [(f"model.layers.{i}.{hf}", f"blk.{i}.{gg}", layer_shapes[hf]) for hf, gg in layer_names.items()]
    plan.append(("model.norm.weight", "output_norm.weight", (d,)))
    if not config.get("tie_word_embeddings", False):
        plan.append(("lm_head.weight", "output.weight", (vocab, d)))
    for hf, _, shape in plan:
        if hf not in tensors:
            raise CheckpointError(f"the {what} is missing tensor '{hf}' (expected shape {shape}); the checkpoint is incomplete.")
        if tuple(tensors[hf].shape) != shape:
            raise CheckpointError(f"{what} tensor '{hf}' has shape {tuple(tensors[hf].shape)} but its config implies {shape}; "
                                  "the checkpoint and its config.json do not match.")
    return plan


def _add_tokenizer(writer: gguf.GGUFWriter, tokenizer_dir: Path, vocab_size: int, eos_id: int, vocabulary: bool = True) -> None:
    tok = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    cfg_path = tokenizer_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.exists() else {}
    extra = ids_past_rows(tok, vocab_size)
    if extra:
        raise CheckpointError(f"{tokenizer_dir} has {len(extra)} token ids beyond the model's {vocab_size} embedding rows; "
                              "the tokenizer does not belong to this model.")
    writer.add_eos_token_id(int(eos_id))
    if not vocabulary:
        writer.add_tokenizer_model("none")
        return
    tokens = writer_tokens(tok, vocab_size)
    add_bpe_vocab(writer, tok, vocab_size, pre="qwen2")
    by_text = {t: i for i, t in enumerate(tokens)}
    pad = cfg.get("pad_token")
    if isinstance(pad, str) and pad in by_text:
        writer.add_pad_token_id(by_text[pad])
    writer.add_add_bos_token(False)  # Qwen prepends nothing
    if cfg.get("chat_template"):
        writer.add_chat_template(cfg["chat_template"])


def write_qwen2_gguf(tensors: Mapping, config: dict, tokenizer_dir: Path, out_path: Path, *, eos_id: int,
                     dtype: str = "f32", name: str = "omnilite-qwen2", what: str = "Qwen2 LM", progress: bool = False,
                     vocabulary: bool = True) -> None:
    """Atomically write ``out_path``; ``tensors`` are HF-named (prefix already stripped)."""
    entries, file_type = float_entries(tensors, _plan(tensors, config, what), dtype)
    cfg = dict(config)
    cfg.setdefault("max_position_embeddings", 32768)
    write_gguf(Path(out_path), ARCH, entries, lambda w: (_add_hparams(w, cfg, name, file_type),
               _add_tokenizer(w, Path(tokenizer_dir), int(config["vocab_size"]), eos_id, vocabulary)), progress)
    log.info("wrote %s (%s, %d tensors)", out_path, dtype, len(entries))
