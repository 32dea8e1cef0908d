"""Open a Step-Audio-2-mini release (HF ``stepfun-ai/Step-Audio-2-mini``) as a user who downloaded it has it.

Layout (see NOTES.md for the sources)::

    ROOT/config.json                         architectures StepAudio2ForCausalLM, model_type step_audio_2,
                                             "text_config" (Qwen2.5-7B-shaped) + "audio_encoder_config"
    ROOT/model-0000{1..4}-of-00004.safetensors + model.safetensors.index.json   (bf16)
    ROOT/tokenizer files                     Qwen2 BPE (vocab.json, merges.txt, tokenizer.json) plus the
                                             Step-Audio special tokens (added_tokens.json, tokenizer_config.json)
    ROOT/token2wav/                          speech_tokenizer_v2_25hz.onnx, campplus.onnx, flow.yaml,
                                             flow.pt, hift.pt

Tensor prefixes are the module names of ``StepAudio2ForCausalLM``: ``model.*`` (a transformers
Qwen2Model), ``encoder.*`` (Whisper-like encoder with a learned ``positional_embedding`` Embedding, an
avg-pool and ``after_norm``), ``adapter.*`` (conv + linear1 + linear2) and ``lm_head.weight`` (untied).
Every tensor is checked against config.json when the checkpoint is opened; a problem is refused in one
sentence that names the file, the tensor and both shapes.
"""

from __future__ import annotations

import json
import logging
from dataclasses import MISSING, dataclass, fields
from pathlib import Path

from omnilite.runtime.errors import CheckpointError

from ..checkpoint import SafetensorsDir, read_config
from .flow_checkpoint import load_flow_state, read_flow_config
from .flow_reference import StepFlowConfig

log = logging.getLogger(__name__)

FAMILY = "step-audio2"
MODEL_TYPE = "step_audio_2"
ARCHITECTURE = "StepAudio2ForCausalLM"
N_SHARDS = 4  # the release's model-0000N-of-00004.safetensors
ADAPTER_INNER = 2048  # hard-coded width of the adapter's linear1 in the official Adaptor, not a config key

# Token ids the official code hard-codes (stepaudio2.py, modeling insert index): text ids are below
# AUDIO_START_ID, and an audio code is id - AUDIO_CODE_BASE for ids above AUDIO_CODE_BASE - 1.
AUDIO_START_ID = 151688
AUDIO_CODE_BASE = 151696
N_AUDIO_CODES = 6561  # CosyVoice2 S3 tokenizer v2 codebook (3^8)
# Tokens the loader resolves by name (their ids come from the tokenizer, never from here).
REQUIRED_TOKENS = ("<|BOT|>", "<|EOT|>", "<audio_start>", "<audio_end>", "<audio_patch>", "<tts_start>", "<tts_end>",
                   "<audio_0>")
HARD_CODED_IDS = {"<audio_start>": AUDIO_START_ID, "<audio_0>": AUDIO_CODE_BASE,
                  f"<audio_{N_AUDIO_CODES - 1}>": AUDIO_CODE_BASE + N_AUDIO_CODES - 1}

TOKEN2WAV_DIR = "token2wav"
# All five released token2wav files (token2wav.py Token2wav.__init__); flow.yaml and flow.pt are also
# parsed and checked tensor by tensor (flow_checkpoint.py).
TOKEN2WAV_FILES = ("speech_tokenizer_v2_25hz.onnx", "campplus.onnx", "flow.yaml", "flow.pt", "hift.pt")
TOKEN2WAV_REQUIRED = TOKEN2WAV_FILES
TOKENIZER_CONFIG = "tokenizer_config.json"


@dataclass(frozen=True)
class TextConfig:
    """config.json "text_config" (keys as released; defaults as the official StepAudio2TextConfig)."""

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    num_hidden_layers: int
    vocab_size: int
    num_attention_groups: int = 4
    max_seq_len: int = 16384
    rms_norm_eps: float = 1e-6
    eos_token_id: int = 151643
    pad_token_id: int = 151643
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 8192
    rope_scaling: dict | None = None
    torch_dtype: str = "bfloat16"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class AudioEncoderConfig:
    """config.json "audio_encoder_config"."""

    n_mels: int
    n_audio_ctx: int
    n_audio_state: int
    n_audio_head: int
    n_audio_layer: int
    llm_dim: int
    kernel_size: int
    adapter_stride: int
    n_codebook_size: int = 4096  # present in the release, unused by the model code


