"""`omnilite export` for LLaMA-Omni2: checkpoint -> bundle, every stage checked against PyTorch.

Stages and files:

* ``encoder.onnx``          Whisper encoder + concat adapter (dynamic length)
* ``encoder_padding.npy``   its output for a 30 s window of padding (what ``+fill`` encoder modes splice in)
* ``llm.gguf``              Qwen2.5 LLM + tokenizer (llama.cpp)
* ``tts_lm.gguf``           TTS LM without a vocabulary (ids in); it takes fused inputs as raw embedding batches
* ``tts_fusion.onnx``       input_proj + gate: (LLM hidden, TTS text embedding) -> fused TTS input
* ``tts_text_embed.npy``    the TTS LM's input-embedding rows for the LLM's token ids (memory-mapped
                            by the runtime: llama.cpp has no embedding lookup to call)
* ``flow_encoder.onnx``     speech tokens -> mu (the flow's conformer encoder, 2x upsampled)
* ``flow_estimator.onnx``   the causal U-Net vector field with the official inputs (x, mask, mu, t, spks, cond)
* ``flow_estimator_cached.onnx`` the same U-Net on a stream step's new frames only, given the flow cache
                            of the frames before (each transformer block's normed input, each causal
                            conv's last 2 inputs): the runtime's stream solves each chunk once
* ``flow_noise.npy``        the flow's fixed initial noise (80 x 15000), which numpy cannot redraw
* ``hift_f0.onnx``          HiFT's f0 predictor
* ``hift.onnx``             HiFT decode from mel + NSF source (the source is made in numpy)

Built in a temporary directory and renamed into place only when everything is written and parity
holds (unless told to keep a failing bundle).
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

from ..bundle_dir import building_dir, record_parity
from ..onnx_export import export_onnx, io_shapes
from ..speech_encoder import PADDING_CACHE_FILE, encoder_manifest, padding_cache
from .checkpoint import Omni2Checkpoint
from .flow import CachedEstimatorStage, EstimatorStage, FlowEncoderStage, cache_layout
from .gguf_qwen2 import write_qwen2_gguf
from .hift import F0_RECEPTIVE_FIELD, HiFTF0, measured_receptive_field
from .reference import DEFAULT_MAX_TTS_TOKENS, Omni2ReferencePipeline
from .tts import GateFusion

log = logging.getLogger(__name__)

FAMILY = "llama-omni2"


@dataclass(frozen=True)
class Omni2ExportOptions:
    llm_dtype: str = "f32"  # GGUF weights of both LMs: "f32" or "f16"
    encoder_mode: str = DEFAULT_FAST_MODE  # the bundle's default encoder mode (runtime flag overrides)
    parity: bool = True
    strict_parity: bool = True
    overwrite: bool = False
    progress: bool = True


def _speaker_wav(path: str | Path | None) -> np.ndarray:
    from omnilite.runtime.audio import prepare_speech, read_wav

    if path is None:
        raise OmniliteError(
            "LLaMA-Omni2 speaks in the voice of a prompt recording; pass --speaker-wav (the official one is "
            "llama_omni2/inference/prompt_en.wav in the LLaMA-Omni2 code repository)."
        )
    audio, rate = read_wav(Path(path))
    return prepare_speech(audio, rate, 16000)


def export_llama_omni2(checkpoint: str | Path, out: str | Path, options: Omni2ExportOptions = Omni2ExportOptions(),
                       speech_encoder: str | Path | None = None, decoder: str | Path | None = None,
                       speaker_wav: str | Path | None = None) -> Path:
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not options.overwrite:
        raise OmniliteError(f"{out} already exists and is not empty; choose another directory or pass --force.")
    if options.llm_dtype not in ("f32", "f16"):
        raise OmniliteError(f"LLM dtype {options.llm_dtype!r} is not supported; use f32 or f16.")
    EncoderMode.parse(options.encoder_mode)  # a bad mode fails before any work
    ckpt = Omni2Checkpoint.open(checkpoint, speech_encoder, decoder)
    speaker = _speaker_wav(speaker_wav)
    with building_dir(out) as tmp:  # locked against a second export to OUT; removed if the build fails
        _build(ckpt, speaker, tmp, options)
    return out


class _FusionStage(torch.nn.Module):
    def __init__(self, gen):
        super().__init__()
        self.fusion = GateFusion(gen.input_proj[0].in_features, gen.model.config.hidden_size)
        self.fusion.input_proj, self.fusion.gate = gen.input_proj, gen.gate

    def forward(self, hidden: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        return self.fusion(hidden, text_embeds)


def _build(ckpt: Omni2Checkpoint, speaker: np.ndarray, tmp: Path, options: Omni2ExportOptions) -> None:
    steps = tqdm(total=10, desc="export", unit="step", disable=not options.progress)

    def step(name: str) -> None:
        steps.set_postfix_str(name)
        log.info("export: %s", name)

    step("reference")
    ref = Omni2ReferencePipeline(ckpt, speaker)
    steps.update()
    gen, flow, hift = ref.generator, ref.flow, ref.hift
    h_llm, h_tts = ckpt.config["hidden_size"], ckpt.tts_config.hidden_size
    t = 40
    onnx_stages = [
        ("encoder.onnx", ref.encoder, (torch.zeros(1, ref.n_mels, 3000),), {"mel": {2: "mel_frames"}}, {"speech_embeds": {1: "speech_positions"}}),
        ("tts_fusion.onnx", _FusionStage(gen), (torch.zeros(3, h_llm), torch.zeros(3, h_tts)),
         {"hidden": {0: "n"}, "text_embeds": {0: "n"}}, {"fused": {0: "n"}}),
        ("flow_encoder.onnx", FlowEncoderStage(flow), (torch.zeros(1, t, dtype=torch.long), torch.tensor(7)),
         {"tokens": {1: "tokens"}, "chunk_tokens": {}}, {"mu": {2: "frames"}}),
        ("flow_estimator.onnx", EstimatorStage(flow),
         (torch.zeros(2, 80, 2 * t), torch.ones(2, 1, 2 * t), torch.zeros(2, 80, 2 * t), torch.zeros(2), torch.zeros(2, 80),
          torch.zeros(2, 80, 2 * t), torch.tensor(14)),
         {"x": {2: "frames"}, "mask": {2: "frames"}, "mu": {2: "frames"}, "t": {}, "spks": {}, "cond": {2: "frames"}, "chunk_frames": {}},
         {"estimator_out": {2: "frames"}}),
        ("flow_estimator_cached.onnx", CachedEstimatorStage(flow), cached_example(flow, 2 * t), *CACHED_ESTIMATOR_AXES),
        ("hift_f0.onnx", HiFTF0(hift), (torch.zeros(1, 80, t),), {"mel": {2: "frames"}}, {"f0": {1: "frames"}}),
        ("hift.onnx", hift, (torch.zeros(1, 80, t), torch.zeros(1, t * hift.c.hop)), {"mel": {2: "frames"}, "source": {1: "samples"}},
         {"audio": {1: "samples"}}),
    ]
    side_files: dict[str, list[str]] = {}
    for file, module, example, dyn_in, dyn_out in onnx_stages:
        step(file)
        side_files[file] = export_onnx(module, example, tmp / file, dyn_in, dyn_out)
        if file == "encoder.onnx":
            # +fill encoder modes splice in the encoding of pure padding; one exact-mode run, done here.
            np.save(tmp / PADDING_CACHE_FILE, padding_cache(ref.encoder, ref.n_mels, 2 * ckpt.whisper_dims["n_audio_ctx"]))
            side_files[file].append(PADDING_CACHE_FILE)
        steps.update()

    step("llm.gguf + tts_lm.gguf")
    eos = ckpt.config.get("eos_token_id", min(ref.eos_ids))  # the turn end (<|im_end|>) for an instruct model
    eos = eos[0] if isinstance(eos, list) else eos
    write_qwen2_gguf(ckpt.qwen_tensors("", ckpt.llm_config), ckpt.config, ckpt.tokenizer_dir, tmp / "llm.gguf", eos_id=int(eos),
                     dtype=options.llm_dtype, name=ckpt.model_dir.name, what="Qwen2.5 LLM", progress=options.progress)
    write_qwen2_gguf(ckpt.qwen_tensors("speech_generator.model.", ckpt.tts_config), ckpt.config["speech_generator"], ckpt.tts_tokenizer_dir,
                     tmp / "tts_lm.gguf", eos_id=ref.tts_eos, dtype=options.llm_dtype, name=ckpt.model_dir.name + "-tts", what="TTS LM",
                     progress=options.progress, vocabulary=False)
    steps.update()

    step("tables")
    table = gen.model.get_input_embeddings().weight.detach()[: ckpt.llm_config.vocab_size]
    np.save(tmp / "tts_text_embed.npy", table.numpy().astype(np.float16 if options.llm_dtype == "f16" else np.float32))
    np.save(tmp / "flow_noise.npy", flow.noise[0].numpy())
    steps.update()

    manifest = _manifest(ckpt, ref, tmp, options, side_files)
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    if options.parity:
        step("parity")
        from .parity import measure_parity

        report = measure_parity(ref, tmp)
        report["flow_estimator_cached"] = cached_estimator_parity(flow, tmp / "flow_estimator_cached.onnx")
        record_parity(manifest, tmp, report, options.strict_parity)
    steps.update()
    steps.close()


STAGE_FILES = (
    ("encoder", "encoder.onnx"), ("llm", "llm.gguf"), ("tts_lm", "tts_lm.gguf"), ("tts_fusion", "tts_fusion.onnx"),
    ("tts_text_embed", "tts_text_embed.npy"), ("flow_encoder", "flow_encoder.onnx"), ("flow_estimator", "flow_estimator.onnx"),
    ("flow_estimator_cached", "flow_estimator_cached.onnx"), ("flow_noise", "flow_noise.npy"), ("hift_f0", "hift_f0.onnx"), ("hift", "hift.onnx"),
)


CACHED_ESTIMATOR_MAX_ABS = 1e-4  # fp32: the cached graph re-orders sums only
# Dynamic axes of flow_estimator_cached.onnx: inputs, outputs.
CACHED_ESTIMATOR_AXES = (
    {"x": {2: "frames"}, "mu": {2: "frames"}, "t": {}, "spks": {}, "cond": {2: "frames"}, "past": {2: "past"},
     "conv_context": {}, "chunk_frames": {}, "keep": {}},
    {"velocity": {2: "frames"}, "new_past": {2: "keep"}, "conv_context_out": {}},
)


def cached_example(flow, frames: int) -> tuple[torch.Tensor, ...]:
    """Example inputs of ``flow_estimator_cached.onnx``: P (past frames) and keep differ from N so every
    length stays symbolic."""
    blocks, width, channels, ctx = cache_layout(flow.decoder.estimator)
    mel = torch.zeros(2, 80, frames)
    return (mel, mel, torch.zeros(2), torch.zeros(2, 80), mel, torch.zeros(blocks, 2, frames // 2 + 6, width),
            torch.zeros(2, channels, ctx), torch.tensor(14), torch.tensor(frames // 4))


def cached_estimator_parity(flow, path: Path, frames: int = 0, seed: int = 0) -> dict:
    """The exported cached estimator (onnxruntime), run as a stream runs it (steps of 1, 1.5 and the
    remaining chunks, the cache growing by whole chunks) vs the PyTorch estimator on all frames at
    once: max abs difference of the velocity, random inputs, the flow's own chunk."""
    from omnilite.runtime.onnx_session import SessionOptions, open_session

    est, chunk = flow.decoder.estimator, flow.c.chunk_frames
    frames = frames or 3 * chunk + chunk // 2 + 1
    blocks, width, channels, ctx = cache_layout(est)
    g = torch.Generator().manual_seed(seed)
    x, mu, cond = (torch.randn(2, 80, frames, generator=g) for _ in range(3))
    t, spks = torch.rand(2, generator=g), torch.randn(2, 80, generator=g)
    with torch.no_grad():
        ref = est(x, torch.ones(2, 1, frames), mu, t, spks, cond, chunk).numpy()
    sess = open_session(path, SessionOptions())
    past, conv = np.zeros((blocks, 2, 0, width), np.float32), np.zeros((2, channels, ctx), np.float32)
    got, start, steps = [], 0, 0
    for end in sorted({chunk, chunk + chunk // 2, frames}):
        keep = (end // chunk) * chunk - start if end < frames else end - start
        sl = slice(start, end)
        v, new_past, conv = sess.run(None, {"x": x[..., sl].numpy(), "mu": mu[..., sl].numpy(), "t": t.numpy(),
                                            "spks": spks.numpy(), "cond": cond[..., sl].numpy(), "past": past, "conv_context": conv,
                                            "chunk_frames": np.asarray(chunk, np.int64), "keep": np.asarray(keep, np.int64)})
        got.append(v[..., :keep])
        past = np.concatenate([past, new_past], axis=2)
        start += keep
        steps += 1
    err = float(np.max(np.abs(np.concatenate(got, axis=2) - ref)))
    return {"max_abs": err, "threshold": CACHED_ESTIMATOR_MAX_ABS, "frames": frames, "steps": steps,
            "ok": err <= CACHED_ESTIMATOR_MAX_ABS}


def turn_prefix_ids(tokenizer_dir: Path) -> list[int]:
    """What separates a finished assistant reply from the next user turn's speech in the Qwen
    template: the reply's <|im_end|> (never fed: generation stops on it), newline, user header."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    return tok.encode("<|im_end|>\n<|im_start|>user\n", add_special_tokens=False).ids


def _manifest(ckpt: Omni2Checkpoint, ref: Omni2ReferencePipeline, tmp: Path, options: Omni2ExportOptions,
              side_files: dict[str, list[str]]) -> dict:
    c, fc, hc = ckpt.config, ckpt.flow_config, ckpt.hift_config
    stages = []
    for name, file in STAGE_FILES:
        fmt = file.rsplit(".", 1)[1]
        if fmt == "onnx":
            inputs, outputs = io_shapes(tmp / file)
            precision = "fp32"
        elif fmt == "gguf":
            width = c["hidden_size"] if name == "llm" else ckpt.tts_config.hidden_size
            inputs, outputs = {"tokens_or_embeddings": ["n", width]}, {"logits_and_hidden": ["n", "vocab+hidden"]}
            precision = options.llm_dtype
        else:
            arr = np.load(tmp / file, mmap_mode="r")
            inputs, outputs = {}, {"array": list(arr.shape)}
            precision = "fp16" if arr.dtype == np.float16 else "fp32"
        stages.append({"name": name, "file": file, "format": fmt, "precision": precision, "sha256": sha256_file(tmp / file),
                       "inputs": inputs, "outputs": outputs,
                       "extra_files": {f: sha256_file(tmp / f) for f in side_files.get(file, [])}}
                      | ({"flash_attn": default_flash_attn(precision)} if fmt == "gguf" else {}))
    specials = ckpt.tts_specials()
    units = specials["units"]
    first = min(units)
    contiguous = all(units.get(first + i) == i for i in range(len(units)))
    read, write = ckpt.stream_params
    return {
        "format_version": FORMAT_VERSION,
        "family": FAMILY,
        "created_by": f"omnilite {__version__}",
        "source": {
            "model_dir": str(ckpt.model_dir.resolve()),
            "decoder_dir": str(ckpt.decoder_dir.resolve()),
            "speech_encoder": str(ckpt.encoder_path.resolve()) if ckpt.encoder_path else None,
            "speech_encoder_weights": ckpt.encoder_source,
            "model_type": c["model_type"],
            "hidden_size": c["hidden_size"],
            "num_hidden_layers": c["num_hidden_layers"],
            "tts_hidden_size": ckpt.tts_config.hidden_size,
            "tts_num_hidden_layers": ckpt.tts_config.num_hidden_layers,
            "whisper_dims": ckpt.whisper_dims,
        },
        "audio": {"input_sample_rate": 16000, "output_sample_rate": hc.sampling_rate},
        "encoder": encoder_manifest(ref.n_mels, 2 * ckpt.whisper_dims["n_audio_ctx"], 2 * int(c.get("speech_encoder_ds_rate", 5)),
                                    options.encoder_mode),
        "llm": {
            "n_embd": c["hidden_size"],
            "n_vocab": ckpt.llm_config.vocab_size,
            "eos_ids": sorted(ref.eos_ids),
            "prompt": {"prefix_ids": ref.prompt.prefix_ids, "suffix_ids": ref.prompt.suffix_ids, "text": ref.prompt.text,
                       "turn_prefix_ids": turn_prefix_ids(ckpt.tokenizer_dir),
                       "template": "tokenizer_config.json chat_template, one user turn '<speech>'"},
            "max_context": int(c.get("tokenizer_model_max_length", 2048)),
        },
        "tts": {
            "n_embd": ckpt.tts_config.hidden_size,
            "eos_id": ref.tts_eos,
            "sep_id": ref.sep_id,
            "units": {"first_id": first, "count": len(units)} if contiguous else {"ids": sorted(units), "units": [units[k] for k in sorted(units)]},
            "max_tokens_final": DEFAULT_MAX_TTS_TOKENS,
            "decoding": "greedy (parity); the official release samples with temperature 1, top-k 50",
        },
        "speaker": {
            "xvector": [float(v) for v in ref.xvector],
            "spks": [float(v) for v in ref.spks],
            "source": "CAM++ (campplus.onnx) on the --speaker-wav prompt, Kaldi fbank, mean-normalised",
        },
        "flow": {
            "mel_bins": fc.output_size,
            "token_mel_ratio": fc.token_mel_ratio,
            "pre_lookahead_len": fc.pre_lookahead_len,
            "chunk_tokens": fc.chunk_tokens,
            "n_timesteps": fc.n_timesteps,
            "t_scheduler": fc.t_scheduler,
            "inference_cfg_rate": fc.inference_cfg_rate,
            "noise_frames": int(ref.flow.noise.shape[-1]),
        },
        "hift": {
            "hop": hc.hop,
            "sample_rate": hc.sampling_rate,
            "receptive_field_frames": measured_receptive_field(ref.hift),
            "f0_receptive_field": F0_RECEPTIVE_FIELD,
            "source": {
                "harmonics": hc.nb_harmonics + 1,
                "sine_amp": hc.nsf_alpha, "noise_std": hc.nsf_sigma, "voiced_threshold": hc.nsf_voiced_threshold,
                "merge_weight": [float(v) for v in ref.hift.m_source.l_linear.weight.detach().reshape(-1)],
                "merge_bias": float(ref.hift.m_source.l_linear.bias.detach().reshape(())),
                "noise_seed": 0,
                "note": "deterministic: zero initial phases, PCG64(seed) noise in sample order (the official source is random)",
            },
        },
        "streaming": {"read": read, "write": write},
        "stages": stages,
        "parity": {},
    }


def export_tiny_demo_bundle(work: Path, progress: bool = True) -> Path:
    """Make (or reuse) the tiny LLaMA-Omni2 checkpoint and its bundle under `work`."""
    from .tiny import make_tiny_llama_omni2

    ckpt, bundle = work / "tiny-llama-omni2", work / "tiny-llama-omni2-bundle"
    if not (ckpt / "models" / "LLaMA-Omni2-0.5B" / "config.json").exists():
        make_tiny_llama_omni2(ckpt, overwrite=True)
    if not (bundle / MANIFEST).exists():
        import omnilite

        question = Path(omnilite.__file__).parent / "data" / "question.wav"  # any voice will do for random weights
        export_llama_omni2(ckpt, bundle, Omni2ExportOptions(overwrite=True, progress=progress), speaker_wav=question)
    return bundle
