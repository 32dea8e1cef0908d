"""The LLM stage: a Llama GGUF run by llama.cpp through llama-cpp-python's low-level C API.

One context is created with ``embeddings=True`` and pooling NONE, so a single ``llama_decode``
gives, for every position marked as an output, both the logits and the hidden state after the
final RMSNorm (what the speech generator consumes). Speech features enter the model as raw
input embeddings through a batch made with ``llama_batch_init(n, n_embd, 1)``.

Torch-free: only numpy and llama_cpp.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# llama.cpp's CPU backend in the PyPI wheel runs on OpenMP, whose idle workers spin for a while after
# every graph. Beside the onnxruntime stages on the same few cores that spin takes the cores they need
# (measured on a loaded 2-core host: a reply's decode went from 0.08 s to 2-3 s in sequential mode), so
# workers sleep unless the user chose otherwise. It must be set before libgomp loads with llama_cpp.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import llama_cpp  # noqa: E402  (after the OpenMP setting above)

from .bundle import Bundle
from .errors import BundleError, OmniliteError
from .memory import keep_large_blocks_off_heap

log = logging.getLogger(__name__)


@llama_cpp.llama_log_callback
def _llama_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    """llama.cpp's log lines go to this module's logger at DEBUG, so they are silent by default.

    Module level on purpose: llama.cpp keeps this pointer for the life of the process."""
    if log.isEnabledFor(logging.DEBUG):
        log.debug("llama.cpp: %s", text.decode("utf-8", "replace").rstrip("\n"))


@dataclass
class LLMConfig:
    n_ctx: int = 4096
    n_threads: int | None = None  # None: all cores
    n_gpu_layers: int = 0
    n_batch: int = 512  # prefill piece size (tokens or embedding rows per llama_decode)
    kv_cache: str = "f16"  # f16 halves the cache; an f32 GGUF is only exact with "f32" here and flash_attn "off"
    # llama.cpp's flash attention accumulates in another order: with an F32 GGUF and an f32 cache it
    # moved logits by 1e-2 and greedy ids within 10 tokens; "off" matches torch to ~1e-6.
    flash_attn: str = "auto"  # "auto" (llama.cpp decides: on for CPU), "on" or "off"
    # Map the GGUF (True) or read it into memory (False). Mapped, the file's pages stay resident next
    # to the copies llama.cpp repacks for its CPU kernels (the Q4_K tensors of a Qwen2.5-0.5B Q4_K_M:
    # 28 MiB), so reading holds ~33 MiB less per such model, with the same weights and kernels. A
    # mapped file's pages can be dropped and re-read under memory pressure, which a read copy cannot.
    # None: read files under a quarter of physical memory, map larger ones.
    mmap: bool | None = None


_KV_TYPES = {"f32": llama_cpp.GGML_TYPE_F32, "f16": llama_cpp.GGML_TYPE_F16}
_FLASH_ATTN = {"auto": llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO, "on": llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
               "off": llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED}

def default_flash_attn(precision: str) -> str:
    """An f32 GGUF is the exact path: plain attention, as torch computes it. Other types keep
    llama.cpp's choice (flash attention on CPU): benchmarks/results/flash_attn.md measures its speed
    and accuracy per type; the exporter and quantizer record the setting in each GGUF stage."""
    return "off" if precision.lower() == "f32" else "auto"


def stage_llm_config(bundle: Bundle, stage: str, **fields) -> LLMConfig:
    """The KV cache type and attention kernel a bundle's GGUF stage was checked with at export."""
    s = bundle.stages[stage]
    return LLMConfig(kv_cache="f32" if s.precision.lower() == "f32" else "f16",
                     flash_attn=s.flash_attn or default_flash_attn(s.precision), **fields)


Output = tuple[np.ndarray, np.ndarray]  # (logits[n_vocab], hidden[n_embd]) of one position


