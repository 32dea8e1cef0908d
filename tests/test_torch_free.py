import subprocess
import sys


def test_runtime_import_loads_neither_torch_nor_transformers():
    code = (
        "import sys, omnilite.runtime, omnilite.runtime.pipeline;"
        "bad = [m for m in ('torch', 'transformers', 'safetensors', 'gguf', 'onnx') if m in sys.modules];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_cli_run_path_does_not_import_torch():
    code = (
        "import sys; from omnilite import cli; cli.build_parser();"
        "import omnilite.runtime; sys.exit(1 if 'torch' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
