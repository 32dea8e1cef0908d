"""The `omnilite` command line.

Every user-fixable problem ends with one sentence on stderr and exit status 2. Export-side
commands import torch lazily, so `omnilite run` stays torch-free.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

from omnilite import __version__

FAMILIES = ("llama-omni", "llama-omni2")
DEMO_QUESTION = Path(__file__).parent / "data" / "question.wav"


def _cache_dir() -> Path:
    base = os.environ.get("OMNILITE_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"), "omnilite")
    return Path(base)


def _print_timings(timings: dict[str, float], calls: dict[str, int] | None = None) -> None:
    stages = [k for k in ("resample", "mel", "encoder", "llm_prefill", "llm_decode", "speech_generator", "vocoder") if k in timings]
    busy = sum(timings[k] for k in stages) or 1.0
    print(f"{'stage':<18}{'ms':>10}{'calls':>7}{'share':>8}")
    for k in stages:
        print(f"{k:<18}{timings[k] * 1000:>10.1f}{(calls or {}).get(k, 1):>7}{timings[k] / busy:>8.1%}")
    for k in sorted(k for k in timings if k.endswith("_wait")):  # overlapped mode: time blocked on a queue
        print(f"{k:<18}{timings[k] * 1000:>10.1f}")
    for k, label in (("ttft", "TTFT"), ("ttfa", "TTFA"), ("total", "total")):
        if k in timings:
            print(f"{label:<18}{timings[k] * 1000:>10.1f}")
    if "rtf" in timings:
        print(f"{'RTF':<18}{timings['rtf']:>10.3f}")


def _bundle_family(bundle: Path) -> str | None:
    """The family named in a bundle's manifest (None when unreadable: loading will say why)."""
    try:
        return json.loads((Path(bundle) / "omnilite.json").read_text()).get("family")
    except (OSError, ValueError):
        return None


def _pipeline_config(args, bundle: Path, **fields):
    """The pipeline settings of the device profile (--profile, else the detected one), overridden by
    whatever the command line sets explicitly."""
    from omnilite.devices.host import detect_host
    from omnilite.devices.profiles import choose_profile, pipeline_settings
    from omnilite.runtime import PipelineConfig

    family = _bundle_family(bundle)
    host = detect_host()
    profile, reason = choose_profile(args.profile, host)
    settings = pipeline_settings(profile, host, family or "")
    logging.getLogger(__name__).info("device profile %s (%s)", profile.name, reason)
    if args.threads:  # one thread count for every stage
        settings.pop("stage_threads")
    write = settings.pop("write", None)
    settings.update({k: v for k, v in (("omega", args.omega), ("threads", args.threads)) if v is not None})
    config = PipelineConfig(encoder_mode=args.encoder_mode, max_new_tokens=args.max_new_tokens,
                            ignore_eos=args.ignore_eos, **settings, **fields)
    if family == "llama-omni2":
        from omnilite.runtime.omni2.flow import FlowStreamConfig
        from omnilite.runtime.omni2.pipeline import as_omni2_config

        config = dataclasses.replace(as_omni2_config(config), write=args.write or write,
                                     flow=FlowStreamConfig(chunk_tokens=args.flow_chunk))
    return config


def _respond_to_file(bundle: Path, wav_in: Path, wav_out: Path, text_out: Path | None, args) -> dict:
    from omnilite.runtime import Done, TextDelta, Timing, Pipeline
    from omnilite.runtime.audio import atomic_write_bytes, read_wav, write_wav

    audio, rate = read_wav(wav_in)
    config = _pipeline_config(args, bundle)
    calls: dict[str, int] = {}
    with Pipeline.load(bundle, config) as pipe:
        print("reply: ", end="", flush=True)
        for event in pipe.respond(audio, rate):
            if isinstance(event, TextDelta):
                print(event.text, end="", flush=True)
            elif isinstance(event, Timing):
                calls[event.stage] = event.calls
            elif isinstance(event, Done):
                done = event
    print()
    write_wav(wav_out, done.audio, done.sample_rate)
    if text_out:
        atomic_write_bytes(text_out, (done.text + "\n").encode())
    print(f"wrote {wav_out} ({len(done.audio) / done.sample_rate:.2f} s at {done.sample_rate} Hz, "
          f"{len(done.tokens)} tokens, {len(done.units)} units)" + (f" and {text_out}" if text_out else ""))
    _print_timings(done.timings, calls)
    return done.timings


