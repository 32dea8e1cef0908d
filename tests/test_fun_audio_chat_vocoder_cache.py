"""Fun-Audio-Chat's chunk-aligned vocoder stream with the flow cache: each 50-frame chunk is solved once
(the earlier chunks' keys / values per Euler step and layer, the position convs' last inputs), equal to
the re-solve of every token per call, in the PyTorch reference and through the exported
``flow_estimator_cached.onnx``; bundles without that stage fall back to the re-solve."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from omnilite.export.fun_audio_chat.checkpoint import open_cosyvoice3
from omnilite.export.fun_audio_chat.tiny import make_tiny_fun_audio_chat
from omnilite.export.fun_audio_chat.vocoder_reference import FlowCache, mu_window
from omnilite.export.fun_audio_chat.vocoder_stage import export_vocoder, parity_tokens, reference_cached_stream_mel
from omnilite.runtime.errors import OmniliteError
from omnilite.runtime.fun_audio_chat.vocoder import CACHED_ESTIMATOR_STAGE, CHUNK_ALIGNED, OFFICIAL, FlowCache as NpFlowCache
from omnilite.runtime.fun_audio_chat.vocoder import OnnxVocoder, Schedule
from omnilite.runtime.metrics import snr_db

TOKENS = 130  # 5 non-final calls (4 whole chunks before the last one) and a finalize call of 5 tokens
SAME_MAX_ABS, SAME_SNR_DB = 1e-4, 80.0


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("facvc") / "pretrained_models"
    make_tiny_fun_audio_chat(root)
    return root


@pytest.fixture(scope="module")
def models(root):
    ckpt = open_cosyvoice3(root)
    return ckpt.flow(), ckpt.speaker_embedding()


@pytest.fixture(scope="module")
def exported(root, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("facvc-out") / "vocoder"
    return out, export_vocoder(root, out, strict=False)


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """The test's criterion for "the same audio": equal length and SNR >= 80 dB or max abs <= 1e-4."""
    return a.shape == b.shape and (float(np.max(np.abs(a - b))) <= SAME_MAX_ABS or snr_db(a, b) >= SAME_SNR_DB)


def _stream(voc: OnnxVocoder, tokens: list[int], cached: bool, burst: int = 7) -> tuple[np.ndarray, list[int], object]:
    s = Schedule.named(voc, CHUNK_ALIGNED).stream(voc)
    if not cached:
        s.flow_cache = None  # the re-solve of every token per call (the stream before the cache)
    out = [s.push(tokens[i:i + burst]) for i in range(0, len(tokens), burst)] + [s.flush()]
    return np.concatenate(out), [len(a) for a in out], s


# ----------------------------------------------------------------------------- reference


def test_reference_cached_solve_equals_each_calls_full_solve(models):
    """Every call of the chunk-aligned schedule (not finalize, then finalize): the cached solve of the
    new frames == the new frames of the full chunk-attention solve over all tokens so far."""
    flow, emb = models
    tokens, spks, chunk = parity_tokens(TOKENS), flow.speaker(emb), flow.c.static_chunk_size
    hop, la = chunk // flow.c.token_mel_ratio, flow.c.pre_lookahead_len
    cache, offset, errs = FlowCache(), 0, []
    with torch.no_grad():
        calls = [(e, False) for e in range(hop + la, TOKENS + 1, hop)] + [(TOKENS, True)]
        for end, finalize in calls:
            full = flow.solve(flow.mu(torch.tensor([tokens[:end]]), finalize), spks, chunk)[:, :, offset * 2:]
            new = flow.solve_cached(mu_window(flow, tokens[:end], offset, finalize), spks, cache, chunk)
            assert new.shape == full.shape and cache.frames == (end - (0 if finalize else la)) * 2
            errs.append(float((new - full).abs().max()))
            offset = end - la if not finalize else end
    assert len(calls) == 6 and max(errs) <= 1e-5, errs
    # The whole stream's mel (as the export's parity runs it) equals the whole-utterance chunk solve.
    whole = flow.inference(torch.tensor([tokens]), emb, streaming=True)[0].numpy()
    assert np.max(np.abs(reference_cached_stream_mel(flow, tokens, emb, hop) - whole)) <= 1e-5


