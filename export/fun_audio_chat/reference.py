"""PyTorch reference of Fun-Audio-Chat, written from the official modeling code (facts in NOTES.md).

Module and parameter names equal the release's, so ``FunAudioChatReference(config).state_dict()``
lists the released tensors (less the tied ones, see `expected_shapes`).

- ``continuous_audio_tower``: Whisper-shaped encoder over 128-bin log-mel at 100 frames/s. The
  mel is cut into windows of 200 frames; each window goes through conv1, conv2 (stride 2), its own
  positional embedding (restarting at 0) and all layers with attention confined to the window, so
  running the windows one by one is the official block-diagonal attention. The windows' frames are
  concatenated, average-pooled by 2 (25 Hz), then ``ln_post`` and ``proj`` to the LLM width.
- ``audio_tower``: the 5 Hz side. User audio: the 25 Hz features, zero-padded (or cut) to the
  placeholder count rounded up to 5, averaged in groups of 5 and passed through
  ``continual_output_matching`` ("replace" mode: they replace the placeholder embeddings).
  Assistant speech fed back: 5 codes -> ``embed_tokens`` -> mean -> ``output_matching``.
- ``audio_invert_tower``: the speech refined head (Linear to 5 sub-steps, a Qwen3 decoder without
  token embeddings, a head over 6565 codes tied to ``audio_tower.embed_tokens``).
- ``language_model``: transformers' Qwen3ForCausalLM built from ``text_config``, as the official
  code builds it.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model

from omnilite.runtime.errors import AudioError, OmniliteError

from ..tiny import sinusoids
from .config import AUDIO_BOS, AUDIO_EOS, AUDIO_TOKEN, CHUNK_MEL_FRAMES, GROUP, MEL_HOP, SAMPLE_RATE, TOKEN_RATE

MAX_MEL_FRAMES = 3000  # the feature extractor pads or cuts to 30 s


# ----------------------------------------------------------------------------- lengths


def placeholder_count(n_samples: int) -> int:
    """25 Hz ``<|audio_pad|>`` placeholders for a 16 kHz clip: int(duration * 25), as the processor counts."""
    return int(n_samples / SAMPLE_RATE * TOKEN_RATE)


def llm_positions(n_placeholders: int) -> int:
    """``<|AUDIO|>`` positions in the prompt: the placeholders grouped by 5, rounded up."""
    return (n_placeholders + GROUP - 1) // GROUP


def mel_frames(n_samples: int) -> int:
    """Valid log-mel frames: the feature extractor's attention mask, one frame per started hop, at most 30 s."""
    return min(-(-n_samples // MEL_HOP), MAX_MEL_FRAMES)


def encoder_frames(n_mel: int) -> int:
    """25 Hz frames the continuous encoder returns for `n_mel` valid mel frames."""
    windows = [CHUNK_MEL_FRAMES] * (n_mel // CHUNK_MEL_FRAMES) + ([n_mel % CHUNK_MEL_FRAMES] if n_mel % CHUNK_MEL_FRAMES else [])
    after_cnn = sum((w - 1) // 2 + 1 for w in windows)
    return after_cnn // 2 if after_cnn >= 2 else after_cnn


# ----------------------------------------------------------------------------- encoder


def qwen3_config(d: dict) -> Qwen3Config:
    return Qwen3Config(**{k: v for k, v in d.items() if k not in ("architectures", "model_type", "transformers_version")})


class AudioAttention(nn.Module):
    def __init__(self, d_model: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t, d = x.shape
        q, k, v = (p(x).view(t, self.heads, -1).transpose(0, 1) for p in (self.q_proj, self.k_proj, self.v_proj))
        w = torch.softmax((q @ k.transpose(-1, -2)) * (d // self.heads) ** -0.5, dim=-1, dtype=torch.float32).to(q.dtype)
        return self.out_proj((w @ v).transpose(0, 1).reshape(t, d))


class EncoderLayer(nn.Module):
    def __init__(self, d_model: int, heads: int, ffn: int):
        super().__init__()
        self.self_attn = AudioAttention(d_model, heads)
        self.self_attn_layer_norm = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, ffn)
        self.fc2 = nn.Linear(ffn, d_model)
        self.final_layer_norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x))
        return x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))


class ContinuousAudioEncoder(nn.Module):
    def __init__(self, audio: dict):
        super().__init__()
        d = audio["d_model"]
        if audio.get("scale_embedding"):
            raise OmniliteError("audio_config.scale_embedding is true, which no Fun-Audio-Chat release uses; check config.json.")
        self.conv1 = nn.Conv1d(audio["num_mel_bins"], d, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2, padding=1)
        self.layers = nn.ModuleList(EncoderLayer(d, audio["encoder_attention_heads"], audio["encoder_ffn_dim"])
                                    for _ in range(audio["encoder_layers"]))
        self.ln_post = nn.LayerNorm(d)
        self.proj = nn.Linear(d, audio["output_dim"])
        # Stored in the release but never read by the official forward pass.
        self.audio_bos_eos_token = nn.Embedding(2, audio["output_dim"])
        self.window = 2 * audio["n_window"]
        self.register_buffer("positional_embedding", sinusoids(audio["max_source_positions"], d), persistent=False)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """(n_mels, frames) log-mel, valid frames only -> (encoder_frames(frames), output_dim)."""
        out = []
        for w in mel.split(self.window, dim=1):
            x = F.gelu(self.conv2(F.gelu(self.conv1(w[None]))))[0].T
            x = x + self.positional_embedding[: x.shape[0]]
            for layer in self.layers:
                x = layer(x)
            out.append(x)
        x = torch.cat(out)
        if x.shape[0] >= 2:
            x = F.avg_pool1d(x.T[None], 2, 2)[0].T
        return self.proj(self.ln_post(x))


class DiscreteEncoder(nn.Module):
    """``audio_tower``: everything the LLM reads at 5 Hz from audio."""

    def __init__(self, audio: dict):
        super().__init__()
        d = audio["output_dim"]
        self.group = audio["group_size"]
        self.embed_tokens = nn.Embedding(audio["codebook_size"], d, audio["pad_token_id"])
        self.output_matching = nn.Linear(d, d, bias=False)
        self.continual_output_matching = nn.Linear(d, d, bias=False)

    def user_audio(self, features: torch.Tensor, n_placeholders: int) -> torch.Tensor:
        """25 Hz encoder features -> (llm_positions(n_placeholders), D) prompt embeddings."""
        n = llm_positions(n_placeholders) * self.group
        x = features[:n]
        if x.shape[0] < n:  # the official code writes the features into a zero tensor of the padded length
            x = torch.cat([x, x.new_zeros(n - x.shape[0], x.shape[1])])
        return self.continual_output_matching(x.view(-1, self.group, x.shape[1]).mean(dim=1))

    def speech_groups(self, codes: torch.Tensor) -> torch.Tensor:
        """(..., 5k) speech codes -> (..., k, D): what assistant speech feeds back to the LLM."""
        e = self.embed_tokens(codes)
        return self.output_matching(e.view(*codes.shape[:-1], -1, self.group, e.shape[-1]).mean(dim=-2))


@dataclass
class HeadState:
    """The speech head's persistent state across LLM steps: its KV cache and the last code's embedding
    (one per generate() call in the official code, which starts it empty with BOS)."""

    cache: object = None
    prev: torch.Tensor | None = None
    logits: torch.Tensor | None = None  # (5, codebook) logits of the last step's sub-steps


class SpeechHead(nn.Module):
    """``audio_invert_tower`` (the speech refined head); its lm_head shares ``audio_tower.embed_tokens``."""

    def __init__(self, audio: dict):
        super().__init__()
        d, cfg = audio["output_dim"], qwen3_config(audio["crq_transformer_config"])
        self.pre_matching = nn.Linear(d, d * audio["group_size"])
        self.crq_transformer = Qwen3Model(cfg)
        del self.crq_transformer.embed_tokens  # it reads input embeddings only; the release stores none
        self.input_matching = nn.Linear(d, cfg.hidden_size, bias=False)
        self.output_matching = nn.Linear(cfg.hidden_size, d, bias=False)
        self.lm_head = nn.Linear(d, audio["codebook_size"], bias=False)
        self.group = audio["group_size"]
        self.bos, self.eos = audio["bos_token_id"], audio["eos_token_id"]

    def step(self, x: torch.Tensor, state: "HeadState", choose=None) -> list[int]:
        """One LLM step (or the prompt prefill): `x` (T, D) = final-norm hidden states + the input
        tokens' text embeddings. Writes 5 codes, the first from the last position's first sub-step;
        every earlier sub-position only extends the head's KV cache. `choose` maps (codebook,) logits
        to a code (greedy by default; the release samples)."""
        choose = choose or (lambda logits: int(logits.argmax()))
        h = self.pre_matching(x).reshape(-1, x.shape[-1])  # (5T, D): sub-position 5t+i
        prev = self.lm_head.weight[self.bos] if state.prev is None else state.prev
        codes, logits = [], []
        for i in range(self.group):
            # Sub-step 0 also feeds every earlier sub-position, all with the same previous-code embedding.
            inp = h[: len(h) - self.group + 1] if i == 0 else h[len(h) - self.group + i: len(h) - self.group + i + 1]
            out = self.crq_transformer(inputs_embeds=self.input_matching(inp + prev)[None], past_key_values=state.cache, use_cache=True)
            state.cache = out.past_key_values
            logits.append(self.lm_head(self.output_matching(out.last_hidden_state[0, -1])))
            code = choose(logits[-1])
            codes.append(code)
            prev = self.lm_head.weight[code]
        state.prev = prev
        state.logits = torch.stack(logits)
        return codes


class FunAudioChatReference(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        audio = config["audio_config"]
        self.continuous_audio_tower = ContinuousAudioEncoder(audio)
        self.audio_tower = DiscreteEncoder(audio)
        self.audio_invert_tower = SpeechHead(audio)
        self.language_model = Qwen3ForCausalLM(qwen3_config(config["text_config"]))
        self.audio_invert_tower.lm_head.weight = self.audio_tower.embed_tokens.weight

    def user_audio_embeddings(self, mel: torch.Tensor, n_samples: int) -> torch.Tensor:
        """Valid log-mel frames of one 16 kHz clip of `n_samples` -> its ``<|AUDIO|>`` embeddings."""
        n = placeholder_count(n_samples)
        if n == 0:
            raise AudioError(f"the clip is {1000 * n_samples / SAMPLE_RATE:.0f} ms long, shorter than one 40 ms speech frame; record a longer question.")
        return self.audio_tower.user_audio(self.continuous_audio_tower(mel), n)

    def prompt_embeddings(self, input_ids: torch.Tensor, audio_embeds: torch.Tensor) -> torch.Tensor:
        """(T,) prompt ids with ``<|AUDIO|>`` placeholders -> (T, D) LLM input embeddings."""
        x = self.language_model.get_input_embeddings()(input_ids)
        where = input_ids == AUDIO_TOKEN
        if int(where.sum()) != audio_embeds.shape[0]:
            raise OmniliteError(f"the prompt has {int(where.sum())} <|AUDIO|> positions but the audio gives {audio_embeds.shape[0]}; "
                                "expand the placeholders with llm_positions(placeholder_count(samples)).")
        x = x.clone()
        x[where] = audio_embeds.to(x.dtype)
        return x


@dataclass
class S2MTrace:
    """One greedy speech reply of the official generate loop, step by step; step 0 is the prompt
    prefill (the head runs there too, its codes are dropped since speech is not on yet)."""

    text_tokens: list[int]  # the text token chosen at each step
    head_hidden: list[torch.Tensor]  # (T, D) final-norm hidden states the head read at each step
    head_text: list[torch.Tensor]  # (T, D) text embeddings of those positions' input tokens
    codes: list[list[int]]  # the head's codes at each step
    logits: list[torch.Tensor]  # (5, codebook) head logits at each step
    speech: list[list[int]]  # the groups kept as the reply's speech (a group with EOS becomes all EOS and ends it)
    feedback: list[torch.Tensor]  # (D,) audio_tower row of each kept group that the LLM read back


@dataclass
class S2MStep:
    """One LLM step of the official generate loop (step 0 is the prompt prefill)."""

    hidden: torch.Tensor  # (T, D) final-norm hidden states the head read
    text: torch.Tensor  # (T, D) text embeddings of those positions' input tokens
    codes: list[int]  # the head's codes
    logits: torch.Tensor  # (5, codebook) head logits
    token: int  # the text token chosen
    kept: list[int] | None  # the group kept as the reply's speech (None while speech is off)


@torch.no_grad()
def s2m_steps(model: FunAudioChatReference, input_ids: torch.Tensor, audio_embeds: torch.Tensor,
              force_audio_bos: bool = True) -> Iterator[S2MStep]:
    """The official ``_sample`` loop (M:1218-1447) one LLM step at a time, greedy for text and speech
    and without stopping at the text eos: the head runs on every forward from the prefill on, reading
    the final-norm hidden state + the input token's text embedding (at the prompt's ``<|AUDIO|>`` rows
    that is the embedding of the ``<|AUDIO|>`` id itself, M:1123-1126); ``<|audio_bos|>`` as input
    switches speech on (``force_text_abos`` makes it the first token); while speaking, the next input
    is (text embedding + audio_tower(last group)) / 2 (M:1199-1208); a group holding the speech EOS
    ends speech and the text token becomes ``<|audio_eos|>``. The caller stops whenever it likes."""
    lm, head = model.language_model, model.audio_invert_tower
    embed = lm.get_input_embeddings()
    text = embed(input_ids)
    out = lm.model(inputs_embeds=model.prompt_embeddings(input_ids, audio_embeds)[None], use_cache=True)
    state = HeadState()
    speaking = bool(input_ids[-1] == AUDIO_BOS)
    last_group: list[int] | None = None
    for k in itertools.count():
        hidden = out.last_hidden_state[0]
        codes = head.step(hidden + text, state)
        token = AUDIO_BOS if k == 0 and force_audio_bos else int(lm.lm_head(hidden[-1]).argmax())
        kept = None
        if speaking:
            if head.eos in codes:
                codes, token, speaking = [head.eos] * head.group, AUDIO_EOS, False
            kept = last_group = codes
        yield S2MStep(hidden, text, codes, state.logits, token, kept)
        speaking |= token == AUDIO_BOS
        text = embed(torch.tensor([token]))
        x = text
        if speaking and last_group is not None:
            x = (text + model.audio_tower.speech_groups(torch.tensor(last_group))[0]) / 2
        out = lm.model(inputs_embeds=x[None], past_key_values=out.past_key_values, use_cache=True)


@torch.no_grad()
def s2m_greedy(model: FunAudioChatReference, input_ids: torch.Tensor, audio_embeds: torch.Tensor, steps: int,
               force_audio_bos: bool = True) -> S2MTrace:
    """`steps` LLM steps after the prompt of `s2m_steps`, recorded."""
    trace = S2MTrace([], [], [], [], [], [], [])
    for k, step in enumerate(s2m_steps(model, input_ids, audio_embeds, force_audio_bos)):
        trace.head_hidden.append(step.hidden)
        trace.head_text.append(step.text)
        trace.codes.append(step.codes)
        trace.logits.append(step.logits)
        trace.text_tokens.append(step.token)
        if step.kept is not None:
            if trace.speech:  # the group the LLM read back before this step
                trace.feedback.append(model.audio_tower.speech_groups(torch.tensor(trace.speech[-1]))[0])
            trace.speech.append(step.kept)
        if k == steps:
            break
    return trace


def expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor the release stores, with the shape `config` implies (tied copies are not stored)."""
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in FunAudioChatReference(config).state_dict().items()}
    shapes.pop("audio_invert_tower.lm_head.weight")
    if config["text_config"].get("tie_word_embeddings"):
        shapes.pop("language_model.lm_head.weight")
    return shapes


def n_params(shapes: dict[str, tuple[int, ...]], prefix: str = "") -> int:
    return sum(math.prod(s) for k, s in shapes.items() if k.startswith(prefix))


def materialize_buffers(model: FunAudioChatReference, dtype: torch.dtype = torch.float32) -> None:
    """Recompute the unsaved buffers (positional table, rotary frequencies) of a model built on the
    meta device, whose parameters were then assigned from a checkpoint. The positional table takes the
    model's `dtype`, as a model cast to bf16 holds it (the rotary frequencies stay f32, as transformers
    keeps them)."""
    enc = model.continuous_audio_tower
    enc.register_buffer("positional_embedding", sinusoids(*enc.positional_embedding.shape).to(dtype), persistent=False)
    for name, module in list(model.named_modules()):
        if name.endswith("rotary_emb"):
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner), attr, type(module)(config=module.config, device="cpu"))