def cmd_make_tiny(args) -> int:
    if args.family == "llama-omni2":
        from omnilite.export.omni2.tiny import make_tiny_llama_omni2

        shape = args.size if args.shape == "real" else "tiny"
        model_dir = make_tiny_llama_omni2(Path(args.out), shape=shape, seed=args.seed, overwrite=args.force)
        print(f"wrote a {shape} {args.family} checkpoint with random weights to {args.out} (model dir {model_dir})")
        return 0
    from omnilite.export.tiny import make_tiny_llama_omni

    model_dir = make_tiny_llama_omni(Path(args.out), shape=args.shape, seed=args.seed, overwrite=args.force)
    print(f"wrote a {args.shape} {args.family} checkpoint with random weights to {args.out} (model dir {model_dir})")
    return 0


def _is_omni2(checkpoint: str) -> bool:
    """The checkpoint's config.json (the model dir's, or the one under models/) names its family."""
    root = Path(checkpoint)
    for cfg in [root / "config.json", *sorted(root.glob("models/LLaMA-Omni2-*/config.json"))]:
        if cfg.is_file():
            try:
                return str(json.loads(cfg.read_text()).get("model_type", "")).startswith("omni2_")
            except ValueError:
                return False
    return False


def _export_omni2(args) -> int:
    from omnilite.export.omni2.export import Omni2ExportOptions, export_llama_omni2

    options = Omni2ExportOptions(llm_dtype=args.llm_dtype, parity=not args.no_parity, strict_parity=not args.no_strict,
                                 overwrite=args.force, **({"encoder_mode": args.encoder_mode} if args.encoder_mode else {}))
    if args.preset != "fp32" or any(_quant_overrides(args).values()):
        return _export_quantized(args, "llama-omni2", lambda path, overwrite: export_llama_omni2(
            args.checkpoint, path, dataclasses.replace(options, overwrite=overwrite), args.speech_encoder, args.decoder,
            args.speaker_wav))
    out = export_llama_omni2(args.checkpoint, args.out, options, args.speech_encoder, args.decoder, args.speaker_wav)
    _print_parity(json.loads((out / "omnilite.json").read_text()).get("parity", {}))
    print(f"wrote bundle {out}")
    return 0


def cmd_export(args) -> int:
    if _is_omni2(args.checkpoint):
        return _export_omni2(args)
    from omnilite.export.llama_omni import ExportOptions, export_llama_omni

    options = ExportOptions(llm_dtype=args.llm_dtype, omega=args.omega, parity=not args.no_parity,
                            strict_parity=not args.no_strict, overwrite=args.force,
                            **({"encoder_mode": args.encoder_mode} if args.encoder_mode else {}))
    if args.preset != "fp32" or any(_quant_overrides(args).values()):
        return _export_quantized(args, "llama-omni", lambda path, overwrite: export_llama_omni(
            args.checkpoint, path, dataclasses.replace(options, overwrite=overwrite), args.speech_encoder, args.vocoder))
    out = export_llama_omni(args.checkpoint, args.out, options, args.speech_encoder, args.vocoder)
    _print_parity(json.loads((out / "omnilite.json").read_text()).get("parity", {}))
    print(f"wrote bundle {out}")
    return 0


def _print_parity(parity: dict) -> None:
    for stage, rep in parity.items():
        if isinstance(rep, dict):
            fields = ", ".join(f"{k}={v}" for k, v in rep.items() if k != "ok")
            print(f"  parity {stage:<17} {'ok  ' if rep.get('ok') else 'FAIL'} {fields}")


def _quant_overrides(args) -> dict[str, str | None]:
    return {"encoder": args.q_encoder, "llm": args.q_llm, "decoder": args.q_decoder, "tts": args.q_tts,
            "flow": args.q_flow, "vocoder": args.q_vocoder}


def _quant_options(args, **extra):
    from omnilite.quant import QuantizeOptions
    from omnilite.quant.presets import parse_tolerances

    return QuantizeOptions(preset=args.preset, overrides=_quant_overrides(args), strict=args.strict, overwrite=args.force,
                           tolerances=parse_tolerances(args.tolerance), report=not args.no_report,
                           report_tokens=args.report_tokens, threads=args.threads, **extra)


