"""The Step-Audio 2 LLM as a llama.cpp GGUF, and its parity with the speech rows spliced in.

The LLM is a plain transformers Qwen2 (``model.*`` + untied ``lm_head``), so the LLaMA-Omni2 writer
(``omni2.gguf_qwen2``, llama.cpp arch "qwen2") writes it with the release's tokenizer.json; what is
new here is the prompt and where the audio goes:

* the prompt is rendered as ``stepaudio2.py StepAudio2.apply_chat_template`` renders a speech turn,
  each segment tokenized on its own as the official code does: system turn, ``<|BOT|>human\\n``,
  one ``<audio_start>`` + ``<audio_patch>`` x N + ``<audio_end>`` per 25 s piece, ``<|EOT|>``, then
  ``<|BOT|>assistant\\n`` followed by ``<tts_start>`` for a spoken reply;
* the official forward overwrites the N positions after the i-th ``<audio_start>`` with piece i's
  rows (``reference.splice_audio``); llama.cpp gets the same sequence as token runs and embedding runs
  cut at those positions (``splice_plan``), so no position moves.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from omnilite.runtime.errors import CheckpointError, OmniliteError
from omnilite.runtime.llm import LlamaCppLLM, LLMConfig, Output

from ..checkpoint import LazyTensor
from ..omni2.gguf_qwen2 import write_qwen2_gguf
from ..parity import PARITY_TOKENS, lm_agreement, summarize_lm
from .checkpoint import AUDIO_START_ID, StepAudio2Checkpoint, TextConfig
from .reference import EncoderWithAdapter, audio_positions, chunk_audio, encode_pieces, log_mel, splice_audio

LLM_FILE = "llm.gguf"
SYSTEM_PROMPT = "You are a helpful assistant."  # stepaudio2.py __main__, every example


def gguf_config(t: TextConfig) -> dict:
    """text_config in the HF Qwen2 key names the GGUF writer reads (the official Qwen2Config mapping)."""
    return {"hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
            "num_attention_heads": t.num_attention_heads, "num_key_value_heads": t.num_key_value_heads,
            "num_hidden_layers": t.num_hidden_layers, "vocab_size": t.vocab_size, "rms_norm_eps": t.rms_norm_eps,
            "rope_theta": t.rope_theta, "rope_scaling": t.rope_scaling,
            "max_position_embeddings": t.max_position_embeddings, "tie_word_embeddings": False}


def tokenizer_json(ckpt: StepAudio2Checkpoint) -> Path:
    path = ckpt.root / "tokenizer.json"
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; the export needs the release's tokenizer.json (download it from "
                              "the Step-Audio-2-mini release).")
    return path


def write_llm_gguf(ckpt: StepAudio2Checkpoint, path: Path, dtype: str = "f32", progress: bool = False) -> None:
    """The LLM (``model.*`` + ``lm_head``) as an f32 (or f16) qwen2 GGUF with the release tokenizer; eos is
    ``<|EOT|>`` (the official StepAudio2 class ends a turn there)."""
    names = [n for n in ckpt.tensors if n.startswith("model.") or n == "lm_head.weight"]
    write_qwen2_gguf({n: LazyTensor(ckpt.tensors, n) for n in names}, gguf_config(ckpt.config.text),
                     tokenizer_json(ckpt).parent, path, eos_id=ckpt.token_ids["<|EOT|>"], dtype=dtype,
                     name=ckpt.root.name, what="Step-Audio 2 LLM", progress=progress)


def prompt_segments(piece_positions: Sequence[int], speech_reply: bool = True, system: str = SYSTEM_PROMPT) -> list[str]:
    """The texts the official apply_chat_template emits for a system turn plus one spoken user turn,
    with the assistant turn opened (and ``<tts_start>`` prefilled for a spoken reply)."""
    return [f"<|BOT|>system\n{system}<|EOT|>", "<|BOT|>human\n",
            *(f"<audio_start>{'<audio_patch>' * n}<audio_end>" for n in piece_positions),
            "<|EOT|>", "<|BOT|>assistant\n" + ("<tts_start>" if speech_reply else "")]


def render_speech_prompt(tokenizer, piece_positions: Sequence[int], speech_reply: bool = True,
                         system: str = SYSTEM_PROMPT) -> list[int]:
    """Token ids of `prompt_segments`, each segment tokenized on its own as the official code does.
    `tokenizer`: a ``tokenizers.Tokenizer`` of the release's tokenizer.json."""
    segments = prompt_segments(piece_positions, speech_reply, system)
    return [i for s in segments for i in tokenizer.encode(s, add_special_tokens=False).ids]


