"""Load a LLaMA-Omni2 release exactly as a user who followed the official README has it on disk.

Layout (ictnlp/LLaMA-Omni2 README)::

    ROOT/models/LLaMA-Omni2-0.5B/          HF dir: config.json (model_type omni2_speech2s_qwen2, the TTS
                                           LM config nested under "speech_generator", "stream_params"),
                                           safetensors, Qwen2.5 tokenizer with <speech>, tts_tokenizer/
    ROOT/models/speech_encoder/large-v3.pt openai-whisper checkpoint
    ROOT/models/cosy2_decoder/             cosyvoice.yaml, flow.pt, hift.pt ("generator." prefix,
                                           weight-norm pairs), campplus.onnx, speech_tokenizer_v2.onnx,
                                           spk2info.pt, CosyVoice-BlankEN/

Tensor prefixes: the Qwen2 LLM at the top level (``model.*``, ``lm_head``), ``model.speech_encoder.*``
(Whisper encoder), ``model.speech_projector.linear{1,2}``, ``speech_generator.model.*`` (TTS
Qwen2ForCausalLM), ``speech_generator.input_proj.{0,2}``, ``speech_generator.gate.0``.

Which file wins, as the official ``load_pretrained_model`` (``from_pretrained`` under the transformers
it pins: build the model, then copy the checkpoint's tensors over it) leaves each group:
- Whisper encoder: built from the ``.pt`` named by config.json ``speech_encoder`` (dims and weights),
  then overwritten by ``model.speech_encoder.*`` from the safetensors; per tensor the safetensors copy
  wins, the dims come from the ``.pt`` when it exists (``export.checkpoint.open_whisper_weights``).
  ``--speech-encoder`` only says where that ``.pt`` is.
- Qwen2.5 LLM, speech projector, TTS LM (``speech_generator.model.*``) and gate fusion: random init,
  then the safetensors copy, their only source; a missing tensor is refused.
- Flow and HiFT: ``cosy2_decoder/flow.pt`` and ``hift.pt`` only (loaded by the CosyVoice2 code).
Every tensor is shape-checked against its config; a mismatch names the tensor, the file and both shapes.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from omnilite.runtime.errors import CheckpointError

from ..checkpoint import LazyTensor, SafetensorsDir, _check_and_load, _torch_load, open_whisper_weights, read_config
from ..speech_encoder import AudioEncoder, ConcatAdapter, EncoderWithAdapter
from ..unit_vocoder import fold_weight_norm
from .cosy_yaml import load_cosyvoice_yaml
from .flow import CausalMaskedDiffWithXvec, FlowConfig
from .hift import HiFT, HiFTConfig
from .tts import SpeechGenerator

log = logging.getLogger(__name__)

MODEL_TYPES = ("omni2_speech2s_qwen2",)
S2T_MODEL_TYPE = "omni2_speech_qwen2"
DECODER_DIR = Path("models/cosy2_decoder")
ENCODER_FILE = Path("models/speech_encoder/large-v3.pt")
_QWEN_KEYS_DROP = ("model_type", "architectures", "speech_generator", "stream_params")


def parse_stream_params(value: str | None) -> tuple[int, int]:
    """config "stream_params" is a string tuple "(R,W)" (the official code evals it)."""
    m = re.fullmatch(r"\s*\(\s*(\d+)\s*,\s*(\d+)\s*\)\s*", str(value or "(1,1)"))
    if not m:
        raise CheckpointError(f"config.json has stream_params {value!r}; expected a string like \"(3,10)\".")
    return int(m.group(1)), int(m.group(2))


def qwen_config(d: Mapping) -> Qwen2Config:
    cfg = Qwen2Config(**{k: v for k, v in d.items() if k not in _QWEN_KEYS_DROP and not k.startswith("speech_") and k not in (
        "unit_vocab_size", "tokenizer_model_max_length", "tokenizer_padding_side")})
    return cfg


def flow_config(y: dict, path: Path) -> FlowConfig:
    try:
        f = y["flow"]
        enc, cfm = f["encoder"], f["decoder"]
        est, params = cfm["estimator"], cfm["cfm_params"]
        params = params.get("content", params)  # omegaconf.DictConfig wraps its values in "content"
        return FlowConfig(
            vocab_size=int(f["vocab_size"]), input_size=int(f["input_size"]), output_size=int(f["output_size"]),
            spk_embed_dim=int(f["spk_embed_dim"]), token_mel_ratio=int(f.get("token_mel_ratio", 2)),
            pre_lookahead_len=int(f.get("pre_lookahead_len", 3)), input_frame_rate=int(f.get("input_frame_rate", 25)),
            attention_heads=int(enc["attention_heads"]), linear_units=int(enc["linear_units"]), num_blocks=int(enc["num_blocks"]),
            channels=tuple(int(c) for c in est["channels"]), attention_head_dim=int(est["attention_head_dim"]),
            n_blocks=int(est["n_blocks"]), num_mid_blocks=int(est["num_mid_blocks"]), num_heads=int(est["num_heads"]),
            inference_cfg_rate=float(params["inference_cfg_rate"]), t_scheduler=str(params.get("t_scheduler", "cosine")),
            # LLaMA-Omni2 sets the encoder chunk to 2 * input_frame_rate tokens at load time.
            chunk_tokens=2 * int(f.get("input_frame_rate", 25)),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path} lacks flow setting {e}; it is not a CosyVoice2 decoder config.") from None


def hift_config(y: dict, path: Path) -> HiFTConfig:
    try:
        h = y["hift"]
        return HiFTConfig(
            in_channels=int(h["in_channels"]), base_channels=int(h["base_channels"]), nb_harmonics=int(h["nb_harmonics"]),
            sampling_rate=int(h["sampling_rate"]), nsf_alpha=float(h["nsf_alpha"]), nsf_sigma=float(h["nsf_sigma"]),
            nsf_voiced_threshold=float(h["nsf_voiced_threshold"]), upsample_rates=tuple(h["upsample_rates"]),
            upsample_kernel_sizes=tuple(h["upsample_kernel_sizes"]), n_fft=int(h["istft_params"]["n_fft"]),
            hop_len=int(h["istft_params"]["hop_len"]), resblock_kernel_sizes=tuple(h["resblock_kernel_sizes"]),
            resblock_dilation_sizes=tuple(tuple(d) for d in h["resblock_dilation_sizes"]),
            source_resblock_kernel_sizes=tuple(h["source_resblock_kernel_sizes"]),
            source_resblock_dilation_sizes=tuple(tuple(d) for d in h["source_resblock_dilation_sizes"]),
            lrelu_slope=float(h["lrelu_slope"]), audio_limit=float(h["audio_limit"]),
            f0_cond_channels=int(h["f0_predictor"]["cond_channels"]),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path} lacks HiFT setting {e}; it is not a CosyVoice2 decoder config.") from None


def fast_tokenizer_dir(src: Path, scratch: Path) -> Path:
    """A directory with the tokenizer.json (and tokenizer_config.json) of the tokenizer saved in `src`.

    A tokenizer saved by a slow tokenizer's ``save_pretrained`` has only vocab.json + merges.txt +
    tokenizer_config.json (its added tokens in ``added_tokens_decoder``); the official code's
    ``AutoTokenizer.from_pretrained`` then builds the fast tokenizer from them, and so does this,
    into `scratch`, leaving the checkpoint untouched."""
    if (src / "tokenizer.json").exists():
        if not (src / "tokenizer_config.json").exists():
            raise CheckpointError(f"{src / 'tokenizer_config.json'} is missing; download the complete LLaMA-Omni2 model directory.")
        return src
    missing = [f for f in ("vocab.json", "merges.txt", "tokenizer_config.json") if not (src / f).exists()]
    if missing:
        raise CheckpointError(f"{src} has no tokenizer.json and no {' / '.join(missing)} to build it from; "
                              "download the complete LLaMA-Omni2 model directory.")
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(src))
    except Exception as e:  # noqa: BLE001 - malformed vocab/merges surface as several error types
        raise CheckpointError(f"the tokenizer in {src} cannot be built from vocab.json + merges.txt ({e}); download it again.") from None
    scratch.mkdir(parents=True)
    tok.backend_tokenizer.save(str(scratch / "tokenizer.json"))
    shutil.copyfile(src / "tokenizer_config.json", scratch / "tokenizer_config.json")
    log.info("built %s from the slow tokenizer files in %s", scratch / "tokenizer.json", src)
    return scratch


def _weight_norm_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torch's newer parametrized weight norm (``parametrizations.weight.original0/1``) -> weight_g/_v."""
    out = {}
    for k, v in state.items():
        k = k.replace(".parametrizations.weight.original0", ".weight_g").replace(".parametrizations.weight.original1", ".weight_v")
        out[k] = v
    return out