def _print_quantization(manifest: dict, stream=None) -> None:
    from omnilite.quant.accuracy import format_report
    from omnilite.quant.bundle_quant import format_sizes

    q = manifest.get("quantization")
    if not q:
        return
    source = q["source"].get("path") or q["source"].get("note")
    print(f"quantization: preset {q['preset']}{' (requantized)' if q.get('requantized') else ''}, from {source}", file=stream)
    for line in format_sizes(manifest):
        print(line, file=stream)
    if q.get("accuracy"):
        for line in format_report(q["accuracy"]):
            print(line, file=stream)
        if not q["accuracy"]["ok"]:
            print(f"WARNING: stage(s) {', '.join(q['accuracy']['failed'])} exceed their tolerance (FAIL lines above)",
                  file=sys.stderr)
    else:
        print("  accuracy: not measured (quantized with --no-report)", file=stream)


def _quantize_and_print(run) -> int:
    from omnilite.quant import QuantizationFailed, format_report

    try:
        result = run()
    except QuantizationFailed as e:
        for line in format_report(e.report):
            print(line)
        raise
    _print_quantization(result.manifest)
    print(f"wrote bundle {result.path}")
    return 0


def _export_quantized(args, family: str, export) -> int:
    """`export(path, overwrite)` writes the unquantized bundle of `family`."""
    from omnilite.quant import export_with_preset, plan_for

    plan_for(args.preset, _quant_overrides(args), family)  # a bad override fails before the export
    return _quantize_and_print(lambda: export_with_preset(export, args.out, _quant_options(args),
                                                          keep_unquantized=args.keep_unquantized))


def cmd_quantize(args) -> int:
    from omnilite.quant import quantize_bundle

    options = _quant_options(args, allow_requantize=args.allow_requantize, reference=args.reference)
    return _quantize_and_print(lambda: quantize_bundle(args.bundle, args.out, options))


def cmd_info(args) -> int:
    from omnilite.runtime.bundle import load_bundle

    b = load_bundle(args.bundle, verify=not args.no_verify)
    print(f"bundle {b.path}: family {b.family}, format {b['format_version']}, {b['created_by']}")
    for s in b.stages.values():
        size = sum((b.path / f).stat().st_size for f in [s.file, *s.extra_files]) / 2**20
        print(f"  {s.name:<17} {s.file:<24} {s.format:<5} {s.precision:<6} {size:8.1f} MiB")
    _print_parity(b.manifest.get("parity", {}))
    if "quantization" in b.manifest:
        _print_quantization(b.manifest)
    return 0


def cmd_run(args) -> int:
    _respond_to_file(Path(args.bundle), Path(args.input), Path(args.output), Path(args.text_output) if args.text_output else None, args)
    return 0


def cmd_demo(args) -> int:
    from omnilite.export.llama_omni import export_tiny_demo_bundle

    work = Path(args.work_dir) if args.work_dir else _cache_dir() / "demo"
    print("omnilite demo: the tiny LLaMA-Omni model has RANDOM weights, so its reply is babble "
          "(text and audio); the point is the full path and its timings.")
    bundle = export_tiny_demo_bundle(work)
    out_dir = Path(args.out_dir)
    question = Path(args.input) if args.input else DEMO_QUESTION
    print(f"bundle: {bundle}\nquestion: {question}")
    _respond_to_file(bundle, question, out_dir / "reply.wav", out_dir / "reply.txt", args)
    return 0


