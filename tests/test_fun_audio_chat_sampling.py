"""Fun-Audio-Chat speech sampling (runtime/fun_audio_chat/sampling.py): the numpy processors against
transformers' RepetitionPenalty -> Temperature -> TopP (the order transformers builds from the release's
kwargs), edge cases (repeats, negative scores, a top-p boundary tie, min_tokens_to_keep), injected
faults the same comparison must catch, and the pipeline on the tiny bundle: the history the sampler
sees, seeded reproducibility, sampled vs greedy replies, and greedy unchanged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper,
)

import omnilite
import omnilite.runtime.fun_audio_chat.sampling as smp
from omnilite.runtime import Done, Pipeline, PipelineConfig
from omnilite.runtime.audio import prepare_speech, read_wav
from omnilite.runtime.errors import OmniliteError
from omnilite.runtime.fun_audio_chat.pipeline import FunAudioChatConfig, FunAudioChatPipeline
from omnilite.runtime.fun_audio_chat.sampling import SpeechSampler, SpeechSampling

CODEBOOK = 6565
BOS, EOS, N_VOCODER = 6561, 6562, 6561
AUDIO_BOS = 151670
QUESTION = Path(omnilite.__file__).parent / "data" / "question.wav"
# utils/constant.py:65-76 (DEFAULT_S2M_GEN_KWARGS) + the web demo's bad words (web_demo/server/server.py:186-188),
# to see that the speech processors are the list minus NoBadWords.
RELEASE_KWARGS = dict(do_sample=True, temperature=0.8, top_p=0.9, top_k=0, num_beams=1, max_new_tokens=512,
                      repetition_penalty=1.2, length_penalty=1.0, eos_token_id=151645, pad_token_id=151643,
                      bad_words_ids=[[151670, 151672]])


def _processors(p: SpeechSampling) -> LogitsProcessorList:
    """transformers' processors in the order its generate() builds them (checked below)."""
    procs = [RepetitionPenaltyLogitsProcessor(float(p.repetition_penalty)), TemperatureLogitsWarper(float(p.temperature))]
    if p.top_k:
        procs.append(TopKLogitsWarper(p.top_k, min_tokens_to_keep=p.min_tokens_to_keep))
    procs.append(TopPLogitsWarper(p.top_p, min_tokens_to_keep=p.min_tokens_to_keep))
    return LogitsProcessorList(procs)


def _reference_scores(logits: np.ndarray, history, p: SpeechSampling) -> np.ndarray:
    ids = torch.tensor([list(history)], dtype=torch.long).reshape(1, -1)
    return _processors(p)(ids, torch.from_numpy(np.array(logits, np.float32))[None])[0].numpy()


def _gap(logits, history, p: SpeechSampling) -> float:
    """Max |numpy distribution - transformers distribution|, after checking that both drop the same codes."""
    ours = SpeechSampler(p).scores(logits, history)
    ref = _reference_scores(logits, history, p)
    if not np.array_equal(np.isneginf(ours), np.isneginf(ref)):
        return float("inf")
    want = torch.softmax(torch.from_numpy(ref), -1).numpy()
    return float(np.max(np.abs(smp.softmax32(ours) - want)))


def _random_case(seed: int, scale: float = 3.0, n_hist: int = 40):
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal(CODEBOOK) * scale).astype(np.float32)
    hist = list(rng.integers(0, CODEBOOK, n_hist)) + list(rng.integers(0, CODEBOOK, 3)) * 2  # repeats
    return logits, [int(h) for h in hist]


# --- the processors against transformers --------------------------------------------------------

def test_transformers_builds_penalty_temperature_top_p_from_the_release_kwargs():
    from transformers import GenerationConfig
    from transformers.generation.logits_process import NoBadWordsLogitsProcessor
    from transformers.generation.utils import GenerationMixin

    gc = GenerationConfig(**RELEASE_KWARGS)
    gc._eos_token_tensor, gc._pad_token_tensor = torch.tensor([151645]), torch.tensor(151643)
    procs = GenerationMixin._get_logits_processor(GenerationMixin.__new__(GenerationMixin), generation_config=gc,
                                                  input_ids_seq_length=10, encoder_input_ids=None,
                                                  prefix_allowed_tokens_fn=None, logits_processor=None, device="cpu")
    speech = [q for q in procs if not isinstance(q, NoBadWordsLogitsProcessor)]  # modeling_funaudiochat.py:1315
    assert [type(q).__name__ for q in speech] == [type(q).__name__ for q in _processors(SpeechSampling())]
    assert (speech[0].penalty, speech[1].temperature, speech[2].top_p, speech[2].min_tokens_to_keep) == (1.2, 0.8, 0.9, 1)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("scale", [1.0, 3.0, 8.0])
