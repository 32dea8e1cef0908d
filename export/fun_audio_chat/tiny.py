"""`make-tiny fun-audio-chat`: a Fun-Audio-Chat release in its on-disk layout with seeded random
weights (small dimensions by default; ``shape="real"`` for the released ones, about 20 GB).

Written under `root` as the official README places the downloads next to the code:
``Fun-Audio-Chat-8B/`` (config.json with the release's keys, processor_config.json, the real
Qwen tokenizer with Qwen3's extra tokens and this family's audio tokens, bf16 safetensors with
the released tensor names, sharded at 5 GB with an index as transformers saves),
``Fun-CosyVoice3-0.5B-2512/`` (``cosyvoice3.yaml`` in HyperPyYAML syntax with the keys of the
official CosyVoice3 config, ``flow.pt`` and ``hift.pt`` as f32 state dicts with the official module
names, HiFT's weight norm stored as ``parametrizations.weight.original0/1`` pairs) and
``utils/new_spk2info.pt`` (the two voices of the GitHub repo's file, same keys and shapes per
frame, random values).

Not written (see NOTES.md): the ``speech_tokenizer/`` subfolder the processor loads (its files were
not available to read; the runtime does not need it: user audio only becomes placeholders, and
speech codes are numbers), generation_config.json (content unknown), and the parts of the vocoder
dir Fun-Audio-Chat never calls (``llm.pt``, ``campplus.onnx``, ``speech_tokenizer_v3.onnx``,
``spk2info.pt``, ``CosyVoice-BlankEN/``). Random weights babble.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from omnilite.runtime.errors import OmniliteError

from ..omni2.qwen_tokenizer import qwen25_tokenizer, tokenizer_config, write_tokenizer
from ..omni2.tiny import _fill, _llm_special
from ..tiny import _Init
from .config import (
    EXTRA_TOKENS, MODEL_DIR, N_CODES, PROCESSOR_CONFIG, SHAPES, SPK2INFO, VOCODER_DIR, VOCODER_YAML, VocoderShape, release_config,
)
from .reference import expected_shapes
from .vocoder_reference import CausalHiFT, CausalHiFTConfig, CausalMaskedDiffWithDiT, DiTFlowConfig

log = logging.getLogger(__name__)

SHARD_BYTES = 5 * 1024**3  # transformers' default max_shard_size
LLM_PREFIX = "language_model."


def make_tiny_fun_audio_chat(root: Path, shape: str = "tiny", seed: int = 0, overwrite: bool = False,
                             progress: bool = False) -> Path:
    """Write the release under `root` and return its model dir. Atomic: built in a sibling temp dir.
    `progress`: a bar over the weight shards on stderr (the real shape writes four 5 GB shards)."""
    if shape not in SHAPES:
        raise OmniliteError(f"unknown Fun-Audio-Chat shape {shape!r}; use one of: {', '.join(SHAPES)}.")
    root = Path(root)
    if root.exists() and any(root.iterdir()) and not overwrite:
        raise OmniliteError(f"{root} already exists and is not empty; choose another directory or pass --force.")
    init = _Init(seed)
    tmp = root.with_name(f".{root.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_model_dir(tmp / MODEL_DIR, release_config(shape), init, progress)
        _write_spk2info(tmp / SPK2INFO, init)
        _write_vocoder_dir(tmp / VOCODER_DIR, SHAPES[shape].vocoder, init)
        if root.exists():
            shutil.rmtree(root)
        tmp.rename(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote %s Fun-Audio-Chat checkpoint (random weights) to %s", shape, root)
    return root / MODEL_DIR


def _write_model_dir(model_dir: Path, cfg: dict, init: _Init, progress: bool) -> None:
    model_dir.mkdir(parents=True)
    (model_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    (model_dir / "processor_config.json").write_text(json.dumps(PROCESSOR_CONFIG, indent=2))
    tok = qwen25_tokenizer(EXTRA_TOKENS)
    # No chat template in the tokenizer config: the processor's built-in one applies (config.CHAT_TEMPLATE).
    write_tokenizer(model_dir, tok, tokenizer_config(tok, eos="<|im_end|>", chat_template=None))
    (model_dir / "added_tokens.json").write_text(json.dumps({t["content"]: t["id"] for t in tok["added_tokens"]}, indent=2))
    _write_weights(model_dir, expected_shapes(cfg), init, bool(cfg["text_config"]["tie_word_embeddings"]), progress)


def _write_weights(model_dir: Path, shapes: dict[str, tuple[int, ...]], init: _Init, tied: bool, progress: bool) -> None:
    llm_special = _llm_special(init, LLM_PREFIX, tied=tied)

    def make(name: str, shp: tuple[int, ...]) -> torch.Tensor:
        if name.startswith(LLM_PREFIX):
            return _fill({name[len(LLM_PREFIX):]: shp}, init, LLM_PREFIX, special=llm_special)[name]
        return _fill({name: shp}, init)[name]

    # Shards are filled one at a time so the real shape never holds more than 5 GB of tensors.
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shp in shapes.items():
        nbytes = 2 * math.prod(shp)
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, shp))
        size += nbytes
    weight_map, total = {}, 0
    for i, shard in enumerate(tqdm(shards, desc="make-tiny", unit="shard", disable=not progress), start=1):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: make(name, shp).to(torch.bfloat16).contiguous() for name, shp in shard}
        save_file(tensors, str(model_dir / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, fname))
        total += 2 * sum(t.numel() for t in tensors.values())
        del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (model_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _write_spk2info(path: Path, init: _Init) -> None:
    """Both voices of the released file: a 192-d CAM++ embedding, a prompt's speech tokens and its 80-bin mel."""
    voices = {}
    for voice, (n_tok, n_mel) in {"中文女": (20, 35), "中文男": (22, 39)}.items():
        g = torch.Generator().manual_seed(init.seed * 7919 + n_tok)
        voices[voice] = {
            "embedding": init(f"spk2info.{n_tok}.embedding", (1, 192), "normal", 0.1),
            "speech_token": torch.randint(0, N_CODES, (1, n_tok), generator=g, dtype=torch.int64),
            "speech_feat": init(f"spk2info.{n_tok}.speech_feat", (1, n_mel, 80), "normal", 2.0) - 6.0,
        }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(voices, path)


