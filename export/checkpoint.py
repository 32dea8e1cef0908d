"""Load a LLaMA-Omni release exactly as a user who downloaded it has it on disk.

Layout (from the official README, ictnlp/LLaMA-Omni)::

    ROOT/Llama-3.1-8B-Omni/          HF dir: config.json, tokenizer files, *.safetensors (+ index)
    ROOT/models/speech_encoder/large-v3.pt   openai-whisper checkpoint {"dims", "model_state_dict"}
    ROOT/vocoder/g_00500000 + config.json    fairseq unit HiFi-GAN {"generator": state dict}

The HF safetensors hold the Llama LLM, ``model.speech_projector.*`` and ``speech_generator.*``.
Like the official loader, the Whisper encoder weights come from the whisper checkpoint.
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
    encoder_path: Path
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
        config = json.loads((model_dir / "config.json").read_text())
        if config.get("model_type") != MODEL_TYPE:
            raise CheckpointError(
                f"{model_dir / 'config.json'} has model_type {config.get('model_type')!r}, not {MODEL_TYPE!r}; "
                "this exporter reads the LLaMA-Omni speech-to-speech release."
            )
        root = model_dir.parent
        enc = Path(encoder) if encoder else _first_existing(
            [root / DEFAULT_ENCODER, model_dir / config.get("speech_encoder", str(DEFAULT_ENCODER)), Path(config.get("speech_encoder", ""))]
        )
        voc = Path(vocoder) if vocoder else root / DEFAULT_VOCODER_DIR
        for p, what, flag in ((enc, "Whisper encoder checkpoint", "--speech-encoder"), (voc / VOCODER_CKPT, "unit vocoder checkpoint", "--vocoder"), (voc / "config.json", "unit vocoder config", "--vocoder")):
            if p is None or not p.exists():
                raise CheckpointError(f"{p} ({what}) is missing; download it as the LLaMA-Omni README says or pass {flag}.")
        ckpt_enc = _torch_load(enc)
        if not isinstance(ckpt_enc, dict) or "dims" not in ckpt_enc or "model_state_dict" not in ckpt_enc:
            raise CheckpointError(f"{enc} is not an openai-whisper checkpoint (no 'dims'/'model_state_dict'); pass large-v3.pt.")
        llm_config = LlamaConfig(**{k: v for k, v in config.items() if k not in ("model_type", "architectures")})
        self = cls(
            model_dir=model_dir,
            encoder_path=enc,
            vocoder_dir=voc,
            config=config,
            whisper_dims=dict(ckpt_enc["dims"]),
            vocoder_config=json.loads((voc / "config.json").read_text()),
            llm_config=llm_config,
            tensors=SafetensorsDir(model_dir),
        )
        self._whisper_state = ckpt_enc["model_state_dict"]
        return self

    def release_whisper_state(self) -> None:
        """Drop the whole-Whisper state dict (encoder and decoder, 3 GB for large-v3) once the
        encoder is built; `speech_encoder` cannot be called again afterwards."""
        self._whisper_state = None

    # ----- reference modules -----
    def speech_encoder(self) -> EncoderWithAdapter:
        d = self.whisper_dims
        if d["n_audio_state"] != self.config.get("speech_encoder_hidden_size", 1280):
            raise CheckpointError(
                f"{self.encoder_path} has width {d['n_audio_state']} but config.json says speech_encoder_hidden_size="
                f"{self.config.get('speech_encoder_hidden_size')}; use the matching Whisper checkpoint."
            )
        encoder = AudioEncoder(d["n_mels"], d["n_audio_ctx"], d["n_audio_state"], d["n_audio_head"], d["n_audio_layer"])
        if self._whisper_state is None:
            raise CheckpointError("the Whisper weights were released after the encoder was built; open the checkpoint again.")
        _check_and_load(encoder, self._whisper_state, "encoder.", lambda _: str(self.encoder_path), "Whisper encoder")
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
