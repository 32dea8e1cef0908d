"""The token2wav voice prompt, computed once at export from ``--speaker-wav`` and stored in the bundle.

token2wav.py (@3556c4ce ``Token2wav.__call__``) conditions the flow on three things derived from the
prompt recording:

* prompt speech tokens: S3Tokenizer v2 (``speech_tokenizer_v2_25hz.onnx``) on the 16 kHz Whisper-style
  128-bin log-mel (no padding) -> 25 Hz token ids;
* the speaker embedding: CAM++ (``campplus.onnx``) on an 80-bin Kaldi fbank (dither 0) with its
  per-bin mean removed -> (192,);
* the prompt mel: the recording at 24 kHz -> CosyVoice's matcha ``mel_spectrogram`` (n_fft 1920, hop
  480, Hann 1920, 80 bins 0-8 kHz Slaney, reflect pad 720 both sides, no centring, magnitude,
  natural log clamped at 1e-5) -> (frames, 80).

The official code loads the tokenizer ONNX's weights into the s3tokenizer package; we run the same
file with ONNX Runtime, as CosyVoice2's own frontend does (inputs ``feats`` (1, 128, T) and
``feats_length`` (1,)). The tiny's two files are small stand-in graphs with those interfaces, so the
same code runs on both. The runtime needs neither file: it reads the result (`VOICE_PROMPT_FILE`).

The flow expects exactly 2 mel frames per prompt token (the reference cuts the prompt's frames by
token count); the two front ends differ by a frame or two, so the mel is cut, or its last frame
repeated, to 2 x tokens (the later token2wav copies' rule, NOTES.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from omnilite.runtime.errors import CheckpointError, OmniliteError
from omnilite.runtime.mel import LogMel, _hz_to_mel, _mel_to_hz
from omnilite.runtime.onnx_session import open_session

from ..omni2.fbank import kaldi_fbank

VOICE_PROMPT_FILE = "voice_prompt.npz"
TOKENIZER_FILE = "speech_tokenizer_v2_25hz.onnx"
CAMPPLUS_FILE = "campplus.onnx"
MAX_PROMPT_SECONDS = 30.0  # the S3 tokenizer's window (CosyVoice refuses longer prompts)
MEL_RATE, MEL_FFT, MEL_HOP, MEL_BINS, MEL_FMAX = 24000, 1920, 480, 80, 8000.0


@dataclass(frozen=True)
class VoicePrompt:
    tokens: np.ndarray  # (P,) int64 speech token ids
    mel: np.ndarray  # (2P, 80) float32
    xvector: np.ndarray  # (192,) float32
    seconds: float

    def save(self, path: Path) -> None:
        with open(path, "wb") as f:  # np.savez would append ".npz" to a name without it
            np.savez(f, prompt_tokens=self.tokens, prompt_mel=self.mel, xvector=self.xvector)


def slaney_mel_filters(n_mels: int, rate: int, n_fft: int, fmax: float) -> np.ndarray:
    """librosa.filters.mel(sr, n_fft, n_mels, fmin=0, fmax) (Slaney scale and area norm), float32."""
    freqs = np.linspace(0.0, rate / 2, n_fft // 2 + 1)
    pts = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(fmax), n_mels + 2))
    ramps = pts[:, None] - freqs[None, :]
    widths = np.diff(pts)
    weights = np.maximum(0.0, np.minimum(-ramps[:-2] / widths[:-1, None], ramps[2:] / widths[1:, None]))
    return (weights * (2.0 / (pts[2:] - pts[:-2]))[:, None]).astype(np.float32)


@torch.no_grad()
def prompt_mel(wav_24k: np.ndarray) -> np.ndarray:
    """CosyVoice's 24 kHz flow mel of a mono recording -> (frames, 80) float32."""
    pad = (MEL_FFT - MEL_HOP) // 2
    y = F.pad(torch.from_numpy(np.asarray(wav_24k, np.float32))[None, None], (pad, pad), mode="reflect")[:, 0]
    spec = torch.stft(y, MEL_FFT, hop_length=MEL_HOP, win_length=MEL_FFT, window=torch.hann_window(MEL_FFT),
                      center=False, return_complex=True)
    mag = torch.sqrt(spec.real ** 2 + spec.imag ** 2 + 1e-9)
    mel = torch.from_numpy(slaney_mel_filters(MEL_BINS, MEL_RATE, MEL_FFT, MEL_FMAX)) @ mag
    return torch.log(torch.clamp(mel, min=1e-5))[0].T.contiguous().numpy()