def cmd_devices(args) -> int:
    from omnilite.devices.host import detect_host
    from omnilite.devices.profiles import get_profile, resolve_providers, select_profile

    host = detect_host()
    if args.profile:
        profile, reason = get_profile(args.profile), "chosen with --profile"
    else:
        profile, reason = select_profile(host)
    providers, warnings = resolve_providers(profile, host.ort_providers)
    if args.json:
        print(json.dumps({"host": host.to_dict(), "profile": profile.name, "reason": reason,
                          "providers": providers, "warnings": warnings}, indent=2))
        return 0
    print(f"host: {host.cpu_model} ({host.cpu_vendor}), {host.arch}, {host.os}")
    print(f"  cores: {host.physical_cores} physical / {host.logical_cores} logical; RAM {host.ram_gb:.1f} GiB")
    print(f"  CPU features: {' '.join(sorted(host.features)) or 'none detected'}")
    print(f"  onnxruntime providers: {', '.join(host.ort_providers) or 'onnxruntime not installed'}")
    for label, value in (("CUDA GPUs", ", ".join(host.cuda_gpus)), ("Jetson", host.jetson_model), ("board", host.board_model)):
        if value:
            print(f"  {label}: {value}")
    print(f"profile: {profile.name} ({profile.description})")
    print(f"  because: {reason}")
    print(f"  providers: {', '.join(providers)}; llama.cpp GPU layers {profile.n_gpu_layers}; precision {profile.precision}")
    print("  threads: " + ", ".join(f"{s} {profile.threads_for(s, host)}" for s in profile.threads))
    print(f"  chunks: omega {profile.omega}, R/W {profile.read}/{profile.write}; memory budget {profile.memory_budget_mb} MB")
    return 0


def _chat_line(done) -> str:
    t, st = done.timings, done.stats
    parts = [f"[turn {done.turn}]"]
    for key, label in (("ttft", "TTFT"), ("ttfa", "TTFA")):
        if key in t:
            parts.append(f"{label} {t[key] * 1000:.0f} ms")
    parts.append("(from end of speech)")
    if "rtf" in t:
        parts.append(f"RTF {t['rtf']:.3f}")
    parts.append(f"underruns {st.get('underruns', 0)}")
    waits = [f"{k[:-5]} {t[k] * 1000:.0f}" for k in sorted(t) if k.endswith("_wait")]
    if waits:
        parts.append("queue waits (ms) " + ", ".join(waits))
    if "prompt_tokens" in st:
        parts.append(f"prompt {st['prompt_tokens']} of {st['context']} context tokens evaluated")
    return "  ".join(parts)


def cmd_chat(args) -> int:
    from omnilite.runtime import Pipeline
    from omnilite.runtime.audio import write_wav
    from omnilite.runtime.audio_io import DeviceAudio, FileAudio, FileLoopConfig, _sounddevice, list_devices
    from omnilite.runtime.errors import OmniliteError
    from omnilite.runtime.events import Done, Interrupted, TextDelta, TurnEnded, TurnStarted
    from omnilite.runtime.session import Session, SessionConfig

    if args.list_devices:
        print(list_devices())
        return 0
    if not args.bundle:
        raise OmniliteError("chat needs a BUNDLE directory (or --list-devices); e.g. `omnilite chat my-bundle`.")
    if bool(args.input_file) != bool(args.output_file):
        raise OmniliteError("--input-file and --output-file go together (the simulated microphone and its speaker); pass both.")
    if not args.input_file:
        _sounddevice()  # no sound card support: say so before loading a multi-GB model
    config = _pipeline_config(args, Path(args.bundle), mode=args.mode, n_ctx=args.n_ctx)
    session_config = SessionConfig(vad=args.vad, min_silence_ms=args.min_silence_ms, barge_in=not args.no_barge_in)
    underruns = turns = 0
    with Pipeline.load(Path(args.bundle), config) as pipe, Session(pipe, session_config) as session:
        if args.input_file:
            audio = FileAudio(session, args.input_file, FileLoopConfig(block_ms=args.block_ms, pace=args.pace))
            print(f"simulated microphone: {args.input_file} at {args.pace:g}x real time (VAD: {session.vad.name})")
        else:
            audio = DeviceAudio(session, args.input_device, args.output_device, block_ms=args.block_ms)
            print(f"listening (VAD: {session.vad.name}); speak, and press Ctrl-C to stop")
        audio.start()
        try:
            while True:
                for e in session.poll(0.05):
                    if isinstance(e, TurnStarted):
                        print(f"\n[turn {e.turn}] you: speaking at {e.at:.2f} s", flush=True)
                    elif isinstance(e, TurnEnded):
                        print(f"[turn {e.turn}] end of speech at {e.end_of_speech:.2f} s (endpoint after {e.silence:.2f} s "
                              f"of silence)\nassistant: ", end="", flush=True)
                    elif isinstance(e, TextDelta):
                        print(e.text, end="", flush=True)
                    elif isinstance(e, Interrupted):
                        print(f" [interrupted after {e.played:.2f} s of audio]", flush=True)
                    elif isinstance(e, Done):
                        turns += 1
                        underruns += e.stats.get("underruns", 0)
                        print("\n" + _chat_line(e), flush=True)
                if not audio.running:  # the file is done, or the sound card stream stopped
                    audio.wait()  # raises what stopped it, if anything did
                    break
        except KeyboardInterrupt:
            print("\nstopped")
        finally:
            audio.stop()
    if args.input_file:
        write_wav(args.output_file, audio.stats.output, pipe.sample_rate)
        print(f"wrote {args.output_file} ({len(audio.stats.output) / pipe.sample_rate:.2f} s: what the speaker played)")
    print(f"{turns} replies, {underruns} underruns" + (" (the vocoder did not keep real time)" if underruns else ""))
    return 0


