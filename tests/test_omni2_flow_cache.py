"""The LLaMA-Omni2 flow cache (``flow_estimator_cached.onnx`` + `FlowCache`): each stream step solves
only the frames from its first incomplete chunk, attending to the cached completed chunks.

* exact window (``window_tokens=None``): the cached stream equals today's uncached exact stream (and
  whole-utterance synthesis) to fp32 rounding, chunk-aligned and with a 25-token first hop;
* the threshold catches a cache missing its last chunk, or one frame of a conv's context;
* default window: drift from whole-utterance synthesis, cached vs today's windowed stream (printed);
* a bundle without the stage (older exports) streams exactly as before."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from omnilite.runtime.bundle import MANIFEST, load_bundle
from omnilite.runtime.metrics import snr_db
from omnilite.runtime.omni2.flow import CACHED_ESTIMATOR, FlowCache, FlowDecoder, FlowStreamConfig

EXACT_MAX_ABS = 1e-4  # cached vs uncached exact stream (measured ~1e-6 on the tiny: fp32 sum order)
N_TOKENS = 230  # 4.6 chunks of 50
LONG_TOKENS = 480  # 9.6 chunks: past the 100-token window


@pytest.fixture(scope="module")
def flow(omni2_bundle):
    return FlowDecoder(load_bundle(omni2_bundle))


def _units(n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(0, 6561, n).tolist()


def _stream(flow: FlowDecoder, units: list[int], config: FlowStreamConfig, burst: int = 7):
    fs = flow.stream(config)
    mels = [fs.push(units[a:a + burst]) for a in range(0, len(units), burst)]
    mels.append(fs.flush())
    return np.concatenate(mels, axis=1), fs


def test_stage_is_exported_with_its_parity(omni2_bundle):
    m = json.loads((omni2_bundle / MANIFEST).read_text())
    stage = next(s for s in m["stages"] if s["name"] == CACHED_ESTIMATOR)
    assert stage["inputs"].keys() == {"x", "mu", "t", "spks", "cond", "past", "conv_context", "chunk_frames", "keep"}
    assert stage["outputs"].keys() == {"velocity", "new_past", "conv_context_out"}
    p = m["parity"][CACHED_ESTIMATOR]
    print(f"cached estimator (onnxruntime, {p['steps']} steps) vs PyTorch estimator on all {p['frames']} frames: max abs {p['max_abs']:.2e}")
    assert p["ok"] and p["max_abs"] <= 1e-4


@pytest.mark.parametrize("first_hop", [None, 25])
def test_exact_window_cached_equals_uncached(flow, first_hop):
    units = _units(N_TOKENS)
    ref, ref_fs = _stream(flow, units, FlowStreamConfig(window_tokens=None, first_hop_tokens=first_hop, flow_cache=False))
    got, fs = _stream(flow, units, FlowStreamConfig(window_tokens=None, first_hop_tokens=first_hop))
    assert ref_fs.cache is None and fs.cache is not None
    assert got.shape == ref.shape == (flow.mel_bins, N_TOKENS * flow.ratio)
    err = float(np.abs(got - ref).max())
    print(f"first hop {first_hop}: cached vs uncached exact stream max abs {err:.2e} (mel max {np.abs(ref).max():.2f})")
    assert err <= EXACT_MAX_ABS
    # Each step solved its new frames only: the first incomplete chunk to the step's end.
    assert fs.max_window_frames <= (flow.chunk_tokens + (first_hop or 0)) * flow.ratio < ref_fs.max_window_frames
    assert fs.exact == ref_fs.exact and fs.drift_frames == ref_fs.drift_frames
    # The cache holds every completed chunk, per Euler step: blocks x 2 rows x width floats per frame.
    complete = N_TOKENS // flow.chunk_tokens * flow.chunk_frames
    assert fs.cache.frames == complete and fs.cache.end == complete and len(fs.cache.steps) == flow.n_timesteps
    assert fs.cache.nbytes >= complete * fs.cache.bytes_per_frame
    if first_hop is None:
        assert np.abs(got - flow.offline(units)).max() <= EXACT_MAX_ABS


@pytest.mark.parametrize("fault", ["last chunk", "conv frame"])
def test_a_broken_cache_misses_the_threshold(flow, fault, monkeypatch):
    """What the threshold above catches: the cache without its last chunk, or each conv's context
    without its older frame (zeros instead)."""
    units = _units(N_TOKENS)
    ref, _ = _stream(flow, units, FlowStreamConfig(window_tokens=None, flow_cache=False))
    state = FlowCache.state

    def broken(self, step, session):
        past, ctx = state(self, step, session)
        if fault == "last chunk":
            return [np.ascontiguousarray(past[:, :, :max(0, past.shape[2] - flow.chunk_frames)]), ctx]
        ctx = ctx.copy()
        ctx[:, :, 0] = 0.0
        return [past, ctx]

    monkeypatch.setattr(FlowCache, "state", broken)
    got, _ = _stream(flow, units, FlowStreamConfig(window_tokens=None))
    err = float(np.abs(got - ref).max())
    print(f"fault '{fault}': max abs {err:.3g} (threshold {EXACT_MAX_ABS:g})")
    assert err > 100 * EXACT_MAX_ABS


def test_default_window_drift_cached_vs_uncached(flow):
    """Past the window (100 tokens = 1 left chunk) both streams drift from whole-utterance synthesis;
    the cached one less: its past chunks were each solved once with their own left context, not
    re-solved with the window's truncated one."""
    units = _units(LONG_TOKENS)
    whole = flow.offline(units)
    old, old_fs = _stream(flow, units, FlowStreamConfig(flow_cache=False))
    new, fs = _stream(flow, units, FlowStreamConfig())
    assert old_fs.left_chunks == fs.left_chunks == 1 and not fs.exact and not old_fs.exact
    # The cache never holds more than the window's left chunk (evicted as new ones come).
    assert fs.cache.frames == flow.chunk_frames and fs.cache.evicted > 0
    assert fs.max_cache_bytes == fs.cache.nbytes
    assert sum(s[0].nbytes for s in fs.cache.steps.values()) == flow.chunk_frames * fs.cache.bytes_per_frame
    win = 2 * flow.chunk_frames  # the first window is exact in both
    for name, mel in (("uncached", old), ("cached", new)):
        assert np.abs(mel[:, :win] - whole[:, :win]).max() <= EXACT_MAX_ABS
    d_old, d_new = (float(np.abs(m[:, win:] - whole[:, win:]).max()) for m in (old, new))
    s_old, s_new = (snr_db(whole[:, win:].ravel(), m[:, win:].ravel()) for m in (old, new))
    print(f"after the window vs whole utterance: uncached windowed max abs {d_old:.3g} / SNR {s_old:.1f} dB, "
          f"cached windowed max abs {d_new:.3g} / SNR {s_new:.1f} dB")
    assert s_new > s_old