def prompt_speech_tokens(tokenizer_onnx: Path, wav_16k: np.ndarray) -> np.ndarray:
    """S3Tokenizer v2 ids of a 16 kHz recording (the ONNX file run by ONNX Runtime)."""
    feats = LogMel(128)(wav_16k, pad_to_30s=False)[None]
    session = open_session(tokenizer_onnx)
    names = [i.name for i in session.get_inputs()]
    length_type = np.int32 if session.get_inputs()[1].type == "tensor(int32)" else np.int64
    out = session.run(None, {names[0]: feats, names[1]: np.array([feats.shape[2]], length_type)})[0]
    return np.asarray(out, np.int64).reshape(-1)


def speaker_xvector(campplus_onnx: Path, wav_16k: np.ndarray) -> np.ndarray:
    """CAM++ embedding (192,) on the mean-normalised Kaldi fbank."""
    feat = kaldi_fbank(wav_16k)
    feat = feat - feat.mean(axis=0, keepdims=True)
    session = open_session(campplus_onnx)
    out = session.run(None, {session.get_inputs()[0].name: feat[None].astype(np.float32)})[0]
    return np.asarray(out, np.float32).reshape(-1)


def align_mel(mel: np.ndarray, n_tokens: int) -> np.ndarray:
    """Cut the mel, or repeat its last frame, to 2 frames per prompt token."""
    want = 2 * n_tokens
    if len(mel) >= want:
        return np.ascontiguousarray(mel[:want])
    return np.concatenate([mel, np.repeat(mel[-1:], want - len(mel), axis=0)])


def voice_prompt(token2wav_dir: Path, speaker_wav: str | Path | None, vocab_size: int) -> VoicePrompt:
    """The flow's prompt conditioning from the recording at `speaker_wav` (any rate, mixed to mono)."""
    from omnilite.runtime.audio import prepare_speech, read_wav

    if speaker_wav is None:
        raise OmniliteError("Step-Audio 2 speaks in the voice of a prompt recording; pass --speaker-wav (the official "
                            "examples use assets/default_female.wav or default_male.wav of the Step-Audio2 repository).")
    for name in (TOKENIZER_FILE, CAMPPLUS_FILE):
        if not (Path(token2wav_dir) / name).is_file():
            raise CheckpointError(f"{Path(token2wav_dir) / name} is missing; the voice prompt needs it (download the "
                                  "release's token2wav folder).")
    audio, rate = read_wav(Path(speaker_wav))
    wav_16k = prepare_speech(audio, rate, 16000, source=str(speaker_wav))
    seconds = len(wav_16k) / 16000
    if seconds > MAX_PROMPT_SECONDS:
        raise OmniliteError(f"{speaker_wav} is {seconds:.1f} s long; the speech tokenizer takes at most "
                            f"{MAX_PROMPT_SECONDS:.0f} s: pass a shorter voice prompt (3-10 s is typical).")
    tokens = prompt_speech_tokens(Path(token2wav_dir) / TOKENIZER_FILE, wav_16k)
    if len(tokens) == 0 or tokens.min() < 0 or tokens.max() >= vocab_size:
        raise OmniliteError(f"the speech tokenizer gave {len(tokens)} tokens for {speaker_wav}, not ids in 0..{vocab_size - 1}; "
                            "check token2wav/speech_tokenizer_v2_25hz.onnx.")
    mel = align_mel(prompt_mel(prepare_speech(audio, rate, MEL_RATE, source=str(speaker_wav))), len(tokens))
    return VoicePrompt(tokens, mel.astype(np.float32), speaker_xvector(Path(token2wav_dir) / CAMPPLUS_FILE, wav_16k), seconds)
