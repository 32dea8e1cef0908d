"""Fun-Audio-Chat's speech head (``audio_invert_tower``) and speech feedback, torch-free.

Per LLM step the head turns (final-norm hidden state + text embedding of the input token) into 5
speech codes; its Qwen3 decoder keeps its own KV cache across steps (export/fun_audio_chat/NOTES.md,
"Speech head"). Three files carry it, exported by ``export/fun_audio_chat/speech_head.py``:

* ``speech_head_input.onnx``: (T, D) hidden + (T, D) text embeddings -> (5T, H) decoder input rows
  (``pre_matching`` folded into ``input_matching``: both are linear, nothing between them);
* ``speech_head_codes.npy``: (codebook, H) ``input_matching`` of each code's embedding, the term the
  previous code adds to a sub-step's row (the head's lm_head rows are the code embeddings);
* ``speech_head.gguf``: the Qwen3 decoder for llama.cpp, fed raw rows; its output matrix is
  ``lm_head @ output_matching`` folded, so llama.cpp returns the codebook logits directly.

``speech_feedback.onnx`` (codes -> ``audio_tower`` row) is what the LLM reads back while speaking:
its next input is (text embedding + that row) / 2 (``SpeechFeedback.llm_input``).

llama.cpp was chosen over an ONNX decoder with explicit past K/V by measured speed (NOTES.md).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import BundleError, OmniliteError
from ..llm import LlamaCppLLM, LLMConfig, default_flash_attn
from ..onnx_session import SessionOptions, open_session

HEAD_INPUT_FILE = "speech_head_input.onnx"
HEAD_CODES_FILE = "speech_head_codes.npy"
HEAD_LM_FILE = "speech_head.gguf"
FEEDBACK_FILE = "speech_feedback.onnx"
STAGES_FILE = "stages.json"

HEAD_N_CTX = 8192  # head positions (5 per LLM position): a prompt of ~1000 LLM positions and a 2-minute reply


@dataclass(frozen=True)
class HeadSpec:
    """The release's speech-token ids (audio_config) and the head's precision as exported."""

    bos_id: int  # the "previous code" of the very first sub-step
    eos_id: int  # a group holding it ends speech
    group: int  # codes per LLM step
    precision: str = "f32"

    @classmethod
    def from_record(cls, rec: dict) -> "HeadSpec":
        return cls(int(rec["bos_id"]), int(rec["eos_id"]), int(rec["group"]), str(rec.get("precision", "f32")))

    @classmethod
    def from_bundle(cls, bundle) -> "HeadSpec":
        """The manifest's speech ids with the precision of the ``speech_head`` stage itself (a quantized
        bundle changes the stage, not the speech section)."""
        speech = bundle["speech"]
        return cls(int(speech["bos_id"]), int(speech["eos_id"]), int(speech["group"]), bundle.stages["speech_head"].precision)


@dataclass(frozen=True)
class HeadPosition:
    """Where the head stands: positions in its KV cache and the last code it wrote (BOS before any)."""

    n_past: int
    prev: int


def sub_step_rows(n_rows: int, group: int, i: int) -> slice:
    """Rows of a step's (5T, H) input fed at sub-step `i`: sub-step 0 feeds every row up to the last
    position's first sub-position (5T - 4 rows in a prefill, 1 in a decode step), each later
    sub-step one more row."""
    first = n_rows - group + 1
    return slice(0, first) if i == 0 else slice(first + i - 1, first + i)


def _stage_record(stage_dir: Path, name: str) -> dict:
    path = stage_dir / STAGES_FILE
    try:
        stages = json.loads(path.read_text())["stages"]
    except (OSError, ValueError, KeyError) as e:
        raise BundleError(f"cannot read the stage list {path} ({type(e).__name__}); re-export the Fun-Audio-Chat stages.") from None
    for s in stages:
        if s.get("name") == name:
            return s
    raise BundleError(f"{path} has no '{name}' stage; re-export the Fun-Audio-Chat stages with a speech head.")


class SpeechHead:
    """Writes `group` speech codes per LLM step; greedy unless `choose` is given (e.g. a
    `sampling.SpeechSampler`, the release's speech sampling)."""

    def __init__(self, stage_dir: Path, spec: HeadSpec, llm_config: LLMConfig | None = None,
                 options: SessionOptions = SessionOptions()):
        stage_dir = Path(stage_dir)
        for name in (HEAD_INPUT_FILE, HEAD_CODES_FILE, HEAD_LM_FILE):
            if not (stage_dir / name).exists():
                raise BundleError(f"{stage_dir / name} is missing; re-export the Fun-Audio-Chat stages.")
        self.spec = spec
        self._input = open_session(stage_dir / HEAD_INPUT_FILE, options)
        self.width = int(self._input.get_inputs()[0].shape[-1])  # the LLM width D
        self._codes = np.load(stage_dir / HEAD_CODES_FILE, mmap_mode="r")
        exact = spec.precision.lower() == "f32"
        config = llm_config or LLMConfig(n_ctx=HEAD_N_CTX, kv_cache="f32" if exact else "f16",
                                         flash_attn=default_flash_attn(spec.precision))
        self.lm = LlamaCppLLM(stage_dir / HEAD_LM_FILE, config)
        if self._codes.shape != (self.lm.n_vocab, self.lm.n_embd):
            self.lm.close()
            raise BundleError(f"{stage_dir / HEAD_CODES_FILE} has shape {self._codes.shape} but {HEAD_LM_FILE} has "
                              f"{self.lm.n_vocab} codes of width {self.lm.n_embd}; the files come from different exports, re-export them.")
        self.logits: np.ndarray | None = None  # (group, codebook) logits of the last step
        self.reset()

    @classmethod
    def from_stage_dir(cls, stage_dir: Path, llm_config: LLMConfig | None = None,
                       options: SessionOptions = SessionOptions()) -> "SpeechHead":
        return cls(stage_dir, HeadSpec.from_record(_stage_record(Path(stage_dir), "speech_head")), llm_config, options)

    # --- state -------------------------------------------------------------------------------

    def reset(self) -> None:
        """Empty cache, previous code BOS: what the official generate() starts each call with."""
        self.lm.reset()
        self._prev = self.spec.bos_id
        self.logits = None

    def position(self) -> HeadPosition:
        return HeadPosition(self.lm.n_past, self._prev)

    def rollback(self, pos: HeadPosition) -> None:
        """Return to `pos` (taken earlier with `position()`): drops the cache past it and restores the
        previous code, so the next step continues exactly as it would have from there."""
        self.lm.truncate(pos.n_past)
        self._prev = pos.prev

    def close(self) -> None:
        self.lm.close()

    # --- one LLM step ------------------------------------------------------------------------

    def step(self, hidden: np.ndarray, text_embeds: np.ndarray,
             choose: Callable[[np.ndarray, Sequence[int]], int] | None = None, history: Sequence[int] = ()) -> list[int]:
        """`hidden`, `text_embeds`: (T, D) (or (D,)) for the T LLM positions of this step: the prompt at
        prefill, one position afterwards. Returns `group` codes (the last position's).

        Each code is argmax of its sub-step's logits, or `choose(logits, seen)` with `seen` = `history`
        (the reply's kept codes) + this step's codes so far: the ids the release's repetition penalty
        sees (``sampling_step``, export/fun_audio_chat/NOTES.md "Speech sampling")."""
        hidden, text_embeds = (np.atleast_2d(np.asarray(a, dtype=np.float32)) for a in (hidden, text_embeds))
        if hidden.shape != text_embeds.shape or hidden.ndim != 2 or hidden.shape[1] != self.width or not len(hidden):
            raise OmniliteError(f"the speech head needs hidden states and text embeddings of the same shape (T, {self.width}), "
                                f"got {hidden.shape} and {text_embeds.shape}; pass the LLM's final-norm rows and its input tokens' embeddings.")
        rows = self._input.run(None, {"hidden": hidden, "text_embeds": text_embeds})[0]
        codes, logits = [], []
        prev = self._prev
        for i in range(self.spec.group):
            x = rows[sub_step_rows(len(rows), self.spec.group, i)] + self._codes[prev]
            lo, _ = self.lm.eval_embeddings(x, want_last=True)
            prev = int(np.argmax(lo)) if choose is None else int(choose(lo, [*history, *codes]))
            codes.append(prev)
            logits.append(lo)
        self._prev = prev
        self.logits = np.stack(logits)
        return codes

    def ends_speech(self, codes: Sequence[int]) -> bool:
        """The official rule: a group holding EOS ends the reply's speech (the whole group becomes EOS)."""
        return self.spec.eos_id in codes


class SpeechFeedback:
    """``audio_tower`` on written codes: what the LLM reads back for each group while speaking."""

    def __init__(self, path: Path, group: int, options: SessionOptions = SessionOptions()):
        if not Path(path).exists():
            raise BundleError(f"{path} is missing; re-export the Fun-Audio-Chat stages.")
        self._session = open_session(Path(path), options)
        self.group = group

    def embed(self, codes: Sequence[int]) -> np.ndarray:
        """(5k,) codes -> (k, D) rows: each group's mean code embedding through ``output_matching``."""
        codes = np.asarray(codes, dtype=np.int64).reshape(-1)
        if not len(codes) or len(codes) % self.group:
            raise OmniliteError(f"speech feedback takes whole groups of {self.group} codes, got {len(codes)}.")
        return self._session.run(None, {"codes": codes})[0]

    def llm_input(self, text_embedding: np.ndarray, codes: Sequence[int]) -> np.ndarray:
        """The LLM's next input while speaking: (text embedding of the sampled token + feedback row) / 2."""
        return (np.asarray(text_embedding, dtype=np.float32) + self.embed(codes)[-1]) / 2
