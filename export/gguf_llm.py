"""Write a HF Llama (``LlamaForCausalLM`` tensor names) as a llama.cpp GGUF file.

Follows the facts of llama.cpp's ``convert_hf_to_gguf.py`` for the "llama" architecture:

* tensor names ``token_embd``, ``blk.N.attn_q`` ... ``output``; 2-D weights in f32 or f16,
  1-D tensors (norms, ``rope_freqs``) always f32;
* Q and K rows permuted from HF's rotate-half RoPE layout to GGML's interleaved-pair layout;
* Llama-3 RoPE scaling stored as a ``rope_freqs.weight`` tensor of per-dimension divisors;
* the HF fast BPE tokenizer stored as tokenizer model "gpt2" with pre-tokenizer "llama-bpe".

Tensors are converted one at a time while writing, so peak memory is one tensor, not the model.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path

import gguf
import numpy as np

from omnilite.runtime.errors import CheckpointError

log = logging.getLogger(__name__)

ARCH = "llama"

# HF per-layer suffix -> GGUF per-layer name.
_LAYER_TENSORS = {
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}


def _permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotates the two halves of each head; GGML rotates adjacent pairs. Reorder the rows of
    each head from [x0..x(d/2-1), y0..y(d/2-1)] to [x0, y0, x1, y1, ...] (same as the converter)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope(config: Mapping) -> tuple[float, dict]:
    """(rope_theta, rope scaling dict); transformers 5 folds both into ``rope_parameters``."""
    scaling = config.get("rope_scaling") or config.get("rope_parameters") or {}
    theta = config.get("rope_theta", scaling.get("rope_theta", 10000.0))
    return float(theta), scaling


def llama3_rope_factors(config: Mapping) -> np.ndarray | None:
    """Per-frequency divisors llama.cpp applies for Llama-3 RoPE scaling, or None when unscaled.

    Same formula as HF's ``_compute_llama3_parameters``: high frequencies unchanged, low
    frequencies divided by ``factor``, a smooth blend in between."""
    theta, scaling = _rope(config)
    if scaling.get("rope_type", scaling.get("type", "")).lower() != "llama3":
        return None
    dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    factor = scaling.get("factor", 8.0)
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_ctx = scaling.get("original_max_position_embeddings", config.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high

    freqs = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim)
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


def _plan(tensors: Mapping[str, np.ndarray], config: Mapping) -> list[tuple[str, str, tuple[int, ...]]]:
    """(HF name, GGUF name, expected HF shape) for every tensor to write, in file order."""
    d, ff, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    n_head, n_kv = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])
    head_dim = config.get("head_dim") or d // n_head
    shapes = {
        "self_attn.q_proj.weight": (n_head * head_dim, d),
        "self_attn.k_proj.weight": (n_kv * head_dim, d),
        "self_attn.v_proj.weight": (n_kv * head_dim, d),
        "self_attn.o_proj.weight": (d, n_head * head_dim),
        "mlp.gate_proj.weight": (ff, d),
        "mlp.up_proj.weight": (ff, d),
        "mlp.down_proj.weight": (d, ff),
        "input_layernorm.weight": (d,),
        "post_attention_layernorm.weight": (d,),
    }
    plan = [("model.embed_tokens.weight", "token_embd.weight", (vocab, d))]
    for i in range(config["num_hidden_layers"]):
        plan += [(f"model.layers.{i}.{hf}", f"blk.{i}.{gg}", shapes[hf]) for hf, gg in _LAYER_TENSORS.items()]
    plan.append(("model.norm.weight", "output_norm.weight", (d,)))
    # Tied embeddings: llama.cpp reuses token_embd when output.weight is absent.
    if "lm_head.weight" in tensors or not config.get("tie_word_embeddings", False):
        plan.append(("lm_head.weight", "output.weight", (vocab, d)))

    for hf, _, shape in plan:
        if hf not in tensors:
            raise CheckpointError(f"The Llama checkpoint is missing tensor '{hf}' (expected shape {shape}); re-download the checkpoint.")
        if tuple(tensors[hf].shape) != shape:
            raise CheckpointError(
                f"Llama tensor '{hf}' has shape {tuple(tensors[hf].shape)} but config.json implies {shape}; "
                "the checkpoint and its config.json do not match."
            )
    return plan


def _convert(hf_name: str, w: np.ndarray, config: Mapping, out_dtype: type) -> np.ndarray:
    w = np.asarray(w, dtype=np.float32)
    if hf_name.endswith("q_proj.weight"):
        w = _permute_qk(w, config["num_attention_heads"])
    elif hf_name.endswith("k_proj.weight"):
        w = _permute_qk(w, config.get("num_key_value_heads", config["num_attention_heads"]))
    # 1-D tensors stay f32, as in the converter (ggml ops on norms expect f32).
    return np.ascontiguousarray(w.astype(out_dtype if w.ndim == 2 else np.float32, copy=False))


def _vocab(tok: dict, vocab_size: int) -> tuple[list[str], list[gguf.TokenType], list[str]]:
    """One (text, type) per embedding row, and the names of tokenizer ids past the last row."""
    ids: dict[int, tuple[str, gguf.TokenType]] = {i: (t, gguf.TokenType.NORMAL) for t, i in tok["model"]["vocab"].items()}
    for added in tok.get("added_tokens", []):
        ids[added["id"]] = (added["content"], gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED)
    rows = [ids.get(i, (f"[PAD{i}]", gguf.TokenType.UNUSED)) for i in range(vocab_size)]
    return [t for t, _ in rows], [k for _, k in rows], [ids[i][0] for i in sorted(ids) if i >= vocab_size]


def writer_tokens(tok: dict, vocab_size: int) -> list[str]:
    return _vocab(tok, vocab_size)[0]


def ids_past_rows(tok: dict, vocab_size: int) -> list[str]:
    """The names of tokenizer ids that have no embedding row (a tokenizer of another model)."""
    return _vocab(tok, vocab_size)[2]


def add_bpe_vocab(writer: gguf.GGUFWriter, tok: dict, vocab_size: int, pre: str) -> list[str]:
    """A byte-level BPE tokenizer.json -> GGUF "gpt2" vocabulary with llama.cpp pre-tokenizer `pre`.
    The token list has exactly one entry per embedding row (llama.cpp refuses anything else); the
    names of tokenizer ids past the last row, which are dropped, are returned."""
    tokens, types, extra = _vocab(tok, vocab_size)
    # tokenizers saves merges either as "a b" strings or as [a, b] pairs.
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    return extra


def _add_tokenizer(writer: gguf.GGUFWriter, tokenizer_dir: Path, config: Mapping) -> None:
    """Llama-3 tokenizer.json (byte-level BPE + added special tokens) -> GGUF "gpt2" vocabulary."""
    tok_path = tokenizer_dir / "tokenizer.json"
    try:
        tok = json.loads(tok_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{tok_path} is missing; the LLM's tokenizer.json must be next to its config.json.") from None
    cfg_path = tokenizer_dir / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.exists() else {}

    vocab_size = config["vocab_size"]
    extra = add_bpe_vocab(writer, tok, vocab_size, pre="llama-bpe")  # Llama-3's pre-tokenizer regex
    if extra:
        log.warning("gguf: dropping %d tokenizer ids >= vocab_size %d (no embedding row): %s", len(extra), vocab_size, extra)
    tokens = writer_tokens(tok, vocab_size)
    by_text = {t: i for i, t in enumerate(tokens)}

    def special_id(key: str):  # config.json's id, else the token named in tokenizer_config.json
        value = config.get(f"{key}_id")
        return by_text.get(tok_cfg.get(key)) if value is None else value

    bos = special_id("bos_token")
    if bos is not None:
        writer.add_bos_token_id(int(bos))
        # Llama-3 has no add_bos_token flag: its post-processor template prepends <|begin_of_text|>.
        template = json.dumps(tok.get("post_processor") or {})
        writer.add_add_bos_token(bool(tok_cfg.get("add_bos_token", tokens[bos] in template)))
    eos = special_id("eos_token")
    eos_list = [eos] if isinstance(eos, int) else list(eos or [])
    eot = by_text.get("<|eot_id|>")
    if eot is not None and eot in eos_list:
        # Instruct models end a turn with <|eot_id|>: make it the eos and the eot.
        writer.add_eos_token_id(eot)
        writer.add_eot_token_id(eot)
    elif eos_list:
        writer.add_eos_token_id(int(eos_list[0]))
    if tok_cfg.get("chat_template"):
        writer.add_chat_template(tok_cfg["chat_template"])


def _add_hparams(writer: gguf.GGUFWriter, config: Mapping, name: str, file_type: gguf.LlamaFileType) -> None:
    d, n_head = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or d // n_head
    theta, _ = _rope(config)
    writer.add_name(name)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config.get("max_position_embeddings", 8192))
    writer.add_embedding_length(d)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(config.get("num_key_value_heads", n_head))
    writer.add_rope_freq_base(theta)
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-5))
    writer.add_vocab_size(config["vocab_size"])
    writer.add_rope_dimension_count(head_dim)
    if head_dim != d // n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_file_type(file_type)


def write_llama_gguf(
    tensors: Mapping[str, np.ndarray],
    config: dict,
    tokenizer_dir: Path,
    out_path: Path,
    *,
    dtype: str = "f32",
    name: str = "omnilite-llm",
    progress: bool = False,
) -> None:
    """Write the Llama LLM in ``tensors`` (HF names) with its tokenizer to ``out_path`` (GGUF).

    The file appears atomically: it is written to ``out_path.with_suffix('.tmp')`` and renamed."""
    if dtype not in ("f32", "f16"):
        raise ValueError(f"dtype must be 'f32' or 'f16', not {dtype!r}")
    out_dtype = np.float16 if dtype == "f16" else np.float32
    file_type = gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32
    out_path, tokenizer_dir = Path(out_path), Path(tokenizer_dir)
    plan = _plan(tensors, config)  # validate everything before touching the disk
    rope_factors = llama3_rope_factors(config)

    # (GGUF name, shape, dtype, producer); data is produced lazily, one tensor at a time.
    entries = [
        (gg, shape, np.dtype(out_dtype if len(shape) == 2 else np.float32),
         lambda hf=hf: _convert(hf, tensors[hf], config, out_dtype))
        for hf, gg, shape in plan
    ]
    if rope_factors is not None:
        entries.insert(0, ("rope_freqs.weight", rope_factors.shape, np.dtype(np.float32), lambda: rope_factors))

    write_gguf(out_path, ARCH, entries, lambda w: (_add_hparams(w, config, name, file_type),
                                                   _add_tokenizer(w, tokenizer_dir, config)), progress)
    log.info("wrote %s (%s, %d tensors)", out_path, dtype, len(entries))



def float_entries(tensors: Mapping, plan: list[tuple[str, str, tuple[int, ...]]], dtype: str
                  ) -> tuple[list[tuple], gguf.LlamaFileType]:
    """`write_gguf` entries for a plan of (HF name, GGUF name, shape) without reordering: matrices in
    `dtype` ("f32" or "f16"), vectors f32 (llama.cpp's norms and biases), each read only when written."""
    if dtype not in ("f32", "f16"):
        raise ValueError(f"dtype must be 'f32' or 'f16', not {dtype!r}")
    out_dtype = np.float16 if dtype == "f16" else np.float32

    def convert(hf: str) -> np.ndarray:
        w = np.asarray(tensors[hf], dtype=np.float32)
        return np.ascontiguousarray(w.astype(out_dtype if w.ndim == 2 else np.float32, copy=False))

    entries = [(gg, shape, np.dtype(out_dtype if len(shape) == 2 else np.float32), lambda hf=hf: convert(hf))
               for hf, gg, shape in plan]
    return entries, gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32


def write_gguf(out_path: Path, arch: str, entries: list[tuple], add_metadata, progress: bool = False) -> None:
    """Write a GGUF atomically (to ``out_path.with_suffix('.tmp')``, then renamed): the metadata that
    ``add_metadata(writer)`` adds, every tensor's shape and dtype, then each tensor's data in order.
    ``entries``: (GGUF name, shape, numpy dtype, produce() -> array); produced one at a time, so only
    one converted tensor is in memory."""
    tmp = Path(out_path).with_suffix(".tmp")
    writer = gguf.GGUFWriter(tmp, arch)
    try:
        add_metadata(writer)
        for gg, shape, dt, _ in entries:
            writer.add_tensor_info(gg, shape, dt, math.prod(shape) * dt.itemsize)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        if progress:
            from tqdm import tqdm

            entries = tqdm(entries, desc=Path(out_path).name, unit="tensor")
        for _, _, _, produce in entries:
            writer.write_tensor_data(produce())
        writer.close()
        os.replace(tmp, out_path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