class LlamaCppLLM:
    """Greedy decoding over one sequence with access to the final hidden states."""

    def __init__(self, gguf_path: Path, config: LLMConfig = LLMConfig()):
        self._model = self._ctx = None
        self._batches: list[llama_cpp.llama_batch] = []
        path = Path(gguf_path)
        _check_gguf(path)
        keep_large_blocks_off_heap()
        llama_cpp.llama_log_set(_llama_log, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()

        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = config.n_gpu_layers
        _set_load_mode(mparams, _maps(path, config.mmap))
        self._model = llama_cpp.llama_model_load_from_file(str(path).encode(), mparams)
        if not self._model:
            raise BundleError(
                f"llama.cpp could not load {path} (corrupt, truncated or written for another llama.cpp version); "
                "re-export the bundle with `omnilite export` or upgrade llama-cpp-python."
            )
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.n_embd: int = llama_cpp.llama_model_n_embd(self._model)
        self.n_vocab: int = llama_cpp.llama_vocab_n_tokens(self._vocab)

        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = config.n_ctx
        # One ubatch per llama_decode call: a prefill piece is computed in one graph.
        cparams.n_batch = cparams.n_ubatch = config.n_batch
        cparams.n_threads = cparams.n_threads_batch = config.n_threads or os.cpu_count() or 1
        self.threads = (cparams.n_threads, cparams.n_threads_batch)  # (decode, prefill); see set_threads
        # Hidden states next to the logits; switched on per decode only where an output is wanted.
        cparams.embeddings = True
        cparams.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_NONE  # per position, not pooled
        cparams.no_perf = True
        if config.kv_cache not in _KV_TYPES:
            raise OmniliteError(f"KV cache type {config.kv_cache!r} is not supported; use one of: {', '.join(_KV_TYPES)}.")
        cparams.type_k = cparams.type_v = _KV_TYPES[config.kv_cache]
        if config.flash_attn not in _FLASH_ATTN:
            raise OmniliteError(f"flash attention setting {config.flash_attn!r} is not supported; use one of: {', '.join(_FLASH_ATTN)}.")
        cparams.flash_attn_type = _FLASH_ATTN[config.flash_attn]
        self._ctx = llama_cpp.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            raise OmniliteError(
                f"llama.cpp could not create a {config.n_ctx}-position context for {path} (out of memory?); "
                "use a smaller n_ctx or fewer GPU layers."
            )
        self.n_ctx: int = llama_cpp.llama_n_ctx(self._ctx)
        self._n_batch = config.n_batch
        # Allocated once, reused for every decode: token ids, and raw input embeddings.
        self._tok_batch = llama_cpp.llama_batch_init(self._n_batch, 0, 1)
        self._batches.append(self._tok_batch)
        self._emb_batch = llama_cpp.llama_batch_init(self._n_batch, self.n_embd, 1)
        self._batches.append(self._emb_batch)
        # End-of-generation ids as llama.cpp sees them (eos, eot, eom, <|end_of_text|>, ...).
        self.eos_ids: frozenset[int] = frozenset(
            t for t in range(self.n_vocab) if llama_cpp.llama_vocab_is_eog(self._vocab, t)
        )
        self._n_past = 0
        log.info("LLM %s: n_embd %d, n_vocab %d, n_ctx %d, eos %s", path.name, self.n_embd, self.n_vocab,
                 self.n_ctx, sorted(self.eos_ids))

    # --- state -------------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget the conversation: clear the KV cache and start again at position 0."""
        self._open()
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self._ctx), True)
        self._n_past = 0

    def truncate(self, n_past: int) -> None:
        """Forget every position from ``n_past`` on (e.g. a cancelled user turn), keeping the ones before."""
        self._open()
        if not 0 <= n_past <= self._n_past:
            raise ValueError(f"cannot truncate to {n_past} positions: the cache holds {self._n_past}")
        if n_past == self._n_past:
            return
        if not llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(self._ctx), 0, n_past, -1):
            raise OmniliteError("llama.cpp could not remove positions from the KV cache; reset the conversation instead.")
        self._n_past = n_past

    @property
    def n_past(self) -> int:
        return self._n_past

    def set_threads(self, n_threads: int, n_threads_batch: int | None = None) -> None:
        """Threads for the next decodes (single-position steps, and prefill pieces): a pipeline moves
        cores between stages per phase (all to the path to the first audio sample, then shared)."""
        self._open()
        n_batch_threads = n_threads if n_threads_batch is None else n_threads_batch
        if n_threads < 1 or n_batch_threads < 1:
            raise OmniliteError(f"an LLM needs at least 1 thread, got {n_threads}/{n_batch_threads}.")
        llama_cpp.llama_set_n_threads(self._ctx, int(n_threads), int(n_batch_threads))
        self.threads = (int(n_threads), int(n_batch_threads))

    def _open(self) -> None:
        """Calling llama.cpp with a freed context would crash the process; fail in Python instead."""
        if not self._ctx:
            raise OmniliteError("This LLM has been closed; load the bundle again.")

    # --- evaluation --------------------------------------------------------------------------

    def eval_tokens(self, ids: Sequence[int], want_last: bool = False, want_hidden: bool = False) -> Output | None:
        """Prefill token ids; with ``want_last`` return the last position's (logits, hidden); with
        ``want_hidden``, the last position's logits and every position's hidden state (n, n_embd)."""
        ids = [int(t) for t in ids]
        bad = [t for t in ids if not 0 <= t < self.n_vocab]
        if bad:
            raise OmniliteError(f"Token id {bad[0]} is outside the LLM vocabulary of {self.n_vocab}; the prompt ids do not belong to this LLM.")
        batch = self._tok_batch

        def put(start: int, count: int) -> None:
            for i, t in enumerate(ids[start:start + count]):
                batch.token[i] = t

        return self._eval(batch, len(ids), put, want_last, want_hidden)

    def eval_embeddings(self, embeds: np.ndarray, want_last: bool = False, want_hidden: bool = False) -> Output | None:
        """Prefill raw input embeddings of shape (n, n_embd) (a leading batch axis of 1 is allowed);
        ``want_last`` / ``want_hidden`` as in `eval_tokens`."""
        embeds = np.asarray(embeds, dtype=np.float32)
        if embeds.ndim == 3 and embeds.shape[0] == 1:
            embeds = embeds[0]
        if embeds.ndim != 2 or embeds.shape[1] != self.n_embd:
            raise ValueError(f"embeddings must have shape (n, {self.n_embd}), got {embeds.shape}")
        embeds = np.ascontiguousarray(embeds)
        batch = self._emb_batch

        def put(start: int, count: int) -> None:
            ctypes.memmove(batch.embd, embeds[start:start + count].ctypes.data, count * self.n_embd * 4)

        return self._eval(batch, len(embeds), put, want_last, want_hidden)

    def generate(self, max_new_tokens: int, *, ignore_eos: bool = False, first: Output) -> Iterator[tuple[int, np.ndarray]]:
        """Greedy decoding. Yields (token, hidden) where hidden is the state of the position that
        predicted the token (the first one is ``first``'s, the last prompt position). Stops after
        yielding an eos token (unless ``ignore_eos``) or ``max_new_tokens`` tokens."""
        logits, hidden = first
        for step in range(max_new_tokens):
            token = int(np.argmax(logits))
            yield token, hidden
            if (token in self.eos_ids and not ignore_eos) or step == max_new_tokens - 1:
                return  # the final token is not fed back: nobody will read its prediction
            logits, hidden = self.eval_tokens([token], want_last=True)

    def _eval(self, batch: llama_cpp.llama_batch, n: int, put: Callable[[int, int], None], want_last: bool,
              want_hidden: bool = False) -> Output | None:
        """Decode ``n`` rows in pieces of n_batch; ``put(start, count)`` writes a piece's data. With
        `want_hidden` every row is an output (Fun-Audio-Chat's speech head reads each prompt position's
        final-norm state): returns (last row's logits, (n, n_embd) hidden states)."""
        self._open()
        if n == 0:
            if want_last:
                raise ValueError("want_last needs at least one position to evaluate")
            return None
        if self._n_past + n > self.n_ctx:
            raise OmniliteError(
                f"The LLM context is full: {self._n_past} + {n} positions exceed n_ctx={self.n_ctx}; "
                "shorten the input or the reply, or load the LLM with a larger n_ctx."
            )
        # With embeddings on and pooling NONE, llama.cpp outputs logits and hidden state for every row
        # of a decode, whatever the rows ask for: the LM head (vocab x n_embd per row, 136 M
        # multiply-adds at Qwen2.5-0.5B) and a logits copy for each prompt position. Only the last
        # position is read, so it is decoded alone, with embeddings on; the rest without outputs.
        pieces = [(s, min(self._n_batch, n - s)) for s in range(0, n, self._n_batch)]
        hidden = np.empty((n, self.n_embd), np.float32) if want_hidden else None
        if want_last and not want_hidden and pieces[-1][1] > 1:
            s, c = pieces.pop()
            pieces += [(s, c - 1), (s + c - 1, 1)]
        for start, count in pieces:
            last = want_hidden or (want_last and start + count == n)
            put(start, count)
            batch.n_tokens = count
            for i in range(count):
                batch.pos[i] = self._n_past + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = last
            llama_cpp.llama_set_embeddings(self._ctx, last)
            rc = llama_cpp.llama_decode(self._ctx, batch)
            if rc != 0:
                raise OmniliteError(
                    f"llama_decode failed with code {rc} at position {self._n_past}"
                    + (" (no free KV-cache slot)" if rc == 1 else "")
                    + "; load the LLM with a larger n_ctx, fewer GPU layers or a smaller n_batch."
                )
            self._n_past += count
            if want_hidden:
                for i in range(count):
                    hidden[start + i] = self._output(i, logits=False)[1]
        if want_hidden:
            return self._output(pieces[-1][1] - 1)[0], hidden
        return self._output(0) if want_last else None

    def _output(self, i: int, logits: bool = True) -> Output:
        """(logits, hidden) of batch row ``i``; copied, since llama.cpp reuses its buffers. Without
        `logits` the first item is None (a row whose logits nobody reads)."""
        out = llama_cpp.llama_get_logits_ith(self._ctx, i) if logits else True
        hidden = llama_cpp.llama_get_embeddings_ith(self._ctx, i)
        if not out or not hidden:
            raise OmniliteError("llama.cpp returned no logits or hidden state; upgrade llama-cpp-python.")
        return (np.ctypeslib.as_array(out, shape=(self.n_vocab,)).copy() if logits else None,
                np.ctypeslib.as_array(hidden, shape=(self.n_embd,)).copy())

    # --- text --------------------------------------------------------------------------------

    def shape(self) -> dict[str, int]:
        """Sizes llama.cpp reports (parameters, bytes of weights, layers, heads): what a cost model needs."""
        m = self._model
        return {"n_params": int(llama_cpp.llama_model_n_params(m)), "size_bytes": int(llama_cpp.llama_model_size(m)),
                "n_layer": llama_cpp.llama_model_n_layer(m), "n_head": llama_cpp.llama_model_n_head(m),
                "n_head_kv": llama_cpp.llama_model_n_head_kv(m), "n_embd": self.n_embd, "n_vocab": self.n_vocab}

    def token_piece(self, token_id: int) -> bytes:
        """Raw bytes of one token (may be part of a UTF-8 character); special tokens give b''."""
        self._open()
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self._vocab, int(token_id), buf, len(buf), 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self._vocab, int(token_id), buf, len(buf), 0, False)
        return buf.raw[:n]

    def detokenize(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; special tokens are left out."""
        self._open()
        arr = (llama_cpp.llama_token * len(ids))(*[int(t) for t in ids])
        size = max(64, 8 * len(ids))
        for _ in range(2):
            buf = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_detokenize(self._vocab, arr, len(ids), buf, size, False, False)
            if n >= 0:
                return buf.raw[:n].decode("utf-8", "replace")
            size = -n
        raise OmniliteError("llama.cpp could not detokenize the reply.")

    def tokenize(self, text: str, add_bos: bool = False, special: bool = True) -> list[int]:
        """Token ids of ``text``; with ``special``, texts like ``<|eot_id|>`` become their special ids."""
        self._open()
        data = text.encode("utf-8")
        size = len(data) + 2
        for _ in range(2):
            arr = (llama_cpp.llama_token * size)()
            n = llama_cpp.llama_tokenize(self._vocab, data, len(data), arr, size, add_bos, special)
            if n >= 0:
                return list(arr[:n])
            size = -n
        raise OmniliteError("llama.cpp could not tokenize the text.")

    # --- lifetime ----------------------------------------------------------------------------

    def close(self) -> None:
        """Free the batches, context and model; safe to call more than once."""
        for batch in getattr(self, "_batches", []):
            llama_cpp.llama_batch_free(batch)
        self._batches = []
        if getattr(self, "_ctx", None):
            llama_cpp.llama_free(self._ctx)
        self._ctx = None
        if getattr(self, "_model", None):
            llama_cpp.llama_model_free(self._model)
        self._model = None

    def __enter__(self) -> "LlamaCppLLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: llama_cpp may already be gone
            pass


def _maps(path: Path, mmap: bool | None) -> bool:
    if mmap is not None:
        return mmap
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows): llama.cpp's default, mapped
        return True
    return path.stat().st_size * 4 >= ram


def _set_load_mode(mparams, mmap: bool) -> None:
    """llama-cpp-python 0.3.36 has `load_mode` (an enum); older releases a `use_mmap` flag."""
    names = {f[0] for f in getattr(type(mparams), "_fields_", ())}
    if "load_mode" in names:
        mparams.load_mode = llama_cpp.LLAMA_LOAD_MODE_MMAP if mmap else llama_cpp.LLAMA_LOAD_MODE_NONE
    elif "use_mmap" in names:
        mparams.use_mmap = mmap


def _check_gguf(path: Path) -> None:
    """Refuse early, with a sentence, what llama.cpp would refuse with a log line and NULL."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise BundleError(f"cannot read the LLM file {path} ({e.strerror}); re-export the bundle with `omnilite export`.") from None
    if magic != b"GGUF":
        raise BundleError(f"{path} is not a GGUF file; re-export the bundle with `omnilite export`.")
