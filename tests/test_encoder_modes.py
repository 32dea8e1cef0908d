"""Encoder modes: window arithmetic, every mode in the runtime on the tiny model, parity of each mode
with the PyTorch stage, the +fill padding cache, streaming blocks, and the bundle default."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from omnilite.runtime import Done, Pipeline, PipelineConfig
from omnilite.runtime.bundle import load_bundle
from omnilite.runtime.encoder import (DEFAULT_FAST_MODE, ENCODER_MODES, EncoderMode, SpeechEncoder, Window,
                                      padding_mel)
from omnilite.runtime.errors import OmniliteError
from omnilite.runtime.mel import LogMel
from omnilite.runtime.metrics import relative_max_error

from conftest import QUESTION

S = 16000


# --- window arithmetic (no model) -------------------------------------------------------------

def test_mode_names_round_trip_and_bad_modes_get_one_sentence():
    for name in ENCODER_MODES + ("tail-0s", "tail-1.5s+fill", "pad-2.5s", "blocked-10s+fill"):
        assert EncoderMode.parse(name).name == name
    assert EncoderMode.parse(" Tail-2S+FILL ").name == "tail-2s+fill"
    for bad, why in (("fast", "unknown"), ("tail-1.05s", "multiple of 0.1 s"), ("pad-0s", "between 0.1 and 30"),
                     ("blocked-7s", "divides 30 s"), ("exact+fill", "just 'exact'"), ("tail-31s", "between 0.1 and 30")):
        with pytest.raises(OmniliteError, match=why) as e:
            EncoderMode.parse(bad)
        assert "\n" not in str(e.value) and str(e.value).endswith(".")  # one sentence


@pytest.mark.parametrize("mode, n, windows", [
    ("exact", 3 * S, [Window(0, 3 * S, 30 * S)]),
    ("exact", 40 * S, [Window(0, 30 * S, 30 * S)]),  # trimmed to the trained window
    ("unpadded", 3 * S + 5, [Window(0, 3 * S + 5, None)]),
    ("pad-5s", 3 * S, [Window(0, 3 * S, 5 * S)]),
    ("pad-5s", 5 * S + 1, [Window(0, 5 * S + 1, 10 * S)]),
    ("pad-5s", 29 * S, [Window(0, 29 * S, 30 * S)]),
    ("tail-2s", 3 * S + 1, [Window(0, 3 * S + 1, 81600)]),  # rounded up to whole 100 ms positions
    ("tail-2s", 29 * S, [Window(0, 29 * S, 30 * S)]),  # capped at 30 s
    ("blocked-5s", 12 * S, [Window(0, 5 * S, 5 * S), Window(5 * S, 5 * S, 5 * S), Window(10 * S, 2 * S, 5 * S)]),
])
def test_windows(mode, n, windows):
    assert EncoderMode.parse(mode).windows(n) == windows


@pytest.mark.parametrize("mode, positions", [("exact", 300), ("unpadded", 30), ("pad-5s", 50), ("tail-1s", 40),
                                             ("tail-2s", 50), ("blocked-5s", 50), ("tail-2s+fill", 300),
                                             ("unpadded+fill", 300)])
def test_positions_the_llm_sees_for_a_3s_question(mode, positions):
    assert EncoderMode.parse(mode).positions(3 * S) == positions


# --- the runtime on the tiny bundle ------------------------------------------------------------

@pytest.fixture(scope="module")
def encoder(bundle) -> SpeechEncoder:
    return SpeechEncoder(load_bundle(bundle))


@pytest.mark.parametrize("mode", ENCODER_MODES)
def test_every_mode_runs_in_the_pipeline(bundle, question_16k, mode):
    with Pipeline.load(bundle, PipelineConfig(max_new_tokens=4, ignore_eos=True, encoder_mode=mode)) as pipe:
        embeds = pipe.encoder(question_16k, mode)
        assert embeds.shape == (EncoderMode.parse(mode).positions(len(question_16k)), 64)
        assert np.isfinite(embeds).all()
        done = [e for e in pipe.respond(question_16k, 16000) if isinstance(e, Done)][0]
    assert len(done.tokens) == 4 and len(done.audio) > 0


@pytest.mark.parametrize("mode", ENCODER_MODES)
def test_every_mode_matches_the_pytorch_stage(encoder, reference, question_16k, mode):
    from omnilite.export.speech_encoder import reference_mode_embeddings

    want = reference_mode_embeddings(reference.encoder, question_16k, mode, 128, 10)
    assert relative_max_error(want, encoder(question_16k, mode)) <= 1e-3


def test_exact_mode_is_the_trained_input_and_keeps_parity(bundle, encoder, reference, question_16k):
    inp = encoder.mel(question_16k, "exact")
    assert len(inp.mels) == 1 and np.array_equal(inp.mels[0], LogMel(128)(question_16k, pad_to_30s=True))
    _, want = reference.speech_embeddings(question_16k, pad_to_30s=True)
    assert relative_max_error(want.numpy(), encoder(question_16k, "exact")) <= 1e-3
    parity = json.loads((bundle / "omnilite.json").read_text())["parity"]["encoder"]
    assert parity["ok"] and set(parity["rel_max_error"]) == set(ENCODER_MODES)


def test_multichannel_audio_is_refused_with_one_sentence(encoder, question_16k):
    """A (samples, channels) array (what read_wav returns) used to be windowed as a matrix until the
    process ran out of memory; it is refused with a sentence naming the fix."""
    with pytest.raises(OmniliteError, match=r"^the speech encoder takes 16 kHz mono samples as a 1-D array, got shape "
                                            r"\(\d+, 1\); mix it down first \(omnilite.runtime.audio.to_mono\)\.$"):
        encoder(question_16k[:, None])


def test_padded_windows_see_exact_modes_mel_frames(encoder, question_16k):
    """Padding before the STFT: a tail window's frames are exact mode's first frames."""
    exact = encoder.mel(question_16k, "exact").mels[0]
    tail = encoder.mel(question_16k, "tail-2s").mels[0]
    assert np.allclose(tail, exact[:, : tail.shape[1]], atol=1e-6)


def test_fill_uses_the_bundles_padding_cache_and_falls_back_to_computing_it(bundle, encoder, question_16k, tmp_path):
    stored = encoder.padding_embeddings()
    assert stored.shape == (300, 64)
    assert relative_max_error(stored, encoder.embed(padding_mel(128, 3000))) <= 1e-3
    fast = encoder(question_16k, "tail-2s")
    filled = encoder(question_16k, "tail-2s+fill")
    assert np.array_equal(filled[: len(fast)], fast) and np.array_equal(filled[len(fast):], stored[len(fast):])
    # A bundle without the cache (older export) computes it once from its own encoder.
    old = tmp_path / "old-bundle"
    shutil.copytree(bundle, old)
    manifest = json.loads((old / "omnilite.json").read_text())
    del manifest["encoder"]["padding_cache"]
    (old / "omnilite.json").write_text(json.dumps(manifest))
    lazy = SpeechEncoder(load_bundle(old))
    assert relative_max_error(filled, lazy(question_16k, "tail-2s+fill")) <= 1e-3


def test_blocked_stream_encodes_completed_blocks_while_audio_arrives(encoder, question_16k):
    audio = np.concatenate([question_16k] * 4)[: 12 * S]  # 12 s: two full 5 s blocks and a partial one
    for mode in ("blocked-5s", "blocked-5s+fill", "tail-2s+fill"):
        stream = encoder.stream(mode)
        encoded_early = sum(stream.push(audio[a:a + 5923]) for a in range(0, len(audio), 5923))
        assert encoded_early == (2 if mode.startswith("blocked") else 0)
        assert np.array_equal(stream.finish(), encoder(audio, mode))
        # Finishing leaves the stream as it was: a dropped speculative reply, then more audio.
        stream.push(question_16k[: 3 * S])
        longer = np.concatenate([audio, question_16k[: 3 * S]])
        assert np.array_equal(stream.finish(), encoder(longer, mode))


def test_bundle_default_mode_and_runtime_override(bundle, question_16k, tmp_path):
    fast = tmp_path / "fast-bundle"
    shutil.copytree(bundle, fast)
    manifest = json.loads((fast / "omnilite.json").read_text())
    assert manifest["encoder"]["mode"] == "exact"  # the test fixture exports exact on purpose
    manifest["encoder"]["mode"] = DEFAULT_FAST_MODE
    (fast / "omnilite.json").write_text(json.dumps(manifest))
    enc = SpeechEncoder(load_bundle(fast))
    assert enc.default_mode.name == DEFAULT_FAST_MODE
    assert np.array_equal(enc(question_16k), enc(question_16k, DEFAULT_FAST_MODE))
    assert np.array_equal(enc(question_16k, "exact"), SpeechEncoder(load_bundle(bundle))(question_16k))


def test_export_records_the_default_fast_mode_and_every_mode():
    from omnilite.export.llama_omni import ExportOptions
    from omnilite.export.speech_encoder import encoder_manifest

    assert ExportOptions().encoder_mode == DEFAULT_FAST_MODE
    section = encoder_manifest(128, 3000, 10, ExportOptions().encoder_mode)
    assert section["mode"] == DEFAULT_FAST_MODE and set(ENCODER_MODES) <= set(section["modes"])
    assert section["speech_positions"]["exact"] == 300 and section["padding_cache"]["file"] == "encoder_padding.npy"
    with pytest.raises(OmniliteError, match="unknown"):
        encoder_manifest(128, 3000, 10, "fastest")


def test_cli_takes_any_mode_and_refuses_a_bad_one(bundle, tmp_path):
    out = tmp_path / "reply.wav"
    cmd = [sys.executable, "-m", "omnilite", "run", str(bundle), "--input", str(QUESTION), "--output", str(out),
           "--max-new-tokens", "3", "--ignore-eos"]
    ok = subprocess.run(cmd + ["--encoder-mode", "tail-1.5s+fill"], capture_output=True, text=True)
    assert ok.returncode == 0 and out.exists(), ok.stderr
    bad = subprocess.run(cmd + ["--encoder-mode", "tail-1.05s"], capture_output=True, text=True)
    assert bad.returncode == 2 and "multiple of 0.1 s" in bad.stderr