def test_distribution_equals_transformers_on_random_logits_and_histories(seed, scale):
    logits, hist = _random_case(seed, scale)
    assert (logits[hist] < 0).any() and (logits[hist] > 0).any() and len(set(hist)) < len(hist)
    p = SpeechSampling()
    assert _gap(logits, hist, p) < 1e-6
    assert _gap(logits, [], p) < 1e-6  # the prefill's first sub-step: nothing seen yet
    kept = np.isfinite(SpeechSampler(p).scores(logits, hist))
    assert 1 <= kept.sum() < CODEBOOK  # top-p did cut


def test_penalty_moves_seen_codes_the_right_way():
    logits = np.zeros(CODEBOOK, np.float32)
    logits[[10, 11, 12]] = [2.4, -2.4, 0.0]
    s = smp.repetition_penalty(logits, [10, 11, 12, 10, 10], 1.2)
    assert s[10] == np.float32(2.4) / np.float32(1.2) and s[11] == np.float32(-2.4) * np.float32(1.2) and s[12] == 0
    assert np.array_equal(np.delete(s, [10, 11, 12]), np.delete(logits, [10, 11, 12]))  # once per id, others untouched


def test_edge_cases_equal_transformers():
    p = SpeechSampling()
    # One code holding nearly all the mass: top-p keeps only it (and min_tokens_to_keep=2 keeps two).
    logits = np.random.default_rng(1).standard_normal(CODEBOOK).astype(np.float32)
    logits[77] = 40.0
    assert _gap(logits, [77, 3], p) < 1e-6 and np.isfinite(SpeechSampler(p).scores(logits)).sum() == 1
    p2 = SpeechSampling(min_tokens_to_keep=2)
    assert _gap(logits, [], p2) < 1e-6 and np.isfinite(SpeechSampler(p2).scores(logits)).sum() == 2
    # The penalty flips which code leads: a seen positive leader divided, a seen negative one multiplied.
    logits = np.full(CODEBOOK, -30.0, np.float32)
    logits[[5, 6, 7]] = [1.0, 0.95, -0.5]
    assert _gap(logits, [5, 7, 5], p) < 1e-6
    assert np.argmax(SpeechSampler(p).scores(logits, [5])) == 6
    # All negative scores, a long history with repeats.
    logits = -np.abs(np.random.default_rng(2).standard_normal(CODEBOOK)).astype(np.float32) * 4
    assert _gap(logits, list(range(0, CODEBOOK, 3)) * 2, p) < 1e-6
    # top_k on (the release has it off): transformers puts TopK between temperature and top-p.
    logits, hist = _random_case(9)
    assert _gap(logits, hist, SpeechSampling(top_k=50)) < 1e-6
    assert np.isfinite(SpeechSampler(SpeechSampling(top_k=50, top_p=1.0)).scores(logits, hist)).sum() == 50


def _stable_sort(monkeypatch):
    """torch.sort as the release's device runs it for 6565 entries (CUDA sorts rows over 4096 stably);
    PyTorch's CPU sort orders equal entries arbitrarily."""
    sort = torch.sort
    monkeypatch.setattr(torch, "sort", lambda x, *a, **k: sort(x, *a, **{**k, "stable": True}))


def test_top_p_boundary_tie_equals_transformers(monkeypatch):
    """Ten equal codes hold all the mass (0.1 each): the first one's cumulative sum is exactly
    float32(1 - 0.9), so `<=` drops one of the ten; equal scores go in index order."""
    p = SpeechSampling()
    logits = np.full(CODEBOOK, -1e4, np.float32)
    ties = np.arange(100, 6500, 640)
    logits[ties] = 0.0
    ours = SpeechSampler(p).scores(logits)
    assert np.flatnonzero(np.isfinite(ours)).tolist() == ties[1:].tolist()
    unpatched = _reference_scores(logits, [], p)  # CPU order of the ties: the same count, maybe other codes
    assert np.isfinite(unpatched).sum() == 9
    _stable_sort(monkeypatch)
    assert _gap(logits, [], p) < 1e-6
    # Every code equal: the boundary falls inside one tie of 6565.
    flat = np.zeros(CODEBOOK, np.float32)
    assert _gap(flat, [], p) < 1e-6 and 0 < np.isneginf(SpeechSampler(p).scores(flat)).sum() < CODEBOOK


# --- injected faults: the same comparison catches them --------------------------------------------

def test_penalty_multiplying_positive_scores_is_caught(monkeypatch):
    logits, hist = _random_case(3)
    assert _gap(logits, hist, SpeechSampling()) < 1e-6

    def wrong(scores, history, penalty):
        out = np.array(scores, np.float32)
        ids = np.unique(np.asarray(history, np.int64))
        out[ids] = out[ids] * np.float32(penalty)  # positive scores multiplied too
        return out
    monkeypatch.setattr(smp, "repetition_penalty", wrong)
    assert _gap(logits, hist, SpeechSampling()) > 1e-3


