"""The `omnilite` command line.

Every user-fixable problem ends with one sentence on stderr and exit status 2. Export-side
commands import torch lazily, so `omnilite run` stays torch-free.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from omnilite import __version__

FAMILIES = ("llama-omni",)
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


def _respond_to_file(bundle: Path, wav_in: Path, wav_out: Path, text_out: Path | None, args) -> dict:
    from omnilite.runtime import Done, PipelineConfig, TextDelta, Timing, Pipeline
    from omnilite.runtime.audio import atomic_write_bytes, read_wav, write_wav

    audio, rate = read_wav(wav_in)
    config = PipelineConfig(
        encoder_mode=args.encoder_mode, omega=args.omega, max_new_tokens=args.max_new_tokens,
        ignore_eos=args.ignore_eos, threads=args.threads,
    )
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
    from omnilite.export.tiny import make_tiny_llama_omni

    model_dir = make_tiny_llama_omni(Path(args.out), shape=args.shape, seed=args.seed, overwrite=args.force)
    print(f"wrote a {args.shape} {args.family} checkpoint with random weights to {args.out} (model dir {model_dir})")
    return 0


def cmd_export(args) -> int:
    from omnilite.export.llama_omni import ExportOptions, export_llama_omni

    options = ExportOptions(llm_dtype=args.llm_dtype, omega=args.omega, parity=not args.no_parity,
                            strict_parity=not args.no_strict, overwrite=args.force)
    out = export_llama_omni(args.checkpoint, args.out, options, args.speech_encoder, args.vocoder)
    _print_parity(json.loads((out / "omnilite.json").read_text()).get("parity", {}))
    print(f"wrote bundle {out}")
    return 0


def _print_parity(parity: dict) -> None:
    for stage, rep in parity.items():
        if isinstance(rep, dict):
            fields = ", ".join(f"{k}={v}" for k, v in rep.items() if k != "ok")
            print(f"  parity {stage:<17} {'ok  ' if rep.get('ok') else 'FAIL'} {fields}")


def cmd_info(args) -> int:
    from omnilite.runtime.bundle import load_bundle

    b = load_bundle(args.bundle, verify=not args.no_verify)
    print(f"bundle {b.path}: family {b.family}, format {b['format_version']}, {b['created_by']}")
    for s in b.stages.values():
        size = (b.path / s.file).stat().st_size / 2**20
        print(f"  {s.name:<17} {s.file:<24} {s.format:<5} {s.precision:<5} {size:8.1f} MiB")
    _print_parity(b.manifest.get("parity", {}))
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
    print(f"  threads: " + ", ".join(f"{s} {profile.threads_for(s, host)}" for s in profile.threads))
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
    from omnilite.runtime import Pipeline, PipelineConfig
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
    config = PipelineConfig(encoder_mode=args.encoder_mode, omega=args.omega, max_new_tokens=args.max_new_tokens,
                            ignore_eos=args.ignore_eos, threads=args.threads, mode=args.mode, n_ctx=args.n_ctx)
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
                if args.input_file and not audio.running:
                    audio.wait()
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="omnilite", description="Speech-in, speech-out models on edge hardware.")
    p.add_argument("--version", action="version", version=f"omnilite {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("make-tiny", help="write a checkpoint in the official layout with random weights")
    s.add_argument("family", choices=FAMILIES)
    s.add_argument("out")
    s.add_argument("--shape", choices=("tiny", "real"), default="tiny", help="'real' writes the released dimensions (about 17 GB)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--force", action="store_true", help="replace OUT if it exists")
    s.set_defaults(func=cmd_make_tiny)

    s = sub.add_parser("export", help="export a downloaded checkpoint to a bundle, checking parity")
    s.add_argument("checkpoint", help="the HF model dir (or the dir that holds it, models/ and vocoder/)")
    s.add_argument("out")
    s.add_argument("--speech-encoder", help="Whisper large-v3.pt (default: models/speech_encoder/large-v3.pt next to the model dir)")
    s.add_argument("--vocoder", help="unit vocoder dir with g_00500000 and config.json (default: vocoder/ next to the model dir)")
    s.add_argument("--llm-dtype", choices=("f32", "f16"), default="f32")
    s.add_argument("--omega", type=int, default=10, help="text tokens per speech-generator chunk")
    s.add_argument("--no-parity", action="store_true", help="skip the parity check against PyTorch")
    s.add_argument("--no-strict", action="store_true", help="keep the bundle even if a stage misses its parity threshold")
    s.add_argument("--force", action="store_true", help="replace OUT if it exists")
    s.set_defaults(func=cmd_export)

    def add_run_options(s: argparse.ArgumentParser) -> None:
        s.add_argument("--encoder-mode", choices=("exact", "unpadded"), default="exact")
        s.add_argument("--omega", type=int, default=None, help="text tokens per speech chunk (default: the bundle's)")
        s.add_argument("--max-new-tokens", type=int, default=256)
        s.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")
        s.add_argument("--threads", type=int, default=None)

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

    s = sub.add_parser("info", help="show a bundle's stages and parity report")
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
