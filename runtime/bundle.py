"""The bundle: a directory with ``omnilite.json`` and one file per stage.

The runtime refuses, with one sentence naming the file and the fix, a bundle whose manifest is
missing, damaged (a field missing or of the wrong type) or of a newer format, names a file outside
the bundle (absolute, `..`, or a symlink out), or whose stage file is missing or does not match its
sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import BundleError

FORMAT_VERSION = 1
MANIFEST = "omnilite.json"


@dataclass(frozen=True)
class StageFile:
    name: str
    file: str
    format: str
    precision: str
    sha256: str
    inputs: dict[str, list]
    outputs: dict[str, list]
    extra_files: dict[str, str] = field(default_factory=dict)  # side files (ONNX external data) -> sha256
    flash_attn: str | None = None  # GGUF stages: llama.cpp's flash attention as parity was measured ("on"/"off"/"auto")


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: dict[str, Any]

    @property
    def family(self) -> str:
        return self.manifest["family"]

    @property
    def stages(self) -> dict[str, StageFile]:
        return {s["name"]: _stage_file(s) for s in self.manifest["stages"]}

    def file(self, stage: str) -> Path:
        try:
            return self.path / self.stages[stage].file
        except KeyError:
            raise BundleError(f"{self.path} has no '{stage}' stage; re-export the bundle with `omnilite export`.") from None

    def __getitem__(self, key: str) -> Any:
        return self.manifest[key]


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def load_bundle(path: str | os.PathLike, verify: bool = True) -> Bundle:
    """Read and check a bundle. `verify` hashes every stage file (seconds for multi-GB LLMs)."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not path.is_dir():
        raise BundleError(f"{path} is not a directory; pass a bundle directory made by `omnilite export`.")
    if not manifest_path.is_file():
        raise BundleError(f"{path} is not an omnilite bundle (no {MANIFEST}); create one with `omnilite export`.")
    try:
        manifest = json.loads(manifest_path.read_text())
        version = int(manifest["format_version"])
    except (ValueError, KeyError, TypeError):
        raise BundleError(f"{manifest_path} is damaged (not a valid manifest); re-export the bundle with `omnilite export`.") from None
    if version > FORMAT_VERSION:
        raise BundleError(
            f"{manifest_path} has format version {version}, newer than this omnilite reads ({FORMAT_VERSION}); "
            "upgrade omnilite or re-export the bundle with this version."
        )
    if version < 1:
        raise BundleError(f"{manifest_path} has unknown format version {version}; re-export the bundle with `omnilite export`.")
    stages = _checked_stages(manifest_path, manifest)
    encoder = manifest.get("encoder")
    padding = encoder.get("padding_cache") if isinstance(encoder, dict) else None
    if isinstance(padding, dict) and isinstance(padding.get("file"), str):
        _confined(path, padding["file"], manifest_path, "encoder.padding_cache")
    for stage in stages:
        for name, digest in {stage.file: stage.sha256, **stage.extra_files}.items():
            f = _confined(path, name, manifest_path, f"stage '{stage.name}'")
            if not f.is_file():
                raise BundleError(
                    f"{path} is missing {name} (stage '{stage.name}'); re-export the bundle with `omnilite export`."
                )
            if verify and sha256_file(f) != digest:
                raise BundleError(
                    f"{f} does not match the sha256 recorded in {MANIFEST} (altered or damaged); re-export the bundle "
                    "or restore the original file."
                )
    return Bundle(path=path, manifest=manifest)


_STAGE_FIELDS = {"name": str, "file": str, "format": str, "precision": str, "sha256": str, "inputs": dict, "outputs": dict}
_JSON_TYPE = {str: "string", dict: "object"}


def _checked_stages(manifest_path: Path, manifest: Any) -> list[StageFile]:
    """The manifest's stages, or one sentence naming the first field that is missing or of the wrong type."""
    def damaged(what: str) -> BundleError:
        return BundleError(f"{manifest_path} is damaged ({what}); re-export the bundle with `omnilite export`.")

    if not isinstance(manifest.get("family"), str):
        raise damaged("'family' is missing or not a string")
    stages = manifest.get("stages")
    if not isinstance(stages, list) or not stages:
        raise damaged("'stages' is missing or not a non-empty list")
    checked = []
    for i, stage in enumerate(stages):
        if not isinstance(stage, dict):
            raise damaged(f"stage {i} is not an object")
        label = f"stage {stage.get('name', i)!r}" if isinstance(stage.get("name"), str) else f"stage {i}"
        for key, kind in _STAGE_FIELDS.items():
            if not isinstance(stage.get(key), kind):
                raise damaged(f"{label} has no '{key}' {_JSON_TYPE[kind]}")
        extra = stage.get("extra_files", {})
        if not isinstance(extra, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in extra.items()):
            raise damaged(f"{label} has 'extra_files' that is not a map of file name to sha256")
        if not isinstance(stage.get("flash_attn", ""), str):
            raise damaged(f"{label} has a 'flash_attn' that is not a string")
        checked.append(_stage_file(stage))
    return checked


def _stage_file(stage: dict) -> StageFile:
    # Fields a newer writer of the same format version may add are ignored, not refused.
    return StageFile(**{k: stage[k] for k in _STAGE_FIELDS}, extra_files=stage.get("extra_files", {}),
                     flash_attn=stage.get("flash_attn"))


def _confined(bundle: Path, name: str, manifest_path: Path, what: str) -> Path:
    """`bundle / name`, refusing a name that leads outside the bundle (absolute, `..`, or a symlink
    out): a manifest must not make the runtime load files it was not shipped with."""
    rel = Path(name)
    f = bundle / rel
    if rel.is_absolute() or ".." in rel.parts or not f.resolve().is_relative_to(bundle.resolve()):
        raise BundleError(
            f"{manifest_path} names {name!r} for {what}, which is outside the bundle; bundle files must be inside "
            f"{bundle} (re-export the bundle with `omnilite export`)."
        )
    return f
