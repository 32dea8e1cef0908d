"""Step-Audio 2 stage export on the tiny checkpoint: the encoder + adapter ONNX and the f32 LLM GGUF
against the PyTorch reference, and injected faults that the checks must catch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import omnilite
from tokenizers import Tokenizer
from torch import nn

from omnilite.export.parity import fixed_audio
from omnilite.export.step_audio2 import llm_stage
from omnilite.export.step_audio2 import reference as R
from omnilite.export.step_audio2.checkpoint import AUDIO_START_ID, open_step_audio2
from omnilite.export.step_audio2.encoder_stage import ENCODER_FILE, encoder_parity, export_encoder, official_batch_inputs
from omnilite.export.step_audio2.flow_stage import FLOW_FILES
from omnilite.export.step_audio2.export import STAGE_FILES, StepAudio2ExportOptions, export_step_audio2, stage_parity_inputs
from omnilite.export.step_audio2.llm_stage import (LLM_FILE, llm_parity, prefill_spliced, render_speech_prompt,
                                                   spliced_prompts, splice_plan)
from omnilite.export.step_audio2.tiny import make_tiny_step_audio2
from omnilite.runtime.bundle import MANIFEST, load_bundle, sha256_file
from omnilite.runtime.errors import CheckpointError, OmniliteError
from omnilite.runtime.llm import LlamaCppLLM, LLMConfig
from omnilite.runtime.metrics import relative_max_error


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_step_audio2(tmp_path_factory.mktemp("sa2x") / "Step-Audio-2-mini", seed=0)


QUESTION = Path(omnilite.__file__).parent / "data" / "question.wav"  # any voice will do for random weights


@pytest.fixture(scope="module")
def stages(tiny) -> Path:
    return export_step_audio2(tiny, tiny.parent / "stages", speaker_wav=QUESTION)


def _parity(stages: Path) -> dict:
    return json.loads((stages / MANIFEST).read_text())["parity"]


@pytest.fixture(scope="module")
def ref(tiny):
    ckpt = open_step_audio2(tiny)
    return ckpt, R.load_encoder(ckpt), R.load_llm(ckpt), Tokenizer.from_file(str(tiny / "tokenizer.json"))


def test_export_writes_the_bundle_and_its_parity(stages):
    record = json.loads((stages / MANIFEST).read_text())
    files = [f for _, f in STAGE_FILES]
    assert sorted(p.name for p in stages.iterdir()) == sorted([*files, MANIFEST])
    assert {ENCODER_FILE, LLM_FILE, *FLOW_FILES} <= set(files)
    assert record["family"] == "step-audio2" and record["audio"]["output_sample_rate"] == 24000
    assert {s["file"]: s["sha256"] for s in record["stages"]} == {f: sha256_file(stages / f) for f in files}
    assert load_bundle(stages).family == "step-audio2"  # verifies every sha256
    assert not (stages.parent / ".stages.partial").exists()
    p = record["parity"]
    assert all(p[k]["ok"] for k in ("flow_whole", "flow_stream", "flow_stream_vs_whole", "hift"))
    assert p["mel"]["ok"] and p["mel"]["max_abs_error"] <= 1e-4


def test_encoder_onnx_matches_the_reference_on_pieces_of_different_lengths(stages):
    enc = _parity(stages)["encoder"]
    frames = [r["mel_frames"] for r in enc["per_piece"]]
    assert frames == [302, 202, 363, 2502, 133]  # both mask parities; a full 25 s piece (313 positions)
    for r in enc["per_piece"]:
        assert r["positions"] == r["positions_official"] == R.audio_positions(r["mel_frames"])
        assert r["rel_max_error"] <= 1e-3
    assert enc["ok"] and enc["per_piece"][-1]["of_pieces"] == 2


def test_encoder_onnx_keeps_the_official_row_count_where_the_pooled_count_differs(stages, ref):
    # 139 frames: the adapter conv yields 18 rows but the official cut keeps (34 - 1) // 2 + 1 = 17.
    _, encoder, _, _ = ref
    piece = fixed_audio(1.37, 5)
    assert R.log_mel(torch.from_numpy(piece)).shape[-1] == 139
    report = encoder_parity(encoder, stages / ENCODER_FILE, [("139 frames", piece)])
    assert report["encoder"]["per_piece"][0]["positions"] == 17 and report["encoder"]["ok"]


def test_last_piece_needs_the_official_padded_batch(stages, ref):
    # Injected fault: the odd-length last piece of a 26.31 s prompt encoded alone (unpadded, length
    # T - 2) instead of zero-padded to the batch with its own length, as the official forward does.
    import onnxruntime as ort

    _, encoder, _, _ = ref
    pieces = R.chunk_audio(torch.from_numpy(fixed_audio(26.31, 7)))
    mels = [R.log_mel(p) for p in pieces]
    with torch.no_grad():
        official = R.encode_pieces(encoder, mels)[1].numpy()
    session = ort.InferenceSession(str(stages / ENCODER_FILE), providers=["CPUExecutionProvider"])
    x, n = official_batch_inputs([m.numpy() for m in mels])[1]
    exact = session.run(None, {"mel": x, "mel_len": n})[0]
    alone = session.run(None, {"mel": mels[1][None].numpy(), "mel_len": n})[0]
    assert x.shape[-1] == 2502 and int(n[0]) == 131
    assert relative_max_error(official, exact) <= 1e-3 < relative_max_error(official, alone)


def test_llm_gguf_matches_the_reference_with_the_speech_spliced(stages):
    llm = _parity(stages)["llm"]
    assert llm["ok"] and llm["inputs"] == len(stage_parity_inputs()) == 4
    assert llm["identical_per_input"] == [32] * 4 and llm["of"] == 32
    assert llm["first_logits_max_abs"] <= 1e-3
    assert llm["kv_cache"] == "f32" and llm["flash_attn"] == "off"
    assert llm["gguf_tokenizer_identical"]
    assert llm["audio_rows"][3] == [313, 17]  # 26.31 s: two pieces, two splices


def test_gguf_carries_the_release_tokenizer_and_eot(stages, ref):
    ckpt, _, _, tok = ref
    with LlamaCppLLM(stages / LLM_FILE, LLMConfig(n_ctx=64, kv_cache="f32", flash_attn="off")) as llm:
        assert llm.n_vocab == 158720
        assert ckpt.token_ids["<|EOT|>"] in llm.eos_ids
        text = "<|BOT|>human\nHello, wall<audio_start><audio_patch><audio_end><|EOT|>"
        assert llm.tokenize(text) == tok.encode(text, add_special_tokens=False).ids


def test_prompt_is_the_official_speech_turn(ref):
    _, _, _, tok = ref
    ids = render_speech_prompt(tok, [3, 2])
    text = tok.decode(ids, skip_special_tokens=False)
    assert text == ("<|BOT|>system\nYou are a helpful assistant.<|EOT|><|BOT|>human\n"
                    "<audio_start><audio_patch><audio_patch><audio_patch><audio_end>"
                    "<audio_start><audio_patch><audio_patch><audio_end><|EOT|><|BOT|>assistant\n<tts_start>")
    starts = splice_plan(ids, [3, 2])
    assert [ids[s - 1] for s in starts] == [AUDIO_START_ID] * 2
    assert tok.decode(render_speech_prompt(tok, [1], speech_reply=False), skip_special_tokens=False).endswith("<|BOT|>assistant\n")
    with pytest.raises(OmniliteError, match=r"^the prompt has 2 <audio_start> tokens for 1 audio pieces; render one"):
        splice_plan(ids, [3])


def test_wrong_splice_offset_fails_the_llm_check(stages, ref, monkeypatch):
    # Injected fault: llama.cpp receives the speech rows one position late (after the first
    # <audio_patch> instead of right after <audio_start>).
    _, encoder, llm, tok = ref
    prompts = spliced_prompts(tok, encoder, stage_parity_inputs()[:1])
    good = llm_parity(llm, stages / LLM_FILE, prompts)
    real = llm_stage.splice_plan
    monkeypatch.setattr(llm_stage, "splice_plan", lambda ids, counts: [s + 1 for s in real(ids, counts)])
    bad = llm_parity(llm, stages / LLM_FILE, prompts)
    assert good["ok"] and good["first_logits_max_abs"] <= 1e-3
    assert not bad["ok"] and bad["first_logits_max_abs"] > 1e-3


def test_dropped_encoder_layer_fails_the_encoder_check(ref, tmp_path):
    # Injected fault: the ONNX graph is traced with the encoder's after_norm LayerNorm dropped.
    _, encoder, _, _ = ref
    broken = R.EncoderWithAdapter.__new__(R.EncoderWithAdapter)
    nn.Module.__init__(broken)
    broken.encoder, broken.adapter = R.StepAudio2Encoder.__new__(R.StepAudio2Encoder), encoder.adapter
    nn.Module.__init__(broken.encoder)
    for name, child in encoder.encoder.named_children():
        setattr(broken.encoder, name, nn.Identity() if name == "after_norm" else child)
    export_encoder(broken, tmp_path / ENCODER_FILE)
    report = encoder_parity(encoder, tmp_path / ENCODER_FILE, [("3 s", fixed_audio())])
    assert not report["encoder"]["ok"] and report["encoder"]["rel_max_error"] > 1e-3
    assert report["encoder"]["positions_match_official"]  # same count, wrong values


def test_failing_parity_writes_nothing(tiny, monkeypatch, tmp_path):
    real = llm_stage.splice_plan
    monkeypatch.setattr(llm_stage, "splice_plan", lambda ids, counts: [s + 1 for s in real(ids, counts)])
    out = tmp_path / "stages"
    with pytest.raises(OmniliteError, match=r"^exported stage\(s\) llm differ from the PyTorch reference beyond tolerance"):
        export_step_audio2(tiny, out, speaker_wav=QUESTION)
    assert not out.exists() and not (tmp_path / ".stages.partial").exists()


def test_bad_targets_are_refused_in_one_sentence(tiny, stages, tmp_path):
    with pytest.raises(OmniliteError, match=r"already exists and is not empty; choose another directory or pass --force\.$"):
        export_step_audio2(tiny, stages, speaker_wav=QUESTION)
    no_fast = Path(tmp_path / "ckpt")
    no_fast.mkdir()
    for p in tiny.iterdir():
        if p.name != "tokenizer.json":
            (no_fast / p.name).symlink_to(p)
    with pytest.raises(CheckpointError, match=r"tokenizer\.json is missing; the export needs the release's tokenizer\.json"):
        export_step_audio2(no_fast, tmp_path / "out", StepAudio2ExportOptions(parity=False), speaker_wav=QUESTION)
    assert not (tmp_path / "out").exists()


def test_prefill_spliced_equals_one_embedding_prefill(stages, ref):
    # The cut prefill (tokens, rows, tokens) gives the same last position as feeding the whole
    # official spliced sequence as embeddings.
    ckpt, encoder, llm, tok = ref
    p = spliced_prompts(tok, encoder, [("2 s", fixed_audio(2.0, 99))])[0]
    with torch.no_grad():
        ids = torch.tensor(p.ids)
        whole = R.splice_audio(ids, llm.get_input_embeddings()(ids), p.rows).numpy()
    with LlamaCppLLM(stages / LLM_FILE, LLMConfig(n_ctx=128, kv_cache="f32", flash_attn="off")) as g:
        cut, _ = prefill_spliced(g, p.ids, [r.numpy() for r in p.rows])
        g.reset()
        full, _ = g.eval_embeddings(whole, want_last=True)
    assert np.max(np.abs(cut - full)) <= 1e-4
