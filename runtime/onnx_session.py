"""ONNX Runtime sessions with clear errors and explicit providers/threads."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import onnxruntime as ort

from .errors import BundleError, DeviceError
from .memory import keep_large_blocks_off_heap

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SessionOptions:
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    intra_op_threads: int = 0  # 0: let onnxruntime decide
    # onnxruntime's CPU memory arena keeps every chunk it grew to (by powers of two) for the life of
    # its sessions; `shared_arena` makes that one arena for all of them. Off, activations are
    # malloc'd and freed per run: the LLaMA-Omni2 0.5B real-shape turn's anonymous memory grew ~200 MiB
    # less over three turns (with runtime/memory.py's fixed mmap threshold). But off together with
    # that threshold, every large activation is a fresh mmap: the Fun-Audio-Chat real-shape flow
    # solve took 4.2 s instead of 1.95 s (same run, quiet host). So the arena stays on by default;
    # off is for a caller that trades speed for memory. Same results either way.
    mem_arena: bool = True
    # With the arena on: allocate from one CPU arena shared by every session of the process (see
    # `shared_cpu_arena`) instead of one arena per session. Same results; less memory.
    shared_arena: bool = True
    extra: dict = field(default_factory=dict)
    # Benchmarks only: write ONNX Runtime's per-node profile (shapes, bytes) under this directory.
    profile_dir: str | None = None


_shared_arena: bool | None = None


def shared_cpu_arena() -> bool:
    """Register, once per process, a CPU arena that sessions opened with `shared_arena` allocate from.

    Each session's own arena keeps the chunks of its largest run for its lifetime, so a pipeline of
    stages holds the sum of their peaks; one shared arena lets the next stage reuse a finished stage's
    chunks (LLaMA-Omni2 0.5B real shape, turn_latency's phase: peak 2157 vs 2345 MiB, together with
    the vocabulary-less TTS LM). It grows by powers of two like a session's own: growing by exactly
    what is asked made the flow's Euler solve 15% slower (same process, interleaved), while powers of
    two ran encoder, flow and HiFT at 0.96-1.00x of their own arenas' time.
    onnxruntime's environment is per process, so this is too; True when the arena is registered."""
    global _shared_arena
    if _shared_arena is None:
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        # max_mem 0 (no cap), extend strategy 0 (kNextPowerOfTwo), default chunk and dead-bytes sizes.
        try:
            ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, 0, -1, -1))
            _shared_arena = True
        except Exception as e:  # noqa: BLE001 - a build without it: sessions keep their own arenas
            log.warning("onnxruntime refused a shared CPU arena (%s); each session keeps its own", e)
            _shared_arena = False
    return _shared_arena


def open_session(path: Path, options: SessionOptions = SessionOptions()) -> ort.InferenceSession:
    keep_large_blocks_off_heap()  # loading a model frees its parse buffers: keep them off the heap
    available = ort.get_available_providers()
    missing = [p for p in options.providers if p not in available]
    if missing and not any(p in available for p in options.providers):
        raise DeviceError(
            f"none of the requested execution providers {list(options.providers)} is available "
            f"(installed: {available}); install the matching onnxruntime package or use CPUExecutionProvider."
        )
    for p in missing:
        log.warning("execution provider %s is not installed; falling back to %s", p, [q for q in options.providers if q in available])
    so = ort.SessionOptions()
    so.intra_op_num_threads = options.intra_op_threads
    so.inter_op_num_threads = 1
    so.enable_cpu_mem_arena = options.mem_arena
    # Without the arena, the memory pattern's one planned block per run is a fresh allocation that
    # holds every intermediate's slot at once; freed tensor by tensor the peak is lower (the
    # Whisper-large int4 encoder on 11 s: 776 vs 798 MiB), with the same results.
    so.enable_mem_pattern = options.mem_arena
    if options.mem_arena and options.shared_arena and shared_cpu_arena():
        so.add_session_config_entry("session.use_env_allocators", "1")
    so.log_severity_level = 3
    # Spinning worker threads would steal the cores llama.cpp decodes on between our calls.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if options.profile_dir:
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(options.profile_dir) / Path(path).stem)
    try:
        return ort.InferenceSession(str(path), so, providers=[p for p in options.providers if p in available])
    except Exception as e:  # noqa: BLE001 - onnxruntime raises several types for a bad model file
        raise BundleError(f"{path} cannot be loaded by onnxruntime ({type(e).__name__}); re-export the bundle.") from None


class LazySessions:
    """Sessions by stage name, each opened on first use: a flow with a plain and a cached estimator
    (the same weights) holds only the one its stream runs."""

    def __init__(self, files: dict[str, Path], options: SessionOptions = SessionOptions()):
        self.files, self.options = dict(files), options
        self._open: dict[str, ort.InferenceSession] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def __getitem__(self, name: str) -> ort.InferenceSession:
        if name not in self._open:
            self._open[name] = open_session(self.files[name], self.options)
        return self._open[name]

    def __setitem__(self, name: str, session) -> None:  # a wrapped session (tests count its inputs)
        self._open[name] = session

    def opened(self) -> list[ort.InferenceSession]:
        return list(self._open.values())

