"""`make-tiny fun-audio-chat`: a Fun-Audio-Chat release in its on-disk layout with seeded random
weights (small dimensions by default; ``shape="real"`` for the released ones, about 19 GB).

Written under `root` as the official README places the downloads next to the code:
``Fun-Audio-Chat-8B/`` (config.json with the release's keys, processor_config.json, the real
Qwen tokenizer with Qwen3's extra tokens and this family's audio tokens, bf16 safetensors with
the released tensor names, sharded at 5 GB with an index as transformers saves) and
``utils/new_spk2info.pt`` (the two voices of the GitHub repo's file, same keys and shapes per
frame, random values).

Not written (see NOTES.md): the ``speech_tokenizer/`` subfolder the processor loads (its files were
not available to read; the runtime does not need it: user audio only becomes placeholders, and
speech codes are numbers), generation_config.json (content unknown), and the CosyVoice3 vocoder
dir ``Fun-CosyVoice3-0.5B-2512`` (flow.pt / hift.pt layouts still to be read). Random weights babble.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from omnilite.runtime.errors import OmniliteError

from ..omni2.qwen_tokenizer import qwen25_tokenizer, tokenizer_config, write_tokenizer
from ..omni2.tiny import _fill, _llm_special
from ..tiny import _Init
from .config import EXTRA_TOKENS, MODEL_DIR, N_CODES, PROCESSOR_CONFIG, SHAPES, SPK2INFO, release_config
from .reference import expected_shapes

log = logging.getLogger(__name__)

SHARD_BYTES = 5 * 1024**3  # transformers' default max_shard_size
LLM_PREFIX = "language_model."


def make_tiny_fun_audio_chat(root: Path, shape: str = "tiny", seed: int = 0, overwrite: bool = False,
                             progress: bool = False) -> Path:
    """Write the release under `root` and return its model dir. Atomic: built in a sibling temp dir.
    `progress`: a bar over the weight shards on stderr (the real shape writes four 5 GB shards)."""
    if shape not in SHAPES:
        raise OmniliteError(f"unknown Fun-Audio-Chat shape {shape!r}; use one of: {', '.join(SHAPES)}.")
    root = Path(root)
    if root.exists() and any(root.iterdir()) and not overwrite:
        raise OmniliteError(f"{root} already exists and is not empty; choose another directory or pass --force.")
    init = _Init(seed)
    tmp = root.with_name(f".{root.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_model_dir(tmp / MODEL_DIR, release_config(shape), init, progress)
        _write_spk2info(tmp / SPK2INFO, init)
        if root.exists():
            shutil.rmtree(root)
        tmp.rename(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote %s Fun-Audio-Chat checkpoint (random weights) to %s", shape, root)
    return root / MODEL_DIR


def _write_model_dir(model_dir: Path, cfg: dict, init: _Init, progress: bool) -> None:
    model_dir.mkdir(parents=True)
    (model_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    (model_dir / "processor_config.json").write_text(json.dumps(PROCESSOR_CONFIG, indent=2))
    tok = qwen25_tokenizer(EXTRA_TOKENS)
    # No chat template in the tokenizer config: the processor's built-in one applies (config.CHAT_TEMPLATE).
    write_tokenizer(model_dir, tok, tokenizer_config(tok, eos="<|im_end|>", chat_template=None))
    (model_dir / "added_tokens.json").write_text(json.dumps({t["content"]: t["id"] for t in tok["added_tokens"]}, indent=2))
    _write_weights(model_dir, expected_shapes(cfg), init, bool(cfg["text_config"]["tie_word_embeddings"]), progress)


def _write_weights(model_dir: Path, shapes: dict[str, tuple[int, ...]], init: _Init, tied: bool, progress: bool) -> None:
    llm_special = _llm_special(init, LLM_PREFIX, tied=tied)

    def make(name: str, shp: tuple[int, ...]) -> torch.Tensor:
        if name.startswith(LLM_PREFIX):
            return _fill({name[len(LLM_PREFIX):]: shp}, init, LLM_PREFIX, special=llm_special)[name]
        return _fill({name: shp}, init)[name]

    # Shards are filled one at a time so the real shape never holds more than 5 GB of tensors.
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shp in shapes.items():
        nbytes = 2 * math.prod(shp)
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, shp))
        size += nbytes
    weight_map, total = {}, 0
    for i, shard in enumerate(tqdm(shards, desc="make-tiny", unit="shard", disable=not progress), start=1):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: make(name, shp).to(torch.bfloat16).contiguous() for name, shp in shard}
        save_file(tensors, str(model_dir / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, fname))
        total += 2 * sum(t.numel() for t in tensors.values())
        del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (model_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _write_spk2info(path: Path, init: _Init) -> None:
    """Both voices of the released file: a 192-d CAM++ embedding, a prompt's speech tokens and its 80-bin mel."""
    voices = {}
    for voice, (n_tok, n_mel) in {"中文女": (20, 35), "中文男": (22, 39)}.items():
        g = torch.Generator().manual_seed(init.seed * 7919 + n_tok)
        voices[voice] = {
            "embedding": init(f"spk2info.{n_tok}.embedding", (1, 192), "normal", 0.1),
            "speech_token": torch.randint(0, N_CODES, (1, n_tok), generator=g, dtype=torch.int64),
            "speech_feat": init(f"spk2info.{n_tok}.speech_feat", (1, n_mel, 80), "normal", 2.0) - 6.0,
        }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(voices, path)
