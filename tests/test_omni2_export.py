"""The exported LLaMA-Omni2 bundle against the PyTorch reference (the issue's acceptance thresholds)."""

import json

import numpy as np
import torch

from omnilite.runtime.bundle import load_bundle, sha256_file
from omnilite.runtime.encoder import SpeechEncoder
from omnilite.runtime.metrics import relative_max_error, snr_db
from omnilite.runtime.omni2.flow import FlowDecoder, FlowStreamConfig
from omnilite.runtime.omni2.hift import HiFTVocoder

from omni2_fixtures import MAX_TTS


def test_manifest_stages_hashes_and_parity(omni2_bundle):
    m = json.loads((omni2_bundle / "omnilite.json").read_text())
    assert m["family"] == "llama-omni2" and m["streaming"] == {"read": 3, "write": 10}
    stages = {s["name"]: s for s in m["stages"]}
    assert set(stages) == {"encoder", "llm", "tts_lm", "tts_fusion", "tts_text_embed", "flow_encoder", "flow_estimator",
                           "flow_estimator_cached", "flow_noise", "hift_f0", "hift"}
    for s in stages.values():
        assert s["sha256"] == sha256_file(omni2_bundle / s["file"])
    # The official estimator inputs, plus the attention chunk (an inference setting, not a weight).
    assert stages["flow_estimator"]["inputs"].keys() == {"x", "mask", "mu", "t", "spks", "cond", "chunk_frames"}
    p = m["parity"]
    for stage in ("mel", "encoder", "llm", "tts_lm", "flow", "hift"):
        assert p[stage]["ok"], (stage, p[stage])
    assert max(p["encoder"]["rel_max_error"].values()) <= 1e-3
    assert p["llm"]["greedy_tokens_identical"] == 32
    assert p["tts_lm"]["greedy_tokens_identical"] >= 32 and (p["tts_lm"]["read"], p["tts_lm"]["write"]) == (3, 10)
    assert p["flow"]["rel_max_error"] <= 1e-3
    assert p["hift"]["snr_db"] >= 40.0


def test_tts_lm_carries_no_vocabulary_and_keeps_every_row(omni2_bundle, omni2_checkpoint):
    """The TTS LM takes ids and embeddings only, so its GGUF leaves the BPE vocabulary out (llama.cpp
    would build its tables at load); the logits still cover every row (greedy parity: the test below)."""
    from gguf import GGUFReader

    from omnilite.runtime.llm import LlamaCppLLM

    def tokenizer_model(path):
        f = GGUFReader(path).fields["tokenizer.ggml.model"]
        return bytes(f.parts[f.data[0]]).decode()

    assert tokenizer_model(omni2_bundle / "tts_lm.gguf") == "none"
    assert tokenizer_model(omni2_bundle / "llm.gguf") == "gpt2"  # the LLM's text is detokenized
    config = json.loads((omni2_checkpoint / "models" / "LLaMA-Omni2-0.5B" / "config.json").read_text())
    rows = config["speech_generator"]["vocab_size"]
    lm = LlamaCppLLM(omni2_bundle / "tts_lm.gguf")
    try:
        assert lm.n_vocab == rows and lm.eval_tokens([rows - 1], want_last=True)[0].shape == (rows,)
    finally:
        lm.close()


def test_encoder_on_the_spoken_question(omni2_bundle, omni2_reference, question_16k):
    _, ref = omni2_reference.speech_embeddings(question_16k)
    got = SpeechEncoder(load_bundle(omni2_bundle))(question_16k)
    assert got.shape == (300, 64)
    assert relative_max_error(ref.numpy(), got) <= 1e-3


def test_tts_tokens_identical_under_rw_3_10(omni2_bundle, omni2_reference, omni2_reply):
    from omnilite.export.omni2.parity import tts_parity

    ref, rt = tts_parity(omni2_reference, load_bundle(omni2_bundle), omni2_reply.tokens, omni2_reply.hidden, 3, 10, MAX_TTS)
    assert ref == omni2_reply.tts_tokens
    assert len(ref) >= 32 and rt == ref


def test_flow_mel_matches_reference(omni2_bundle, omni2_reply):
    mel = FlowDecoder(load_bundle(omni2_bundle)).offline(omni2_reply.units)
    assert mel.shape == omni2_reply.flow_mel.shape == (80, 2 * len(omni2_reply.units))
    assert relative_max_error(omni2_reply.flow_mel, mel) <= 1e-3


