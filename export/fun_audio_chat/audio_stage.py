"""The user-audio input stage as one traceable module: log-mel -> ``<|AUDIO|>`` embeddings.

The reference (``reference.ContinuousAudioEncoder``) loops over 200-frame windows in Python, which a
trace would freeze to the example's window count. Here the windows are a batch axis instead, as the
official forward batches them (NOTES.md "Encoder"): the mel is zero-padded to whole windows, conv
outputs past each window's valid frames are zeroed (the official validity mask), and attention keys
past them are masked. Only the last window can be partial, so the valid 25 Hz frames are the first
``(frames + 1) // 2`` rows of the flattened windows (each window keeps ceil(len / 2) frames and 200 is
even). Grouping by 5 then pads or cuts those frames to the placeholder count rounded up to 5, a value
the stage takes as a second input because it comes from the sample count, not from the mel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import GROUP
from .reference import FunAudioChatReference


class AudioInputStage(nn.Module):
    """(1, n_mels, frames) valid log-mel frames and the clip's 25 Hz placeholder count (int64 scalar)
    -> (llm_positions(placeholders), LLM width). Needs frames >= 3 (one pooled frame), which every
    clip with at least one placeholder (640 samples, 4 frames) has."""

    def __init__(self, model: FunAudioChatReference):
        super().__init__()
        self.encoder = model.continuous_audio_tower
        self.group_proj = model.audio_tower.continual_output_matching
        self.group = GROUP
        self.window = self.encoder.window

    def forward(self, mel: torch.Tensor, placeholders: torch.Tensor) -> torch.Tensor:
        enc, w = self.encoder, self.window
        n_mels, frames = mel.shape[1], mel.shape[2]
        # Whole windows: pad by w - 1 zero frames, keep a multiple of w, windows on the batch axis.
        n_win = (frames + w - 1) // w
        windows = F.pad(mel[0], (0, w - 1))[:, : n_win * w].reshape(n_mels, -1, w).transpose(0, 1)
        valid = F.pad(torch.ones_like(mel[0, :1]), (0, w - 1))[:, : n_win * w].reshape(1, -1, w).transpose(0, 1)
        x = F.gelu(enc.conv1(windows)) * valid
        x = F.gelu(enc.conv2(x)).transpose(1, 2)  # (windows, w / 2, d)
        x = x + enc.positional_embedding[: x.shape[1]]
        key_ok = valid[:, :, ::2]  # a stride-2 output is valid when its centre input frame is
        bias = (1.0 - key_ok) * torch.finfo(x.dtype).min  # (windows, 1, w / 2): masks padded keys
        for layer in enc.layers:
            x = x + self._attention(layer.self_attn, layer.self_attn_layer_norm(x), bias)
            x = x + layer.fc2(F.gelu(layer.fc1(layer.final_layer_norm(x))))
        d = x.shape[2]
        x = x.reshape(-1, d)[: (frames + 1) // 2]
        n_pooled = x.shape[0] // 2
        x = x[: 2 * n_pooled].reshape(-1, 2, d).mean(dim=1)
        feats = enc.proj(enc.ln_post(x))
        # Rows 0 .. positions*5 - 1 of the features, zeros past their end (the official zero tensor).
        rows = torch.arange((placeholders + self.group - 1) // self.group * self.group)
        picked = feats[rows.clamp(max=feats.shape[0] - 1)] * (rows < feats.shape[0]).unsqueeze(1).to(feats.dtype)
        return self.group_proj(picked.reshape(-1, self.group, picked.shape[1]).mean(dim=1))

    @staticmethod
    def _attention(a, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (p(x).view(b, t, a.heads, -1).transpose(1, 2) for p in (a.q_proj, a.k_proj, a.v_proj))
        w = torch.softmax(q @ k.transpose(-1, -2) * (d // a.heads) ** -0.5 + bias.unsqueeze(1), dim=-1)
        return a.out_proj((w @ v).transpose(1, 2).reshape(b, t, d))
