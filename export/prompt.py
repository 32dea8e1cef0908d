"""LLaMA-Omni's prompt: the `llama_3` conversation template with a `<speech>` placeholder.

Tokenised as the official ``tokenizer_speech_token`` does: each text piece around ``<speech>`` is
encoded with the HF tokenizer (which prepends <|begin_of_text|>); the first piece keeps its BOS,
later pieces drop it. As the template text itself starts with <|begin_of_text|>, the official
prompt starts with two BOS tokens; we reproduce that, since it is what the model was run with.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import Tokenizer

SYSTEM_PROMPT = (
    "You are a helpful language and speech assistant. You are able to understand the speech content that the "
    "user provides, and assist the user with a variety of tasks using natural language."
)
USER_INSTRUCTION = "<speech>\nPlease directly answer the questions in the user's speech."
SPEECH_PLACEHOLDER = "<speech>"


def llama3_prompt(system: str = SYSTEM_PROMPT, user: str = USER_INSTRUCTION) -> str:
    header = "<|start_header_id|>{}<|end_header_id|>\n\n"
    text = "<|begin_of_text|>"
    if system:
        text += header.format("system") + system + "<|eot_id|>"
    text += header.format("user") + user.strip() + "<|eot_id|>"
    return text + header.format("assistant")


@dataclass(frozen=True)
class SpeechPrompt:
    """Token ids before and after the spliced speech embeddings."""

    prefix_ids: list[int]
    suffix_ids: list[int]
    text: str
    # Follow-up turns: after the assistant's reply, these ids close it and open the next user turn,
    # whose speech is followed by suffix_ids again (the same user instruction).
    turn_prefix_ids: list[int] = field(default_factory=list)


def turn_separator() -> str:
    """What the llama_3 template puts between an assistant reply and the next user message."""
    return "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"


def speech_prompt(tokenizer_json: Path, system: str = SYSTEM_PROMPT, user: str = USER_INSTRUCTION) -> SpeechPrompt:
    tok = Tokenizer.from_file(str(tokenizer_json))
    text = llama3_prompt(system, user)
    pieces = [tok.encode(p).ids for p in text.split(SPEECH_PLACEHOLDER)]
    if len(pieces) != 2:
        raise ValueError("the user message must contain exactly one <speech> placeholder")
    bos = tok.token_to_id("<|begin_of_text|>")
    # The first piece is kept whole; later pieces lose the BOS the tokenizer prepended.
    drop = 1 if pieces[0][:1] == [bos] else 0
    turn = tok.encode(turn_separator(), add_special_tokens=False).ids
    return SpeechPrompt(prefix_ids=pieces[0], suffix_ids=pieces[1][drop:], text=text, turn_prefix_ids=turn)
