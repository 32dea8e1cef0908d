"""`omnilite make-tiny llama-omni2 OUT`: a LLaMA-Omni2 release in its exact on-disk layout with
seeded random weights (tiny by default; ``shape="real"`` with ``size`` 0.5B / 1.5B / 7B for the
released dimensions).

Written as the official README lays it out (see `checkpoint.py`): the HF model dir (bf16
safetensors holding the Qwen2.5 LLM, the Whisper encoder as a full save repeats it, the projector
and the speech generator; config.json with the TTS LM config nested under "speech_generator";
the real Qwen2.5 tokenizer plus ``<speech>``; ``tts_tokenizer/`` with 6561 speech tokens and
``<sep>``), the openai-whisper ``large-v3.pt``, and the CosyVoice2 decoder dir (``cosyvoice.yaml``
in HyperPyYAML syntax, ``flow.pt``, ``hift.pt`` with ``generator.`` keys and weight-norm pairs,
``campplus.onnx``, ``speech_tokenizer_v2.onnx``, ``spk2info.pt``, ``CosyVoice-BlankEN/``).

Not reproduced: the blank Qwen weights inside ``CosyVoice-BlankEN`` (LLaMA-Omni2 never uses them),
and the real CAM++ / speech-tokenizer networks (small graphs with the same inputs and outputs stand
in; only CAM++ is used, for the speaker embedding). The speech-token strings ``<|s_N|>`` are our
choice: no released TTS tokenizer was available to read, and the loader only relies on each speech
token's text holding its unit number. Random weights babble.
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
from transformers import Qwen2Config, Qwen2ForCausalLM

from omnilite.runtime.errors import OmniliteError

from ..speech_encoder import ConcatAdapter
from ..tiny import _fill as _fill_v1
from ..tiny import _Init, _shapes, _whisper_state, saved_encoder_state, whisper_dims
from .flow import CausalMaskedDiffWithXvec, FlowConfig
from .hift import HiFT, HiFTConfig
from .qwen_tokenizer import qwen25_tokenizer, tokenizer_config, write_tokenizer
from .tts import GateFusion

log = logging.getLogger(__name__)

SHARD_BYTES = 5 * 1024**3  # transformers' default max_shard_size when the release was saved
N_UNITS = 6561
STREAM_PARAMS = "(3,10)"  # the paper's best read/write setting


@dataclass(frozen=True)
class QwenShape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    inter: int
    vocab: int
    tie: bool


@dataclass(frozen=True)
class Shape:
    name: str
    llm: QwenShape
    tts: QwenShape  # vocab filled in from the TTS tokenizer
    whisper: tuple[int, int, int]  # state, heads, layers
    flow: FlowConfig
    hift: HiFTConfig


_QWEN05 = QwenShape(896, 24, 14, 2, 4864, 151936, True)
_REAL_FLOW = FlowConfig()
_REAL_HIFT = HiFTConfig()
SHAPES = {
    "tiny": Shape("LLaMA-Omni2-0.5B", QwenShape(64, 2, 4, 2, 128, 151936, False), QwenShape(48, 2, 4, 2, 96, 0, True), (64, 2, 2),
                  FlowConfig(input_size=64, attention_heads=4, linear_units=128, num_blocks=2, num_up_blocks=4, channels=(64,),
                             attention_head_dim=16, n_blocks=1, num_mid_blocks=2, num_heads=2),
                  HiFTConfig(base_channels=32, f0_cond_channels=32)),
    "0.5B": Shape("LLaMA-Omni2-0.5B", _QWEN05, _QWEN05, (1280, 20, 32), _REAL_FLOW, _REAL_HIFT),
    "1.5B": Shape("LLaMA-Omni2-1.5B", QwenShape(1536, 28, 12, 2, 8960, 151936, True), _QWEN05, (1280, 20, 32), _REAL_FLOW, _REAL_HIFT),
    "7B": Shape("LLaMA-Omni2-7B", QwenShape(3584, 28, 28, 4, 18944, 152064, False), _QWEN05, (1280, 20, 32), _REAL_FLOW, _REAL_HIFT),
}


def qwen_dict(s: QwenShape, vocab: int, extra: dict | None = None) -> dict:
    return {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "attention_dropout": 0.0,
        "bos_token_id": 151643, "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": s.hidden,
        "initializer_range": 0.02, "intermediate_size": s.inter, "max_position_embeddings": 32768,
        "max_window_layers": s.layers, "num_attention_heads": s.heads, "num_hidden_layers": s.layers,
        "num_key_value_heads": s.kv_heads, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
        "tie_word_embeddings": s.tie, "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False,
        "vocab_size": vocab, **(extra or {}),
    }


def omni2_config(shape: Shape, tts_vocab: int) -> dict:
    tts = qwen_dict(shape.tts, tts_vocab, {"eos_token_id": 151643})
    return qwen_dict(shape.llm, shape.llm.vocab) | {
        "architectures": ["Omni2Speech2SQwen2ForCausalLM"], "model_type": "omni2_speech2s_qwen2",
        "speech_encoder": "models/speech_encoder/large-v3.pt", "speech_encoder_type": "whisper",
        "speech_encoder_ds_rate": 5, "speech_encoder_hidden_size": shape.whisper[0], "speech_projector_type": "linear",
        "speech_generator": tts, "unit_vocab_size": N_UNITS, "stream_params": STREAM_PARAMS,
        "tokenizer_model_max_length": 2048, "tokenizer_padding_side": "right",
    }


def cosyvoice_yaml(f: FlowConfig, h: HiFTConfig) -> str:
    """CosyVoice2's decoder config in the HyperPyYAML form the official loader reads."""
    def lst(v) -> str:
        return "[" + ", ".join(lst(x) if isinstance(x, (list, tuple)) else str(x) for x in v) + "]"

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

