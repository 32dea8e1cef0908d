"""Packaging: the wheel holds every package and data file of the source tree under its omnilite.*
name, its unconditional requirements are the torch-free runtime's, and export-side commands
without their extra say which extra to install in one sentence (exit 2, nothing written).
.ci/run installs the wheel without extras in a fresh venv and runs both families there."""

from __future__ import annotations

import email
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
# Source folder -> installed package (setup.py's mapping).
FOLDERS = {"omnilite": "omnilite", **{t: f"omnilite/{t}" for t in ("export", "runtime", "quant", "devices", "benchmarks")}}
NOT_PACKAGED = ("benchmarks/results/",)  # benchmark outputs live in the repository only
RUNTIME_REQUIREMENTS = {"numpy", "onnxruntime", "llama-cpp-python", "tqdm"}


def _source_files() -> list[str]:
    """What a fresh clone holds (tracked files, plus new ones not ignored: the working tree's state)."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    return [f for f in out.splitlines() if (ROOT / f).is_file()]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    # Built from a copy of the source files, as from a fresh clone (no build/ or stale egg-info).
    src = tmp_path_factory.mktemp("src")
    for f in _source_files():
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, src / f)
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(src),
                        "-w", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "absent from the `packages` configuration" not in r.stderr, r.stderr  # every folder is discovered
    (path,) = out.glob("omnilite-*.whl")
    return zipfile.ZipFile(path)


def _installed_name(source: str) -> str | None:
    top, _, rest = source.partition("/")
    if top not in FOLDERS or not rest or source.startswith(NOT_PACKAGED) or "__pycache__" in source:
        return None
    return f"{FOLDERS[top]}/{rest}"


def test_wheel_holds_every_module_and_data_file_under_its_package_name(wheel):
    expected = {name for f in _source_files() if (name := _installed_name(f))}
    assert any(n.startswith("omnilite/runtime/omni2/") for n in expected)  # the subpackages are in the count
    assert any(n.startswith("omnilite/benchmarks/data/speech/") for n in expected)
    names = set(wheel.namelist())
    assert sorted(expected - names) == []
    assert not any(n.startswith("omnilite/benchmarks/results/") for n in names)


def test_wheel_requires_only_the_torch_free_runtime_without_extras(wheel):
    (meta,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
    requires = email.message_from_bytes(wheel.read(meta)).get_all("Requires-Dist")
    base = {r.split(";")[0].split(">")[0].split("=")[0].split("<")[0].strip().lower()
            for r in requires if "extra ==" not in r}
    assert base == RUNTIME_REQUIREMENTS
    quant = {r.split(">")[0] for r in requires if 'extra == "quant"' in r}
    assert quant == {"onnx", "gguf"}


def _cli_without(modules: tuple[str, ...], argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """The CLI in a process where `modules` cannot be imported (as if their extra were not installed)."""
    code = (f"import sys; sys.modules.update(dict.fromkeys({modules!r}));"  # None there: ModuleNotFoundError
            f"from omnilite.cli import main; sys.exit(main({argv!r}))")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd)


def _one_error_line(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


@pytest.mark.parametrize("argv", [["make-tiny", "llama-omni", "ckpt"], ["export", "ckpt", "out"],
                                  ["demo", "--work-dir", "work", "--out-dir", "out"]])
def test_export_side_commands_without_torch_name_the_export_extra(argv, tmp_path):
    if argv[0] == "export":
        (tmp_path / "ckpt").mkdir()
    before = {p.name for p in tmp_path.iterdir()}
    line = _one_error_line(_cli_without(("torch",), argv, tmp_path))
    assert line == (f"error: `omnilite {argv[0]}` needs the Python package 'torch', which is not installed; "
                    "install it with `pip install 'omnilite[export]'`.")
    assert {p.name for p in tmp_path.iterdir()} == before  # nothing written


def test_quantize_without_onnx_names_the_quant_extra_not_torch(bundle, tmp_path):
    line = _one_error_line(_cli_without(("onnx",), ["quantize", str(bundle), "q"], tmp_path))
    assert line == ("error: `omnilite quantize` needs the Python package 'onnx', which is not installed; "
                    "install it with `pip install 'omnilite[quant]'`.")
    assert not (tmp_path / "q").exists()


def test_quantize_does_not_need_torch(bundle, tmp_path):
    # quantize's own work is onnx, onnxruntime and llama.cpp: it runs with torch and transformers blocked.
    r = _cli_without(("torch", "transformers"), ["quantize", str(bundle), "q", "--no-report"],
                     tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "q" / "omnilite.json").is_file()


def test_bench_torch_baseline_without_torch_names_the_export_extra(bundle, tmp_path):
    line = _one_error_line(_cli_without(("torch",), ["bench", str(bundle), "--baseline", "torch", "--out-dir", "b"],
                                        tmp_path))
    assert line == "error: --baseline torch needs the export extra; install it with `pip install 'omnilite[export]'`."
    assert not (tmp_path / "b").exists()


def test_serve_without_websockets_names_the_serve_extra(bundle, tmp_path):
    line = _one_error_line(_cli_without(("websockets",), ["serve", str(bundle), "--port", "0"], tmp_path))
    assert line == ("error: `omnilite serve` needs the Python package 'websockets', which is not installed; "
                    "install it with `pip install 'omnilite[serve]'`.")


def test_a_missing_module_that_is_no_optional_dependency_keeps_its_traceback(tmp_path):
    # A runtime dependency missing is a broken install (or a bug), not a choice of extras.
    r = _cli_without(("llama_cpp",), ["make-tiny", "llama-omni", "ckpt"], tmp_path)
    assert r.returncode == 1 and "ModuleNotFoundError" in r.stderr, r.stderr
