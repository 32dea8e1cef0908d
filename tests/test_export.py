"""Every exported stage against the PyTorch reference, on the committed spoken question."""

import json

import numpy as np
import pytest
import torch

from omnilite.runtime.bundle import load_bundle, sha256_file
from omnilite.runtime.encoder import SpeechEncoder
from omnilite.runtime.metrics import relative_max_error, snr_db
from omnilite.runtime.units import StreamingUnitGenerator
from omnilite.runtime.vocoder import UnitVocoder


def test_manifest_lists_every_stage_with_hash_and_passing_parity(bundle):
    m = json.loads((bundle / "omnilite.json").read_text())
    assert m["format_version"] == 1 and m["family"] == "llama-omni"
    files = {s["name"]: s for s in m["stages"]}
    assert set(files) == {"encoder", "llm", "speech_generator", "unit_duration", "vocoder"}
    for s in files.values():
        assert s["sha256"] == sha256_file(bundle / s["file"])
    assert files["encoder"]["inputs"]["mel"] == [1, 128, "mel_frames"]
    parity = m["parity"]
    for stage in ("mel", "encoder", "llm", "speech_generator", "vocoder"):
        assert parity[stage]["ok"], (stage, parity[stage])
    assert parity["llm"]["greedy_tokens_identical"] == 32 and parity["llm"]["hidden_cosine_min"] >= 0.999
    assert parity["llm"]["first_logits_max_abs"] <= 1e-3 and parity["llm"]["flash_attn"] == "off" and parity["llm"]["inputs"] == 3
    assert files["llm"]["flash_attn"] == "off"  # the f32 GGUF runs the exact path
    # The official precedence: the safetensors copy of the Whisper encoder over large-v3.pt's.
    assert m["source"]["speech_encoder_weights"] == "safetensors (model.speech_encoder.*)"


@pytest.mark.parametrize("mode", ["exact", "unpadded"])
def test_encoder_onnx_matches_pytorch(bundle, reference, question_16k, mode):
    mel, ref = reference.speech_embeddings(question_16k, pad_to_30s=(mode == "exact"))
    enc = SpeechEncoder(load_bundle(bundle))
    got = enc(question_16k, mode)
    assert got.shape == ref.shape == ((300, 64) if mode == "exact" else (len(question_16k) // 1600, 64))
    assert relative_max_error(ref.numpy(), got) <= 1e-3


@pytest.fixture(scope="module")
def reference_reply(reference, question_16k):
    return reference.generate(question_16k, max_new_tokens=40, ignore_eos=True)


@pytest.mark.parametrize("omega", [1, 3, 10, 1000])
def test_units_identical_offline_and_chunked(bundle, reference_reply, omega):
    gen = StreamingUnitGenerator(load_bundle(bundle))
    hidden = reference_reply.hidden
    units = [u for a in range(0, len(hidden), omega) for u in gen.push(hidden[a:a + omega])]
    assert len(reference_reply.units) > 20
    assert units == reference_reply.units


def test_vocoder_onnx_matches_pytorch(bundle, reference, reference_reply):
    voc = UnitVocoder(load_bundle(bundle))
    units = reference_reply.units
    assert np.array_equal(voc.durations(np.asarray(units)), reference_reply.durations)
    with torch.no_grad():
        ref = reference.vocoder(torch.tensor([units]))[0].numpy()
    assert snr_db(ref, voc.offline(units)) >= 40.0


def test_streamed_vocoder_with_full_context_equals_offline(bundle, reference_reply):
    voc = UnitVocoder(load_bundle(bundle))
    offline = voc.offline(reference_reply.units)
    stream = voc.stream()
    units = reference_reply.units
    parts = [stream.push(units[a:a + 7]) for a in range(0, len(units), 7)] + [stream.flush()]
    streamed = np.concatenate(parts)
    assert len(streamed) == len(offline)
    assert snr_db(offline, streamed) >= 80.0  # same samples up to float rounding
    assert stream.max_buffered_frames <= 2 * voc.receptive_field + max(reference_reply.durations) * 7 + 1


def test_large_onnx_weights_go_to_one_verified_side_file(reference, tmp_path):
    """Real Whisper-large is 2.5 GB in fp32, past protobuf's 2 GB: weights move to `<file>.data`."""
    import shutil

    from omnilite.export.onnx_export import export_onnx
    from omnilite.runtime.errors import BundleError
    from omnilite.runtime.onnx_session import open_session

    extra = export_onnx(reference.encoder, (torch.zeros(1, 128, 3000),), tmp_path / "encoder.onnx",
                        {"mel": {2: "frames"}}, {"speech_embeds": {1: "positions"}}, external_threshold=1 << 16)
    assert extra == ["encoder.onnx.data"] and sorted(p.name for p in tmp_path.iterdir()) == ["encoder.onnx", "encoder.onnx.data"]
    mel = torch.randn(1, 128, 400)
    with torch.no_grad():
        ref = reference.encoder(mel).numpy()
    got = open_session(tmp_path / "encoder.onnx").run(None, {"mel": mel.numpy()})[0]
    assert relative_max_error(ref, got) <= 1e-3
    # The manifest covers the side file: altering it is caught like altering the stage file.
    b = tmp_path / "b"
    b.mkdir()
    for f in ("encoder.onnx", "encoder.onnx.data"):
        shutil.copy(tmp_path / f, b / f)
    stage = {"name": "encoder", "file": "encoder.onnx", "format": "onnx", "precision": "fp32", "inputs": {}, "outputs": {},
             "sha256": sha256_file(b / "encoder.onnx"), "extra_files": {"encoder.onnx.data": sha256_file(b / "encoder.onnx.data")}}
    (b / "omnilite.json").write_text(json.dumps({"format_version": 1, "family": "llama-omni", "stages": [stage]}))
    load_bundle(b)
    with open(b / "encoder.onnx.data", "r+b") as f:
        f.write(b"\1\2\3\4")
    with pytest.raises(BundleError, match="encoder.onnx.data does not match the sha256"):
        load_bundle(b)