def test_reference_cached_solve_refuses_a_partial_chunk(models):
    flow, emb = models
    cache = FlowCache()
    cache.frames = 20
    with pytest.raises(ValueError, match="20 frames are not a multiple of 50"):
        flow.solve_cached(torch.zeros(1, 80, 10), flow.speaker(emb), cache, 50)


# ----------------------------------------------------------------------------- exported stage + runtime


def test_export_writes_the_cached_stage_and_its_parity(exported):
    out, report = exported
    record = json.loads((out / "vocoder.json").read_text())
    stage = next(s for s in record["stages"] if s["name"] == CACHED_ESTIMATOR_STAGE[0])
    assert stage["file"] == CACHED_ESTIMATOR_STAGE[1] and (out / stage["file"]).exists()
    assert set(stage["inputs"]) == {"x", "mu", "t", "spks", "cond", "past_k", "past_v", "conv1_context", "conv2_context", "chunk_frames"}
    assert set(stage["outputs"]) == {"velocity", "new_k", "new_v", "conv1_context_out", "conv2_context_out"}
    assert record["flow"]["encoder_left_tokens"] == 2
    f = report["flow"]
    assert f["chunk_stream_cached"] and f["chunk_stream_max_abs"] <= 1e-3 and f["reference_cached_max_abs"] <= 1e-5 and f["ok"]


def test_encoder_window_equals_the_slice_of_the_whole_encoder(exported):
    voc = OnnxVocoder(exported[0])
    tokens = parity_tokens(80)
    whole = voc.mu(tokens)
    for start in (0, 1, 2, 25, 50, 79):
        np.testing.assert_allclose(voc.mu_from(tokens, start), whole[:, start * voc.ratio:], atol=1e-6)


@pytest.mark.parametrize("n", [TOKENS, 127])  # 127: the finalize call's 27 tokens (54 frames) cross a chunk's end
def test_cached_stream_equals_the_resolve_stream(exported, n):
    """>= 4 chunks, bursts of 7 codes: the cached stream hands out the same samples per push as the
    re-solve of every token per call, and the cache holds every frame solved."""
    voc = OnnxVocoder(exported[0])
    tokens = parity_tokens(n, seed=3)
    old, old_sizes, s_old = _stream(voc, tokens, cached=False)
    new, new_sizes, s_new = _stream(voc, tokens, cached=True)
    assert s_old.flow_cache is None and s_new.flow_cache is not None
    assert s_new.calls == s_old.calls == (6 if n == TOKENS else 5) and new_sizes == old_sizes
    assert _same(old, new), (float(np.max(np.abs(old - new))), snr_db(old, new))
    assert float(np.max(np.abs(old - new))) <= SAME_MAX_ABS
    assert s_new.flow_cache.frames == 2 * n and s_new.mel.shape[1] == 2 * n
    assert all(k.shape[2] == 2 * n for st in s_new.flow_cache.steps.values() for k in st[:2])
    # ... and the whole utterance with the same attention (what the chunk-aligned schedule streams towards).
    assert snr_db(Schedule.named(voc, CHUNK_ALIGNED).whole(voc, tokens), new) >= 60


def test_a_cache_off_by_one_chunk_is_caught(exported, monkeypatch):
    """Fault injected once: the third call's keys / values are not appended (the cache is then one chunk
    short); the comparison above must fail."""
    voc = OnnxVocoder(exported[0])
    tokens = parity_tokens(TOKENS, seed=3)
    old, _, _ = _stream(voc, tokens, cached=False)
    append, seen = NpFlowCache.append, []

    def faulty(self, step, k, v, c1, c2):
        seen.append(self.frames)
        if self.frames == 100:  # the third call (frames 100..149): keep the old keys / values
            self.steps[step][2:] = [c1, c2]
            return
        append(self, step, k, v, c1, c2)

    monkeypatch.setattr(NpFlowCache, "append", faulty)
    bad, _, _ = _stream(voc, tokens, cached=True)
    assert 100 in seen
    assert not _same(old, bad)


