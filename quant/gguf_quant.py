"""GGUF (llama.cpp) stage quantization through llama-cpp-python's binding of ``llama_model_quantize``.

No external binary: the same library that runs the model quantizes it. llama.cpp chooses the type
per tensor (e.g. Q4_K_M keeps some ``attn_v`` / ``ffn_down`` tensors at Q6_K and the output
matrix at Q6_K; rows whose width is not a multiple of 256 fall back to a 32-wide type). What it
actually chose is read back from the file and recorded (count per ggml type), so a fallback is
visible in the report, and the stage's label says when no tensor got the asked type's main type.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
from collections import Counter
from pathlib import Path

from omnilite.runtime.errors import OmniliteError
from omnilite.runtime.llm import llama_cpp  # imported there after its OpenMP setting

log = logging.getLogger(__name__)

FTYPES: dict[str, int] = {
    "F32": llama_cpp.LLAMA_FTYPE_ALL_F32,
    "F16": llama_cpp.LLAMA_FTYPE_MOSTLY_F16,
    "BF16": llama_cpp.LLAMA_FTYPE_MOSTLY_BF16,
    "Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
    "Q6_K": llama_cpp.LLAMA_FTYPE_MOSTLY_Q6_K,
    "Q5_K_M": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_M,
    "Q4_K_M": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M,
    # IQ4_NL: 32-wide blocks with one scale, like Q4_0, but the 16 levels lie on a non-linear grid
    # (denser near zero); llama.cpp repacks it, like Q4_0, into interleaved rows for its x86 kernels.
    "IQ4_NL": llama_cpp.LLAMA_FTYPE_MOSTLY_IQ4_NL,
    "Q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0,
}
# The main weight type each file type aims for (to spot llama.cpp's fallbacks).
_MAIN_TENSOR_TYPE = {"Q8_0": "Q8_0", "Q6_K": "Q6_K", "Q5_K_M": "Q5_K", "Q4_K_M": "Q4_K", "IQ4_NL": "IQ4_NL", "Q4_0": "Q4_0",
                     "BF16": "BF16", "F16": "F16", "F32": "F32"}

_PROGRESS = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]")
_progress_bar = None  # the tqdm bar the log callback advances, if any


@llama_cpp.llama_log_callback
def _quantize_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    """llama.cpp logs one line per tensor ("[ 12/ 291] blk.0.attn_q.weight ..."): drive the
    progress bar from it and keep the rest at DEBUG. Module level: llama.cpp keeps the pointer."""
    line = text.decode("utf-8", "replace")
    m = _PROGRESS.match(line)
    if m and _progress_bar is not None:
        _progress_bar.total = int(m.group(2))
        _progress_bar.n = int(m.group(1))
        _progress_bar.refresh()
    if line.startswith("warning:") or "falling back" in line:
        log.info("llama.cpp: %s", line.rstrip())
    elif log.isEnabledFor(logging.DEBUG):
        log.debug("llama.cpp: %s", line.rstrip())


_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF value type -> bytes
_STRING, _ARRAY = 8, 9


def gguf_tensor_types(path: Path) -> dict[str, int]:
    """Count of tensors per ggml type in a GGUF file, from its header.

    Parsed here rather than with gguf.GGUFReader, which decodes every metadata value (the Llama-3
    vocabulary and merges: 30 s for a tiny model) when only the tensor table is needed."""
    import mmap
    import struct

    from gguf import GGMLQuantizationType

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise OmniliteError(f"{path} is not a GGUF file.")
        n_tensors, n_kv = struct.unpack_from("<QQ", buf, 8)
        pos = 24

        def skip_value(kind: int, pos: int) -> int:
            if kind == _STRING:
                return pos + 8 + struct.unpack_from("<Q", buf, pos)[0]
            if kind == _ARRAY:
                elem, count = struct.unpack_from("<IQ", buf, pos)
                pos += 12
                if elem in _SCALAR_SIZES:
                    return pos + count * _SCALAR_SIZES[elem]
                for _ in range(count):
                    pos = skip_value(elem, pos)
                return pos
            return pos + _SCALAR_SIZES[kind]

        for _ in range(n_kv):
            pos = skip_value(_STRING, pos)  # key
            kind = struct.unpack_from("<I", buf, pos)[0]
            pos = skip_value(kind, pos + 4)
        counts: Counter[str] = Counter()
        for _ in range(n_tensors):
            pos = skip_value(_STRING, pos)  # name
            n_dims = struct.unpack_from("<I", buf, pos)[0]
            pos += 4 + 8 * n_dims
            kind = struct.unpack_from("<I", buf, pos)[0]
            pos += 4 + 8  # type, data offset
            counts[GGMLQuantizationType(kind).name] += 1
    return dict(sorted(counts.items()))


def quantize_gguf(src: Path, dst: Path, qtype: str, *, threads: int | None = None, allow_requantize: bool = False,
                  progress: bool = True) -> dict:
    """Write `src` quantized to `qtype` at `dst` (atomically: a temp file renamed into place).

    `allow_requantize` lets llama.cpp quantize tensors that are already quantized (it dequantizes
    them first: the errors add up); without it a quantized source is refused with a sentence."""
    global _progress_bar
    if qtype not in FTYPES:
        raise OmniliteError(f"llama.cpp type {qtype!r} is not offered; use one of: {', '.join(FTYPES)}.")
    src, dst = Path(src), Path(dst)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[qtype]
    params.nthread = threads or os.cpu_count() or 1
    params.allow_requantize = allow_requantize
    tmp = dst.with_name(dst.name + ".tmp")
    from omnilite.runtime.llm import _llama_log  # the runtime's callback, restored afterwards

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(desc=f"{dst.name} -> {qtype}", unit="tensor")
    _progress_bar = bar
    llama_cpp.llama_log_set(_quantize_log, ctypes.c_void_p(0))
    try:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    finally:
        llama_cpp.llama_log_set(_llama_log, ctypes.c_void_p(0))
        _progress_bar = None
        if bar is not None:
            bar.close()
    if rc != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise OmniliteError(f"llama.cpp could not quantize {src} to {qtype} (code {rc}); check that it is an "
                            "unquantized GGUF and that the disk has room (run with -v for llama.cpp's log).")
    os.replace(tmp, dst)
    types = gguf_tensor_types(dst)
    main = _MAIN_TENSOR_TYPE[qtype]
    details = {"method": f"llama.cpp llama_model_quantize ({qtype})", "tensor_types": types, "label": qtype}
    if main not in types:
        # Tiny test models: rows narrower than 256 cannot use k-quants, llama.cpp picked 32-wide types.
        # The label says so, so that `info` does not claim a type no tensor has.
        details["fallback"] = f"no tensor got {main}; llama.cpp fell back to {', '.join(types)} (row widths not a multiple of its block)"
        details["label"] = f"{qtype} (no tensor got {main}: rows too narrow, kept as {'/'.join(types)})"
        log.info("%s: %s", Path(dst).stem, details["fallback"])  # the stage file: llm or tts_lm
    return details