# model params
llm: !new:cosyvoice.llm.llm.Qwen2LM
    llm_input_size: !ref <llm_input_size>
    llm_output_size: !ref <llm_output_size>
    speech_token_size: {f.vocab_size}
    length_normalized_loss: True
    lsm_weight: 0
    llm: !new:cosyvoice.llm.llm.Qwen2Encoder
        pretrain_path: !ref <qwen_pretrain_path>
    sampling: !name:cosyvoice.utils.common.ras_sampling
        top_p: 0.8
        top_k: 25
        win_size: 10
        tau_r: 0.1

flow: !new:cosyvoice.flow.flow.CausalMaskedDiffWithXvec
    input_size: {f.input_size}
    output_size: {f.output_size}
    spk_embed_dim: !ref <spk_embed_dim>
    output_type: 'mel'
    vocab_size: {f.vocab_size}
    input_frame_rate: {f.input_frame_rate}
    only_mask_loss: True
    token_mel_ratio: {f.token_mel_ratio}
    pre_lookahead_len: {f.pre_lookahead_len}
    encoder: !new:cosyvoice.transformer.upsample_encoder.UpsampleConformerEncoder
        output_size: {f.input_size}
        attention_heads: {f.attention_heads}
        linear_units: {f.linear_units}
        num_blocks: {f.num_blocks}
        dropout_rate: 0.1
        positional_dropout_rate: 0.1
        attention_dropout_rate: 0.1
        normalize_before: True
        input_layer: 'linear'
        pos_enc_layer_type: 'rel_pos_espnet'
        selfattention_layer_type: 'rel_selfattn'
        input_size: {f.input_size}
        use_cnn_module: False
        macaron_style: False
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
        estimator: !new:cosyvoice.flow.decoder.ConditionalDecoder
            in_channels: {4 * f.output_size}
            out_channels: {f.output_size}
            causal: True
            channels: {lst(f.channels)}
            dropout: 0.0
            attention_head_dim: {f.attention_head_dim}
            n_blocks: {f.n_blocks}
            num_mid_blocks: {f.num_mid_blocks}
            num_heads: {f.num_heads}
            act_fn: 'gelu'

hift: !new:cosyvoice.hifigan.generator.HiFTGenerator
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
    f0_predictor: !new:cosyvoice.hifigan.f0_predictor.ConvRNNF0Predictor
        num_class: 1
        in_channels: {h.in_channels}
        cond_channels: {h.f0_cond_channels}

