from pathlib import Path

import numpy as np
import pytest
import torch

from omnilite.export.speech_encoder import log_mel_torch
from omnilite.runtime.mel import LogMel, mel_filters


@pytest.mark.parametrize("pad", [True, False])
def test_numpy_log_mel_matches_torch_reference(question_16k, pad):
    ref = log_mel_torch(torch.from_numpy(question_16k), 128, pad_to_30s=pad).numpy()
    got = LogMel(128)(question_16k, pad_to_30s=pad)
    assert got.shape == ref.shape == ((128, 3000) if pad else (128, len(question_16k) // 160))
    assert np.max(np.abs(got - ref)) <= 1e-4


def test_mel_filters_equal_whisper_assets():
    # tests/data/whisper_mel_filters_128.npy is `mel_128` from openai-whisper's assets/mel_filters.npz
    # (the librosa Slaney filterbank Whisper was trained with).
    ref = np.load(Path(__file__).parent / "data" / "whisper_mel_filters_128.npy")
    assert np.max(np.abs(mel_filters(128) - ref)) < 1e-7