def test_top_p_keeping_one_code_too_few_is_caught(monkeypatch):
    logits, hist = _random_case(4)
    top_p = smp.top_p_filter

    def wrong(scores, p, keep=1):
        out = top_p(scores, p, keep)
        kept = np.flatnonzero(np.isfinite(out))
        out[kept[np.argmin(out[kept])]] = -np.inf  # the smallest kept code dropped as well
        return out
    monkeypatch.setattr(smp, "top_p_filter", wrong)
    assert _gap(logits, hist, SpeechSampling()) == float("inf")


def test_threshold_compared_in_double_is_caught(monkeypatch):
    """float32(1 - 0.9) == 0.1f but the double 1 - 0.9 < 0.1f: only the float32 comparison drops the tie."""
    logits = np.full(CODEBOOK, -1e4, np.float32)
    logits[np.arange(100, 6500, 640)] = 0.0
    _stable_sort(monkeypatch)
    assert _gap(logits, [], SpeechSampling()) < 1e-6

    def wrong(scores, p, keep=1):
        order = np.argsort(scores, kind="stable")
        cum = np.cumsum(smp.softmax32(scores[order]), dtype=np.float64)
        remove = cum <= 1 - p  # the threshold left in double
        remove[-keep:] = False
        out = np.array(scores, np.float32)
        out[order[remove]] = -np.inf
        return out
    monkeypatch.setattr(smp, "top_p_filter", wrong)
    assert _gap(logits, [], SpeechSampling()) == float("inf")


# --- the sampler itself ---------------------------------------------------------------------------

def test_seeded_draws_are_reproducible_and_follow_the_distribution():
    logits, hist = _random_case(5, scale=2.0)
    a, b, c = (SpeechSampler(SpeechSampling(seed=s)) for s in (11, 11, 12))
    da, db, dc = ([s(logits, hist) for _ in range(200)] for s in (a, b, c))
    assert da == db and da != dc
    probs = SpeechSampler().probs(logits, hist)
    assert all(probs[i] > 0 for i in da + dc)  # never a code top-p removed
    peaked = np.full(CODEBOOK, -50.0, np.float32)
    peaked[[1, 2]] = [0.0, np.log(3.0) * 0.8]  # after the temperature: p(2) = 3 p(1), 0.75 / 0.25
    draws = np.array([a(peaked) for _ in range(4000)])
    assert set(draws.tolist()) == {1, 2} and abs(np.mean(draws == 2) - 0.75) < 0.03


def test_settings_are_checked():
    assert smp.resolve_speech_sampling("greedy") is None and smp.resolve_speech_sampling(None) is None
    assert smp.resolve_speech_sampling("release") == SpeechSampling(0.8, 0.9, 0, 1.2, None)
    with pytest.raises(OmniliteError) as e:
        smp.resolve_speech_sampling("fast")
    assert str(e.value) == "speech_sampling must be 'greedy', 'release' or a SpeechSampling, got 'fast'."
    with pytest.raises(OmniliteError) as e:
        SpeechSampling(temperature=0.0)
    assert str(e.value) == ("speech sampling temperature must be a positive number, got 0.0; "
                            "use speech_sampling='greedy' for argmax codes.")
    with pytest.raises(OmniliteError, match=r"^speech history holds ids outside the codebook of 6565: 0\.\.6565\.$"):
        SpeechSampler().scores(np.zeros(CODEBOOK, np.float32), [0, 6565])


# --- the pipeline on the tiny bundle --------------------------------------------------------------

@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    from omnilite.cli import main

    d = tmp_path_factory.mktemp("facs")
    assert main(["make-tiny", "fun-audio-chat", str(d / "ckpt"), "-q"]) == 0
    assert main(["export", str(d / "ckpt"), str(d / "bundle"), "-q"]) == 0
    return d / "bundle"


@pytest.fixture(scope="module")
def question() -> np.ndarray:
    audio, rate = read_wav(QUESTION)
    return prepare_speech(audio, rate, 16000)


STEPS = 16


def _run(bundle: Path, audio: np.ndarray, config: PipelineConfig, record_sampler: bool = False):
    """A reply, the head's codes at every step (kept or dropped) and, if asked, every (logits, seen)
    the sampler was given."""
    with Pipeline.load(bundle, config) as pipe:
        assert isinstance(pipe, FunAudioChatPipeline)
        codes, calls, step = [], [], pipe.head.step
        pipe.head.step = lambda *a, **k: codes.append(step(*a, **k)) or codes[-1]
        if record_sampler:  # _speak hands pipe.speech_sampler to the head as its `choose`
            sampler = pipe.speech_sampler
            pipe.speech_sampler = lambda lo, seen: calls.append((np.array(lo), list(seen))) or sampler(lo, seen)
        done = [e for e in pipe.respond(audio, 16000) if isinstance(e, Done)][0]
        return done, codes, calls


