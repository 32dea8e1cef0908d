"""The Fun-Audio-Chat bundle end to end on the tiny release: `make-tiny` -> `export` -> `run` through the
CLI, the torch-free pipeline's text ids and speech codes against the export's PyTorch reference (the
official S2M loop, greedy), its streamed audio against the vocoder driver for the same codes, multi-turn
KV reuse, refusals, one injected fault and the torch-free import. Random weights babble: text and audio
are noise, the checks are exact."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import omnilite
from omnilite.runtime import Conversation, Done, Pipeline, PipelineConfig
from omnilite.runtime.audio import prepare_speech, read_wav
from omnilite.runtime.bundle import MANIFEST
from omnilite.runtime.fun_audio_chat.pipeline import FunAudioChatConfig, FunAudioChatPipeline
from omnilite.runtime.fun_audio_chat.speech_head import SpeechFeedback
from omnilite.runtime.fun_audio_chat.vocoder import CHUNK_ALIGNED, OFFICIAL, OnnxVocoder, Schedule
from omnilite.runtime.metrics import snr_db

QUESTION = Path(omnilite.__file__).parent / "data" / "question.wav"
AUDIO_TOKEN, AUDIO_BOS, AUDIO_EOS, IM_END = 151669, 151670, 151671, 151645
STEPS = 24  # LLM steps after the forced <|audio_bos|> compared with the reference


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """The issue's command line (a shorter reply: the vocoder re-solves every token per call)."""
    from omnilite.cli import main

    d = tmp_path_factory.mktemp("facp")
    assert main(["make-tiny", "fun-audio-chat", str(d / "ckpt"), "-q"]) == 0
    assert main(["export", str(d / "ckpt"), str(d / "bundle"), "-q"]) == 0
    assert main(["run", str(d / "bundle"), "--input", str(QUESTION), "--output", str(d / "reply.wav"),
                 "--text-output", str(d / "reply.txt"), "--max-new-tokens", "40", "-q"]) == 0
    return d


@pytest.fixture(scope="module")
def bundle(cli_run) -> Path:
    return cli_run / "bundle"


@pytest.fixture(scope="module")
def question() -> np.ndarray:
    audio, rate = read_wav(QUESTION)
    return prepare_speech(audio, rate, 16000)


@pytest.fixture(scope="module")
def reference(cli_run, question):
    """The PyTorch reference and its official prompt (ids, clip rows) for question.wav."""
    from omnilite.export.fun_audio_chat.checkpoint import open_fun_audio_chat
    from omnilite.export.fun_audio_chat.config import S2M_PROMPT
    from omnilite.export.fun_audio_chat.parity import clip_mel
    from omnilite.export.fun_audio_chat.prompt import official_prompt_ids

    ckpt = open_fun_audio_chat(cli_run / "ckpt")
    model = ckpt.reference()
    with torch.no_grad():
        emb = model.user_audio_embeddings(clip_mel(question), len(question))
    return model, torch.tensor(official_prompt_ids(ckpt.model_dir, len(emb), S2M_PROMPT)), emb


@pytest.fixture(scope="module")
def reference_trace(reference):
    """The official S2M loop (greedy text and speech, force_text_abos) on question.wav."""
    from omnilite.export.fun_audio_chat.reference import s2m_greedy

    return s2m_greedy(*reference, STEPS)


def _with_eos_at(step_fn, call: int, eos: int = 6562):
    """`step_fn` whose `call`-th result (0: the prefill) holds the speech EOS in its third code."""
    calls = []

    def step(*a, **k):
        codes = list(step_fn(*a, **k))
        if len(calls) == call:
            codes[2] = eos
        calls.append(codes)
        return codes
    return step


def _reply(pipe, audio: np.ndarray, **kw) -> Done:
    return [e for e in pipe.respond(audio, 16000, **kw) if isinstance(e, Done)][0]