def test_hift_matches_reference(omni2_bundle, omni2_reply):
    voc = HiFTVocoder(load_bundle(omni2_bundle))
    audio = voc.offline(omni2_reply.flow_mel)
    assert len(audio) == 480 * omni2_reply.flow_mel.shape[1]
    assert snr_db(omni2_reply.audio, audio) >= 40.0


def test_flow_is_chunk_causal_as_the_streaming_design_assumes(omni2_reference, omni2_reply):
    """The official streaming call on tokens[:chunk + lookahead] (lookahead frames dropped) gives the
    whole utterance's first chunk of mel: attention is chunk-causal, convs causal but the lookahead."""
    flow = omni2_reference.flow
    units = omni2_reply.units
    assert len(units) > 53
    xv = torch.from_numpy(omni2_reference.xvector)[None]
    with torch.no_grad():
        part = flow.inference(torch.tensor([units[:53]]), xv, finalize=False)[0].numpy()
    assert part.shape[1] == 100
    assert relative_max_error(omni2_reply.flow_mel[:, :100], part) <= 1e-5


def test_streamed_flow_and_hift_vs_whole_utterance(omni2_bundle, omni2_reply):
    """Chunked flow (the model's 50-token chunks, 3 lookahead tokens) + ring-buffered HiFT, units
    arriving 10 at a time as the R/W loop writes them, against whole-utterance synthesis."""
    b = load_bundle(omni2_bundle)
    flow, voc = FlowDecoder(b), HiFTVocoder(b)
    whole = voc.offline(flow.offline(omni2_reply.units))
    fs, hs = flow.stream(FlowStreamConfig(window_tokens=None)), voc.stream()  # every chunk: exact at any length
    parts = []
    units = omni2_reply.units
    for a in range(0, len(units), 10):
        parts.append(hs.push(fs.push(units[a:a + 10])))
    parts.append(hs.push(fs.flush()))
    parts.append(hs.flush())
    streamed = np.concatenate(parts)
    assert fs.exact and fs.steps >= 2 and sum(len(p) > 0 for p in parts) >= 2
    assert len(streamed) == len(whole)
    snr = snr_db(whole, streamed)
    assert snr >= 25.0, snr
    assert hs.max_buffered_frames <= 2 * voc.receptive_field + 2 * 50 + 1


def test_hift_stream_with_full_context_equals_offline(omni2_bundle, omni2_reply):
    voc = HiFTVocoder(load_bundle(omni2_bundle))
    mel = omni2_reply.flow_mel
    offline = voc.offline(mel)
    st = voc.stream()
    streamed = np.concatenate([st.push(mel[:, a:a + 7]) for a in range(0, mel.shape[1], 7)] + [st.flush()])
    assert len(streamed) == len(offline)
    assert snr_db(offline, streamed) >= 80.0


def test_smaller_flow_chunk_streams_exactly_for_earlier_audio(omni2_bundle, omni2_reference, omni2_reply):
    """The chunk is an inference setting (LLaMA-Omni2: 50 tokens, CosyVoice2's streaming: 25): at 25
    the exported flow still matches PyTorch, and streaming in 25-token hops equals whole-utterance
    synthesis at that chunk, with the first audio after 28 tokens instead of 53."""
    b = load_bundle(omni2_bundle)
    flow, voc = FlowDecoder(b), HiFTVocoder(b)
    units = omni2_reply.units
    with torch.no_grad():
        ref = omni2_reference.flow.inference(torch.tensor([units]), torch.from_numpy(omni2_reference.xvector)[None],
                                             chunk_tokens=25)[0].numpy()
    whole_mel = flow.offline(units, chunk_tokens=25)
    assert relative_max_error(ref, whole_mel) <= 1e-3
    fs, hs = flow.stream(FlowStreamConfig(chunk_tokens=25, window_tokens=None)), voc.stream()
    first = None
    parts = []
    for a in range(0, len(units), 5):
        parts.append(hs.push(fs.push(units[a:a + 5])))
        if first is None and fs.steps:
            first = a + 5
    parts += [hs.push(fs.flush()), hs.flush()]
    assert first == 30  # 25 + 3 lookahead tokens, arriving 5 at a time
    assert snr_db(voc.offline(whole_mel), np.concatenate(parts)) >= 60.0