def test_bundles_without_the_cached_stage_fall_back_to_the_resolve(exported, tmp_path):
    src = exported[0]
    tokens = parity_tokens(TOKENS, seed=3)
    new, _, _ = _stream(OnnxVocoder(src), tokens, cached=True)
    old_dir = tmp_path / "old"
    shutil.copytree(src, old_dir)
    record = json.loads((old_dir / "vocoder.json").read_text())
    record["stages"] = [s for s in record["stages"] if s["name"] != CACHED_ESTIMATOR_STAGE[0]]
    del record["flow"]["encoder_left_tokens"]
    (old_dir / "vocoder.json").write_text(json.dumps(record))
    (old_dir / CACHED_ESTIMATOR_STAGE[1]).unlink()
    voc = OnnxVocoder(old_dir)
    assert not voc.has_cached_estimator
    got, _, s = _stream(voc, tokens, cached=True)
    assert s.flow_cache is None and _same(new, got)


def test_only_chunk_aligned_streams_use_the_cache(exported):
    voc = OnnxVocoder(exported[0])
    assert Schedule.named(voc, CHUNK_ALIGNED).stream(voc).flow_cache is not None
    assert Schedule.named(voc, OFFICIAL).stream(voc).flow_cache is None  # full attention: every frame sees later ones
    assert voc.stream(15, chunk_frames=50).flow_cache is None  # hop not whole chunks
    assert voc.stream(50, chunk_frames=50).flow_cache is not None  # two chunks per call
    assert voc.stream(25, chunk_frames=50, flow_window_tokens=200).flow_cache is None
    cache = NpFlowCache()
    cache.frames = 30
    with pytest.raises(OmniliteError, match="whole 50-frame chunks before it, got 30 frames"):
        voc.solve_cached(np.zeros((80, 4), np.float32), cache, 50)


def test_cached_stream_runs_without_torch(exported):
    code = ("import sys; sys.modules['torch'] = None; "
            "from omnilite.runtime.fun_audio_chat.vocoder import OnnxVocoder, Schedule; "
            f"v = OnnxVocoder({str(exported[0])!r}); s = Schedule.named(v, 'chunk-aligned').stream(v); "
            "a = s.push(list(range(60))); b = s.flush(); "
            "assert s.flow_cache is not None and s.flow_cache.frames == 120 and len(a) + len(b) == 60 * 960")
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/tmp")


def _reach(voc: OnnxVocoder, which: str, frames: int = 160, at: int = 60) -> int:
    """How many mel frames after input frame `at` the HiFT decode's output still changes when that
    frame's mel (or its source samples) changes: the left receptive field a window needs."""
    rng = np.random.default_rng(0)
    mel = rng.standard_normal((80, frames)).astype(np.float32)
    src = (0.1 * rng.standard_normal(frames * voc.hop)).astype(np.float32)
    base = voc.decode(mel, src)
    if which == "mel":
        mel[:, at] += 1.0
    else:
        src[at * voc.hop:(at + 1) * voc.hop] += 0.5
    changed = np.nonzero(np.abs(voc.decode(mel, src) - base) > 0)[0]
    return int(changed[-1]) // voc.hop - at


def test_hift_window_covers_the_decodes_receptive_field(exported):
    from omnilite.runtime.fun_audio_chat.vocoder import HIFT_CONTEXT_FRAMES

    voc = OnnxVocoder(exported[0])
    reach = max(_reach(voc, "mel"), _reach(voc, "source"))
    assert 0 < reach <= 40 < HIFT_CONTEXT_FRAMES, reach
    # The source in segments (phase sum carried) equals one call.
    f0 = np.abs(np.random.default_rng(1).normal(150, 80, 90))
    whole = voc.source(f0)
    a, c = voc.source.segment(f0[:37])
    b, c = voc.source.segment(f0[37:70], 37, c)
    d, _ = voc.source.segment(f0[70:], 70, c)
    np.testing.assert_array_equal(np.concatenate([a, b, d]), whole)