@dataclass
class Omni2Checkpoint:
    model_dir: Path
    decoder_dir: Path
    encoder_path: Path | None  # the Whisper .pt read (None: the safetensors hold the whole encoder)
    config: dict
    llm_config: Qwen2Config = field(repr=False)
    tts_config: Qwen2Config = field(repr=False)
    flow_config: FlowConfig = field(repr=False)
    hift_config: HiFTConfig = field(repr=False)
    cosy: dict = field(repr=False)
    tensors: SafetensorsDir = field(repr=False)
    whisper_dims: dict = field(default_factory=dict)
    tokenizer_dir: Path | None = None  # holds tokenizer.json: the model dir, or one built from the slow files
    tts_tokenizer_dir: Path | None = None

    @classmethod
    def open(cls, path: str | Path, speech_encoder: str | Path | None = None, decoder: str | Path | None = None) -> "Omni2Checkpoint":
        path = Path(path)
        if not path.exists():
            raise CheckpointError(f"{path} does not exist; pass the directory of the downloaded LLaMA-Omni2 model.")
        model_dir = path
        if not (path / "config.json").exists():
            found = sorted((path / "models").glob("LLaMA-Omni2-*/config.json")) if (path / "models").is_dir() else []
            if len(found) != 1:
                raise CheckpointError(
                    f"{path} has no config.json (nor exactly one models/LLaMA-Omni2-*/config.json); pass the LLaMA-Omni2 model directory."
                )
            model_dir = found[0].parent
        config = read_config(model_dir / "config.json")
        mt = config.get("model_type")
        if mt == S2T_MODEL_TYPE:
            raise CheckpointError(f"{model_dir} is a speech-to-text LLaMA-Omni2 ({mt}) without a speech generator; use an omni2_speech2s_qwen2 release.")
        if mt not in MODEL_TYPES:
            raise CheckpointError(f"{model_dir / 'config.json'} has model_type {mt!r}, not 'omni2_speech2s_qwen2'; this exporter reads LLaMA-Omni2 releases.")
        if not isinstance(config.get("speech_generator"), dict):
            raise CheckpointError(f"{model_dir / 'config.json'} has no 'speech_generator' dict (the TTS LM config); the config is incomplete.")
        converted = tempfile.TemporaryDirectory(prefix="omnilite-tokenizers-")  # removed with the checkpoint object
        tokenizer_dir = fast_tokenizer_dir(model_dir, Path(converted.name) / "llm")
        tts_tokenizer_dir = fast_tokenizer_dir(model_dir / "tts_tokenizer", Path(converted.name) / "tts")
        roots = [model_dir.parent.parent, model_dir.parent, Path.cwd()]
        dec = Path(decoder) if decoder else next((r / DECODER_DIR for r in roots if (r / DECODER_DIR).is_dir()), model_dir.parent / "cosy2_decoder")
        for f, what in (("cosyvoice.yaml", "CosyVoice2 config"), ("flow.pt", "flow-matching weights"), ("hift.pt", "HiFT vocoder weights"),
                        ("campplus.onnx", "speaker-embedding model")):
            if not (dec / f).exists():
                raise CheckpointError(f"{dec / f} ({what}) is missing; download ICTNLP/cosy2_decoder to models/cosy2_decoder or pass --decoder.")
        cosy = load_cosyvoice_yaml(dec / "cosyvoice.yaml")
        tensors = SafetensorsDir(model_dir)
        named = Path(config.get("speech_encoder", ENCODER_FILE))
        candidates = [Path(speech_encoder)] if speech_encoder else [named] + [r / named for r in roots] + [r / ENCODER_FILE for r in roots]
        whisper, dims = open_whisper_weights(tensors, next((p for p in candidates if p.is_file()), candidates[0]),
                                             required=bool(speech_encoder))
        self = cls(
            model_dir=model_dir, decoder_dir=dec, encoder_path=whisper.pt_path, config=config,
            llm_config=qwen_config(config), tts_config=Qwen2Config(**{k: v for k, v in config["speech_generator"].items() if k not in ("model_type", "architectures")}),
            flow_config=flow_config(cosy, dec / "cosyvoice.yaml"), hift_config=hift_config(cosy, dec / "cosyvoice.yaml"),
            cosy=cosy, tensors=tensors,
        )
        self.whisper_dims, self._whisper = dims, whisper
        self.tokenizer_dir, self.tts_tokenizer_dir, self._converted = tokenizer_dir, tts_tokenizer_dir, converted
        self.encoder_source = whisper.source()  # for the manifest and `omnilite info`
        return self

    # ----- facts the exporter needs -----
    @property
    def stream_params(self) -> tuple[int, int]:
        return parse_stream_params(self.config.get("stream_params"))

    def tts_specials(self) -> dict[str, int]:
        """eos, pad and <sep> ids of the TTS tokenizer, and the id -> speech-unit map.

        Speech tokens are the added, non-special tokens whose text is one integer wrapped in markup
        (the official code recovers units by extracting the integers of the decoded text)."""
        tok = json.loads((self.tts_tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
        cfg = json.loads((self.tts_tokenizer_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
        by_text = {t["content"]: t["id"] for t in tok.get("added_tokens", [])}
        by_text.update({k: v for k, v in tok["model"]["vocab"].items() if k not in by_text})

        def special(name: str) -> int:
            value = cfg.get(name)
            if isinstance(value, dict):
                value = value.get("content")
            if value is None or value not in by_text:
                raise CheckpointError(f"{self.tts_tokenizer_dir / 'tokenizer_config.json'} names no usable {name}; the TTS tokenizer is incomplete.")
            return int(by_text[value])

        if "<sep>" not in by_text:
            raise CheckpointError(f"{self.tts_tokenizer_dir / 'tokenizer.json'} has no <sep> token; the TTS tokenizer is incomplete.")
        units = {}
        for t in tok.get("added_tokens", []):
            m = re.fullmatch(r"\D*?(\d+)\D*", t["content"])
            if m and not t.get("special", False):
                units[int(t["id"])] = int(m.group(1))
        if not units:
            raise CheckpointError(f"{self.tts_tokenizer_dir / 'tokenizer.json'} has no speech-unit tokens; it is not a LLaMA-Omni2 TTS tokenizer.")
        return {"eos": special("eos_token"), "pad": special("pad_token") if cfg.get("pad_token") else special("eos_token"),
                "sep": int(by_text["<sep>"]), "units": units}

    # ----- reference modules (fp32) -----
    def speech_encoder(self) -> EncoderWithAdapter:
        d = self.whisper_dims
        width = self.config.get("speech_encoder_hidden_size", 1280)
        if d["n_audio_state"] != width:
            raise CheckpointError(f"the Whisper encoder ({self.encoder_source}) has width {d['n_audio_state']} but config.json says speech_encoder_hidden_size={width}; use the matching encoder.")
        enc = AudioEncoder(d["n_mels"], d["n_audio_ctx"], d["n_audio_state"], d["n_audio_head"], d["n_audio_layer"])
        _check_and_load(enc, self._whisper, "", self._whisper.file_of, "Whisper encoder")
        adapter = ConcatAdapter(int(self.config.get("speech_encoder_ds_rate", 5)), d["n_audio_state"], self.config["hidden_size"])
        _check_and_load(adapter, self.tensors, "model.speech_projector.", self.tensors.file_of, "speech projector")
        return EncoderWithAdapter(enc, adapter).eval()

    def _qwen(self, cfg: Qwen2Config, prefix: str, what: str) -> Qwen2ForCausalLM:
        model = Qwen2ForCausalLM(cfg)
        tied = bool(cfg.tie_word_embeddings)
        skip = {"lm_head.weight"} if tied else set()
        if tied and prefix + "model.embed_tokens.weight" not in self.tensors and prefix + "lm_head.weight" in self.tensors:
            # A tied pair saved under the head's name only (safetensors drops one of two shared tensors).
            model.model.embed_tokens.weight.data = self.tensors[prefix + "lm_head.weight"].float()
            skip = {"model.embed_tokens.weight", "lm_head.weight"}
        _check_and_load(model, self.tensors, prefix, self.tensors.file_of, what, skip=skip)
        if tied:
            model.lm_head.weight = model.model.embed_tokens.weight
        return model.eval()

    def llm(self) -> Qwen2ForCausalLM:
        return self._qwen(self.llm_config, "", "Qwen2.5 LLM")

    def speech_generator(self) -> SpeechGenerator:
        gen = SpeechGenerator(self.config["hidden_size"], self.tts_config)
        gen.model = self._qwen(self.tts_config, "speech_generator.model.", "TTS LM")
        fusion = torch.nn.ModuleDict({"input_proj": gen.input_proj, "gate": gen.gate})
        _check_and_load(fusion, self.tensors, "speech_generator.", self.tensors.file_of, "gate fusion")
        return gen.eval()

    def qwen_tensors(self, prefix: str, cfg: Qwen2Config) -> dict[str, LazyTensor]:
        """HF-named tensors of one Qwen2 LM (prefix stripped) for the GGUF writer, read lazily."""
        names = [n for n in self.tensors if n.startswith(prefix)]
        if prefix == "":
            names = [n for n in names if not n.startswith(("model.speech_", "speech_generator."))]
        out = {n[len(prefix):]: LazyTensor(self.tensors, n) for n in names}
        if cfg.tie_word_embeddings and "model.embed_tokens.weight" not in out and "lm_head.weight" in out:
            out["model.embed_tokens.weight"] = out.pop("lm_head.weight")
        return out

    def flow(self) -> CausalMaskedDiffWithXvec:
        path = self.decoder_dir / "flow.pt"
        state = _torch_load(path)
        model = CausalMaskedDiffWithXvec(self.flow_config)
        _check_and_load(model, state, "", lambda _: str(path), "CosyVoice2 flow")
        return model.eval()

    def hift(self) -> HiFT:
        path = self.decoder_dir / "hift.pt"
        state = _torch_load(path)
        state = {k[len("generator."):] if k.startswith("generator.") else k: v for k, v in state.items()}
        state = fold_weight_norm(_weight_norm_names(state))
        model = HiFT(self.hift_config)
        _check_and_load(model, state, "", lambda _: str(path), "HiFT vocoder")
        return model.eval()

    def speaker_embedding(self, wav_16k: np.ndarray) -> np.ndarray:
        """CAM++ x-vector (192,) of a speaker prompt, as the official frontend computes it."""
        from omnilite.runtime.onnx_session import open_session

        from .fbank import kaldi_fbank

        feat = kaldi_fbank(wav_16k)
        feat = feat - feat.mean(axis=0, keepdims=True)
        sess = open_session(self.decoder_dir / "campplus.onnx")
        out = sess.run(None, {sess.get_inputs()[0].name: feat[None].astype(np.float32)})[0]
        return np.asarray(out, np.float32).reshape(-1)
