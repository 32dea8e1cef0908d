"""Open a downloaded Fun-Audio-Chat release, check it against its config.json, and build the
PyTorch reference from it.

Accepts the model dir itself (``Fun-Audio-Chat-8B/``) or the folder holding it (e.g. the
official ``pretrained_models/``). Every tensor the config implies is checked for presence and
shape from the safetensors headers before any weight is read; a problem is one sentence naming
the file, the tensor and the fix (CheckpointError).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from omnilite.runtime.errors import CheckpointError

from ..checkpoint import SafetensorsDir, read_config
from .config import AUDIO_MODEL_TYPE, MODEL_DIR, MODEL_TYPE, SPK2INFO
from .reference import FunAudioChatReference, expected_shapes, materialize_buffers

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

    def reference(self, dtype: torch.dtype = torch.float32) -> FunAudioChatReference:
        """The whole model with the release's weights as `dtype` (eval mode)."""
        with torch.device("meta"):
            model = FunAudioChatReference(self.config)
        state = {name: self.tensors[name].to(dtype) for name in self.shapes}
        state["audio_invert_tower.lm_head.weight"] = state["audio_tower.embed_tokens.weight"]
        if "language_model.lm_head.weight" not in state:
            state["language_model.lm_head.weight"] = state["language_model.model.embed_tokens.weight"]
        model.load_state_dict(state, strict=True, assign=True)
        materialize_buffers(model)
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