def _run_recording_codes(bundle: Path, audio: np.ndarray, steps: int) -> tuple[Done, list[list[int]]]:
    """A reply of `steps` LLM steps, and the head's 5 codes at every step (kept or dropped)."""
    with Pipeline.load(bundle, PipelineConfig(max_new_tokens=steps, ignore_eos=True, mode="sequential")) as pipe:
        assert isinstance(pipe, FunAudioChatPipeline)
        codes, step = [], pipe.head.step
        pipe.head.step = lambda *a, **k: codes.append(step(*a, **k)) or codes[-1]
        return _reply(pipe, audio), codes


def test_cli_writes_a_24khz_reply_with_text_and_speech(cli_run, bundle):
    audio, rate = read_wav(cli_run / "reply.wav")
    assert rate == 24000 and audio.size > 0 and np.isfinite(audio).all() and np.abs(audio).max() > 1e-3
    assert (cli_run / "reply.txt").read_text().strip()
    manifest = json.loads((bundle / MANIFEST).read_text())
    assert manifest["family"] == "fun-audio-chat" and manifest["audio"]["output_sample_rate"] == 24000
    assert all(v["ok"] for v in manifest["parity"].values())
    assert set(manifest["parity"]) == {"audio_input", "llm", "speech_head", "speech_feedback", "flow", "hift",
                                       "stream_vs_reference", "stream_vs_whole"}
    prompt = manifest["llm"]["prompt"]
    assert prompt["prefix_ids"][-1] == AUDIO_BOS and prompt["suffix_ids"][0] == AUDIO_EOS  # the splice
    assert manifest["llm"]["eos_ids"] == [IM_END] and manifest["llm"]["force_text_abos"]
    # A follow-up turn opens as the first one did after the system turn: <|im_end|>\n<|im_start|>user\n<|audio_bos|>.
    turn = prompt["turn_prefix_ids"]
    assert turn[0] == IM_END and prompt["prefix_ids"][-len(turn):] == turn
    assert manifest["vocoder"]["schedule"] == CHUNK_ALIGNED and manifest["source"]["voice"] == "中文女"
    embeds = np.load(bundle / "text_embeddings.npy", mmap_mode="r")
    assert embeds.dtype == np.float32 and embeds.shape == (151936, manifest["llm"]["n_embd"])


def test_text_ids_and_speech_codes_equal_the_reference_s2m_loop(bundle, question, reference_trace):
    done, codes = _run_recording_codes(bundle, question, STEPS + 1)
    assert done.tokens[0] == AUDIO_BOS
    assert done.tokens == reference_trace.text_tokens  # all 25 steps, f32 GGUF, llama.cpp exact path
    assert codes == reference_trace.codes  # the prefill's group and every step's, 125 codes
    kept = [c for g in reference_trace.speech for c in g if c < 6561]
    assert len(reference_trace.speech) == STEPS and done.units == kept
    with Pipeline.load(bundle, PipelineConfig(verify_bundle=False)) as pipe:
        assert done.text == pipe.llm.detokenize(reference_trace.text_tokens) and done.text.strip()


def test_a_group_with_the_speech_eos_ends_speech_as_the_reference_does(bundle, question, reference, monkeypatch):
    # Random weights never write EOS 6562 in 25 steps, so both sides get it at step 4 (third code).
    from omnilite.export.fun_audio_chat.reference import s2m_greedy

    model = reference[0]
    monkeypatch.setattr(model.audio_invert_tower, "step", _with_eos_at(model.audio_invert_tower.step, 4))
    want = s2m_greedy(*reference, STEPS)
    assert want.text_tokens[4] == AUDIO_EOS and want.speech[3] == [6562] * 5 and len(want.speech) == 4
    with Pipeline.load(bundle, PipelineConfig(max_new_tokens=STEPS + 1, ignore_eos=True, mode="sequential")) as pipe:
        pipe.head.step = _with_eos_at(pipe.head.step, 4)
        done = _reply(pipe, question)
    assert done.tokens == want.text_tokens  # after <|audio_eos|> the LLM reads plain text embeddings, as there
    assert done.units == [c for g in want.speech[:3] for c in g if c < 6561] and len(done.units) == 15
    assert done.audio.size == 15 * 2 * 480  # the 15 codes are flushed at the reply's end