def splice_plan(ids: Sequence[int], counts: Sequence[int]) -> list[int]:
    """Position of the first audio row of each piece: right after the i-th ``<audio_start>``."""
    starts = [i for i, t in enumerate(ids) if t == AUDIO_START_ID]
    if len(starts) != len(counts):
        raise OmniliteError(f"the prompt has {len(starts)} <audio_start> tokens for {len(counts)} audio pieces; "
                            "render one <audio_start><audio_patch>...<audio_end> per 25 s piece.")
    return [s + 1 for s in starts]


def prefill_spliced(llm: LlamaCppLLM, ids: Sequence[int], pieces: Sequence[np.ndarray]) -> Output:
    """Prefill `ids` with each piece's rows in place of its ``<audio_patch>`` run, from an empty
    cache; returns the last position's (logits, hidden)."""
    llm.reset()
    pos = 0
    for at, rows in zip(splice_plan(ids, [len(p) for p in pieces]), pieces):
        llm.eval_tokens(ids[pos:at])
        llm.eval_embeddings(rows)
        pos = at + len(rows)
    return llm.eval_tokens(ids[pos:], want_last=True)


@torch.no_grad()
def reference_greedy(llm, embeds: torch.Tensor, n: int) -> tuple[list[int], np.ndarray]:
    """Greedy ids and their logits from input embeddings (T, hidden), with a KV cache, eos ignored
    (parity runs a fixed number of steps)."""
    out = llm(inputs_embeds=embeds[None], use_cache=True)
    tokens, logits = [], []
    for _ in range(n):
        last = out.logits[0, -1]
        tokens.append(int(last.argmax()))
        logits.append(last.float().numpy())
        out = llm(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)
    return tokens, np.stack(logits)


@dataclass(frozen=True)
class SplicedPrompt:
    name: str
    text: str  # the rendered prompt, for llama.cpp's tokenizer check
    ids: list[int]
    rows: list[torch.Tensor]  # per 25 s piece, as the official forward encodes them (one padded batch)


@torch.no_grad()
def spliced_prompts(tokenizer, encoder: EncoderWithAdapter, audio: list[tuple[str, np.ndarray]],
                    speech_reply: bool = True) -> list[SplicedPrompt]:
    n_mels = encoder.encoder.conv1.in_channels
    out = []
    for name, a in audio:
        mels = [log_mel(p, n_mels) for p in chunk_audio(torch.from_numpy(a))]
        rows = encode_pieces(encoder, mels)
        positions = [audio_positions(m.shape[-1]) for m in mels]
        text = "".join(prompt_segments(positions, speech_reply))
        out.append(SplicedPrompt(name, text, render_speech_prompt(tokenizer, positions, speech_reply), rows))
    return out


@torch.no_grad()
def llm_parity(ref_llm, gguf_path: Path, prompts: list[SplicedPrompt], dtype: str = "f32") -> dict:
    """The GGUF (f32: exact; f16: judged as the quantizer judges F16) against the PyTorch LLM on each spliced prompt: the reference runs the official
    splice (``splice_audio`` over the embedded ids), llama.cpp the cut prefill; teacher-forced along
    the reference's greedy ids (``PARITY_TOKENS``). Plain attention and an f32 KV cache: the exact
    path (``runtime.llm.default_flash_attn``). Also whether llama.cpp's tokenizer (the GGUF's) turns
    each prompt's text into the same ids as the release's tokenizer.json."""
    from omnilite.quant.accuracy import teacher_forced

    config = LLMConfig(n_ctx=max(len(p.ids) for p in prompts) + PARITY_TOKENS + 8, kv_cache="f32", flash_attn="off")
    embed = ref_llm.get_input_embeddings()
    per_input, tokenizer_ok = [], True
    with LlamaCppLLM(gguf_path, config) as llm:
        for p in prompts:
            ids = torch.tensor(p.ids)
            tokens, logits = reference_greedy(ref_llm, splice_audio(ids, embed(ids), p.rows), PARITY_TOKENS)
            first = prefill_spliced(llm, p.ids, [r.numpy() for r in p.rows])
            logits_rt, _ = teacher_forced(llm, first, tokens)
            per_input.append(lm_agreement(dtype, tokens, logits, None, logits_rt, None) | {"reference_ids": tokens})
            tokenizer_ok = tokenizer_ok and llm.tokenize(p.text, special=True) == p.ids
    # The reference's greedy ids per input: what the runtime pipeline must reproduce free-running.
    report = summarize_lm(per_input, config) | {"inputs_named": [p.name for p in prompts],
                                                "reference_greedy_ids": [r["reference_ids"] for r in per_input],
                                                "prompt_positions": [len(p.ids) for p in prompts],
                                                "audio_rows": [[len(r) for r in p.rows] for p in prompts],
                                                "gguf_tokenizer_identical": tokenizer_ok}
    report["ok"] = report["ok"] and tokenizer_ok
    return report
