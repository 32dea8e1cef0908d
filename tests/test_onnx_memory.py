"""ONNX Runtime sessions without the CPU arena, and malloc's fixed mmap threshold (runtime/memory.py):
where the bytes live changes, never the results."""

from __future__ import annotations

import gc
import re
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from omnilite.runtime import memory
from omnilite.runtime.onnx_session import SessionOptions, open_session


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    """x (n, 64) -> gelu-ish MLP with a softmax: intermediates large enough to leave the heap."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((64, 1024)).astype(np.float32) * 0.1, "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((1024, 64)).astype(np.float32) * 0.1, "w2")
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Tanh", ["h"], ["t"]),
             helper.make_node("Softmax", ["t"], ["s"], axis=-1), helper.make_node("MatMul", ["s", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 64])], [w1, w2])
    path = tmp_path_factory.mktemp("onnx") / "mlp.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_sessions_run_without_arena_and_give_the_same_outputs(model_path):
    x = np.random.default_rng(1).standard_normal((700, 64)).astype(np.float32)
    plain = open_session(model_path, SessionOptions(intra_op_threads=1, mem_arena=False))
    arena = open_session(model_path, SessionOptions(intra_op_threads=1))  # the default keeps the arena (speed)
    so = plain.get_session_options()
    assert (so.enable_cpu_mem_arena, so.enable_mem_pattern) == (False, False)
    assert arena.get_session_options().enable_cpu_mem_arena is True
    for _ in range(2):  # the second run reuses the arena (and its memory pattern)
        np.testing.assert_array_equal(plain.run(None, {"x": x})[0], arena.run(None, {"x": x})[0])


def _anon_mib() -> float:
    return int(re.search(r"RssAnon:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_sessions_share_one_arena_and_hold_one_peak_instead_of_two(model_path):
    """Two stages run one after the other: with their own arenas each keeps its peak's chunks, with
    the shared arena the second reuses the first's. Same outputs either way."""
    x = np.random.default_rng(2).standard_normal((12000, 64)).astype(np.float32)  # 47 MiB intermediates
    growth, outputs = {}, {}
    for shared in (False, True):
        gc.collect()
        before = _anon_mib()
        sessions = [open_session(model_path, SessionOptions(intra_op_threads=1, shared_arena=shared)) for _ in range(2)]
        outputs[shared] = [s.run(None, {"x": x})[0] for s in sessions]
        growth[shared] = _anon_mib() - before
        del sessions
    for a, b in zip(outputs[False], outputs[True]):
        np.testing.assert_array_equal(a, b)
    # Own arenas: two peaks (>= 2 x 47 MiB); shared: about one.
    assert growth[False] > 90 and growth[True] < 0.7 * growth[False], growth


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_mmap_threshold_is_fixed_once(model_path, monkeypatch):
    open_session(model_path)  # every model load sets it
    assert memory._done is True
    monkeypatch.setattr(memory, "_done", None)
    monkeypatch.setenv("OMNILITE_MALLOC_TUNING", "0")
    assert memory.keep_large_blocks_off_heap() is False  # the opt-out leaves malloc alone
    monkeypatch.setattr(memory, "_done", None)
    monkeypatch.delenv("OMNILITE_MALLOC_TUNING")
    assert memory.keep_large_blocks_off_heap() is True
