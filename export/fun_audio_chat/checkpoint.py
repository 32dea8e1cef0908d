"""Open a downloaded Fun-Audio-Chat release, check it against its config.json, and build the
PyTorch reference from it; `open_cosyvoice3` does the same for its vocoder dir
(``Fun-CosyVoice3-0.5B-2512``: cosyvoice3.yaml, flow.pt, hift.pt) and the voice file
``utils/new_spk2info.pt``.

Accepts the model dir itself (``Fun-Audio-Chat-8B/``) or the folder holding it (e.g. the
official ``pretrained_models/``). Every tensor the config implies is checked for presence and
shape from the safetensors headers before any weight is read; a problem is one sentence naming
the file, the tensor and the fix (CheckpointError).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from omnilite.runtime.errors import CheckpointError

from ..checkpoint import SafetensorsDir, _torch_load, read_config
from ..omni2.cosy_yaml import load_cosyvoice_yaml
from ..omni2.flow import fixed_noise
from .config import AUDIO_MODEL_TYPE, MODEL_DIR, MODEL_TYPE, SPK2INFO, SPK2INFO_VOICE, VOCODER_DIR, VOCODER_YAML
from .reference import FunAudioChatReference, expected_shapes, materialize_buffers
from .vocoder_reference import NOISE_FRAMES, CausalHiFT, CausalHiFTConfig, CausalMaskedDiffWithDiT, DiTFlowConfig

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer_config.json", "vocab.json", "merges.txt")


@dataclass
class FunAudioChatCheckpoint:
    model_dir: Path
    config: dict
    shapes: dict[str, tuple[int, ...]]  # every stored tensor, checked
    spk2info: Path | None  # utils/new_spk2info.pt when it sits next to the model dir
    tensors: SafetensorsDir = field(repr=False)

    @property
    def audio_config(self) -> dict:
        return self.config["audio_config"]

    @property
    def text_config(self) -> dict:
        return self.config["text_config"]

    def reference(self, dtype: torch.dtype = torch.float32, language_model: bool = True) -> FunAudioChatReference:
        """The whole model with the release's weights as `dtype` (eval mode). Without `language_model`
        the LLM stays unloaded (on the meta device): the audio towers and the speech head alone are
        1.2B parameters, while the 8B LLM in f32 (33 GB) does not fit a 24 GB machine."""
        with torch.device("meta"):
            model = FunAudioChatReference(self.config)
        names = [n for n in self.shapes if language_model or not n.startswith("language_model.")]
        state = {name: self.tensors[name].to(dtype) for name in names}
        state["audio_invert_tower.lm_head.weight"] = state["audio_tower.embed_tokens.weight"]
        if language_model and "language_model.lm_head.weight" not in state:
            state["language_model.lm_head.weight"] = state["language_model.model.embed_tokens.weight"]
        if language_model:
            model.load_state_dict(state, strict=True, assign=True)
        else:
            for child, module in model.named_children():
                if child != "language_model":
                    module.load_state_dict({k[len(child) + 1:]: v for k, v in state.items() if k.startswith(child + ".")},
                                           strict=True, assign=True)
        materialize_buffers(model, dtype)
        model.audio_invert_tower.lm_head.weight = model.audio_tower.embed_tokens.weight
        return model.eval()


def _find_model_dir(root: Path) -> Path:
    if not root.exists():
        raise CheckpointError(f"{root} does not exist; pass the downloaded {MODEL_DIR} directory or the folder that holds it.")
    for cand in (root, root / MODEL_DIR):
        if (cand / "config.json").exists():
            return cand
    raise CheckpointError(f"{root} has no config.json (nor {MODEL_DIR}/config.json); pass the downloaded {MODEL_DIR} directory.")


def _check_config(model_dir: Path, config: dict) -> None:
    where = model_dir / "config.json"
    if config.get("model_type") != MODEL_TYPE:
        raise CheckpointError(f"{where} has model_type {config.get('model_type')!r}, not {MODEL_TYPE!r}; this loader reads Fun-Audio-Chat releases.")
    for key in ("audio_config", "text_config"):
        if not isinstance(config.get(key), dict):
            raise CheckpointError(f"{where} has no {key!r} object; the config is incomplete, download it again.")
    audio, text = config["audio_config"], config["text_config"]
    if audio.get("model_type", AUDIO_MODEL_TYPE) != AUDIO_MODEL_TYPE:
        raise CheckpointError(f"{where} has audio_config.model_type {audio['model_type']!r}, not {AUDIO_MODEL_TYPE!r}; it is not a Fun-Audio-Chat config.")
    if text.get("model_type") != "qwen3":
        raise CheckpointError(f"{where} has text_config.model_type {text.get('model_type')!r}, not 'qwen3'; it is not a Fun-Audio-Chat config.")
    needed = {"audio_config": ("num_mel_bins", "d_model", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim", "n_window",
                               "max_source_positions", "output_dim", "codebook_size", "group_size", "pad_token_id",
                               "bos_token_id", "eos_token_id", "continuous_features_mode", "crq_transformer_config"),
              "text_config": ("hidden_size", "num_hidden_layers", "vocab_size", "audio_bos_index", "audio_eos_index", "sil_index")}
    for part, keys in needed.items():
        for key in keys:
            if config[part].get(key) is None:
                raise CheckpointError(f"{where} lacks {part}.{key}; the config is incomplete, download it again.")
    if audio["output_dim"] != text["hidden_size"]:
        raise CheckpointError(f"{where} has audio_config.output_dim {audio['output_dim']} but text_config.hidden_size "
                              f"{text['hidden_size']}; audio features must have the LLM's width, download the config again.")
    if audio["continuous_features_mode"] != "replace":
        raise CheckpointError(f"{where} has continuous_features_mode {audio['continuous_features_mode']!r}; only the released 'replace' mode is supported.")
    if not audio.get("enable_audio_invert_tower", True):
        raise CheckpointError(f"{where} disables the audio_invert_tower (speech head); this runtime needs a speech-output release.")


def open_fun_audio_chat(root: str | Path) -> FunAudioChatCheckpoint:
    """Validate the release under `root` (files, config, every tensor's name and shape)."""
    model_dir = _find_model_dir(Path(root))
    config = read_config(model_dir / "config.json")
    _check_config(model_dir, config)
    for name in ("processor_config.json", *TOKENIZER_FILES):
        if not (model_dir / name).exists():
            raise CheckpointError(f"{model_dir / name} is missing; download the complete {MODEL_DIR} directory.")
    tensors = SafetensorsDir(model_dir)
    shapes = expected_shapes(config)
    for name, want in shapes.items():
        if name not in tensors.where:
            raise CheckpointError(f"{tensors.file_of(name)} is missing tensor '{name}' (expected shape {want}); "
                                  f"the {MODEL_DIR} download is incomplete, download it again.")
        got = tensors.shape(name)
        if got != want:
            raise CheckpointError(f"{tensors.file_of(name)}: tensor '{name}' has shape {got}, expected {want} from config.json; "
                                  "the weights do not match their config, download both again.")
    spk = model_dir.parent / SPK2INFO
    return FunAudioChatCheckpoint(model_dir, config, shapes, spk if spk.exists() else None, tensors)


# ----------------------------------------------------------------------------- the vocoder dir


@dataclass
class CosyVoice3Checkpoint:
    vocoder_dir: Path
    flow_config: DiTFlowConfig
    hift_config: CausalHiFTConfig
    spk2info: Path
    flow_state: dict = field(repr=False)  # flow.pt, checked
    hift_state: dict = field(repr=False)  # hift.pt with weight norm folded, checked

    def flow(self) -> CausalMaskedDiffWithDiT:
        with torch.device("meta"):
            model = CausalMaskedDiffWithDiT(self.flow_config)
        model.load_state_dict({k: v.float() for k, v in self.flow_state.items()}, strict=True, assign=True)
        model.register_buffer("noise", fixed_noise(NOISE_FRAMES, self.flow_config.output_size), persistent=False)  # was on meta
        return model.eval()

    def hift(self) -> CausalHiFT:
        model = CausalHiFT(self.hift_config)
        model.load_state_dict({k: v.float() for k, v in self.hift_state.items()}, strict=True)
        return model.eval()

    def speaker_embedding(self, voice: str = SPK2INFO_VOICE) -> torch.Tensor:
        """The voice's 192-d embedding, (1, 192) f32, as the official detokenizer reads it."""
        voices = _torch_load(self.spk2info)
        if not isinstance(voices, dict) or voice not in voices:
            have = ", ".join(map(str, voices)) if isinstance(voices, dict) else "no voices"
            raise CheckpointError(f"{self.spk2info} has no voice {voice!r} (it has {have}); pick one of those or download the file again.")
        emb = voices[voice].get("embedding") if isinstance(voices[voice], dict) else None
        if not isinstance(emb, torch.Tensor) or emb.numel() != self.flow_config.spk_embed_dim:
            raise CheckpointError(f"{self.spk2info}: voice {voice!r} has no {self.flow_config.spk_embed_dim}-value 'embedding'; "
                                  "download the file again.")
        return emb.reshape(1, -1).float()


def _find_vocoder_dir(root: Path) -> Path:
    if not root.exists():
        raise CheckpointError(f"{root} does not exist; pass the downloaded {VOCODER_DIR} directory or the folder that holds it.")
    for cand in (root, root / VOCODER_DIR, root.parent / VOCODER_DIR):
        if (cand / VOCODER_YAML).exists():
            return cand
    raise CheckpointError(f"{root} has no {VOCODER_YAML} (nor {VOCODER_DIR}/{VOCODER_YAML}); pass the downloaded {VOCODER_DIR} directory.")


def _section(y: dict, key: str, cls: str, path: Path) -> dict:
    part = y.get(key)
    if not isinstance(part, dict) or not str(part.get("__class__", "")).endswith(cls):
        got = part.get("__class__") if isinstance(part, dict) else None
        raise CheckpointError(f"{path} has {key} {got!r}, not {cls}; it is not a CosyVoice3 config, download {VOCODER_DIR} again.")
    return part


def vocoder_configs(y: dict, path: Path) -> tuple[DiTFlowConfig, CausalHiFTConfig]:
    """The flow and HiFT settings of a parsed cosyvoice3.yaml (keys as in examples/libritts/cosyvoice3/conf)."""
    f = _section(y, "flow", "CausalMaskedDiffWithDiT", path)
    h = _section(y, "hift", "CausalHiFTGenerator", path)
    try:
        look, cfm = f["pre_lookahead_layer"], f["decoder"]
        est, params = cfm["estimator"], cfm["cfm_params"]
        params = params.get("content", params)  # omegaconf.DictConfig wraps its values in "content"
        flow = DiTFlowConfig(
            vocab_size=int(f["vocab_size"]), input_size=int(f["input_size"]), output_size=int(f["output_size"]),
            spk_embed_dim=int(f["spk_embed_dim"]), token_mel_ratio=int(f["token_mel_ratio"]), pre_lookahead_len=int(f["pre_lookahead_len"]),
            lookahead_channels=int(look["channels"]), dim=int(est["dim"]), depth=int(est["depth"]), heads=int(est["heads"]),
            dim_head=int(est["dim_head"]), ff_mult=int(est["ff_mult"]), static_chunk_size=int(est["static_chunk_size"]),
            inference_cfg_rate=float(params["inference_cfg_rate"]), t_scheduler=str(params["t_scheduler"]))
        widths = {"pre_lookahead_layer.in_channels": int(look["in_channels"]), "estimator.mel_dim": int(est["mel_dim"]),
                  "estimator.mu_dim": int(est["mu_dim"]), "estimator.spk_dim": int(est["spk_dim"]), "estimator.out_channels": int(est["out_channels"])}
        hift = CausalHiFTConfig(
            in_channels=int(h["in_channels"]), base_channels=int(h["base_channels"]), nb_harmonics=int(h["nb_harmonics"]),
            sampling_rate=int(h["sampling_rate"]), nsf_alpha=float(h["nsf_alpha"]), nsf_sigma=float(h["nsf_sigma"]),
            nsf_voiced_threshold=float(h["nsf_voiced_threshold"]), upsample_rates=tuple(int(v) for v in h["upsample_rates"]),
            upsample_kernel_sizes=tuple(int(v) for v in h["upsample_kernel_sizes"]), n_fft=int(h["istft_params"]["n_fft"]),
            hop_len=int(h["istft_params"]["hop_len"]), resblock_kernel_sizes=tuple(int(v) for v in h["resblock_kernel_sizes"]),
            resblock_dilation_sizes=tuple(tuple(int(v) for v in d) for d in h["resblock_dilation_sizes"]),
            source_resblock_kernel_sizes=tuple(int(v) for v in h["source_resblock_kernel_sizes"]),
            source_resblock_dilation_sizes=tuple(tuple(int(v) for v in d) for d in h["source_resblock_dilation_sizes"]),
            lrelu_slope=float(h["lrelu_slope"]), audio_limit=float(h["audio_limit"]), conv_pre_look_right=int(h["conv_pre_look_right"]),
            f0_cond_channels=int(h["f0_predictor"]["cond_channels"]))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path} lacks the vocoder setting {e}; the config is incomplete, download {VOCODER_DIR} again.") from None
    for key, width in widths.items():
        if width != flow.output_size:
            raise CheckpointError(f"{path} has flow {key} {width} but output_size {flow.output_size}; the flow's widths disagree, "
                                  f"download {VOCODER_DIR} again.")
    if flow.input_size != flow.output_size:
        raise CheckpointError(f"{path} has flow input_size {flow.input_size} but output_size {flow.output_size}; CosyVoice3's mu is the "
                              "token embedding itself, so they must match.")
    return flow, hift