def _encoder_mode(text: str) -> str:
    """argparse type for --encoder-mode: the canonical mode name, or one sentence on what is wrong."""
    from omnilite.runtime.encoder import EncoderMode
    from omnilite.runtime.errors import OmniliteError

    try:
        return EncoderMode.parse(text).name
    except OmniliteError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def cmd_bench(args) -> int:
    from omnilite.benchmarks.bench import BenchConfig, run_bench

    report = run_bench(BenchConfig(
        bundle=Path(args.bundle), input=Path(args.input) if args.input else DEMO_QUESTION, out_dir=Path(args.out_dir),
        runs=args.runs, warmup=args.warmup, max_new_tokens=args.max_new_tokens, profile=args.profile,
        baseline=args.baseline, encoder_mode=args.encoder_mode, estimate=tuple(args.estimate or ()),
    ))
    from omnilite.benchmarks.bench import markdown

    print(markdown(report), end="")
    print(f"wrote {args.out_dir}/bench.json, bench.md and waterfall.png")
    return 0


def cmd_bench_encoder(args) -> int:
    from omnilite.benchmarks.encoder_drift import config_from_args, result_stem, run_drift, summary_text

    report = run_drift(config_from_args(args))
    print(summary_text(report))
    print(f"wrote {Path(args.out_dir) / result_stem(args.model)}.json and .md")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="omnilite", description="Speech-in, speech-out models on edge hardware.")
    p.add_argument("--version", action="version", version=f"omnilite {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = p.add_subparsers(dest="command", required=True)

    def add_quant_options(s: argparse.ArgumentParser, suffix: str = "") -> None:
        """`suffix`: export already has --vocoder (the vocoder checkpoint dir), so there the
        per-stage precisions are --encoder-precision etc."""
        from omnilite.quant.presets import GGUF_PRECISIONS, ONNX_PRECISIONS, PRESETS

        s.add_argument("--preset", choices=tuple(PRESETS), default="balanced",
                       help="fp32 (as exported), balanced (INT8 + Q8_0), small (INT4 + Q4_K_M; LLaMA-Omni2's flow "
                            "INT8), gpu-fp16; a preset's roles a bundle's family lacks are ignored, an override of one "
                            "is refused")
        s.add_argument(f"--encoder{suffix}", dest="q_encoder", choices=ONNX_PRECISIONS, help="override the preset for the speech encoder")
        s.add_argument(f"--llm{suffix}", dest="q_llm", choices=GGUF_PRECISIONS, help="override the preset for the LLM (llama.cpp type)")
        s.add_argument(f"--decoder{suffix}", dest="q_decoder", choices=ONNX_PRECISIONS,
                       help="LLaMA-Omni: override the preset for the CTC speech decoder")
        s.add_argument(f"--tts{suffix}", dest="q_tts", choices=GGUF_PRECISIONS,
                       help="LLaMA-Omni2: override the preset for the TTS LM (llama.cpp type; its text-embedding table "
                            "goes fp16 below F32)")
        s.add_argument(f"--flow{suffix}", dest="q_flow", choices=ONNX_PRECISIONS,
                       help="LLaMA-Omni2: override the preset for the flow-matching decoder (encoder + estimator)")
        s.add_argument(f"--vocoder{suffix}", dest="q_vocoder", choices=("fp32", "fp16", "int8"),
                       help="override the preset for the vocoder (LLaMA-Omni: unit HiFi-GAN; LLaMA-Omni2: HiFT)")
        s.add_argument("--strict", action="store_true", help="fail (exit 2, nothing written) if a stage exceeds its tolerance")
        s.add_argument("--tolerance", action="append", metavar="ROLE.METRIC=VALUE",
                       help="override a tolerance, e.g. encoder.cosine_mean=0.995 (repeatable)")
        s.add_argument("--report-tokens", type=int, default=32, help="LLM tokens in the accuracy report")
        s.add_argument("--no-report", action="store_true", help="skip the accuracy report (not recommended)")
        s.add_argument("--threads", type=int, default=None)

    s = sub.add_parser("make-tiny", help="write a checkpoint in the official layout with random weights")
    s.add_argument("family", choices=FAMILIES)
    s.add_argument("out")
    s.add_argument("--shape", choices=("tiny", "real"), default="tiny", help="'real' writes the released dimensions (about 17 GB)")
    s.add_argument("--size", choices=("0.5B", "1.5B", "7B"), default="0.5B",
                   help="llama-omni2 with --shape real: which release (0.5B is about 3.3 GB in bf16)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--force", action="store_true", help="replace OUT if it exists")
    s.set_defaults(func=cmd_make_tiny)

    s = sub.add_parser("export", help="export a downloaded checkpoint to a bundle, checking parity")
    s.add_argument("checkpoint", help="the HF model dir (or the dir that holds it, models/ and vocoder/)")
    s.add_argument("out")
    s.add_argument("--speech-encoder", help="Whisper large-v3.pt (default: models/speech_encoder/large-v3.pt next to the model dir)")
    s.add_argument("--vocoder", help="unit vocoder dir with g_00500000 and config.json (default: vocoder/ next to the model dir)")
    s.add_argument("--decoder", help="LLaMA-Omni2: the CosyVoice2 decoder dir (default: models/cosy2_decoder)")
    s.add_argument("--speaker-wav", help="LLaMA-Omni2: the voice prompt (official: llama_omni2/inference/prompt_en.wav)")
    s.add_argument("--llm-dtype", choices=("f32", "f16"), default="f32")
    s.add_argument("--omega", type=int, default=10, help="text tokens per speech-generator chunk")
    s.add_argument("--encoder-mode", type=_encoder_mode, default=None, metavar="MODE",
                   help="the bundle's default encoder mode (default: the fast mode chosen by the encoder drift benchmark; "
                        "'exact' pads to 30 s as trained)")
    s.add_argument("--no-parity", action="store_true", help="skip the parity check against PyTorch")
    s.add_argument("--no-strict", action="store_true", help="keep the bundle even if a stage misses its parity threshold")
    s.add_argument("--force", action="store_true", help="replace OUT if it exists")
    add_quant_options(s, suffix="-precision")
    s.add_argument("--keep-unquantized", metavar="DIR", help="with a preset other than fp32: keep the unquantized export in DIR")
    s.set_defaults(func=cmd_export, preset="fp32")

    s = sub.add_parser("quantize", help="quantize a bundle's stages (INT8/INT4 ONNX, llama.cpp GGUF) and report their accuracy")
    s.add_argument("bundle", help="the unquantized bundle (from `omnilite export`)")
    s.add_argument("out", help="directory for the quantized bundle")
    add_quant_options(s)
    s.add_argument("--force", action="store_true", help="replace OUT if it exists")
    s.add_argument("--allow-requantize", action="store_true",
                   help="quantize an already-quantized bundle further (GGUF only; errors add up; needs --reference)")
    s.add_argument("--reference", metavar="BUNDLE", help="the unquantized bundle to measure a requantization against")
    s.set_defaults(func=cmd_quantize)

    def add_run_options(s: argparse.ArgumentParser) -> None:
        s.add_argument("--encoder-mode", type=_encoder_mode, default=None, metavar="MODE",
                       help="exact (pad to 30 s as trained), or a fast mode: unpadded, pad-Ns, tail-Ns, blocked-Ns, "
                            "optionally +fill (default: the bundle's)")
        s.add_argument("--omega", type=int, default=None,
                       help="text tokens per speech chunk (LLaMA-Omni2: the read size R) (default: the bundle's)")
        s.add_argument("--write", type=int, default=None, help="LLaMA-Omni2: speech tokens written per read (W; default: the bundle's)")
        s.add_argument("--flow-chunk", type=int, default=None,
                       help="LLaMA-Omni2: the flow's attention chunk in tokens (default 50; 25 gives earlier audio)")
        s.add_argument("--max-new-tokens", type=int, default=256)
        s.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")
        s.add_argument("--threads", type=int, default=None, help="threads for every stage (default: the device profile's)")
        s.add_argument("--profile", help="device profile name or .json: providers, threads, chunk sizes (default: the detected one)")

    s = sub.add_parser("run", help="answer a spoken question from a WAV file")
    s.add_argument("bundle")
    s.add_argument("--input", required=True, help="question WAV (any rate, mono or stereo)")
    s.add_argument("--output", required=True, help="reply WAV to write")
    s.add_argument("--text-output", help="also write the reply text here")
    add_run_options(s)
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("demo", help="tiny model end to end: make, export, answer the bundled question")
    s.add_argument("--work-dir", help="where the tiny checkpoint and bundle are cached (default ~/.cache/omnilite/demo)")
    s.add_argument("--out-dir", default="omnilite-demo", help="where reply.wav and reply.txt go")
    s.add_argument("--input", help="question WAV (default: the bundled question)")
    add_run_options(s)
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("devices", help="show the detected host and the device profile chosen for it")
    s.add_argument("--profile", help="a profile name or .json file instead of the detected one")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_devices)

    s = sub.add_parser("chat", help="talk with a bundle through the microphone and speaker (or WAV files)")
    s.add_argument("bundle", nargs="?", help="bundle directory (not needed with --list-devices)")
    s.add_argument("--input-file", help="simulated microphone: a WAV file played into the session at --pace")
    s.add_argument("--output-file", help="with --input-file: write what the speaker played here")
    s.add_argument("--pace", type=float, default=1.0, help="simulated microphone speed (1 = real time)")
    s.add_argument("--block-ms", type=float, default=20.0, help="audio block per loop step")
    s.add_argument("--input-device", help="microphone (index or name from --list-devices)")
    s.add_argument("--output-device", help="speaker (index or name from --list-devices)")
    s.add_argument("--list-devices", action="store_true", help="list audio devices and exit")
    s.add_argument("--vad", choices=("auto", "silero", "energy"), default="auto")
    s.add_argument("--min-silence-ms", type=int, default=600, help="silence that ends your turn")
    s.add_argument("--no-barge-in", action="store_true", help="do not let speech interrupt a reply")
    s.add_argument("--mode", choices=("overlapped", "sequential"), default="overlapped", help="run stages in worker threads or one after another")
    s.add_argument("--n-ctx", type=int, default=8192, help="LLM context for the whole conversation")
    add_run_options(s)
    s.set_defaults(func=cmd_chat)

    from omnilite.benchmarks.encoder_drift import build_arg_parser as add_drift_options

    s = sub.add_parser("bench", help="per-stage and end-to-end latency of a bundle on this host (JSON, markdown, waterfall)")
    s.add_argument("bundle")
    s.add_argument("--profile", help="device profile name or .json (default: the detected one)")
    s.add_argument("--runs", type=int, default=5)
    s.add_argument("--warmup", type=int, default=1)
    s.add_argument("--input", help="question WAV (default: the bundled question)")
    s.add_argument("--max-new-tokens", type=int, default=64, help="forced reply length (EOS is ignored)")
    s.add_argument("--encoder-mode", default="exact", help="encoder mode to measure (default exact)")
    s.add_argument("--baseline", choices=("torch",), help="also run the PyTorch reference in the same run")
    s.add_argument("--estimate", action="append", metavar="PROFILE",
                   help="estimate per-stage times and TTFA on PROFILE (repeatable; 'all': every built-in profile) "
                        "from the work measured here; the model is checked against this host's own measurement")
    s.add_argument("--out-dir", default="bench-out")
    s.set_defaults(func=cmd_bench)

    s = sub.add_parser("bench-encoder", help="encoder modes against exact on real Whisper weights: speed, drift, transcripts")
    add_drift_options(s)
    s.set_defaults(func=cmd_bench_encoder)

    s = sub.add_parser("info", help="show a bundle's stages, parity report and quantization accuracy")
    s.add_argument("bundle")
    s.add_argument("--no-verify", action="store_true", help="skip sha256 verification")
    s.set_defaults(func=cmd_info)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from omnilite.runtime.errors import OmniliteError

    try:
        return args.func(args)
    except OmniliteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