# processor functions
get_tokenizer: !name:cosyvoice.tokenizer.tokenizer.get_qwen_tokenizer
    token_path: !ref <qwen_pretrain_path>
    skip_special_tokens: True
allowed_special: 'all'
feat_extractor: !name:matcha.utils.audio.mel_spectrogram
    n_fft: 1920
    num_mels: 80
    sampling_rate: !ref <sample_rate>
    hop_size: 480
    win_size: 1920
    fmin: 0
    fmax: 8000
    center: False
"""


# ----------------------------------------------------------------------------- weights


def _fill(names_shapes: dict, init: _Init, prefix: str = "", special=None) -> dict[str, torch.Tensor]:
    """The LLaMA-Omni filler, with every 1-D ``.weight`` treated as a norm scale (~1): the flow's
    LayerNorms are named ``norm_ff``/``out.1`` and would otherwise get bias-sized values."""
    def chained(name: str, shape):
        chosen = special(name, shape) if special else None
        if chosen is None and name.endswith(".weight") and len(shape) == 1:
            chosen = init(prefix + name, shape, "norm")
        return chosen
    return _fill_v1(names_shapes, init, prefix, chained)


def _qwen_shapes(d: dict) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        shapes = _shapes(Qwen2ForCausalLM(Qwen2Config(**{k: v for k, v in d.items() if k not in ("architectures", "model_type")})))
    if d["tie_word_embeddings"]:
        shapes.pop("lm_head.weight")  # a tied head is not stored
    return shapes


def _llm_special(init: _Init, prefix: str = "", tied: bool = True):
    """Random-weight Qwen2 LMs with tied embeddings fall into a loop (the fed-back token's own
    embedding dominates the residual stream and wins the tied head). Small embeddings keep the layers
    in charge, and a large final-norm scale keeps greedy margins clear. (The tiny LLM is untied, as
    the 7B release is, with the LLaMA-Omni tiny's recipe; the tiny TTS LM is tied, as released.)"""
    def special(name: str, shape: tuple[int, ...]):
        if name == "model.embed_tokens.weight":
            return init(prefix + name, shape, "normal", 0.1 if tied else 1.0)
        if name == "model.norm.weight" and tied:
            return init(prefix + name, shape, "const", 40.0)
        if name == "lm_head.weight":
            return init(prefix + name, shape, "normal", 4.0 / math.sqrt(shape[1]))
        return None
    return special


def _tts_special(init: _Init, first_unit: int, n_units: int):
    base = _llm_special(init, "speech_generator.model.")

    def special(name: str, shape: tuple[int, ...]):
        if name == "model.embed_tokens.weight":
            # Larger speech-token rows make a random TTS LM write mostly speech tokens through its
            # tied head, as a trained one does; text rows only feed the gate fusion.
            t = init("speech_generator.model." + name, shape, "normal", 0.05)
            t[first_unit:first_unit + n_units] *= 4.0
            return t
        return base(name, shape)
    return special


def _hift_state(c: HiFTConfig, init: _Init) -> dict[str, torch.Tensor]:
    """hift.pt content: ``generator.`` keys, weight-norm pairs on every conv except source_downs."""
    with torch.device("meta"):
        shapes = _shapes(HiFT(c))

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

    folded = _fill(shapes, init, special=special)
    state = {}
    for name, t in folded.items():
        normed = name.endswith(".weight") and t.dim() == 3 and not name.startswith("source_downs.")
        if normed:
            base = name[: -len(".weight")]
            state["generator." + base + ".weight_g"] = t.flatten(1).norm(dim=1).view(-1, 1, 1)
            state["generator." + base + ".weight_v"] = t
        else:
            state["generator." + name] = t
    return state


def _small_onnx(module: torch.nn.Module, example: tuple, path: Path, inputs: list[str], outputs: list[str], axes: dict) -> None:
    import warnings

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, example, str(path), input_names=inputs, output_names=outputs, dynamic_axes=axes,
                          opset_version=17, dynamo=False)