def test_float16_cache_halves_the_memory_and_rounds_little(flow):
    """cache_fp16: the stored normed inputs in float16 (fed as float32): half the bytes, not exact."""
    units = _units(N_TOKENS)
    ref, ref_fs = _stream(flow, units, FlowStreamConfig(window_tokens=None))
    got, fs = _stream(flow, units, FlowStreamConfig(window_tokens=None, cache_fp16=True))
    assert fs.cache.bytes_per_frame * 2 == ref_fs.cache.bytes_per_frame and fs.cache.frames == ref_fs.cache.frames
    assert ref_fs.exact and not fs.exact
    err, snr = float(np.abs(got - ref).max()), snr_db(ref.ravel(), got.ravel())
    print(f"float16 cache vs float32 cache: max abs {err:.3g}, mel SNR {snr:.1f} dB")
    assert 0.0 < err < 1e-3 and snr > 60.0


def test_bundle_without_the_stage_falls_back(omni2_bundle, flow, tmp_path):
    """An older bundle (no cached estimator): the stream re-solves its window as before, same output."""
    old = tmp_path / "old"
    shutil.copytree(omni2_bundle, old, copy_function=os.link)  # hard links: same files, no copy
    m = json.loads((old / MANIFEST).read_text())
    stage = next(s for s in m["stages"] if s["name"] == CACHED_ESTIMATOR)
    (old / stage["file"]).unlink()
    m["stages"].remove(stage)
    (old / MANIFEST).unlink()  # a link to the fixture's manifest: replace, not overwrite
    (old / MANIFEST).write_text(json.dumps(m))
    old_flow = FlowDecoder(load_bundle(old))
    assert not old_flow.has_cached_estimator and flow.has_cached_estimator
    units = _units(N_TOKENS)
    for config in (FlowStreamConfig(), FlowStreamConfig(window_tokens=None, first_hop_tokens=25)):
        got, fs = _stream(old_flow, units, config)
        ref, _ = _stream(flow, units, FlowStreamConfig(**{**config.__dict__, "flow_cache": False}))
        assert fs.cache is None and np.array_equal(got, ref)


def test_cache_only_for_the_bundles_chunk_and_steps(flow):
    assert flow.stream(FlowStreamConfig()).cache is not None
    assert flow.stream(FlowStreamConfig(chunk_tokens=25)).cache is None
    assert flow.stream(FlowStreamConfig(n_timesteps=5)).cache is None
    assert flow.stream(FlowStreamConfig(flow_cache=False)).cache is None


def test_cache_precision_follows_the_estimator(flow, monkeypatch):
    """By default the cache is float32 for an fp32 cached estimator (exact) and float16 for a quantized
    one, whose own activation rounding is larger (benchmarks/results/omni2-flow-cache-0.5B-small.md)."""
    assert flow.cache_fp16(None) is False and _stream(flow, _units(60), FlowStreamConfig())[1].cache.dtype == np.float32
    monkeypatch.setattr(flow, "_cached_precision", "int8")
    assert flow.cache_fp16(None) is True and flow.cache_fp16(False) is False
    assert _stream(flow, _units(60), FlowStreamConfig())[1].cache.dtype == np.float16
