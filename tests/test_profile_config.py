"""A device profile sets the pipeline's providers, threads per stage and chunk sizes; the command
line overrides it; the loaded pipeline really uses those settings."""

import argparse
import json
import logging
from pathlib import Path

import pytest

import omnilite.devices as devices_pkg
from omnilite.cli import _pipeline_config
from omnilite.runtime.llm import llama_cpp
from omnilite.devices.host import HostInfo
from omnilite.devices.profiles import get_profile, pipeline_settings
from omnilite.runtime import Pipeline

CPU_ONLY = HostInfo(os="linux", arch="arm64", cpu_model="Cortex-A78AE", cpu_vendor="ARM", physical_cores=6,
                    logical_cores=6, features=frozenset({"neon", "dotprod"}), ram_bytes=8 << 30,
                    ort_providers=("CPUExecutionProvider",))


def _args(**kw) -> argparse.Namespace:
    base = dict(profile=None, threads=None, omega=None, write=None, flow_chunk=None, encoder_mode=None,
                max_new_tokens=8, ignore_eos=True)
    return argparse.Namespace(**{**base, **kw})


def test_profile_settings_fall_back_to_installed_providers_and_name_threads_per_stage(caplog):
    profile = get_profile("jetson-orin-nano-8gb")
    with caplog.at_level(logging.WARNING):
        s = pipeline_settings(profile, CPU_ONLY, "llama-omni")
    assert s["providers"] == ("CPUExecutionProvider",)
    assert "onnxruntime-gpu" in caplog.text  # the warning names the package to install
    assert s["n_gpu_layers"] == profile.n_gpu_layers
    assert s["stage_threads"] == {st: profile.threads_for(st, CPU_ONLY) for st in ("encoder", "llm", "speech_generator", "vocoder")}
    assert s["omega"] == profile.omega and "write" not in s
    s2 = pipeline_settings(profile, CPU_ONLY, "llama-omni2")
    assert (s2["omega"], s2["write"]) == (profile.read, profile.write)


def _custom_profile(tmp_path) -> str:
    data = json.loads((Path(devices_pkg.__file__).parent / "profiles" / "raspberry-pi-5.json").read_text())
    data.update(name="test-profile", threads={"encoder": 2, "llm": 1, "speech_generator": 1, "vocoder": 1})
    data["chunks"]["omega"] = 5
    path = tmp_path / "test-profile.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_cli_takes_the_profile_and_explicit_flags_win(bundle, tmp_path):
    profile = _custom_profile(tmp_path)
    config = _pipeline_config(_args(profile=profile), bundle)
    assert config.omega == 5 and config.threads is None
    assert config.stage_threads == {"encoder": 2, "llm": 1, "speech_generator": 1, "vocoder": 1}
    config = _pipeline_config(_args(profile=profile, threads=1, omega=3), bundle)
    assert (config.threads, config.omega, config.stage_threads) == (1, 3, {})


def test_pipeline_runs_with_the_profile_threads_and_chunks(bundle, tmp_path):
    with Pipeline.load(bundle, _pipeline_config(_args(profile=_custom_profile(tmp_path)), bundle)) as pipe:
        assert pipe.omega == 5
        assert llama_cpp.llama_n_threads(pipe.llm._ctx) == 1  # default: every core (2 here)
        assert pipe.encoder.session.get_session_options().intra_op_num_threads == 2
        assert pipe.vocoder.generator_session.get_session_options().intra_op_num_threads == 1


def test_unknown_profile_is_one_sentence(bundle):
    from omnilite.runtime.errors import DeviceError

    with pytest.raises(DeviceError, match=r"unknown device profile 'pi-6'; use one of: .*\(or a \.json file\)\.$"):
        _pipeline_config(_args(profile="pi-6"), bundle)
