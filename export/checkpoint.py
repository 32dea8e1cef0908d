"""Load a LLaMA-Omni release exactly as a user who downloaded it has it on disk.

Layout (from the official README, ictnlp/LLaMA-Omni)::

    ROOT/Llama-3.1-8B-Omni/          HF dir: config.json, tokenizer files, *.safetensors (+ index)
    ROOT/models/speech_encoder/large-v3.pt   openai-whisper checkpoint {"dims", "model_state_dict"}
    ROOT/vocoder/g_00500000 + config.json    fairseq unit HiFi-GAN {"generator": state dict}

Which file wins, per tensor group, as the official code loads a release (``load_pretrained_model``:
``from_pretrained`` with the transformers it pins, which builds the model, then copies every tensor of
the checkpoint's state dict over it, non-strict):

- Whisper encoder: ``__init__`` builds it from the ``.pt`` named by config.json ``speech_encoder``
  (``whisper.load_model(...).encoder``: dims and weights), then ``from_pretrained`` overwrites it
  with ``model.speech_encoder.*`` from the safetensors, which ``save_pretrained`` writes. So per tensor:
  the safetensors copy when present, the ``.pt`` otherwise; the dims (head count included) from the
  ``.pt`` when it is there. ``--speech-encoder`` only changes where that ``.pt`` is.
- ``model.speech_projector.*``, ``speech_generator.*`` (CTC decoder) and the Llama LLM: built with
  random weights, then the safetensors copy. It is their only source, so a missing tensor is refused
  (the official code would run it randomly initialised, with a warning).
- Unit vocoder: ``vocoder/g_00500000`` only (not part of the HF model).
Every tensor is checked against the shape the config implies; a mismatch names tensor, file, shape.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM

from omnilite.runtime.errors import CheckpointError

from .ctc_generator import SpeechGeneratorCTC
from .speech_encoder import AudioEncoder, ConcatAdapter, EncoderWithAdapter
from .unit_vocoder import CodeHiFiGAN, fold_weight_norm

log = logging.getLogger(__name__)

MODEL_TYPE = "omni_speech2s_llama"
DEFAULT_MODEL_DIR = "Llama-3.1-8B-Omni"
DEFAULT_ENCODER = Path("models/speech_encoder/large-v3.pt")
DEFAULT_VOCODER_DIR = Path("vocoder")
VOCODER_CKPT = "g_00500000"


def read_config(path: Path) -> dict:
    """A release's JSON config file, or one sentence saying it is damaged."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
        raise CheckpointError(f"{path} is not valid JSON ({getattr(e, 'msg', e)}); download it again from the release.") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} holds a JSON {type(config).__name__}, not an object; download it again from the release.")
    return config


class SafetensorsDir(Mapping):
    """Lazy name -> tensor view over a HF safetensors dir (single file or sharded with an index)."""

    def __init__(self, model_dir: Path):
        self.dir = model_dir
        index = model_dir / "model.safetensors.index.json"
        if index.exists():
            self.listed = dict(json.loads(index.read_text())["weight_map"])
        elif (model_dir / "model.safetensors").exists():
            self.listed = {}
        else:
            raise CheckpointError(
                f"{model_dir} has no model.safetensors or model.safetensors.index.json; "
                "download the complete model directory."
            )
        shards = sorted(set(self.listed.values())) or ["model.safetensors"]
        self.where: dict[str, str] = {}
        for shard in shards:
            if not (model_dir / shard).exists():
                raise CheckpointError(f"{model_dir / shard} is missing (listed in the index); download it again.")
            try:
                with safe_open(model_dir / shard, "pt") as f:  # reads the header only
                    self.where.update({k: shard for k in f.keys()})
            except Exception as e:  # noqa: BLE001 - a damaged header surfaces as several error types
                raise CheckpointError(f"{model_dir / shard} is not a readable safetensors file ({e}); download it again.") from None
        self._default_shard = shards[0]

    def __getitem__(self, name: str) -> torch.Tensor:
        with safe_open(self.dir / self.where[name], "pt") as f:
            return f.get_tensor(name)

    def shape(self, name: str) -> tuple[int, ...]:
        with safe_open(self.dir / self.where[name], "pt") as f:  # header only
            return tuple(f.get_slice(name).get_shape())

    def file_of(self, name: str) -> str:
        """The file that holds (or, per the index, should hold) `name`."""
        return str(self.dir / self.where.get(name, self.listed.get(name, self._default_shard)))

    def __iter__(self) -> Iterator[str]:
        return iter(self.where)

    def __len__(self) -> int:
        return len(self.where)