class _CampPlusStandIn(torch.nn.Module):
    """Same interface as CAM++'s campplus.onnx: fbank (1, T, 80) -> x-vector (1, 192)."""

    def __init__(self, init: _Init):
        super().__init__()
        self.proj = torch.nn.Linear(80, 192)
        self.proj.weight.data = init("campplus.proj.weight", (192, 80), "normal", 0.1)
        self.proj.bias.data = init("campplus.proj.bias", (192,), "bias")

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.tanh(feats).mean(dim=1))


class _TokenizerStandIn(torch.nn.Module):
    """Same interface as speech_tokenizer_v2.onnx: feats (1, 128, T), feats_length (1,) -> indices (1, T/4)."""

    def __init__(self, init: _Init):
        super().__init__()
        self.conv = torch.nn.Conv1d(128, 16, 4, stride=4)
        self.conv.weight.data = init("speech_tokenizer.conv.weight", (16, 128, 4), "normal", 0.05)

    def forward(self, feats: torch.Tensor, feats_length: torch.Tensor) -> torch.Tensor:
        return self.conv(feats).argmax(dim=1) + 0 * feats_length[:, None]


def make_tiny_llama_omni2(out: Path, shape: str = "tiny", seed: int = 0, overwrite: bool = False,
                          progress: bool = False) -> Path:
    """Write the release under `out`; returns the HF model dir. Atomic: built in a temp dir.
    `progress`: a bar over the steps on stderr (the tokenizers alone take seconds)."""
    if shape not in SHAPES:
        raise OmniliteError(f"unknown LLaMA-Omni2 shape {shape!r}; use one of: {', '.join(SHAPES)}.")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise OmniliteError(f"{out} already exists and is not empty; choose another directory or pass --force.")
    s = SHAPES[shape]
    init = _Init(seed)
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    steps = tqdm(total=3, desc="make-tiny", unit="step", disable=not progress)
    try:
        model_dir = tmp / "models" / s.name
        steps.set_postfix_str(f"{s.name} (tokenizers, weights)")
        _write_model_dir(model_dir, s, init)
        steps.update()
        enc = tmp / "models" / "speech_encoder" / "large-v3.pt"
        steps.set_postfix_str("speech_encoder")
        enc.parent.mkdir(parents=True)
        dims = whisper_dims_for(s)
        torch.save({"dims": dims, "model_state_dict": _whisper_state(dims, init)}, enc)
        steps.update()
        steps.set_postfix_str("cosy2_decoder")
        _write_decoder_dir(tmp / "models" / "cosy2_decoder", s, init)
        steps.update()
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        steps.close()
    log.info("wrote %s LLaMA-Omni2 checkpoint (random weights) to %s", shape, out)
    return out / "models" / s.name


def whisper_dims_for(s: Shape) -> dict:
    from ..tiny import SHAPES as V1_SHAPES

    base = whisper_dims(V1_SHAPES["tiny"])
    state, heads, layers = s.whisper
    return base | {"n_audio_state": state, "n_audio_head": heads, "n_audio_layer": layers,
                   "n_text_state": state, "n_text_head": heads, "n_text_layer": layers}


