"""The bundle: a directory with ``omnilite.json`` and one file per stage.

The runtime refuses, with one sentence naming the file and the fix, a bundle whose manifest is
missing or of a newer format, whose stage file is missing, or whose file does not match its sha256.
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


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: dict[str, Any]

    @property
    def family(self) -> str:
        return self.manifest["family"]

    @property
    def stages(self) -> dict[str, StageFile]:
        return {s["name"]: StageFile(**s) for s in self.manifest["stages"]}

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
        stages = manifest["stages"]
    except (ValueError, KeyError, TypeError):
        raise BundleError(f"{manifest_path} is damaged (not a valid manifest); re-export the bundle with `omnilite export`.") from None
    if version > FORMAT_VERSION:
        raise BundleError(
            f"{manifest_path} has format version {version}, newer than this omnilite reads ({FORMAT_VERSION}); "
            "upgrade omnilite or re-export the bundle with this version."
        )
    if version < 1:
        raise BundleError(f"{manifest_path} has unknown format version {version}; re-export the bundle with `omnilite export`.")
    for stage in stages:
        files = {stage["file"]: stage["sha256"], **stage.get("extra_files", {})}
        for name, digest in files.items():
            f = path / name
            if not f.is_file():
                raise BundleError(
                    f"{path} is missing {name} (stage '{stage['name']}'); re-export the bundle with `omnilite export`."
                )
            if verify and sha256_file(f) != digest:
                raise BundleError(
                    f"{f} does not match the sha256 recorded in {MANIFEST} (altered or damaged); re-export the bundle "
                    "or restore the original file."
                )
    return Bundle(path=path, manifest=manifest)
