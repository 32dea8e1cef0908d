"""The Step-Audio 2 speech stage as ONNX: one audio piece's log-mel -> its LLM input rows.

A new stage type beside LLaMA-Omni's (``speech_encoder.EncoderWithAdapter``): the encoder masks
padded keys, pools 2x and the adapter is a strided conv, so the number of rows is not ``T // k`` but
``reference.audio_positions``. Inputs: ``mel`` (1, n_mels, T) and ``mel_len`` (1,), the official valid
length (``utils.padding_mels``: the piece's own frame count - 2). Output: that length's rows.

Why a length input: the official forward encodes all 25 s pieces of a prompt as one zero-padded
batch, and a shorter last piece with an odd frame count is then masked differently than alone
(NOTES.md). Batch rows are otherwise independent, so feeding each piece zero-padded to the longest
piece's frame count with its own ``mel_len`` (``official_batch_inputs``) gives exactly the official
rows; a lone piece is ``mel_len = T - 2``.

Parity is checked here against the PyTorch reference (``reference.encode_pieces``, the official
batched path) per piece, and the numpy log-mel (``runtime.mel.LogMel`` on the piece plus the official
479 samples of right padding) against ``reference.log_mel``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from omnilite.runtime.mel import LogMel
from omnilite.runtime.metrics import relative_max_error

from ..onnx_export import export_onnx
from ..parity import THRESHOLDS
from .reference import MEL_RIGHT_PAD, EncoderWithAdapter, audio_positions, chunk_audio, encode_pieces, log_mel

ENCODER_FILE = "encoder.onnx"
TRACE_FRAMES = 302  # a 3 s piece; the graph is dynamic in the frame count


class EncoderAdapterStage(nn.Module):
    """(mel (1, n_mels, T), mel_len (1,)) -> (rows, llm_dim); ``reference.EncoderWithAdapter`` with the
    valid length as an input and the official ``(len - 1) // 2 + 1`` row cut kept dynamic."""

    def __init__(self, module: EncoderWithAdapter):
        super().__init__()
        self.encoder = module.encoder
        self.adapter = module.adapter

    def forward(self, mel: torch.Tensor, mel_len: torch.Tensor) -> torch.Tensor:
        enc, enc_len = self.encoder(mel, mel_len)
        return self.adapter(enc)[0, : (enc_len[0] - 1) // 2 + 1]


def export_encoder(module: EncoderWithAdapter, path: Path) -> list[str]:
    """Write the stage to `path` (fp32); returns the side files (external weights beyond 1 GB)."""
    example = (torch.zeros(1, module.encoder.conv1.in_channels, TRACE_FRAMES), torch.tensor([TRACE_FRAMES - 2]))
    return export_onnx(EncoderAdapterStage(module), example, path, {"mel": {2: "mel_frames"}, "mel_len": {}},
                       {"speech_embeds": {0: "speech_positions"}})


def official_batch_inputs(mels: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """The stage inputs that reproduce the official batch of a prompt's pieces (n_mels, T_i): each
    piece zero-padded to the longest, with its own valid length T_i - 2."""
    t = max(m.shape[-1] for m in mels)
    return [(np.pad(m, ((0, 0), (0, t - m.shape[-1])))[None].astype(np.float32), np.array([m.shape[-1] - 2], np.int64))
            for m in mels]


@torch.no_grad()
def encoder_parity(module: EncoderWithAdapter, onnx_path: Path, audio: list[tuple[str, np.ndarray]]) -> dict:
    """For every 25 s piece of every signal: numpy log-mel vs torch, and the ONNX stage (fed
    ``official_batch_inputs``) vs the official batched PyTorch path: relative max error, and the row
    count against the official ``compute_token_num``. The worst piece decides ``ok``."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    n_mels = module.encoder.conv1.in_channels
    numpy_mel = LogMel(n_mels)
    per_piece, mel_err = [], 0.0
    for name, signal in audio:
        pieces = [p.numpy() for p in chunk_audio(torch.from_numpy(signal))]
        mels = [log_mel(torch.from_numpy(p), n_mels) for p in pieces]
        for p, m in zip(pieces, mels):
            mel_err = max(mel_err, float(np.max(np.abs(m.numpy() - numpy_mel(np.pad(p, (0, MEL_RIGHT_PAD)), pad_to_30s=False)))))
        refs = encode_pieces(module, mels)
        for i, (ref, m, (x, n)) in enumerate(zip(refs, mels, official_batch_inputs([m.numpy() for m in mels]))):
            got = session.run(None, {"mel": x, "mel_len": n})[0]
            err = relative_max_error(ref.numpy(), got) if got.shape == tuple(ref.shape) else float("inf")
            per_piece.append({"input": name, "piece": i, "of_pieces": len(mels), "mel_frames": int(m.shape[-1]),
                              "positions": int(got.shape[0]), "positions_official": audio_positions(m.shape[-1]),
                              "rel_max_error": err})
    worst = max(r["rel_max_error"] for r in per_piece)
    positions_ok = all(r["positions"] == r["positions_official"] for r in per_piece)
    return {"mel": {"max_abs_error": mel_err, "threshold": THRESHOLDS["mel_max_abs"], "ok": mel_err <= THRESHOLDS["mel_max_abs"]},
            "encoder": {"rel_max_error": worst, "threshold": THRESHOLDS["encoder_rel_max"], "per_piece": per_piece,
                        "positions_match_official": positions_ok,
                        "ok": positions_ok and worst <= THRESHOLDS["encoder_rel_max"]}}
