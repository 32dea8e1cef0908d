"""`omnilite export` for LLaMA-Omni: checkpoint -> bundle, every stage checked against PyTorch.

Stages: encoder.onnx (Whisper encoder + adapter, dynamic length), llm.gguf (Llama + tokenizer),
speech_generator.onnx (CTC decoder step with KV cache), unit_duration.onnx + vocoder.onnx
(unit HiFi-GAN split for streaming). The bundle is built in a temporary directory and renamed
into place only when every stage is written and its parity measured, so a failed export leaves
nothing behind.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from omnilite import __version__
from omnilite.runtime.bundle import FORMAT_VERSION, MANIFEST, sha256_file
from omnilite.runtime.encoder import DEFAULT_FAST_MODE, EncoderMode
from omnilite.runtime.errors import OmniliteError
from omnilite.runtime.llm import default_flash_attn

from .bundle_dir import building_dir, record_parity
from .checkpoint import LlamaOmniCheckpoint
from .ctc_generator import CachedCTCStep
from .gguf_llm import write_llama_gguf
from .onnx_export import export_onnx, io_shapes
from .parity import measure_parity
from .prompt import SYSTEM_PROMPT, USER_INSTRUCTION
from .reference import ReferencePipeline
from .speech_encoder import PADDING_CACHE_FILE, encoder_manifest, padding_cache
from .unit_vocoder import FrameVocoder, UnitDuration, duration_receptive_field, receptive_field_frames

log = logging.getLogger(__name__)

FAMILY = "llama-omni"


@dataclass(frozen=True)
class ExportOptions:
    llm_dtype: str = "f32"  # "f32" or "f16" GGUF weights
    omega: int = 10  # text tokens per speech-generator chunk (the paper's default)
    encoder_mode: str = DEFAULT_FAST_MODE  # the bundle's default encoder mode (runtime flag overrides)
    parity: bool = True
    strict_parity: bool = True  # refuse to write a bundle whose stage misses its threshold
    overwrite: bool = False
    progress: bool = True


def export_llama_omni(checkpoint: str | Path, out: str | Path, options: ExportOptions = ExportOptions(),
                      speech_encoder: str | Path | None = None, vocoder: str | Path | None = None) -> Path:
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not options.overwrite:
        raise OmniliteError(f"{out} already exists and is not empty; choose another directory or pass --force.")
    if options.llm_dtype not in ("f32", "f16"):
        raise OmniliteError(f"LLM dtype {options.llm_dtype!r} is not supported; use f32 or f16.")
    EncoderMode.parse(options.encoder_mode)  # a bad mode fails before any work
    ckpt = LlamaOmniCheckpoint.open(checkpoint, speech_encoder, vocoder)
    with building_dir(out) as tmp:  # locked against a second export to OUT; removed if the build fails
        _build(ckpt, tmp, options)
    return out


def _build(ckpt: LlamaOmniCheckpoint, tmp: Path, options: ExportOptions) -> None:
    steps = tqdm(total=7, desc="export", unit="step", disable=not options.progress)

    def step(name: str) -> None:
        steps.set_postfix_str(name)
        log.info("export: %s", name)

    step("reference")
    ref = ReferencePipeline(ckpt)
    steps.update()

    gen = ref.generator.config
    cache = torch.zeros(gen.num_hidden_layers, 1, gen.num_attention_heads, 0, gen.hidden_size // gen.num_attention_heads)
    units = torch.zeros(1, 8, dtype=torch.long)
    # file, module, example inputs, dynamic input axes, dynamic output axes
    onnx_stages = [
        ("encoder.onnx", ref.encoder, (torch.zeros(1, ref.n_mels, 3000),),
         {"mel": {2: "mel_frames"}}, {"speech_embeds": {1: "speech_positions"}}),
        ("speech_generator.onnx", CachedCTCStep(ref.generator), (torch.zeros(1, 2, ckpt.config["hidden_size"]), cache, cache),
         {"hidden": {1: "new_tokens"}, "past_key": {3: "past_positions"}, "past_value": {3: "past_positions"}},
         {"frame_units": {1: "new_positions"}, "present_key": {3: "positions"}, "present_value": {3: "positions"}}),
        ("unit_duration.onnx", UnitDuration(ref.vocoder), (units,), {"units": {1: "units"}}, {"durations": {1: "units"}}),
        ("vocoder.onnx", FrameVocoder(ref.vocoder), (units,), {"frame_units": {1: "frames"}}, {"audio": {1: "samples"}}),
    ]
    side_files: dict[str, list[str]] = {}  # ONNX external-data files per stage file
    for file, module, example, dyn_in, dyn_out in onnx_stages:
        step(file)
        side_files[file] = export_onnx(module, example, tmp / file, dyn_in, dyn_out)
        if file == "encoder.onnx":
            # +fill encoder modes splice in the encoding of pure padding; one exact-mode run, done here.
            np.save(tmp / PADDING_CACHE_FILE, padding_cache(ref.encoder, ref.n_mels, 2 * ckpt.whisper_dims["n_audio_ctx"]))
            side_files[file].append(PADDING_CACHE_FILE)
        steps.update()

    step("llm.gguf")
    write_llama_gguf(ckpt.llm_tensors(), ckpt.config, ckpt.model_dir, tmp / "llm.gguf", dtype=options.llm_dtype,
                     name=ckpt.model_dir.name, progress=options.progress)
    steps.update()

    manifest = _manifest(ckpt, ref, tmp, options, side_files)
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    if options.parity:
        step("parity")
        record_parity(manifest, tmp, measure_parity(ref, tmp, omega=options.omega), options.strict_parity)
    steps.update()
    steps.close()


def _manifest(ckpt: LlamaOmniCheckpoint, ref: ReferencePipeline, tmp: Path, options: ExportOptions,
              side_files: dict[str, list[str]]) -> dict:
    gen = ref.generator.config
    precision = {"llm.gguf": options.llm_dtype}
    stages = []
    for name, file in (("encoder", "encoder.onnx"), ("llm", "llm.gguf"), ("speech_generator", "speech_generator.onnx"),
                       ("unit_duration", "unit_duration.onnx"), ("vocoder", "vocoder.onnx")):
        fmt = "gguf" if file.endswith(".gguf") else "onnx"
        inputs, outputs = io_shapes(tmp / file) if fmt == "onnx" else ({"tokens_or_embeddings": ["n", ckpt.config["hidden_size"]]}, {"logits_and_hidden": ["n", "vocab+hidden"]})
        stages.append({"name": name, "file": file, "format": fmt, "precision": precision.get(file, "fp32"),
                       "sha256": sha256_file(tmp / file), "inputs": inputs, "outputs": outputs,
                       "extra_files": {f: sha256_file(tmp / f) for f in side_files.get(file, [])}}
                      | ({"flash_attn": default_flash_attn(options.llm_dtype)} if fmt == "gguf" else {}))
    c = ckpt.config
    return {
        "format_version": FORMAT_VERSION,
        "family": FAMILY,
        "created_by": f"omnilite {__version__}",
        "source": {
            "model_dir": str(ckpt.model_dir.resolve()),
            "speech_encoder": str(ckpt.encoder_path.resolve()) if ckpt.encoder_path else None,
            "speech_encoder_weights": ckpt.encoder_source,
            "vocoder": str(ckpt.vocoder_dir.resolve()),
            "model_type": c["model_type"],
            "hidden_size": c["hidden_size"],
            "num_hidden_layers": c["num_hidden_layers"],
            "whisper_dims": ckpt.whisper_dims,
            "ctc_decoder_config": c.get("ctc_decoder_config"),
        },
        "audio": {"input_sample_rate": 16000, "output_sample_rate": int(ckpt.vocoder_config.get("sampling_rate", 16000))},
        "encoder": encoder_manifest(ref.n_mels, 2 * ckpt.whisper_dims["n_audio_ctx"], 2 * c.get("speech_encoder_ds_rate", 5),
                                    options.encoder_mode),
        "llm": {
            "n_embd": c["hidden_size"],
            "eos_ids": sorted(ref.eos_ids),
            "prompt": {"prefix_ids": ref.prompt.prefix_ids, "suffix_ids": ref.prompt.suffix_ids,
                       "turn_prefix_ids": ref.prompt.turn_prefix_ids,
                       "system": SYSTEM_PROMPT, "user": USER_INSTRUCTION, "template": "llama_3"},
            "max_context": int(c.get("tokenizer_model_max_length", 2048)),
        },
        "speech_generator": {
            "upsample_factor": int(c.get("ctc_upsample_factor", 25)),
            "blank": int(c.get("unit_vocab_size", 1000)),
            "layers": gen.num_hidden_layers,
            "heads": gen.num_attention_heads,
            "head_dim": gen.hidden_size // gen.num_attention_heads,
        },
        "vocoder": {
            "hop": ref.vocoder.hop,
            "sample_rate": int(ckpt.vocoder_config.get("sampling_rate", 16000)),
            "receptive_field_frames": receptive_field_frames(ckpt.vocoder_config),
            "duration_receptive_field": duration_receptive_field(ckpt.vocoder_config),
        },
        "streaming": {"omega": options.omega},
        "stages": stages,
        "parity": {},
    }


def export_tiny_demo_bundle(work: Path, progress: bool = True) -> Path:
    """Used by `omnilite demo`: make (or reuse) the tiny checkpoint and its bundle under `work`."""
    from .tiny import make_tiny_llama_omni

    ckpt, bundle = work / "tiny-llama-omni", work / "tiny-llama-omni-bundle"
    if not (ckpt / "Llama-3.1-8B-Omni" / "config.json").exists():
        make_tiny_llama_omni(ckpt, overwrite=True)
    if not (bundle / MANIFEST).exists():
        export_llama_omni(ckpt, bundle, ExportOptions(overwrite=True, progress=progress))
    return bundle