@dataclass(frozen=True)
class StepAudio2Config:
    text: TextConfig
    audio: AudioEncoderConfig

    def to_json(self) -> dict:
        """config.json as released: the keys and nesting of the HF repo's file."""
        text = {f.name: getattr(self.text, f.name) for f in fields(TextConfig)}
        order = ("hidden_size", "intermediate_size", "num_attention_heads", "num_attention_groups", "num_key_value_heads",
                 "num_hidden_layers", "max_seq_len", "vocab_size", "rms_norm_eps", "eos_token_id", "pad_token_id",
                 "rope_theta", "max_position_embeddings", "rope_scaling", "torch_dtype")
        audio = ("n_mels", "n_audio_ctx", "n_audio_state", "n_audio_head", "n_audio_layer", "n_codebook_size", "llm_dim",
                 "kernel_size", "adapter_stride")
        return {
            "architectures": [ARCHITECTURE],
            "auto_map": {"AutoConfig": "configuration_step_audio_2.StepAudio2Config",
                         "AutoModelForCausalLM": "modeling_step_audio_2.StepAudio2ForCausalLM"},
            "model_type": MODEL_TYPE,
            "text_config": {k: text[k] for k in order},
            "audio_encoder_config": {k: getattr(self.audio, k) for k in audio},
        }


def _section(cfg: dict, path: Path, name: str, cls: type) -> object:
    sec = cfg.get(name)
    if not isinstance(sec, dict):
        raise CheckpointError(f"{path} has no '{name}' object; download config.json again from the Step-Audio-2-mini release.")
    values = {}
    for f in fields(cls):
        if f.name not in sec:
            if f.default is MISSING:
                raise CheckpointError(f"{path} has no '{name}.{f.name}'; download config.json again from the "
                                      "Step-Audio-2-mini release.")
            continue
        v = sec[f.name]
        if f.type == "int" and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
            raise CheckpointError(f"{path}: '{name}.{f.name}' is {v!r}, not a positive integer; the config.json is damaged.")
        values[f.name] = v
    return cls(**values)


def parse_config(path: Path) -> StepAudio2Config:
    """config.json -> StepAudio2Config, refusing a config of another model or with missing keys."""
    cfg = read_config(path)
    if cfg.get("model_type") != MODEL_TYPE:
        raise CheckpointError(f"{path}: model_type is {cfg.get('model_type')!r}, not '{MODEL_TYPE}'; "
                              "this is not a Step-Audio 2 checkpoint.")
    c = StepAudio2Config(_section(cfg, path, "text_config", TextConfig), _section(cfg, path, "audio_encoder_config", AudioEncoderConfig))
    if c.audio.llm_dim != c.text.hidden_size:
        raise CheckpointError(f"{path}: audio_encoder_config.llm_dim {c.audio.llm_dim} differs from text_config.hidden_size "
                              f"{c.text.hidden_size}, so the adapter output cannot enter the LLM; the config.json is damaged.")
    if c.text.hidden_size % c.text.num_attention_heads or c.text.num_attention_heads % c.text.num_key_value_heads:
        raise CheckpointError(f"{path}: text_config heads ({c.text.num_attention_heads} query, {c.text.num_key_value_heads} "
                              f"key/value) do not divide hidden_size {c.text.hidden_size}; the config.json is damaged.")
    return c


