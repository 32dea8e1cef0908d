"""Fun-Audio-Chat stage export on the tiny release: the audio input ONNX and the Qwen3 GGUF against
the PyTorch reference, each parity check shown to fail under one injected fault, and the atomic
write of the stage directory."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from omnilite.export.fun_audio_chat.audio_stage import AudioInputStage
from omnilite.export.fun_audio_chat.checkpoint import open_fun_audio_chat
from omnilite.export.fun_audio_chat.export import (
    AUDIO_INPUT_FILE, LLM_FILE, STAGES_FILE, FunAudioChatStageOptions, export_fun_audio_chat_stages,
)
from omnilite.export.fun_audio_chat.parity import audio_input_parity, llm_parity, run_audio_input
from omnilite.export.fun_audio_chat.prompt import AudioPrompt
from omnilite.export.fun_audio_chat.tiny import make_tiny_fun_audio_chat
from omnilite.export.onnx_export import export_onnx
from omnilite.runtime.bundle import sha256_file
from omnilite.runtime.errors import OmniliteError


@pytest.fixture(scope="module")
def fac_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fac_export") / "pretrained_models"
    make_tiny_fun_audio_chat(root)
    return root


@pytest.fixture(scope="module")
def stages(fac_root) -> Path:
    return export_fun_audio_chat_stages(fac_root, fac_root.parent / "stages")


@pytest.fixture(scope="module")
def model(fac_root):
    return open_fun_audio_chat(fac_root).reference()


def _report(stages: Path) -> dict:
    return json.loads((stages / STAGES_FILE).read_text())


def test_stage_files_are_written_with_their_hashes(stages):
    rec = _report(stages)
    head_files = {"speech_head_input.onnx", "speech_head_codes.npy", "speech_head.gguf", "speech_feedback.onnx"}  # tested in test_fun_audio_chat_speech_head.py
    assert {p.name for p in stages.iterdir()} == {AUDIO_INPUT_FILE, LLM_FILE, STAGES_FILE} | head_files
    assert not any(p.name.startswith(".stages") for p in stages.parent.iterdir())  # no .partial or .lock left
    assert [(s["name"], s["sha256"]) for s in rec["stages"][:2]] == [
        ("audio_input", sha256_file(stages / AUDIO_INPUT_FILE)), ("llm", sha256_file(stages / LLM_FILE))]
    assert rec["stages"][0]["inputs"] == {"mel": [1, 128, "mel_frames"], "placeholders": []}
    assert rec["stages"][0]["outputs"] == {"audio_embeds": ["positions", 64]}
    assert not (stages / "manifest.json").exists()  # not a bundle yet


def test_audio_input_parity_on_three_lengths(stages):
    rep = _report(stages)["parity"]["audio_input"]
    rows = rep["per_input"]
    assert len({r["seconds"] for r in rows}) == 3
    for r in rows:
        assert r["positions"] == r["positions_reference"] == r["positions_official"], r
        assert r["rel_max_error"] <= 1e-3, r
    assert rep["ok"]


@pytest.mark.parametrize("n_samples", [640, 16000 * 4 + 639, 16000 * 31])
def test_audio_input_onnx_lengths_beyond_the_parity_clips(stages, model, n_samples):
    # 640: the shortest clip with a placeholder (4 mel frames, one pooled frame); 4 s + 639: a
    # 4-frame last window, 101 encoder frames cut to the 100 placeholders; 31 s: the mel is cut at
    # 30 s but the placeholders are not, so the grouping pads with zeros (the official zero tensor).
    frames = min(-(-n_samples // 160), 3000)
    mel = torch.randn(128, frames, generator=torch.Generator().manual_seed(n_samples))
    with torch.no_grad():
        want = model.user_audio_embeddings(mel, n_samples).numpy()
    got = run_audio_input(ort.InferenceSession(str(stages / AUDIO_INPUT_FILE)), mel, n_samples)
    assert got.shape == want.shape == ((int(n_samples / 640) + 4) // 5, 64)
    assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max()


def test_llm_gguf_parity(stages):
    rep = _report(stages)["parity"]["llm"]
    assert rep["identical_per_input"] == [32, 32, 32]
    assert rep["first_logits_max_abs"] <= 1e-3
    assert rep["tokenizer_identical"]
    assert rep["kv_cache"] == "f32" and rep["flash_attn"] == "off"
    # llama.cpp gets the embedding rows right after <|audio_bos|>, where the processor put <|AUDIO|>.
    assert rep["splice"]["prefix_ids"] == rep["splice"]["official_first_audio_row"]
    assert rep["ok"]


def test_audio_parity_fails_without_one_encoder_layer(stages, model, tmp_path):
    # Fault injected: the last layer of the continuous audio encoder is dropped before export.
    faulty = copy.deepcopy(model)
    faulty.continuous_audio_tower.layers = faulty.continuous_audio_tower.layers[:-1]
    path = tmp_path / AUDIO_INPUT_FILE
    export_onnx(AudioInputStage(faulty), (torch.zeros(1, 128, 537), torch.tensor(35)), path,
                {"mel": {2: "mel_frames"}, "placeholders": {}}, {"audio_embeds": {0: "positions"}})
    rep = audio_input_parity(model, path)
    assert not rep["ok"] and rep["rel_max_error"] > 1e-3


def test_llm_parity_fails_with_the_speech_rows_one_position_early(stages, model, fac_root):
    # Fault injected: the runtime side splices the speech rows before <|audio_bos|> instead of after it.
    model_dir = fac_root / "Fun-Audio-Chat-8B"
    good = AudioPrompt.build(model_dir)
    shifted = AudioPrompt(good.prefix_ids[:-1], good.prefix_ids[-1:] + good.suffix_ids, good.system)
    rep = llm_parity(model, stages / LLM_FILE, model_dir, shifted, n_tokens=4)
    assert not rep["ok"] and rep["first_logits_max_abs"] > 5e-3
    assert rep["splice"] == {"prefix_ids": 23, "official_first_audio_row": 24}


def test_failed_parity_writes_nothing_unless_told(fac_root, monkeypatch):
    # Fault injected: the exporter's audio stage loses continual_output_matching (identity instead).
    import omnilite.export.fun_audio_chat.export as exp

    class NoMatching(AudioInputStage):
        def __init__(self, model):
            super().__init__(model)
            self.group_proj = torch.nn.Identity()

    monkeypatch.setattr(exp, "AudioInputStage", NoMatching)
    out = fac_root.parent / "faulty"
    with pytest.raises(OmniliteError) as e:
        export_fun_audio_chat_stages(fac_root, out)
    assert str(e.value).startswith("exported stage(s) audio_input differ from the PyTorch reference beyond tolerance (")
    assert str(e.value).endswith("); nothing was written.")
    assert not out.exists() and not any(p.name.startswith(".faulty") for p in fac_root.parent.iterdir())
    kept = export_fun_audio_chat_stages(fac_root, out, FunAudioChatStageOptions(strict_parity=False))
    parity = _report(kept)["parity"]
    assert not parity["audio_input"]["ok"] and parity["audio_input"]["rel_max_error"] > 1e-3 and parity["llm"]["ok"]


def test_non_empty_target_is_refused(fac_root, stages):
    with pytest.raises(OmniliteError) as e:
        export_fun_audio_chat_stages(fac_root, stages)
    assert str(e.value) == f"{stages} already exists and is not empty; choose another directory or pass overwrite=True."


def test_qwen3_gguf_with_head_dim_not_hidden_over_heads(fac_root, tmp_path):
    # The speech head's Qwen3 (1024 wide, 16 heads of 128) has head_dim != hidden / heads; the LLM's
    # does not, so this shape is checked here: 32 wide, 4 heads of 16.
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from omnilite.export.fun_audio_chat.gguf_qwen3 import write_qwen3_gguf
    from omnilite.runtime.llm import LlamaCppLLM, LLMConfig

    cfg = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               head_dim=16, vocab_size=151936, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True)
    torch.manual_seed(0)
    lm = Qwen3ForCausalLM(Qwen3Config(**cfg)).eval()
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)  # not ones, so a misplaced q/k norm shows
    path = tmp_path / "head.gguf"
    write_qwen3_gguf({k: v.detach() for k, v in lm.state_dict().items() if k != "lm_head.weight"}, cfg,
                     fac_root / "Fun-Audio-Chat-8B", path, eos_id=151645)
    ids = [151644, 872, 198, 9707, 11, 1879, 0, 151645]
    with torch.no_grad():
        want = lm(torch.tensor([ids])).logits[0, -1].numpy()
    with LlamaCppLLM(path, LLMConfig(n_ctx=64, kv_cache="f32", flash_attn="off")) as llm:
        got, _ = llm.eval_tokens(ids, want_last=True)
    assert np.abs(got - want).max() <= 1e-4


def test_missing_tokenizer_json_is_one_sentence(tmp_path):
    with pytest.raises(OmniliteError) as e:
        AudioPrompt.build(tmp_path)
    assert str(e.value) == (f"{tmp_path.resolve() / 'tokenizer.json'} is missing; the prompt and the GGUF vocabulary are read "
                            "from it, download it with the rest of the Fun-Audio-Chat-8B directory.")


def test_f16_llm_stage_is_judged_as_an_f16_gguf(fac_root, stages, tmp_path):
    """The real shape's export path: an f16 LLM GGUF (a 33 GB f32 one does not fit beside the rest),
    recorded as f16 with its cache type, within the F16 tolerances against the f32 reference."""
    out = export_fun_audio_chat_stages(fac_root, tmp_path / "f16", FunAudioChatStageOptions(llm_dtype="f16"))
    llm = next(s for s in _report(out)["stages"] if s["name"] == "llm")
    assert (llm["precision"], llm["kv_cache"], llm["flash_attn"]) == ("f16", "f16", "auto")
    assert (out / LLM_FILE).stat().st_size < 0.6 * (stages / LLM_FILE).stat().st_size
    rep = _report(out)["parity"]["llm"]
    assert rep["ok"] and rep["mean_kl"] < 1e-3, rep
    with pytest.raises(OmniliteError, match="LLM dtype 'bf16' is not supported; use f32 or f16"):
        export_fun_audio_chat_stages(fac_root, tmp_path / "bf16", FunAudioChatStageOptions(llm_dtype="bf16"))


def test_reference_without_the_language_model_keeps_the_audio_side(fac_root, model):
    """What the export loads when parity is off: the audio towers and the speech head, the LLM left on
    the meta device (no memory), with the same outputs as the whole reference."""
    part = open_fun_audio_chat(fac_root).reference(language_model=False)
    assert part.language_model.lm_head.weight.is_meta and not part.audio_invert_tower.pre_matching.weight.is_meta
    mel = torch.randn(128, 300)
    with torch.no_grad():
        assert torch.equal(part.user_audio_embeddings(mel, 48000), model.user_audio_embeddings(mel, 48000))
        codes = torch.tensor([1, 2, 3, 4, 5])
        assert torch.equal(part.audio_tower.speech_groups(codes), model.audio_tower.speech_groups(codes))
    assert part.audio_invert_tower.lm_head.weight is part.audio_tower.embed_tokens.weight


def test_bf16_reference_runs_the_encoder_in_bf16(fac_root):
    """The PyTorch baseline loads the release in bf16 as the official code does: the positional table
    follows, or the encoder's layer norm refuses the mixed dtypes."""
    ref = open_fun_audio_chat(fac_root).reference(torch.bfloat16)
    assert ref.continuous_audio_tower.positional_embedding.dtype == torch.bfloat16
    with torch.no_grad():
        out = ref.user_audio_embeddings(torch.randn(128, 300).to(torch.bfloat16), 48000)
    assert out.dtype == torch.bfloat16 and out.shape == (15, ref.language_model.config.hidden_size)


def test_audio_input_weights_in_a_side_file_belong_to_the_stage(fac_root, tmp_path, monkeypatch):
    """At the real shape the fp32 audio input stage (2.6 GB) keeps its weights in `audio_input.onnx.data`:
    the bundle hashes it with the stage, and a bundle without it is refused in one sentence."""
    import omnilite.export.fun_audio_chat.export as fac_export
    from omnilite.export.fun_audio_chat.bundle import FunAudioChatExportOptions, export_fun_audio_chat
    from omnilite.runtime.bundle import load_bundle
    from omnilite.runtime.errors import BundleError

    real = fac_export.export_onnx
    monkeypatch.setattr(fac_export, "export_onnx", lambda *a, **k: real(*a, **k, external_threshold=1 << 12))
    out = export_fun_audio_chat(fac_root, tmp_path / "b", FunAudioChatExportOptions(parity=False))
    stage = load_bundle(out).stages["audio_input"]
    assert list(stage.extra_files) == ["audio_input.onnx.data"]
    assert stage.extra_files["audio_input.onnx.data"] == sha256_file(out / "audio_input.onnx.data")
    (out / "audio_input.onnx.data").unlink()
    with pytest.raises(BundleError, match="audio_input.onnx.data"):
        load_bundle(out)
