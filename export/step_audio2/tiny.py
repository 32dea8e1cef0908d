"""`omnilite make-tiny step-audio2 OUT`: a Step-Audio-2-mini release in its on-disk layout with seeded
random weights (tiny by default; ``shape="real"`` writes the released dimensions, about 17 GB).

What is the release's: config.json (keys and nesting), the bf16 tensors' names and (for ``real``) shapes,
four shards named ``model-0000N-of-00004.safetensors`` with their index, the real Qwen2.5 BPE with the
Step-Audio special tokens (ids: see tokenizer.py), and in ``token2wav/`` ``flow.yaml`` (every key of the
released file) with ``flow.pt`` (the DiT flow's state dict, names as the official modules) and ``hift.pt``
(the CosyVoice2 HiFT format: ``generator.`` keys, weight-norm pairs). Stand-ins: ``campplus.onnx`` and
``speech_tokenizer_v2_25hz.onnx`` are small graphs with the released inputs and outputs (the official
code loads the tokenizer's weights into the s3tokenizer package by name, which a stand-in cannot serve).
Not written: the HF custom code files (configuration/modeling_step_audio_2.py) and
README/assets. ``real`` shards as the release does (transformers' greedy 5 GB split in state_dict order
gives the release's 4.93/4.93/4.99/1.78 GB); the tiny's four files split at module boundaries instead.
Random weights babble.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from omnilite.runtime.errors import OmniliteError

from ..omni2.hift import HiFTConfig
from ..omni2.tiny import SHAPES as OMNI2_SHAPES
from ..omni2.tiny import _CampPlusStandIn, _fill, _hift_state, _llm_special, _small_onnx, _TokenizerStandIn
from ..tiny import _Init, sinusoids
from .checkpoint import N_SHARDS, TOKEN2WAV_DIR, AudioEncoderConfig, StepAudio2Config, TextConfig, expected_shapes
from .flow_checkpoint import expected_flow_shapes, flow_yaml
from .flow_reference import StepFlowConfig
from .tokenizer import write_step_audio2_tokenizer

log = logging.getLogger(__name__)

SHARD_LIMIT = 5 * 10**9  # transformers' default max_shard_size "5GB" (decimal), as the release was saved


@dataclass(frozen=True)
class Shape:
    config: StepAudio2Config
    hift: HiFTConfig
    flow: StepFlowConfig


def _text(hidden: int, inter: int, heads: int, kv: int, layers: int) -> TextConfig:
    return TextConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads, num_key_value_heads=kv,
                      num_attention_groups=kv, num_hidden_layers=layers, vocab_size=158720, max_seq_len=16384,
                      max_position_embeddings=16384)


def _audio(state: int, heads: int, layers: int, llm_dim: int) -> AudioEncoderConfig:
    return AudioEncoderConfig(n_mels=128, n_audio_ctx=1500, n_audio_state=state, n_audio_head=heads, n_audio_layer=layers,
                              llm_dim=llm_dim, kernel_size=3, adapter_stride=2)


SHAPES = {
    "tiny": Shape(StepAudio2Config(_text(64, 128, 4, 2, 2), _audio(64, 2, 2, 64)), OMNI2_SHAPES["tiny"].hift,
                  StepFlowConfig(input_size=64, attention_heads=2, linear_units=128, num_blocks=2, num_up_blocks=2,
                                 hidden_size=64, depth=2, num_heads=2, head_dim=32)),
    "real": Shape(StepAudio2Config(_text(3584, 18944, 28, 4, 28), _audio(1280, 20, 32, 3584)), HiFTConfig(), StepFlowConfig()),
}


def _shards(shapes: dict[str, tuple[int, ...]], tiny: bool) -> list[list[str]]:
    """Tensor names per shard, in file order. Real: transformers' greedy split at 5 GB (the release's four
    shard sizes). Tiny: the same four files split at module boundaries (a byte split would leave the
    embedding and the head nearly alone)."""
    if tiny:
        layers = sorted({int(n.split(".")[2]) for n in shapes if n.startswith("model.layers.")})
        half = layers[len(layers) // 2]

        def shard(n: str) -> int:
            if n == "model.embed_tokens.weight" or n.startswith("model.layers.") and int(n.split(".")[2]) < half:
                return 0
            if n.startswith("model."):
                return 1
            return 2 if n.startswith("encoder.") else 3
        out: list[list[str]] = [[] for _ in range(N_SHARDS)]
        for n in shapes:
            out[shard(n)].append(n)
        return out
    out, size = [[]], 0
    for n, shp in shapes.items():
        nbytes = 2 * math.prod(shp)
        if out[-1] and size + nbytes > SHARD_LIMIT:
            out.append([])
            size = 0
        out[-1].append(n)
        size += nbytes
    if len(out) != N_SHARDS:
        raise OmniliteError(f"the real shape split into {len(out)} shards, not the release's {N_SHARDS}; report this bug.")
    return out


def _tensor(name: str, shape: tuple[int, ...], init: _Init) -> torch.Tensor:
    if name == "encoder.positional_embedding.weight":
        return sinusoids(*shape)  # the Whisper initialisation the learned table starts from
    return _fill({name: shape}, init, special=_llm_special(init, tied=False))[name]


def _write_weights(root: Path, s: Shape, init: _Init, tiny: bool) -> None:
    shapes = expected_shapes(s.config)
    plan = _shards(shapes, tiny)
    weight_map, total = {}, 0
    for i, names in enumerate(plan, start=1):
        fname = f"model-{i:05d}-of-{N_SHARDS:05d}.safetensors"
        tensors = {}
        for n in names:
            tensors[n] = _tensor(n, shapes[n], init).to(torch.bfloat16).contiguous()
            weight_map[n] = fname
            total += tensors[n].numel() * 2
        save_file(tensors, str(root / fname), metadata={"format": "pt"})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (root / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _flow_state(c: StepFlowConfig, init: _Init) -> dict[str, torch.Tensor]:
    def special(name: str, shape):
        if name == "input_embedding.weight":
            return init("flow." + name, shape, "normal", 1.0)
        if name.endswith(("pos_bias_u", "pos_bias_v")):
            return init("flow." + name, shape, "normal", 0.1)
        return None
    return _fill(expected_flow_shapes(c), init, special=special)


def _write_token2wav(t2w: Path, s: Shape, init: _Init) -> None:
    t2w.mkdir(parents=True)
    (t2w / "flow.yaml").write_text(flow_yaml(s.flow))
    torch.save(_flow_state(s.flow, init), t2w / "flow.pt")
    torch.save(_hift_state(s.hift, init), t2w / "hift.pt")
    _small_onnx(_CampPlusStandIn(init), (torch.zeros(1, 100, 80),), t2w / "campplus.onnx", ["input"], ["output"],
                {"input": {1: "frames"}})
    _small_onnx(_TokenizerStandIn(init), (torch.zeros(1, 128, 400), torch.tensor([400])), t2w / "speech_tokenizer_v2_25hz.onnx",
                ["feats", "feats_length"], ["indices"], {"feats": {2: "frames"}, "indices": {1: "tokens"}})


def make_tiny_step_audio2(root: Path, shape: str = "tiny", seed: int = 0, overwrite: bool = False,
                          progress: bool = False) -> Path:
    """Write the release under `root` (the HF repo root) and return it. Atomic: built in a sibling temp dir.
    `progress`: a bar over the steps on stderr (the tokenizer alone takes seconds)."""
    if shape not in SHAPES:
        raise OmniliteError(f"unknown Step-Audio 2 shape {shape!r}; use one of: {', '.join(SHAPES)}.")
    root = Path(root)
    if root.exists() and any(root.iterdir()) and not overwrite:
        raise OmniliteError(f"{root} already exists and is not empty; choose another directory or pass --force.")
    s = SHAPES[shape]
    init = _Init(seed)
    tmp = root.with_name(f".{root.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    steps = tqdm(total=3, desc="make-tiny", unit="step", disable=not progress)
    try:
        tmp.mkdir(parents=True)
        steps.set_postfix_str("config, tokenizer")
        (tmp / "config.json").write_text(json.dumps(s.config.to_json(), indent=2))
        write_step_audio2_tokenizer(tmp, max_length=s.config.text.max_seq_len)
        steps.update()
        steps.set_postfix_str("safetensors")
        _write_weights(tmp, s, init, tiny=shape == "tiny")
        steps.update()
        steps.set_postfix_str(TOKEN2WAV_DIR)
        _write_token2wav(tmp / TOKEN2WAV_DIR, s, init)
        steps.update()
        if root.exists():
            shutil.rmtree(root)
        tmp.rename(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        steps.close()
    log.info("wrote %s Step-Audio 2 checkpoint (random weights) to %s", shape, root)
    return root
