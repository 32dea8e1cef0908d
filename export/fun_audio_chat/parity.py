"""Parity of the exported Fun-Audio-Chat stages against the PyTorch reference.

* ``audio_input.onnx`` vs ``user_audio_embeddings`` on the three parity clips (different lengths):
  the position count must equal the reference's (and the processor's rule), relative max error
  <= 1e-3.
* ``llm.gguf`` vs the reference Qwen3: the reference is fed the official prompt (``<|AUDIO|>`` x
  positions, embeddings scattered into those rows); llama.cpp is fed prefix ids, the same embedding
  rows, suffix ids. Teacher-forced along the reference's greedy ids: first-step logits max abs <= 5e-3
  and all 32 greedy ids identical (export/parity.lm_agreement, f32 rules), with llama.cpp on the
  exact path (f32 KV cache, flash attention off). The GGUF's tokenizer must give the official ids.

* the speech head (``speech_head_input.onnx`` + ``speech_head_codes.npy`` + ``speech_head.gguf``,
  run by runtime/fun_audio_chat/speech_head.py) vs ``reference.s2m_greedy``, the official generate
  loop greedy: the runtime head is driven by the reference's hidden states and text embeddings (the
  prompt prefill's T positions, then one per step) and picks its own codes; all 5 x (1 + 32) codes
  identical, logits max abs <= 1e-3. Continuation: a second head decoding the prefill in pieces of
  16 rows and taking a 3-step detour that it rolls back halfway must give the same codes and logits.
* ``speech_feedback.onnx`` vs ``audio_tower`` on the reply's groups and on groups holding the
  specials (BOS, EOS, pad): max abs error <= 1e-4 x max abs of the reference.

The speech rows are the reference's own, so each stage is judged alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from omnilite.quant.accuracy import teacher_forced
from omnilite.runtime.fun_audio_chat.speech_head import FEEDBACK_FILE, HeadSpec, SpeechFeedback, SpeechHead
from omnilite.runtime.llm import LlamaCppLLM, LLMConfig, default_flash_attn
from omnilite.runtime.metrics import relative_max_error

from ..parity import PARITY_TOKENS, THRESHOLDS, lm_agreement, parity_inputs, summarize_lm
from ..speech_encoder import log_mel_torch
from .config import AUDIO_TOKEN, N_CODES, SAMPLE_RATE
from .prompt import AudioPrompt, official_prompt_ids, prompt_text
from .reference import FunAudioChatReference, S2MTrace, llm_positions, mel_frames, placeholder_count, s2m_greedy

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
               dtype: str = "f32", n_tokens: int = PARITY_TOKENS) -> dict:
    """`prompt` is the runtime side's cut (prefix ids, embedding rows, suffix ids); the reference side
    always builds the official prompt itself, so a wrong cut shows as a mismatch. `dtype`: the GGUF's
    (f32: the exact path; f16: judged as the quantizer judges an F16 GGUF)."""
    config = LLMConfig(n_ctx=PARITY_CTX, kv_cache="f32" if dtype == "f32" else "f16", flash_attn=default_flash_attn(dtype))
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
            per_input.append(lm_agreement(dtype, tokens, logits, hidden.numpy(), logits_rt, hidden_rt))
    out = summarize_lm(per_input, config)
    out["splice"] = {"prefix_ids": len(prompt.prefix_ids), "official_first_audio_row": ids.index(AUDIO_TOKEN)}
    out["tokenizer_identical"] = tokenizer_ok
    out["ok"] = out["ok"] and tokenizer_ok
    return out


HEAD_STEPS = 32  # LLM steps after the prefill: 5 x 32 = 160 codes, plus the prefill's 5
HEAD_THRESHOLDS = {"logits_max_abs": 1e-3, "feedback_rel_max": 1e-4}
HEAD_CTX = 1024  # head positions: 5 x (prompt + steps) of the longest parity clip
DETOUR = 3  # steps a continuation check takes and rolls back


def s2m_traces(model: FunAudioChatReference, tokenizer_dir: Path, system: str, n_steps: int = HEAD_STEPS) -> list[tuple[str, S2MTrace]]:
    """The reference's greedy speech reply to each parity clip (official prompt and scatter)."""
    traces = []
    for name, audio in parity_inputs():
        with torch.no_grad():
            emb = model.user_audio_embeddings(clip_mel(audio), len(audio))
            ids = torch.tensor(official_prompt_ids(tokenizer_dir, len(emb), system))
            traces.append((name, s2m_greedy(model, ids, emb, n_steps)))
    return traces