def expected_shapes(c: StepAudio2Config) -> dict[str, tuple[int, ...]]:
    """Every tensor of the release with its shape, in StepAudio2ForCausalLM's state_dict order
    (model, encoder, adapter, lm_head), from the official module definitions and config.json."""
    t, a = c.text, c.audio
    h, kv = t.hidden_size, t.num_key_value_heads * t.head_dim
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (t.vocab_size, h)}
    for i in range(t.num_hidden_layers):
        p = f"model.layers.{i}."
        out |= {p + "self_attn.q_proj.weight": (h, h), p + "self_attn.q_proj.bias": (h,),
                p + "self_attn.k_proj.weight": (kv, h), p + "self_attn.k_proj.bias": (kv,),
                p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.v_proj.bias": (kv,),
                p + "self_attn.o_proj.weight": (h, h),
                p + "mlp.gate_proj.weight": (t.intermediate_size, h), p + "mlp.up_proj.weight": (t.intermediate_size, h),
                p + "mlp.down_proj.weight": (h, t.intermediate_size),
                p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)}
    out["model.norm.weight"] = (h,)
    s = a.n_audio_state
    out |= {"encoder.conv1.weight": (s, a.n_mels, 3), "encoder.conv1.bias": (s,),
            "encoder.conv2.weight": (s, s, 3), "encoder.conv2.bias": (s,),
            "encoder.positional_embedding.weight": (a.n_audio_ctx, s)}
    for i in range(a.n_audio_layer):
        p = f"encoder.blocks.{i}."
        out |= {p + "attn.query.weight": (s, s), p + "attn.query.bias": (s,), p + "attn.key.weight": (s, s),
                p + "attn.value.weight": (s, s), p + "attn.value.bias": (s,),
                p + "attn.out.weight": (s, s), p + "attn.out.bias": (s,),
                p + "attn_ln.weight": (s,), p + "attn_ln.bias": (s,),
                p + "mlp.0.weight": (4 * s, s), p + "mlp.0.bias": (4 * s,),
                p + "mlp.2.weight": (s, 4 * s), p + "mlp.2.bias": (s,),
                p + "mlp_ln.weight": (s,), p + "mlp_ln.bias": (s,)}
    out |= {"encoder.after_norm.weight": (s,), "encoder.after_norm.bias": (s,),
            "adapter.conv.weight": (s, s, a.kernel_size), "adapter.conv.bias": (s,),
            "adapter.linear1.weight": (ADAPTER_INNER, s), "adapter.linear1.bias": (ADAPTER_INNER,),
            "adapter.linear2.weight": (a.llm_dim, ADAPTER_INNER), "adapter.linear2.bias": (a.llm_dim,),
            "lm_head.weight": (t.vocab_size, h)}
    return out


def read_token_ids(model_dir: Path) -> dict[str, int]:
    """content -> id of the tokens the Step-Audio 2 code needs, as the tokenizer really assigns them:
    through tokenizer.json when the release has one (the HF tokenizers library numbers added tokens by
    position, whatever ids a config lists), else tokenizer_config.json's added_tokens_decoder."""
    wanted = (*REQUIRED_TOKENS, f"<audio_{N_AUDIO_CODES - 1}>")
    fast = model_dir / "tokenizer.json"
    if fast.is_file():
        from tokenizers import Tokenizer

        try:
            tok = Tokenizer.from_file(str(fast))
        except Exception as e:  # noqa: BLE001 - the Rust parser raises its own exception type
            raise CheckpointError(f"{fast} cannot be read as a tokenizer ({e}); download it again from the release.") from None
        return {c: i for c in wanted if (i := tok.token_to_id(c)) is not None}
    cfg_path = model_dir / TOKENIZER_CONFIG
    if not cfg_path.is_file():
        raise CheckpointError(f"{cfg_path} is missing; download the tokenizer files of the Step-Audio-2-mini release.")
    decoder = read_config(cfg_path).get("added_tokens_decoder")
    if not isinstance(decoder, dict):
        raise CheckpointError(f"{cfg_path} lists no added tokens; download the tokenizer files of the Step-Audio-2-mini release.")
    ids = {v.get("content"): int(k) for k, v in decoder.items() if isinstance(v, dict)}
    return {c: ids[c] for c in wanted if c in ids}