def _fold_hift(state: dict, path: Path) -> tuple[dict, dict]:
    """hift.pt -> plain weights: a ``generator.`` prefix (a HiFiGan save) is dropped and each weight-norm
    pair (``weight_g``/``weight_v`` or ``parametrizations.weight.original0/1``) folded. Also returns
    each plain name's stored name, for messages."""
    named, origin = {}, {}
    for key, t in state.items():
        name = key[len("generator."):] if key.startswith("generator.") else key
        name = name.replace(".parametrizations.weight.original0", ".weight_g").replace(".parametrizations.weight.original1", ".weight_v")
        named[name], origin[name] = t, key
    out = {}
    for name, t in named.items():
        if name.endswith(".weight_g"):
            continue
        if not name.endswith(".weight_v"):
            out[name] = t
            continue
        base = name[: -len(".weight_v")]
        g = named.get(base + ".weight_g")
        want = (t.shape[0],) + (1,) * (t.dim() - 1)
        if g is None or tuple(g.shape) != want:
            what = "is missing" if g is None else f"has shape {tuple(g.shape)}"
            raise CheckpointError(f"{path}: the weight-norm gain of '{origin[name]}' {what} (expected {want}); download hift.pt again.")
        norm = t.float().flatten(1).norm(dim=1).view(want)
        out[base + ".weight"] = g.float() * t.float() / norm
        origin[base + ".weight"] = origin[name]
    return out, origin


