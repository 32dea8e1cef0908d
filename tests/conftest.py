"""Shared fixtures: one tiny LLaMA-Omni checkpoint, its exported bundle and the reference pipeline
per test session (the export itself is part of what is tested)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from omnilite.runtime.audio import prepare_speech, read_wav

DATA = Path(__file__).parent / "data"
QUESTION = Path(__file__).parents[1] / "omnilite" / "data" / "question.wav"
QUESTION_STEREO_44K = DATA / "question_44k_stereo.wav"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from omnilite.export.tiny import make_tiny_llama_omni

    root = tmp_path_factory.mktemp("ckpt") / "tiny"
    make_tiny_llama_omni(root)
    return root


@pytest.fixture(scope="session")
def bundle(tiny_checkpoint, tmp_path_factory) -> Path:
    from omnilite.export.llama_omni import ExportOptions, export_llama_omni

    out = tmp_path_factory.mktemp("bundle") / "tiny-bundle"
    # Exact encoder mode: the runtime-vs-reference tests compare with the PyTorch reference, which
    # pads to 30 s; the default (fast) encoder mode has its own tests in test_encoder_modes.py.
    return export_llama_omni(tiny_checkpoint, out, ExportOptions(progress=False, encoder_mode="exact"))


@pytest.fixture(scope="session")
def reference(tiny_checkpoint):
    from omnilite.export.checkpoint import LlamaOmniCheckpoint
    from omnilite.export.reference import ReferencePipeline

    return ReferencePipeline(LlamaOmniCheckpoint.open(tiny_checkpoint))


@pytest.fixture(scope="session")
def question_16k() -> np.ndarray:
    audio, rate = read_wav(QUESTION)
    return prepare_speech(audio, rate, 16000)


# LLaMA-Omni2 fixtures live in their own module; importing them here makes them session-wide.
from omni2_fixtures import omni2_bundle, omni2_checkpoint, omni2_reference, omni2_reply  # noqa: E402,F401