@dataclass
class StepAudio2Checkpoint:
    """A validated Step-Audio-2-mini release: paths, parsed config, lazy tensors and the special-token ids."""

    root: Path
    config: StepAudio2Config
    tensors: SafetensorsDir
    token_ids: dict[str, int]
    flow_config: StepFlowConfig | None = None  # token2wav/flow.yaml


def _check_tokenizer(root: Path) -> dict[str, int]:
    if not (root / TOKENIZER_CONFIG).is_file():
        raise CheckpointError(f"{root / TOKENIZER_CONFIG} is missing; download the tokenizer files of the Step-Audio-2-mini release.")
    if not (root / "tokenizer.json").is_file():
        for name in ("vocab.json", "merges.txt"):
            if not (root / name).is_file():
                raise CheckpointError(f"{root / name} is missing (and there is no tokenizer.json); download the tokenizer "
                                      "files of the Step-Audio-2-mini release.")
    ids = read_token_ids(root)
    for content in (*REQUIRED_TOKENS, *HARD_CODED_IDS):
        if content not in ids:
            raise CheckpointError(f"the tokenizer in {root} has no '{content}' token, so it is not the Step-Audio 2 "
                                  "tokenizer; download the release's tokenizer files.")
    for content, want in HARD_CODED_IDS.items():
        if ids[content] != want:
            raise CheckpointError(f"the tokenizer in {root} maps '{content}' to id {ids[content]}, but the Step-Audio 2 "
                                  f"code expects {want}; download the release's tokenizer files.")
    return ids


def _check_tensors(tensors: SafetensorsDir, expected: dict[str, tuple[int, ...]]) -> None:
    for name, shape in expected.items():
        if name not in tensors:
            raise CheckpointError(f"{tensors.file_of(name)} is missing tensor '{name}' (expected shape {shape}); "
                                  "the checkpoint is incomplete or not a Step-Audio 2 release.")
        got = tensors.shape(name)
        if got != shape:
            raise CheckpointError(f"{tensors.file_of(name)}: tensor '{name}' has shape {got}, expected {shape} from "
                                  "config.json; the checkpoint does not match its config.json.")
    for name in tensors:
        if name not in expected:
            raise CheckpointError(f"{tensors.file_of(name)} holds tensor '{name}', which Step-Audio 2 does not have; "
                                  "the checkpoint is not a Step-Audio-2-mini release.")


def open_step_audio2(root: str | Path) -> StepAudio2Checkpoint:
    """Validate the release under `root` (config, tokenizer, every tensor's name and shape, token2wav
    files) and return it; any problem is one CheckpointError sentence naming the file."""
    root = Path(root)
    if not root.is_dir():
        raise CheckpointError(f"{root} does not exist; pass the directory of the downloaded Step-Audio-2-mini release.")
    cfg_path = root / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{cfg_path} is missing; pass the Step-Audio-2-mini model directory (the one holding "
                              "config.json and the safetensors).")
    config = parse_config(cfg_path)
    ids = _check_tokenizer(root)
    tensors = SafetensorsDir(root)
    _check_tensors(tensors, expected_shapes(config))
    t2w = root / TOKEN2WAV_DIR
    for name in TOKEN2WAV_REQUIRED:
        if not (t2w / name).is_file():
            raise CheckpointError(f"{t2w / name} is missing; download the token2wav/ folder of the Step-Audio-2-mini release.")
    flow_config = read_flow_config(t2w / "flow.yaml")
    load_flow_state(t2w / "flow.pt", flow_config)  # names and shapes only (memory-mapped)
    log.info("opened Step-Audio 2 checkpoint %s (%d tensors)", root, len(tensors))
    return StepAudio2Checkpoint(root, config, tensors, ids, flow_config)


def token2wav_missing(root: Path) -> list[str]:
    """The released token2wav files absent under `root`."""
    return [n for n in TOKEN2WAV_FILES if not (Path(root) / TOKEN2WAV_DIR / n).is_file()]


def index_weight_map(root: Path) -> dict[str, str]:
    """tensor name -> shard file, as model.safetensors.index.json lists it."""
    return dict(json.loads((Path(root) / "model.safetensors.index.json").read_text())["weight_map"])