def _check_state(module: torch.nn.Module, state: dict, origin: dict, path: Path, yaml_path: Path) -> dict:
    expected = module.state_dict()
    for name, ref in expected.items():
        if name not in state:
            raise CheckpointError(f"{path} is missing tensor '{name}' (expected shape {tuple(ref.shape)}); "
                                  f"the download is incomplete, download {VOCODER_DIR} again.")
        got = tuple(state[name].shape)
        if got != tuple(ref.shape):
            raise CheckpointError(f"{path}: tensor '{origin.get(name, name)}' has shape {got}, expected {tuple(ref.shape)} from "
                                  f"{yaml_path.name}; the weights do not match their config, download both again.")
    extra = sorted(set(state) - set(expected))
    if extra:
        log.warning("%s holds %d tensor(s) the reference does not use (first: %s)", path, len(extra), origin.get(extra[0], extra[0]))
    return {k: state[k] for k in expected}


def _find_spk2info(vocoder_dir: Path) -> Path:
    cands = [vocoder_dir.parent / SPK2INFO, vocoder_dir.parent.parent / SPK2INFO]
    for cand in cands:
        if cand.exists():
            return cand
    raise CheckpointError(f"neither {cands[0]} nor {cands[1]} exists; copy {SPK2INFO} from the Fun-Audio-Chat GitHub "
                          f"repository to {cands[0]}.")