def _cfg(sampling, steps: int = STEPS) -> FunAudioChatConfig:
    return FunAudioChatConfig(max_new_tokens=steps, ignore_eos=True, mode="sequential", speech_sampling=sampling)


def _kept(codes: list[list[int]]) -> list[list[int]]:
    """The groups the official loop keeps: every step's after the forced <|audio_bos|> (the prefill's
    dropped), until one holding EOS (kept as all-EOS)."""
    kept = []
    for g in codes[1:]:
        kept.append([EOS] * 5 if EOS in g else list(g))
        if EOS in g:
            break
    return kept


def test_sampler_sees_the_kept_codes_and_this_steps_earlier_codes(bundle, question):
    done, codes, calls = _run(bundle, question, _cfg(SpeechSampling(seed=3)), record_sampler=True)
    assert len(codes) == STEPS and len(calls) == 5 * STEPS
    kept = _kept(codes)
    for j, group in enumerate(codes):
        before = [c for g in kept[:max(j - 1, 0)] for c in g]  # step j's head call sees groups kept up to step j - 1
        for i in range(5):
            assert calls[5 * j + i][1] == before + group[:i], (j, i)
    # The real head logits and histories against transformers, too.
    for lo, seen in calls[::7]:
        assert _gap(lo, seen, SpeechSampling()) < 1e-6
    assert done.units == [c for g in kept for c in g if c < N_VOCODER]


def test_seeded_sampling_is_reproducible_and_differs_from_greedy(bundle, question):
    greedy, g_codes, _ = _run(bundle, question, _cfg("greedy"))
    a, a_codes, _ = _run(bundle, question, _cfg(SpeechSampling(seed=21)))
    b, b_codes, _ = _run(bundle, question, _cfg(SpeechSampling(seed=21)))
    c, c_codes, _ = _run(bundle, question, _cfg(SpeechSampling(seed=22)))
    assert (a.tokens, a_codes, a.units) == (b.tokens, b_codes, b.units) and np.array_equal(a.audio, b.audio)
    assert c_codes != a_codes and a_codes != g_codes
    assert a_codes[0] != g_codes[0]  # the prefill's codes are sampled too (then dropped)
    for r, cs in ((a, a_codes), (c, c_codes)):
        assert len(r.tokens) == len(greedy.tokens) == STEPS and len(cs) == STEPS
        assert all(len(g) == 5 and all(0 <= x < CODEBOOK for x in g) for g in cs)
        # Step 0 is the forced <|audio_bos|>, step 1 reads its plain text embedding: neither depends on
        # the codes. From step 2 on the LLM reads the sampled group back, so the text may differ.
        assert r.tokens[:2] == greedy.tokens[:2] and r.tokens[0] == AUDIO_BOS
        assert r.units == [x for g in _kept(cs) for x in g if x < N_VOCODER]
        assert len(r.audio) == len(r.units) * 2 * 480 and r.sample_rate == 24000


def test_greedy_setting_is_the_plain_config_path(bundle, question):
    plain, p_codes, _ = _run(bundle, question, PipelineConfig(max_new_tokens=STEPS, ignore_eos=True, mode="sequential"))
    default, d_codes, _ = _run(bundle, question, FunAudioChatConfig(max_new_tokens=STEPS, ignore_eos=True, mode="sequential"))
    assert (plain.tokens, p_codes, plain.units) == (default.tokens, d_codes, default.units)
    with Pipeline.load(bundle, _cfg("greedy")) as pipe:
        assert pipe.speech_sampler is None
    with Pipeline.load(bundle, _cfg("release")) as pipe:
        assert pipe.speech_sampler.params == SpeechSampling()


def test_cli_speech_sampling_flags(bundle, tmp_path):
    """`run --speech-sampling release --speech-seed N` is reproducible and not the greedy reply."""
    from omnilite.cli import main

    def run(name: str, *flags: str) -> np.ndarray:
        out = tmp_path / f"{name}.wav"
        assert main(["run", str(bundle), "-i", str(QUESTION), "-o", str(out), "-n", "12", "--ignore-eos", "-q", *flags]) == 0
        return read_wav(out)[0]

    greedy = run("greedy")
    a = run("a", "--speech-sampling", "release", "--speech-seed", "5")
    b = run("b", "--speech-sampling", "release", "--speech-seed", "5")
    assert np.array_equal(a, b) and not (len(a) == len(greedy) and np.array_equal(a, greedy))