def test_unaveraged_feedback_is_caught(bundle, question, reference_trace, monkeypatch):
    # Injected fault: the LLM's next input while speaking is text + feedback, not (text + feedback) / 2.
    monkeypatch.setattr(SpeechFeedback, "llm_input", lambda self, text, codes: text + self.embed(codes)[-1])
    done, codes = _run_recording_codes(bundle, question, STEPS + 1)
    assert done.tokens[:2] == reference_trace.text_tokens[:2]  # the first fed-back step is still the plain text
    assert done.tokens != reference_trace.text_tokens and codes != reference_trace.codes


def test_audio_equals_the_vocoder_driver_on_the_same_codes(bundle, question):
    voc = OnnxVocoder(bundle)
    for name in (CHUNK_ALIGNED, OFFICIAL):
        with Pipeline.load(bundle, FunAudioChatConfig(max_new_tokens=20, ignore_eos=True, schedule=name)) as pipe:
            done = _reply(pipe, question)
        schedule = Schedule.named(voc, name)
        s = schedule.stream(voc)
        want = np.concatenate([s.push(done.units), s.flush()])
        assert len(done.units) == 5 * 19 and done.sample_rate == 24000
        assert len(done.audio) == len(want) == len(done.units) * 2 * 480
        assert np.max(np.abs(done.audio - want)) <= 1e-6
        whole = schedule.whole(voc, done.units)
        print(f"{name}: streamed vs its whole {snr_db(whole, done.audio):.1f} dB, "
              f"vs the official whole {snr_db(voc.offline(done.units), done.audio):.1f} dB")
        if name == CHUNK_ALIGNED:  # the default streams exactly what the whole utterance gives
            assert snr_db(whole, done.audio) >= 25.0


def test_first_audio_comes_after_the_first_hop(bundle, question):
    with Pipeline.load(bundle, PipelineConfig(max_new_tokens=12, ignore_eos=True, mode="sequential")) as pipe:
        events = list(pipe.respond(question, 16000))
    kinds = [type(e).__name__ for e in events]
    first_audio = kinds.index("AudioChunk")
    # 25 + 3 codes = 6 groups: the forced <|audio_bos|> step keeps none (and prints nothing), steps 1..6
    # keep 5 each; the first call's audio is its 50 frames less the 8 HiFT holds back as right context.
    assert kinds[:first_audio].count("TextDelta") <= 6
    assert events[first_audio].samples.size == (25 * 2 - 8) * 480