class LazyTensor:
    """A safetensors entry that knows its shape and becomes a float32 array under np.asarray."""

    def __init__(self, source: SafetensorsDir, name: str):
        self.source, self.name = source, name
        self.shape = source.shape(name)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return self.source[self.name].to(torch.float32).numpy().astype(dtype or np.float32, copy=False)


ENCODER_PREFIX = "model.speech_encoder."
# Every released Whisper size has 64-wide heads; used only when no .pt gives the dims.
_WHISPER_HEADS = {384: 6, 512: 8, 768: 12, 1024: 16, 1280: 20}


class WhisperWeights(Mapping):
    """The speech encoder's tensors (Whisper names, no prefix) as the official loader ends up with
    them: the safetensors copy (``model.speech_encoder.*``) over the ``.pt``'s ``encoder.*``."""

    def __init__(self, tensors: SafetensorsDir, pt_path: Path | None, pt_state: Mapping | None):
        self.tensors, self.pt_path, self.pt_state = tensors, pt_path, pt_state or {}
        self.saved = [n[len(ENCODER_PREFIX):] for n in tensors if n.startswith(ENCODER_PREFIX)]
        saved = set(self.saved)
        self.from_pt = [n[len("encoder."):] for n in self.pt_state if n.startswith("encoder.") and n[len("encoder."):] not in saved]

    def __getitem__(self, name: str) -> torch.Tensor:
        if ENCODER_PREFIX + name in self.tensors.where:
            return self.tensors[ENCODER_PREFIX + name]
        return self.pt_state["encoder." + name]

    def __contains__(self, name: object) -> bool:
        return ENCODER_PREFIX + str(name) in self.tensors.where or "encoder." + str(name) in self.pt_state

    def __iter__(self) -> Iterator[str]:
        return iter(self.saved + self.from_pt)

    def __len__(self) -> int:
        return len(self.saved) + len(self.from_pt)

    def file_of(self, name: str) -> str:
        if ENCODER_PREFIX + name in self.tensors.where or self.pt_path is None:
            return self.tensors.file_of(ENCODER_PREFIX + name)
        return str(self.pt_path)

    def source(self) -> str:
        """Where the encoder's weights come from, for the manifest and `omnilite info`."""
        if self.saved and not self.from_pt:
            return "safetensors (model.speech_encoder.*)"
        if not self.saved:
            return f"{self.pt_path.name} (encoder.*)" if self.pt_path else "none"
        return f"safetensors (model.speech_encoder.*, {len(self.saved)} tensors) over {self.pt_path.name} ({len(self.from_pt)} tensors)"

    def dims(self, pt_dims: Mapping | None) -> dict:
        """Whisper dims: the .pt's (as the official code reads them), else read off the saved tensors."""
        if pt_dims is not None:
            return dict(pt_dims)
        t, p = self.tensors, ENCODER_PREFIX
        if p + "conv1.weight" not in t.where or p + "positional_embedding" not in t.where:
            raise CheckpointError(f"{t.dir} holds no complete model.speech_encoder.* and no Whisper .pt was found; "
                                  "download large-v3.pt as the README says or pass --speech-encoder.")
        n_state, n_mels, _ = t.shape(p + "conv1.weight")
        if n_state not in _WHISPER_HEADS:
            raise CheckpointError(f"the Whisper encoder in {t.dir} has width {n_state}, which no released Whisper has, so its "
                                  "head count is unknown; pass --speech-encoder with the matching .pt (its dims give the heads).")
        return {"n_mels": n_mels, "n_audio_ctx": t.shape(p + "positional_embedding")[0], "n_audio_state": n_state,
                "n_audio_head": _WHISPER_HEADS[n_state],
                "n_audio_layer": len({n.split(".")[3] for n in t.where if n.startswith(p + "blocks.")})}


def open_whisper_weights(tensors: SafetensorsDir, pt_path: Path | None, required: bool) -> tuple[WhisperWeights, dict]:
    """The encoder weights and dims of a release. ``pt_path`` is the .pt the config (or --speech-encoder)
    names; it is read when it exists, and must exist when ``required`` or the safetensors lack the encoder."""
    has_saved = any(n.startswith(ENCODER_PREFIX) for n in tensors.where)
    if pt_path is None or not pt_path.is_file():
        if required or not has_saved:
            raise CheckpointError(f"{pt_path} (Whisper-large-v3 encoder) is missing; download it as the README says "
                                  "or pass --speech-encoder.")
        weights = WhisperWeights(tensors, None, None)
        return weights, weights.dims(None)
    ckpt = _torch_load(pt_path)
    if not isinstance(ckpt, dict) or "dims" not in ckpt or "model_state_dict" not in ckpt:
        raise CheckpointError(f"{pt_path} is not an openai-whisper checkpoint (no 'dims'/'model_state_dict'); pass large-v3.pt.")
    weights = WhisperWeights(tensors, pt_path, ckpt["model_state_dict"])
    return weights, weights.dims(ckpt["dims"])