def _write_model_dir(model_dir: Path, s: Shape, init: _Init) -> None:
    model_dir.mkdir(parents=True)
    # LLM tokenizer: Qwen2.5 + the <speech> placeholder the official prompt code looks up.
    tok = qwen25_tokenizer([("<speech>", True)])
    write_tokenizer(model_dir, tok, tokenizer_config(tok, eos="<|im_end|>", max_length=2048))
    (model_dir / "added_tokens.json").write_text(json.dumps({t["content"]: t["id"] for t in tok["added_tokens"]}, indent=2))
    # TTS tokenizer: Qwen2.5 + 6561 speech tokens + <sep>; the TTS LM's eos is <|endoftext|>.
    tts_tok = qwen25_tokenizer([(f"<|s_{i}|>", False) for i in range(N_UNITS)] + [("<sep>", True)])
    first_unit = max(t["id"] for t in tts_tok["added_tokens"]) - N_UNITS
    tts_vocab = -(-(first_unit + N_UNITS + 1) // 64) * 64  # resized to a multiple of 64
    write_tokenizer(model_dir / "tts_tokenizer", tts_tok, tokenizer_config(tts_tok, eos="<|endoftext|>", chat_template=None))
    cfg = omni2_config(s, tts_vocab)
    (model_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    (model_dir / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 151643, "eos_token_id": [151645, 151643], "pad_token_id": 151643, "do_sample": False}, indent=2))

    tts_cfg = cfg["speech_generator"]
    dims = whisper_dims_for(s)
    ws = saved_encoder_state(dims, init)
    with torch.device("meta"):
        proj = _shapes(ConcatAdapter(5, s.whisper[0], s.llm.hidden))
        fusion = _shapes(GateFusion(s.llm.hidden, s.tts.hidden))
    # (full name, shape, fill) in file order; each shard is made and written on its own.
    entries: list[tuple[str, tuple[int, ...], object]] = []
    llm_special = _llm_special(init, tied=s.llm.tie)
    for k, shp in _qwen_shapes(cfg).items():
        entries.append((k, shp, lambda k=k, shp=shp: _fill({k: shp}, init, special=llm_special)[k]))
    for k, t in ws.items():
        entries.append(("model.speech_encoder." + k, tuple(t.shape), lambda t=t: t.float()))
    for k, shp in proj.items():
        entries.append(("model.speech_projector." + k, shp, lambda k=k, shp=shp: _fill({k: shp}, init, "model.speech_projector.")["model.speech_projector." + k]))
    tts_special = _tts_special(init, first_unit, N_UNITS)
    for k, shp in _qwen_shapes(tts_cfg).items():
        entries.append(("speech_generator.model." + k, shp,
                        lambda k=k, shp=shp: _fill({k: shp}, init, "speech_generator.model.", special=tts_special)["speech_generator.model." + k]))
    for k, shp in fusion.items():
        entries.append(("speech_generator." + k, shp, lambda k=k, shp=shp: _fill({k: shp}, init, "speech_generator.")["speech_generator." + k]))
    shards: list[list] = [[]]
    size = 0
    for e in entries:
        nbytes = 2 * math.prod(e[1])
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += nbytes
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, start=1):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, _, make in shard:
            t = make().to(torch.bfloat16).contiguous()
            tensors[name] = t
            weight_map[name] = fname
            total += t.numel() * 2
        save_file(tensors, str(model_dir / fname), metadata={"format": "pt"})
        del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (model_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _write_decoder_dir(dec: Path, s: Shape, init: _Init) -> None:
    dec.mkdir(parents=True)
    (dec / "cosyvoice.yaml").write_text(cosyvoice_yaml(s.flow, s.hift))
    with torch.device("meta"):
        flow_shapes = _shapes(CausalMaskedDiffWithXvec(s.flow))

    def flow_special(name: str, shape):
        if name == "input_embedding.weight":
            return init("flow." + name, shape, "normal", 1.0)
        if name.endswith(("pos_bias_u", "pos_bias_v")):
            return init("flow." + name, shape, "normal", 0.1)
        return None

    torch.save(_fill(flow_shapes, init, "", special=flow_special), dec / "flow.pt")
    torch.save(_hift_state(s.hift, init), dec / "hift.pt")
    torch.save({}, dec / "spk2info.pt")
    _small_onnx(_CampPlusStandIn(init), (torch.zeros(1, 100, 80),), dec / "campplus.onnx", ["input"], ["output"], {"input": {1: "frames"}})
    _small_onnx(_TokenizerStandIn(init), (torch.zeros(1, 128, 400), torch.tensor([400])), dec / "speech_tokenizer_v2.onnx",
                ["feats", "feats_length"], ["indices"], {"feats": {2: "frames"}, "indices": {1: "tokens"}})
    blank = dec / "CosyVoice-BlankEN"
    tok = qwen25_tokenizer()
    write_tokenizer(blank, tok, tokenizer_config(tok, eos="<|endoftext|>", chat_template=None, max_length=32768))
    (blank / "config.json").write_text(json.dumps(qwen_dict(_QWEN05, 151936, {"eos_token_id": 151643}), indent=2))
    (blank / "generation_config.json").write_text(json.dumps({"bos_token_id": 151643, "eos_token_id": 151643}, indent=2))