def test_second_turn_reuses_the_cache_and_equals_the_reference_on_the_official_history(bundle, question, reference):
    import dataclasses

    import jinja2

    from omnilite.export.fun_audio_chat.config import AUDIO_TEMPLATE, CHAT_TEMPLATE, S2M_PROMPT
    from omnilite.export.fun_audio_chat.prompt import _tokenizer
    from omnilite.export.fun_audio_chat.reference import s2m_greedy

    model, ids1, emb = reference
    cfg, steps2 = PipelineConfig(max_new_tokens=8, ignore_eos=True, mode="sequential"), 12
    with Pipeline.load(bundle, cfg) as pipe:
        llm, width = pipe.llm, pipe.llm.n_embd
        fed: list[int] = []  # rows the LLM is fed per call
        eval_tokens, eval_embeddings = llm.eval_tokens, llm.eval_embeddings
        llm.eval_tokens = lambda ids, *a, **k: fed.append(len(ids)) or eval_tokens(ids, *a, **k)
        llm.eval_embeddings = lambda x, *a, **k: fed.append(len(np.reshape(x, (-1, width)))) or eval_embeddings(x, *a, **k)
        conv = Conversation()
        first = _reply(pipe, question, conversation=conv)
        reply_start, positions = first.stats["context"], len(emb)
        assert reply_start == len(ids1) and first.stats["prompt_tokens"] == len(ids1)
        # The reply stays as its text ids (official web demo history); its speaking rows leave the cache.
        history = pipe.history_ids(first.tokens)
        assert first.tokens[0] == AUDIO_BOS and history[0] != AUDIO_BOS and len(history) >= len(first.tokens) - 2
        assert conv.pending == history and llm.n_past == reply_start
        head_prefill, codes = [], []
        step = pipe.head.step
        pipe.head.step = lambda h, t: head_prefill.append(len(h)) or codes.append(step(h, t)) or codes[-1]
        pipe.config = dataclasses.replace(cfg, max_new_tokens=steps2 + 1)
        fed.clear()
        second = _reply(pipe, question, conversation=conv)
        turn = len(history) + len(pipe.turn_prefix_ids) + positions + len(pipe.suffix_ids)
        assert second.turn == 2 and second.stats["prompt_tokens"] == turn
        assert sum(fed) == turn + steps2  # nothing older is evaluated again
        assert llm.n_past == reply_start + turn and conv.pending == pipe.history_ids(second.tokens)
        # The head starts afresh (as each official generate() call) over the whole dialogue in the cache.
        assert head_prefill[0] == reply_start + turn and pipe.head.position().n_past == 5 * (reply_start + turn + steps2)
        ids2 = ids1.tolist() + history + pipe.turn_prefix_ids + [AUDIO_TOKEN] * positions + pipe.suffix_ids
    # That dialogue is the official template's rendering of the two turns with the reply's text ...
    tok = _tokenizer(Path(json.loads((bundle / MANIFEST).read_text())["source"]["model_dir"]))
    user = AUDIO_TEMPLATE.replace("<|AUDIO|>", "<|AUDIO|>" * positions)
    text = jinja2.Environment().from_string(CHAT_TEMPLATE).render(messages=[
        {"role": "system", "content": S2M_PROMPT}, {"role": "user", "content": user},
        {"role": "assistant", "content": tok.decode(history, skip_special_tokens=False)}, {"role": "user", "content": user}],
        add_generation_prompt=True)
    assert tok.decode(ids2, skip_special_tokens=False) == text
    # ... and the reply to it equals the reference's S2M loop on the whole prompt at once.
    with torch.no_grad():
        want = s2m_greedy(model, torch.tensor(ids2), torch.cat([emb, emb]), steps2)
    assert second.tokens == want.text_tokens and codes == want.codes


def test_runtime_imports_no_torch(bundle):
    code = (
        "import sys, numpy as np\n"
        "from omnilite.runtime import Pipeline, PipelineConfig, Done\n"
        f"pipe = Pipeline.load({str(bundle)!r}, PipelineConfig(max_new_tokens=8, ignore_eos=True))\n"
        "done = [e for e in pipe.respond(np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1, 16000)"
        " if isinstance(e, Done)][0]\n"
        "bad = [m for m in ('torch', 'transformers', 'safetensors', 'onnx', 'gguf') if m in sys.modules]\n"
        "print(type(pipe).__name__, len(done.tokens), len(done.units), done.audio.size > 0, bad); sys.exit(1 if bad else 0)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.split()[:4] == ["FunAudioChatPipeline", "8", "35", "True"]


def test_info_and_bad_layouts_through_the_cli(cli_run, bundle, tmp_path, capsys):
    from omnilite.cli import main

    capsys.readouterr()
    assert main(["info", str(bundle)]) == 0
    out = capsys.readouterr().out
    assert "family fun-audio-chat" in out and "text_embeddings.npy" in out and "speech_head.gguf" in out
    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken)
    (broken / "text_embeddings.npy").unlink()
    assert main(["run", str(broken), "--input", str(QUESTION), "--output", str(tmp_path / "r.wav")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {broken} is missing text_embeddings.npy (stage 'text_embeddings'); re-export the bundle with "
                   "`omnilite export`."]
    assert main(["run", str(bundle), "--input", str(QUESTION), "--output", str(tmp_path / "r.wav"),
                 "--encoder-mode", "tail-2s"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not apply to Fun-Audio-Chat" in err[0]
    # A release without its vocoder dir: refused before any work, nothing written.
    ckpt = tmp_path / "ckpt"
    shutil.copytree(cli_run / "ckpt", ckpt)
    shutil.rmtree(ckpt / "Fun-CosyVoice3-0.5B-2512")
    assert main(["export", str(ckpt), str(tmp_path / "b"), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Fun-CosyVoice3-0.5B-2512" in err[0] and not (tmp_path / "b").exists()
