"""LLaMA-Omni2 fixtures (conftest.py imports them, so each exists once per test session): one tiny
checkpoint in the official layout, its bundle (exported with strict parity, so the export itself is
under test) and the PyTorch reference."""

from __future__ import annotations

from pathlib import Path

import pytest

QUESTION = Path(__file__).parents[1] / "omnilite" / "data" / "question.wav"
N_TOKENS = 20  # LLM tokens per reference reply in these tests
MAX_TTS = 60  # TTS tokens allowed after the text ends (the official 1024 would take long with random weights)


@pytest.fixture(scope="session")
def omni2_checkpoint(tmp_path_factory) -> Path:
    from omnilite.export.omni2.tiny import make_tiny_llama_omni2

    root = tmp_path_factory.mktemp("omni2") / "tiny"
    make_tiny_llama_omni2(root)
    return root


@pytest.fixture(scope="session")
def omni2_bundle(omni2_checkpoint, tmp_path_factory) -> Path:
    from omnilite.export.omni2.export import Omni2ExportOptions, export_llama_omni2

    out = tmp_path_factory.mktemp("omni2-bundle") / "bundle"
    # Exact encoder mode: the runtime-vs-reference tests compare with the PyTorch reference, which
    # pads to 30 s (the default fast mode's parity is in the manifest, measured at export).
    return export_llama_omni2(omni2_checkpoint, out, Omni2ExportOptions(progress=False, encoder_mode="exact"),
                              speaker_wav=QUESTION)


@pytest.fixture(scope="session")
def omni2_reference(omni2_checkpoint, question_16k):
    from omnilite.export.omni2.checkpoint import Omni2Checkpoint
    from omnilite.export.omni2.reference import Omni2ReferencePipeline

    return Omni2ReferencePipeline(Omni2Checkpoint.open(omni2_checkpoint), question_16k)


@pytest.fixture(scope="session")
def omni2_reply(omni2_reference, question_16k):
    """The reference reply under the release's R=3 / W=10."""
    return omni2_reference.generate(question_16k, max_new_tokens=N_TOKENS, ignore_eos=True, max_tts_tokens=MAX_TTS)
