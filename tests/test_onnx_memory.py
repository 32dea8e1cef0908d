"""ONNX Runtime sessions without the CPU arena, and malloc's fixed mmap threshold (runtime/memory.py):
where the bytes live changes, never the results."""

from __future__ import annotations

import sys

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
