import os
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


def _omp_policy_after_import(env_value: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if env_value is not None:
        env["OMP_WAIT_POLICY"] = env_value
    code = "import os, omnilite.runtime.llm; print(os.environ['OMP_WAIT_POLICY'])"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.strip()


def test_llama_cpp_openmp_workers_sleep_unless_the_user_chose():
    # Spinning OpenMP workers starve the onnxruntime stages sharing the cores (see runtime/llm.py).
    assert _omp_policy_after_import(None) == "PASSIVE"
    assert _omp_policy_after_import("ACTIVE") == "ACTIVE"