# ----------------------------------------------------------------------------- the vocoder dir


def vocoder_shape_configs(v: VocoderShape) -> tuple[DiTFlowConfig, CausalHiFTConfig]:
    """Flow and HiFT settings of `v`'s widths; everything else as the official cosyvoice3.yaml."""
    return (DiTFlowConfig(lookahead_channels=v.lookahead_channels, dim=v.dit_dim, depth=v.dit_depth, heads=v.dit_heads,
                          dim_head=v.dit_dim_head),
            CausalHiFTConfig(base_channels=v.hift_channels, f0_cond_channels=v.f0_channels))


def cosyvoice3_yaml(f: DiTFlowConfig, h: CausalHiFTConfig) -> str:
    """cosyvoice3.yaml with the keys and tags of examples/libritts/cosyvoice3/conf/cosyvoice3.yaml
    (training-only sections left out)."""
    def lst(v) -> str:
        return json.dumps([list(x) if isinstance(x, tuple) else x for x in v])

    return f"""# set random seed, so that you may reproduce your result.
__set_seed1: !apply:random.seed [1986]
__set_seed2: !apply:numpy.random.seed [1986]
__set_seed3: !apply:torch.manual_seed [1986]
__set_seed4: !apply:torch.cuda.manual_seed_all [1986]

# fixed params
sample_rate: {h.sampling_rate}
llm_input_size: 896
llm_output_size: 896
spk_embed_dim: {f.spk_embed_dim}
qwen_pretrain_path: ''
token_frame_rate: 25
token_mel_ratio: {f.token_mel_ratio}

# stream related params
chunk_size: {f.static_chunk_size // f.token_mel_ratio} # streaming inference chunk size, in token
num_decoding_left_chunks: -1 # streaming inference flow decoder left chunk size, <0 means use all left chunks

llm: !new:cosyvoice.llm.llm.CosyVoice3LM
    llm_input_size: !ref <llm_input_size>
    llm_output_size: !ref <llm_output_size>
    speech_token_size: {f.vocab_size}
    length_normalized_loss: True
    lsm_weight: 0
    mix_ratio: [5, 15]
    llm: !new:cosyvoice.llm.llm.Qwen2Encoder
        pretrain_path: !ref <qwen_pretrain_path>
    sampling: !name:cosyvoice.utils.common.ras_sampling
        top_p: 0.8
        top_k: 25
        win_size: 10
        tau_r: 0.1

flow: !new:cosyvoice.flow.flow.CausalMaskedDiffWithDiT
    input_size: {f.input_size}
    output_size: {f.output_size}
    spk_embed_dim: !ref <spk_embed_dim>
    output_type: 'mel'
    vocab_size: {f.vocab_size}
    input_frame_rate: !ref <token_frame_rate>
    only_mask_loss: True
    token_mel_ratio: !ref <token_mel_ratio>
    pre_lookahead_len: {f.pre_lookahead_len}
    pre_lookahead_layer: !new:cosyvoice.transformer.upsample_encoder.PreLookaheadLayer
        in_channels: {f.input_size}
        channels: {f.lookahead_channels}
        pre_lookahead_len: {f.pre_lookahead_len}
    decoder: !new:cosyvoice.flow.flow_matching.CausalConditionalCFM
        in_channels: 240
        n_spks: 1
        spk_emb_dim: {f.output_size}
        cfm_params: !new:omegaconf.DictConfig
            content:
                sigma_min: 1e-06
                solver: 'euler'
                t_scheduler: '{f.t_scheduler}'
                training_cfg_rate: 0.2
                inference_cfg_rate: {f.inference_cfg_rate}
                reg_loss_type: 'l1'
        estimator: !new:cosyvoice.flow.DiT.dit.DiT
            dim: {f.dim}
            depth: {f.depth}
            heads: {f.heads}
            dim_head: {f.dim_head}
            ff_mult: {f.ff_mult}
            mel_dim: {f.output_size}
            mu_dim: {f.output_size}
            spk_dim: {f.output_size}
            out_channels: {f.output_size}
            static_chunk_size: !ref <chunk_size> * <token_mel_ratio>
            num_decoding_left_chunks: !ref <num_decoding_left_chunks>

hift: !new:cosyvoice.hifigan.generator.CausalHiFTGenerator
    in_channels: {h.in_channels}
    base_channels: {h.base_channels}
    nb_harmonics: {h.nb_harmonics}
    sampling_rate: !ref <sample_rate>
    nsf_alpha: {h.nsf_alpha}
    nsf_sigma: {h.nsf_sigma}
    nsf_voiced_threshold: {h.nsf_voiced_threshold:g}
    upsample_rates: {lst(h.upsample_rates)}
    upsample_kernel_sizes: {lst(h.upsample_kernel_sizes)}
    istft_params:
        n_fft: {h.n_fft}
        hop_len: {h.hop_len}
    resblock_kernel_sizes: {lst(h.resblock_kernel_sizes)}
    resblock_dilation_sizes: {lst(h.resblock_dilation_sizes)}
    source_resblock_kernel_sizes: {lst(h.source_resblock_kernel_sizes)}
    source_resblock_dilation_sizes: {lst(h.source_resblock_dilation_sizes)}
    lrelu_slope: {h.lrelu_slope}
    audio_limit: {h.audio_limit}
    conv_pre_look_right: {h.conv_pre_look_right}
    f0_predictor: !new:cosyvoice.hifigan.f0_predictor.CausalConvRNNF0Predictor
        num_class: 1
        in_channels: {h.in_channels}
        cond_channels: {h.f0_cond_channels}

feat_extractor: !name:matcha.utils.audio.mel_spectrogram
    n_fft: 1920
    num_mels: 80
    sampling_rate: !ref <sample_rate>
    hop_size: 480
    win_size: 1920
    fmin: 0
    fmax: null
    center: False
"""