def open_cosyvoice3(root: str | Path) -> CosyVoice3Checkpoint:
    """Validate the vocoder dir under `root` (the dir itself, the folder holding it, or the model dir
    next to it): cosyvoice3.yaml, every flow.pt / hift.pt tensor's name and shape, the voice file."""
    vocoder_dir = _find_vocoder_dir(Path(root))
    yaml_path = vocoder_dir / VOCODER_YAML
    flow_cfg, hift_cfg = vocoder_configs(load_cosyvoice_yaml(yaml_path), yaml_path)
    states = {}
    for file in ("flow.pt", "hift.pt"):
        if not (vocoder_dir / file).exists():
            raise CheckpointError(f"{vocoder_dir / file} is missing; download the complete {VOCODER_DIR} directory.")
        state = _torch_load(vocoder_dir / file)
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{vocoder_dir / file} is not a state dict of tensors; download it again.")
        states[file] = state
    with torch.device("meta"):
        flow, hift = CausalMaskedDiffWithDiT(flow_cfg), CausalHiFT(hift_cfg)
    flow_state = _check_state(flow, states["flow.pt"], {}, vocoder_dir / "flow.pt", yaml_path)
    hift_plain, origin = _fold_hift(states["hift.pt"], vocoder_dir / "hift.pt")
    hift_state = _check_state(hift, hift_plain, origin, vocoder_dir / "hift.pt", yaml_path)
    return CosyVoice3Checkpoint(vocoder_dir, flow_cfg, hift_cfg, _find_spk2info(vocoder_dir), flow_state, hift_state)