def _check_and_load(module: torch.nn.Module, source: Mapping, prefix: str, file_of, what: str, skip: set[str] = frozenset(),
                    dtype: torch.dtype = torch.float32) -> None:
    """Copy `prefix + name` tensors into `module` as `dtype`, refusing missing or misshaped tensors.
    A module built on the meta device takes the loaded tensors as its parameters (no second copy)."""
    expected = module.state_dict()
    loaded = {}
    for name, ref in expected.items():
        if name in skip:
            loaded[name] = ref
            continue
        full = prefix + name
        if full not in source:
            raise CheckpointError(
                f"{file_of(full)} is missing tensor '{full}' (expected shape {tuple(ref.shape)}) for the {what}; "
                "the checkpoint is incomplete or not a LLaMA-Omni release."
            )
        t = source[full]
        if tuple(t.shape) != tuple(ref.shape):
            raise CheckpointError(
                f"{file_of(full)}: tensor '{full}' has shape {tuple(t.shape)}, expected {tuple(ref.shape)} "
                f"from the {what} config; the checkpoint does not match its config.json."
            )
        loaded[name] = t.to(dtype)
    module.load_state_dict(loaded, strict=True, assign=any(p.is_meta for p in module.parameters()))


@dataclass
class LlamaOmniCheckpoint:
    """A validated LLaMA-Omni release: configs, paths, and the reference PyTorch modules (fp32)."""

    model_dir: Path
    encoder_path: Path | None  # the Whisper .pt read (None: the safetensors hold the whole encoder)
    vocoder_dir: Path
    config: dict
    whisper_dims: dict
    vocoder_config: dict
    llm_config: LlamaConfig = field(repr=False)
    tensors: SafetensorsDir = field(repr=False)

    # ----- discovery -----
    @classmethod
    def open(cls, path: str | Path, encoder: str | Path | None = None, vocoder: str | Path | None = None) -> "LlamaOmniCheckpoint":
        path = Path(path)
        if not path.exists():
            raise CheckpointError(f"{path} does not exist; pass the directory of the downloaded LLaMA-Omni release.")
        model_dir = path if (path / "config.json").exists() else path / DEFAULT_MODEL_DIR
        if not (model_dir / "config.json").exists():
            raise CheckpointError(
                f"{path} has no config.json (nor {DEFAULT_MODEL_DIR}/config.json); "
                "pass the HF model directory of the LLaMA-Omni release."
            )
        config = read_config(model_dir / "config.json")
        if config.get("model_type") != MODEL_TYPE:
            raise CheckpointError(
                f"{model_dir / 'config.json'} has model_type {config.get('model_type')!r}, not {MODEL_TYPE!r}; "
                "this exporter reads the LLaMA-Omni speech-to-speech release."
            )
        root = model_dir.parent
        voc = Path(vocoder) if vocoder else root / DEFAULT_VOCODER_DIR
        for p, what in ((voc / VOCODER_CKPT, "unit vocoder checkpoint"), (voc / "config.json", "unit vocoder config")):
            if not p.exists():
                raise CheckpointError(f"{p} ({what}) is missing; download it as the LLaMA-Omni README says or pass --vocoder.")
        tensors = SafetensorsDir(model_dir)
        named = Path(config.get("speech_encoder", str(DEFAULT_ENCODER)))
        enc = Path(encoder) if encoder else _first_existing([root / DEFAULT_ENCODER, model_dir / named, named])
        whisper, dims = open_whisper_weights(tensors, enc, required=bool(encoder))
        llm_config = LlamaConfig(**{k: v for k, v in config.items() if k not in ("model_type", "architectures")})
        self = cls(
            model_dir=model_dir,
            encoder_path=whisper.pt_path,
            vocoder_dir=voc,
            config=config,
            whisper_dims=dims,
            vocoder_config=read_config(voc / "config.json"),
            llm_config=llm_config,
            tensors=tensors,
        )
        self._whisper = whisper
        self.encoder_source = whisper.source()  # for the manifest and `omnilite info`
        return self

    def release_whisper_state(self) -> None:
        """Drop the whole-Whisper state dict (encoder and decoder, 3 GB for large-v3) once the
        encoder is built; `speech_encoder` cannot be called again afterwards."""
        self._whisper = None

    # ----- reference modules -----
    def speech_encoder(self) -> EncoderWithAdapter:
        d = self.whisper_dims
        if d["n_audio_state"] != self.config.get("speech_encoder_hidden_size", 1280):
            raise CheckpointError(
                f"the Whisper encoder ({self.encoder_source}) has width {d['n_audio_state']} but config.json says "
                f"speech_encoder_hidden_size={self.config.get('speech_encoder_hidden_size')}; use the matching Whisper checkpoint."
            )
        encoder = AudioEncoder(d["n_mels"], d["n_audio_ctx"], d["n_audio_state"], d["n_audio_head"], d["n_audio_layer"])
        if self._whisper is None:
            raise CheckpointError("the Whisper weights were released after the encoder was built; open the checkpoint again.")
        _check_and_load(encoder, self._whisper, "", self._whisper.file_of, "Whisper encoder")
        adapter = ConcatAdapter(self.config.get("speech_encoder_ds_rate", 5), d["n_audio_state"], self.config["hidden_size"])
        _check_and_load(adapter, self.tensors, "model.speech_projector.", self.tensors.file_of, "speech projector")
        return EncoderWithAdapter(encoder, adapter).eval()

    def llm(self, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
        """The reference LLM in fp32 (parity), or in bfloat16 where fp32 does not fit in memory (the
        benchmark baseline of an 8B model): built on the meta device, so only the loaded weights exist."""
        skip = {"lm_head.weight"} if self.llm_config.tie_word_embeddings else set()
        if dtype == torch.float32:
            model = LlamaForCausalLM(self.llm_config)
            _check_and_load(model, self.tensors, "", self.tensors.file_of, "Llama LLM", skip=skip)
        else:
            with torch.device("meta"):
                model = LlamaForCausalLM(self.llm_config)
            _check_and_load(model, self.tensors, "", self.tensors.file_of, "Llama LLM", dtype=dtype)
            model.model.rotary_emb = type(model.model.rotary_emb)(config=self.llm_config)  # its buffers were meta
        if skip:
            model.tie_weights()
        return model.eval()

    def llm_parameters(self) -> int:
        with torch.device("meta"):
            return sum(p.numel() for p in LlamaForCausalLM(self.llm_config).parameters())

    def llm_tensors(self) -> dict[str, "LazyTensor"]:
        """HF-named LLM tensors for the GGUF writer: each is read (as float32) only when converted,
        so an 8B checkpoint is never held in memory at once."""
        self.llm_shapes_ok()
        names = [n for n in self.tensors if not n.startswith(("model.speech_", "speech_generator."))]
        return {n: LazyTensor(self.tensors, n) for n in names}

    def llm_shapes_ok(self) -> None:
        with torch.device("meta"):
            model = LlamaForCausalLM(self.llm_config)
        for name, ref in model.state_dict().items():
            if self.llm_config.tie_word_embeddings and name == "lm_head.weight":
                continue
            if name not in self.tensors:
                raise CheckpointError(
                    f"{self.tensors.file_of(name)} is missing tensor '{name}' (expected shape {tuple(ref.shape)}) "
                    "for the Llama LLM; the checkpoint is incomplete."
                )

    def speech_generator(self) -> SpeechGeneratorCTC:
        c = self.config
        if c.get("speech_generator_type", "ctc") != "ctc":
            raise CheckpointError(f"{self.model_dir / 'config.json'}: speech_generator_type {c.get('speech_generator_type')!r} is not 'ctc'.")
        gen = SpeechGeneratorCTC(
            self.llm_config, c.get("ctc_decoder_config", "(2,4096,32,11008)"), int(c.get("ctc_upsample_factor", 25)), int(c.get("unit_vocab_size", 1000))
        )
        _check_and_load(gen, self.tensors, "speech_generator.", self.tensors.file_of, "CTC speech generator")
        return gen.eval()

    def vocoder(self) -> CodeHiFiGAN:
        path = self.vocoder_dir / VOCODER_CKPT
        state = _torch_load(path)
        if isinstance(state, dict) and "generator" in state:
            state = state["generator"]
        voc = CodeHiFiGAN(self.vocoder_config)
        _check_and_load(voc, fold_weight_norm(state), "", lambda _: str(path), "unit vocoder")
        return voc.eval()


def _first_existing(paths: list[Path]) -> Path | None:
    for p in paths:
        if str(p) and p.is_file():
            return p
    return paths[0]


def _torch_load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same thing to the user
        raise CheckpointError(f"{path} cannot be read as a PyTorch checkpoint ({type(e).__name__}); download it again.") from None