def _flow_state(c: DiTFlowConfig, init: _Init) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in CausalMaskedDiffWithDiT(c).state_dict().items()}

    def special(name: str, shape):
        if name == "decoder.estimator.rotary_embed.inv_freq":  # a buffer the release stores: the real values
            return 1.0 / (10000 ** (torch.arange(0, c.dim_head, 2).float() / c.dim_head))
        if name == "input_embedding.weight":
            return init("flow." + name, shape, "normal", 1.0)
        return None

    return _fill(shapes, init, special=special)


def _hift_state(c: CausalHiFTConfig, init: _Init) -> dict[str, torch.Tensor]:
    """hift.pt: weight-norm pairs (torch's parametrization names) on every conv but source_downs."""
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in CausalHiFT(c).state_dict().items()}

    def special(name: str, shape):
        if name == "f0_predictor.classifier.bias":
            return init(name, shape, "const", 150.0)  # a voiced pitch, so the harmonic source is exercised
        if name.endswith(".alpha"):
            return init(name, shape, "norm")
        if name == "conv_post.weight":  # modest log-magnitudes: a random net would otherwise clip at +-0.99
            return init(name, shape, "normal", 0.2 / math.sqrt(shape[1] * shape[2]))
        if name == "conv_post.bias":
            return init(name, shape, "const", -1.0)
        return None

    state = {}
    for name, t in _fill(shapes, init, special=special).items():
        if name.endswith(".weight") and t.dim() == 3 and not name.startswith("source_downs."):
            base = name[: -len(".weight")]
            state[base + ".parametrizations.weight.original0"] = t.flatten(1).norm(dim=1).view(-1, 1, 1)
            state[base + ".parametrizations.weight.original1"] = t
        else:
            state[name] = t
    return state


def _write_vocoder_dir(path: Path, v: VocoderShape, init: _Init) -> None:
    flow, hift = vocoder_shape_configs(v)
    path.mkdir(parents=True)
    (path / VOCODER_YAML).write_text(cosyvoice3_yaml(flow, hift))
    torch.save(_flow_state(flow, init), path / "flow.pt")
    torch.save(_hift_state(hift, init), path / "hift.pt")