def drive_head(head: SpeechHead, trace: S2MTrace, detour_at: int | None = None) -> tuple[list[list[int]], np.ndarray]:
    """Run the runtime head on the trace's inputs; with `detour_at`, after that step feed DETOUR
    steps of other inputs, then roll back to where the detour began."""
    head.reset()
    codes, logits = [], []
    for k, (hidden, text) in enumerate(zip(trace.head_hidden, trace.head_text)):
        codes.append(head.step(hidden.numpy(), text.numpy()))
        logits.append(head.logits)
        if k == detour_at:
            mark = head.position()
            for j in range(DETOUR):
                head.step(np.ascontiguousarray(trace.head_hidden[j + 1].numpy()[:, ::-1]), trace.head_text[-1].numpy())
            head.rollback(mark)
    return codes, np.stack(logits)


def _identical_codes(want: list[list[int]], got: list[list[int]]) -> int:
    """Codes identical before the first difference, counted over the flattened steps."""
    flat_w, flat_g = [c for g in want for c in g], [c for g in got for c in g]
    n = next((i for i, (a, b) in enumerate(zip(flat_w, flat_g)) if a != b), min(len(flat_w), len(flat_g)))
    return n


def speech_head_parity(model: FunAudioChatReference, stage_dir: Path, spec: HeadSpec,
                       traces: list[tuple[str, S2MTrace]]) -> dict:
    rows, cont = [], {}
    exact = LLMConfig(n_ctx=HEAD_CTX, kv_cache="f32", flash_attn="off")
    head = SpeechHead(stage_dir, spec, exact)
    pieces = SpeechHead(stage_dir, spec, LLMConfig(n_ctx=HEAD_CTX, n_batch=16, kv_cache="f32", flash_attn="off"))
    try:
        for i, (name, trace) in enumerate(traces):
            want_codes = trace.codes
            want_logits = torch.stack(trace.logits).numpy()
            got_codes, got_logits = drive_head(head, trace)
            n = sum(len(c) for c in want_codes)
            rows.append({"input": name, "prompt_positions": int(trace.head_hidden[0].shape[0]), "steps": len(want_codes),
                         "codes": n, "codes_identical": _identical_codes(want_codes, got_codes),
                         "logits_max_abs": float(np.abs(got_logits - want_logits).max()),
                         "speech_groups": len(trace.speech)})
            if i == 0:
                c_codes, c_logits = drive_head(pieces, trace, detour_at=len(want_codes) // 2)
                cont = {"input": name, "n_batch": 16, "detour_at_step": len(want_codes) // 2, "detour_steps": DETOUR,
                        "codes_identical": _identical_codes(got_codes, c_codes), "codes": n,
                        "logits_max_abs_vs_one_pass": float(np.abs(c_logits - got_logits).max())}
                cont["ok"] = cont["codes_identical"] == n and cont["logits_max_abs_vs_one_pass"] <= 1e-5
    finally:
        head.close()
        pieces.close()
    worst = max(r["logits_max_abs"] for r in rows)
    ok = all(r["codes_identical"] == r["codes"] for r in rows) and worst <= HEAD_THRESHOLDS["logits_max_abs"]
    return {"per_input": rows, "codes_identical": min(r["codes_identical"] for r in rows), "logits_max_abs": worst,
            "threshold_logits_max_abs": HEAD_THRESHOLDS["logits_max_abs"], "continuation": cont,
            "kv_cache": exact.kv_cache, "flash_attn": exact.flash_attn, "ok": ok and cont["ok"]}


def feedback_parity(model: FunAudioChatReference, stage_dir: Path, spec: HeadSpec,
                    traces: list[tuple[str, S2MTrace]]) -> dict:
    groups = [g for _, t in traces for g in t.speech]
    specials = [[spec.bos_id, spec.eos_id, model.audio_tower.embed_tokens.padding_idx, 0, N_CODES - 1]]
    codes = np.array([c for g in groups + specials for c in g], dtype=np.int64)
    with torch.no_grad():
        want = model.audio_tower.speech_groups(torch.from_numpy(codes)).numpy()
    got = SpeechFeedback(stage_dir / FEEDBACK_FILE, spec.group).embed(codes)
    err = relative_max_error(want, got) if got.shape == want.shape else None
    threshold = HEAD_THRESHOLDS["feedback_rel_max"]
    return {"groups": len(groups) + len(specials), "rel_max_error": err, "threshold": threshold,
            "ok": err is not None and err <= threshold}
