"""Fun-Audio-Chat speech head and speech feedback on the tiny release: the torch-free runtime
(runtime/fun_audio_chat/speech_head.py) driven by the PyTorch reference's official generate loop,
KV-cache continuation, three injected faults that the checks must catch, and the stage export."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import omnilite.runtime.fun_audio_chat.speech_head as rt
from omnilite.export.fun_audio_chat.checkpoint import open_fun_audio_chat
from omnilite.export.fun_audio_chat.config import AUDIO_BOS, AUDIO_TOKEN, S2M_PROMPT, SPEECH_PAD
from omnilite.export.fun_audio_chat.export import STAGES_FILE, export_fun_audio_chat_stages
from omnilite.export.fun_audio_chat.parity import (
    HEAD_STEPS, drive_head, feedback_parity, s2m_traces, speech_head_parity,
)
from omnilite.export.fun_audio_chat.speech_head import export_speech_head, head_spec
from omnilite.export.fun_audio_chat.tiny import make_tiny_fun_audio_chat
from omnilite.runtime.bundle import sha256_file
from omnilite.runtime.errors import BundleError, OmniliteError
from omnilite.runtime.llm import LLMConfig

N_CODES_CHECKED = 5 * (1 + HEAD_STEPS)  # the prefill's group and 32 steps' groups


@pytest.fixture(scope="module")
def fac_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fac_head") / "pretrained_models"
    make_tiny_fun_audio_chat(root)
    return root


@pytest.fixture(scope="module")
def ckpt(fac_root):
    return open_fun_audio_chat(fac_root)


@pytest.fixture(scope="module")
def model(ckpt):
    return ckpt.reference()


@pytest.fixture(scope="module")
def head_dir(model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("head_stages")
    export_speech_head(model, out)
    return out


@pytest.fixture(scope="module")
def spec(ckpt):
    return head_spec(ckpt.audio_config)


@pytest.fixture(scope="module")
def traces(model, ckpt):
    return s2m_traces(model, ckpt.model_dir, S2M_PROMPT)


@pytest.fixture(scope="module")
def parity(model, head_dir, spec, traces) -> dict:
    return speech_head_parity(model, head_dir, spec, traces)


def test_reference_loop_prefills_the_head_and_speaks_after_audio_bos(traces):
    for _, t in traces:
        assert len(t.codes) == 1 + HEAD_STEPS
        prompt = t.head_hidden[0].shape[0]
        assert prompt > 20 and all(h.shape[0] == 1 for h in t.head_hidden[1:])
        assert t.text_tokens[0] == AUDIO_BOS  # force_text_abos
        # Speech is on from the step that reads <|audio_bos|>: one kept group per step until a group ends it.
        assert 1 <= len(t.speech) <= HEAD_STEPS and len(t.feedback) == len(t.speech) - 1


def test_head_text_embedding_at_audio_rows_is_the_audio_token_id(traces, model, ckpt):
    # The head reads the <|AUDIO|> id's own embedding at the spliced rows, not the audio features.
    from omnilite.export.fun_audio_chat.prompt import official_prompt_ids
    from omnilite.export.fun_audio_chat.reference import llm_positions, placeholder_count
    from omnilite.export.parity import parity_inputs

    _, audio = parity_inputs()[0]
    ids = torch.tensor(official_prompt_ids(ckpt.model_dir, llm_positions(placeholder_count(len(audio))), S2M_PROMPT))
    text = traces[0][1].head_text[0]
    rows = (ids == AUDIO_TOKEN).nonzero()[:, 0]
    assert len(ids) == text.shape[0] and len(rows) > 0
    embed = model.language_model.get_input_embeddings()
    assert torch.equal(text[rows], embed(torch.full((len(rows),), AUDIO_TOKEN)))


@pytest.mark.parametrize("n_positions", [1, 2, 7])
def test_sub_step_rows_follow_the_official_slicing(n_positions):
    # crq_generate_forward: sub-step 0 feeds rows [0, 5T - 4), sub-step i > 0 the single row 5T - 5 + i.
    g, n = 5, 5 * n_positions
    official = [range(0, n - (g - 1))] + [range(n - (g - i), n - (g - i) + 1) for i in range(1, g)]
    assert [range(n)[rt.sub_step_rows(n, g, i)] for i in range(g)] == official


def test_head_greedy_codes_and_logits_match_the_reference(parity):
    for r in parity["per_input"]:
        assert r["steps"] == 1 + HEAD_STEPS and r["codes"] == N_CODES_CHECKED
        assert r["codes_identical"] == N_CODES_CHECKED, r
        assert r["logits_max_abs"] <= 1e-3, r
    assert parity["kv_cache"] == "f32" and parity["flash_attn"] == "off"
    assert parity["ok"]


def test_cache_continuation_in_pieces_and_after_a_rollback_equals_one_pass(parity):
    c = parity["continuation"]
    assert c["n_batch"] == 16 and c["detour_steps"] == 3
    assert c["codes_identical"] == c["codes"] == N_CODES_CHECKED
    assert c["logits_max_abs_vs_one_pass"] <= 1e-5
    assert c["ok"]


def test_feedback_matches_audio_tower(model, head_dir, spec, traces):
    rep = feedback_parity(model, head_dir, spec, traces)
    assert rep["ok"] and rep["rel_max_error"] <= 1e-4
    fb = rt.SpeechFeedback(head_dir / rt.FEEDBACK_FILE, spec.group)
    _, t = traces[0]
    text = np.random.default_rng(0).standard_normal(t.feedback[0].shape[0]).astype(np.float32)
    want = (text + t.feedback[0].numpy()) / 2
    assert np.abs(fb.llm_input(text, t.speech[0]) - want).max() <= 1e-4 * np.abs(want).max()


def test_parity_fails_with_a_wrong_bos(model, head_dir, spec, traces):
    # Fault injected: the first sub-step's "previous code" is the pad id, not BOS 6561.
    wrong = rt.HeadSpec(SPEECH_PAD, spec.eos_id, spec.group)
    rep = speech_head_parity(model, head_dir, wrong, traces)
    assert not rep["ok"] and rep["logits_max_abs"] > 1e-3
    assert all(r["codes_identical"] < N_CODES_CHECKED for r in rep["per_input"])


def test_parity_fails_when_the_prefill_feeds_one_row_too_few(model, head_dir, spec, traces, monkeypatch):
    # Fault injected: sub-step 0 of the prefill feeds 5T - 5 rows (the prompt's last position loses
    # its first sub-position in the cache, and every later position sits one slot early).
    official = rt.sub_step_rows

    def short(n_rows: int, group: int, i: int) -> slice:
        s = official(n_rows, group, i)
        return slice(0, s.stop - 1) if i == 0 and s.stop > 1 else s

    monkeypatch.setattr(rt, "sub_step_rows", short)
    rep = speech_head_parity(model, head_dir, spec, traces)
    assert not rep["ok"] and rep["logits_max_abs"] > 1e-3


def test_continuation_check_fails_with_a_rollback_one_position_short(model, head_dir, spec, traces, monkeypatch):
    # Fault injected: position() records one cache position fewer than the head holds.
    monkeypatch.setattr(rt.SpeechHead, "position", lambda self: rt.HeadPosition(self.lm.n_past - 1, self._prev))
    rep = speech_head_parity(model, head_dir, spec, traces[:1])
    assert not rep["continuation"]["ok"] and not rep["ok"]
    assert rep["per_input"][0]["codes_identical"] == N_CODES_CHECKED  # the one-pass run does not roll back


def test_step_refuses_misshaped_inputs(head_dir, spec):
    head = rt.SpeechHead(head_dir, spec, LLMConfig(n_ctx=256, kv_cache="f32", flash_attn="off"))
    try:
        with pytest.raises(OmniliteError) as e:
            head.step(np.zeros((3, 64), np.float32), np.zeros((2, 64), np.float32))
        assert str(e.value) == ("the speech head needs hidden states and text embeddings of the same shape (T, 64), got (3, 64) "
                                "and (2, 64); pass the LLM's final-norm rows and its input tokens' embeddings.")
        assert head.position() == rt.HeadPosition(0, spec.bos_id)
    finally:
        head.close()


def test_missing_head_file_is_one_sentence(head_dir, spec, tmp_path):
    for name in (rt.HEAD_INPUT_FILE, rt.HEAD_CODES_FILE):
        (tmp_path / name).write_bytes((head_dir / name).read_bytes())
    with pytest.raises(BundleError) as e:
        rt.SpeechHead(tmp_path, spec)
    assert str(e.value) == f"{tmp_path / rt.HEAD_LM_FILE} is missing; re-export the Fun-Audio-Chat stages."


def test_runtime_head_module_imports_no_torch():
    code = ("import sys, omnilite.runtime.fun_audio_chat.speech_head;"
            "bad = [m for m in ('torch', 'transformers', 'gguf', 'onnx') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_stage_export_writes_the_head_files_and_their_parity(fac_root, traces):
    out = export_fun_audio_chat_stages(fac_root, fac_root.parent / "stages")
    rec = json.loads((out / STAGES_FILE).read_text())
    stages = {s["name"]: s for s in rec["stages"]}
    assert list(stages) == ["audio_input", "llm", "speech_head_input", "speech_head", "speech_feedback"]
    head = stages["speech_head"]
    assert head["sha256"] == sha256_file(out / rt.HEAD_LM_FILE)
    assert head["extra_files"] == {rt.HEAD_CODES_FILE: sha256_file(out / rt.HEAD_CODES_FILE)}
    assert (head["bos_id"], head["eos_id"], head["group"]) == (6561, 6562, 5)
    assert stages["speech_head_input"]["inputs"] == {"hidden": ["positions", 64], "text_embeds": ["positions", 64]}
    assert stages["speech_head_input"]["outputs"] == {"rows": ["sub_positions", 32]}
    assert stages["speech_feedback"]["inputs"] == {"codes": ["codes"]}
    assert stages["speech_feedback"]["outputs"] == {"feedback": ["groups", 64]}
    parity = rec["parity"]
    assert parity["speech_head"]["ok"] and parity["speech_head"]["codes_identical"] == N_CODES_CHECKED
    assert parity["speech_feedback"]["ok"]
    # The runtime head opens the exported directory from stages.json alone and writes the reference's codes.
    head_rt = rt.SpeechHead.from_stage_dir(out)
    try:
        codes, _ = drive_head(head_rt, traces[0][1])
        assert codes == traces[0][1].codes
    finally:
        head_rt.close()
