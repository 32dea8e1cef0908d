"""Parity of the exported Fun-Audio-Chat stages against the PyTorch reference.

* ``audio_input.onnx`` vs ``user_audio_embeddings`` on the three parity clips (different lengths):
  the position count must equal the reference's (and the processor's rule), relative max error
  <= 1e-3.
* ``llm.gguf`` vs the reference Qwen3: the reference is fed the official prompt (``<|AUDIO|>`` x
  positions, embeddings scattered into those rows); llama.cpp is fed prefix ids, the same embedding
  rows, suffix ids. Teacher-forced along the reference's greedy ids: first-step logits max abs <= 1e-3
  and all 32 greedy ids identical (export/parity.lm_agreement, f32 rules), with llama.cpp on the
  exact path (f32 KV cache, flash attention off). The GGUF's tokenizer must give the official ids.

The speech rows are the reference's own, so each stage is judged alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from omnilite.quant.accuracy import teacher_forced
from omnilite.runtime.llm import LlamaCppLLM, LLMConfig, default_flash_attn
from omnilite.runtime.metrics import relative_max_error

from ..parity import PARITY_TOKENS, THRESHOLDS, lm_agreement, parity_inputs, summarize_lm
from ..speech_encoder import log_mel_torch
from .config import AUDIO_TOKEN, SAMPLE_RATE
from .prompt import AudioPrompt, official_prompt_ids, prompt_text
from .reference import FunAudioChatReference, llm_positions, mel_frames, placeholder_count

N_MELS = 128
PARITY_CTX = 1024  # prompt (< 40 ids) + the longest parity clip's positions + 32 generated ids


def clip_mel(audio: np.ndarray) -> torch.Tensor:
    """The processor's log-mel of a 16 kHz clip (Whisper's, over 30 s of padding), valid frames only."""
    return log_mel_torch(torch.from_numpy(audio), N_MELS, pad_to_30s=True)[:, : mel_frames(len(audio))]


def run_audio_input(session, mel: torch.Tensor, n_samples: int) -> np.ndarray:
    """The ONNX stage on one clip's valid mel frames."""
    feeds = {"mel": mel[None].numpy().astype(np.float32), "placeholders": np.array(placeholder_count(n_samples), dtype=np.int64)}
    return session.run(None, feeds)[0]


def audio_input_parity(model: FunAudioChatReference, onnx_path: Path) -> dict:
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    rows = []
    for name, audio in parity_inputs():
        mel = clip_mel(audio)
        with torch.no_grad():
            want = model.user_audio_embeddings(mel, len(audio)).numpy()
        got = run_audio_input(session, mel, len(audio))
        same = got.shape == want.shape
        rows.append({"input": name, "seconds": round(len(audio) / SAMPLE_RATE, 3),
                     "positions": int(got.shape[0]), "positions_reference": int(want.shape[0]),
                     "positions_official": llm_positions(placeholder_count(len(audio))),
                     "rel_max_error": relative_max_error(want, got) if same else None})
    threshold = THRESHOLDS["encoder_rel_max"]
    ok = all(r["positions"] == r["positions_reference"] == r["positions_official"] and r["rel_max_error"] <= threshold
             for r in rows)
    errors = [r["rel_max_error"] for r in rows if r["rel_max_error"] is not None]
    return {"per_input": rows, "rel_max_error": max(errors) if errors else None, "threshold": threshold, "ok": ok}


def _reference_greedy(model: FunAudioChatReference, x: torch.Tensor, n: int) -> tuple[list[int], torch.Tensor]:
    """Greedy ids from input embeddings `x` (T, D), ignoring eos, and the final-norm hidden state
    that predicted each."""
    lm = model.language_model
    embed = lm.get_input_embeddings()
    out = lm.model(inputs_embeds=x[None], use_cache=True)
    tokens, hidden = [], []
    for _ in range(n):
        last = out.last_hidden_state[0, -1]
        tokens.append(int(lm.lm_head(last).argmax()))
        hidden.append(last)
        out = lm.model(inputs_embeds=embed(torch.tensor([[tokens[-1]]])), past_key_values=out.past_key_values, use_cache=True)
    return tokens, torch.stack(hidden)


def llm_parity(model: FunAudioChatReference, gguf_path: Path, tokenizer_dir: Path, prompt: AudioPrompt,
               n_tokens: int = PARITY_TOKENS) -> dict:
    """`prompt` is the runtime side's cut (prefix ids, embedding rows, suffix ids); the reference side
    always builds the official prompt itself, so a wrong cut shows as a mismatch."""
    config = LLMConfig(n_ctx=PARITY_CTX, kv_cache="f32", flash_attn=default_flash_attn("f32"))
    per_input, tokenizer_ok = [], True
    with LlamaCppLLM(gguf_path, config) as llm:
        for _, audio in parity_inputs():
            with torch.no_grad():
                emb = model.user_audio_embeddings(clip_mel(audio), len(audio))
                ids = official_prompt_ids(tokenizer_dir, len(emb), prompt.system)
                x = model.prompt_embeddings(torch.tensor(ids), emb)  # the official scatter into <|AUDIO|> rows
                tokens, hidden = _reference_greedy(model, x, n_tokens)
                logits = model.language_model.lm_head(hidden).numpy()
            tokenizer_ok &= llm.tokenize(prompt_text(len(emb), prompt.system), special=True) == ids
            llm.reset()
            llm.eval_tokens(prompt.prefix_ids)
            llm.eval_embeddings(emb.numpy())
            first = llm.eval_tokens(prompt.suffix_ids, want_last=True)
            logits_rt, hidden_rt = teacher_forced(llm, first, tokens)
            per_input.append(lm_agreement("f32", tokens, logits, hidden.numpy(), logits_rt, hidden_rt))
    out = summarize_lm(per_input, config)
    out["splice"] = {"prefix_ids": len(prompt.prefix_ids), "official_first_audio_row": ids.index(AUDIO_TOKEN)}
    out["tokenizer_identical"] = tokenizer_ok
    out["ok"] = out["ok"] and tokenizer_ok
    return out
