"""Export Fun-Audio-Chat's speech head (``audio_invert_tower``) and the speech feedback
(``audio_tower`` on written codes) for the torch-free runtime (runtime/fun_audio_chat/speech_head.py
describes the files and how they are run).

The head's linear maps around its Qwen3 decoder have no nonlinearity between them, so they are
folded at export (products in float64, stored as float32):

* ``input_matching(pre_matching(x)_i + e_prev)`` = ``F_i x + c_i + input_matching(e_prev)`` with
  ``F_i = W_in W_pre,i`` and ``c_i = W_in b_pre,i``: one (5H, D) matrix in ONNX instead of a (5D, D)
  one and a (H, D) one applied 5 times (5x fewer multiply-adds at H = 1024, D = 4096), plus a
  (codebook, H) table of ``input_matching`` of every code embedding (``speech_head_codes.npy``);
* ``lm_head(output_matching(h))`` = ``(W_lm W_out) h``: the GGUF's (codebook, H) output matrix.

The decoder GGUF ("qwen3", tokenizer model "none", vocabulary = the 6565 codes) holds the code table
as ``token_embd`` too, since llama.cpp requires one; the runtime never feeds it ids.
"""

from __future__ import annotations

import logging
from pathlib import Path

import gguf
import numpy as np
import torch
from torch import nn

from omnilite.runtime.fun_audio_chat.speech_head import FEEDBACK_FILE, HEAD_CODES_FILE, HEAD_INPUT_FILE, HEAD_LM_FILE, HeadSpec

from ..gguf_llm import _add_hparams, write_gguf
from ..onnx_export import export_onnx
from .gguf_qwen3 import ARCH, _plan
from .reference import FunAudioChatReference, SpeechHead

log = logging.getLogger(__name__)


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64)


class HeadInputStage(nn.Module):
    """(T, D) final-norm hidden states + (T, D) text embeddings -> (5T, H): every sub-position's
    decoder input row without the previous code's term."""

    def __init__(self, head: SpeechHead):
        super().__init__()
        d, g = head.pre_matching.in_features, head.group
        w_in = _f64(head.input_matching.weight)  # (H, D)
        w_pre = _f64(head.pre_matching.weight).view(g, d, d)  # sub-position i reads rows i*D .. (i+1)*D
        b_pre = _f64(head.pre_matching.bias).view(g, d)
        self.h = w_in.shape[0]
        self.proj = nn.Linear(d, g * self.h)
        with torch.no_grad():
            self.proj.weight.copy_(torch.einsum("hd,gde->ghe", w_in, w_pre).reshape(g * self.h, d).float())
            self.proj.bias.copy_((b_pre @ w_in.T).reshape(-1).float())

    def forward(self, hidden: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden + text_embeds).unflatten(1, (-1, self.h)).flatten(0, 1)


class FeedbackStage(nn.Module):
    """(5k,) int64 codes -> (k, D): ``audio_tower`` as the official generate loop feeds speech back."""

    def __init__(self, model: FunAudioChatReference):
        super().__init__()
        self.tower = model.audio_tower

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return self.tower.speech_groups(codes)


def code_table(head: SpeechHead) -> np.ndarray:
    """(codebook, H): ``input_matching`` of each code's embedding (the lm_head rows)."""
    return (_f64(head.lm_head.weight) @ _f64(head.input_matching.weight).T).float().numpy()


def head_gguf_config(head: SpeechHead) -> dict:
    cfg = head.crq_transformer.config.to_dict()
    rope = cfg.get("rope_parameters") or {}
    return {"hidden_size": cfg["hidden_size"], "intermediate_size": cfg["intermediate_size"],
            "num_hidden_layers": cfg["num_hidden_layers"], "num_attention_heads": cfg["num_attention_heads"],
            "num_key_value_heads": cfg["num_key_value_heads"], "head_dim": cfg["head_dim"],
            "rope_theta": rope.get("rope_theta", cfg.get("rope_theta")), "rms_norm_eps": cfg["rms_norm_eps"],
            "max_position_embeddings": cfg["max_position_embeddings"], "vocab_size": head.lm_head.out_features,
            "tie_word_embeddings": False}


def write_head_gguf(head: SpeechHead, path: Path, codes: np.ndarray, dtype: str = "f32") -> None:
    """The decoder with the code table as ``token_embd`` and the folded ``lm_head @ output_matching``."""
    if dtype not in ("f32", "f16"):
        raise ValueError(f"dtype must be 'f32' or 'f16', not {dtype!r}")
    out_dtype = np.float16 if dtype == "f16" else np.float32
    config = head_gguf_config(head)
    if config["rope_theta"] is None:
        raise ValueError("the speech head's crq_transformer_config has no rope_theta")
    tensors = {f"model.{k}": v for k, v in head.crq_transformer.state_dict().items()}
    tensors["model.embed_tokens.weight"] = codes
    tensors["lm_head.weight"] = (_f64(head.lm_head.weight) @ _f64(head.output_matching.weight)).float()
    plan = _plan(tensors, config, "speech head")

    def convert(hf: str) -> np.ndarray:
        w = np.asarray(tensors[hf].detach().numpy() if isinstance(tensors[hf], torch.Tensor) else tensors[hf], dtype=np.float32)
        return np.ascontiguousarray(w.astype(out_dtype if w.ndim == 2 else np.float32, copy=False))

    def metadata(w: gguf.GGUFWriter) -> None:
        _add_hparams(w, config, "fun-audio-chat-speech-head",
                     gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32)
        w.add_tokenizer_model("none")  # codes are never tokenized; llama.cpp takes n_vocab from vocab_size

    entries = [(gg, shape, np.dtype(out_dtype if len(shape) == 2 else np.float32), lambda hf=hf: convert(hf))
               for hf, gg, shape in plan]
    write_gguf(Path(path), ARCH, entries, metadata)


def head_spec(audio_config: dict, precision: str = "f32") -> HeadSpec:
    return HeadSpec(int(audio_config["bos_token_id"]), int(audio_config["eos_token_id"]), int(audio_config["group_size"]), precision)


def export_speech_head(model: FunAudioChatReference, out: Path) -> list[str]:
    """Write the head's three files and the feedback ONNX into `out`; returns their names."""
    head = model.audio_invert_tower
    d = head.pre_matching.in_features
    log.info("export: %s", HEAD_INPUT_FILE)
    export_onnx(HeadInputStage(head), (torch.zeros(3, d), torch.zeros(3, d)), out / HEAD_INPUT_FILE,
                {"hidden": {0: "positions"}, "text_embeds": {0: "positions"}}, {"rows": {0: "sub_positions"}})
    codes = code_table(head)
    np.save(out / HEAD_CODES_FILE, codes)
    log.info("export: %s", HEAD_LM_FILE)
    write_head_gguf(head, out / HEAD_LM_FILE, codes)
    log.info("export: %s", FEEDBACK_FILE)
    export_onnx(FeedbackStage(model), (torch.zeros(10, dtype=torch.int64),), out / FEEDBACK_FILE,
                {"codes": {0: "codes"}}, {"feedback": {0: "groups"}})
    return [HEAD_INPUT_FILE, HEAD_CODES_FILE, HEAD_LM_FILE, FEEDBACK_FILE]
