"""Read CosyVoice's ``cosyvoice.yaml`` (HyperPyYAML) without HyperPyYAML: tags become data.

The file instantiates classes with tags such as ``!new:cosyvoice.flow.flow.CausalMaskedDiffWithXvec``
and refers to top-level keys with ``!ref <name>`` (optionally in arithmetic such as
``<chunk_size> * <token_mel_ratio>``). We only need the numbers, so a tagged mapping becomes a dict
with its class under ``"__class__"`` and references are resolved to the values they name.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from omnilite.runtime.errors import CheckpointError

_REF = re.compile(r"<([A-Za-z_][A-Za-z0-9_]*)>")


class _Ref(str):
    """An unresolved ``!ref`` expression."""


class _Loader(yaml.SafeLoader):
    pass


def _tagged(loader: _Loader, suffix: str, node: yaml.Node) -> Any:
    if isinstance(node, yaml.MappingNode):
        value = loader.construct_mapping(node, deep=True)
        return {"__class__": suffix, **value}
    if isinstance(node, yaml.SequenceNode):
        return {"__class__": suffix, "__args__": loader.construct_sequence(node, deep=True)}
    return {"__class__": suffix, "__value__": loader.construct_scalar(node)}


def _ref(loader: _Loader, node: yaml.Node) -> _Ref:
    return _Ref(loader.construct_scalar(node))


_Loader.add_multi_constructor("!new:", _tagged)
_Loader.add_multi_constructor("!name:", _tagged)
_Loader.add_multi_constructor("!apply:", _tagged)
_Loader.add_constructor("!ref", _ref)


def _resolve(value: Any, top: dict, path: Path) -> Any:
    if isinstance(value, _Ref):
        expr = _REF.sub(lambda m: repr(_resolve(top[m.group(1)], top, path)) if m.group(1) in top else m.group(0), str(value))
        if _REF.search(expr):
            raise CheckpointError(f"{path}: '!ref {value}' names a key the file does not define; the yaml is damaged.")
        try:
            return eval(expr, {"__builtins__": {}}, {})  # noqa: S307 - numbers, quotes and + - * / only
        except Exception:  # noqa: BLE001
            return expr.strip("'\"")
    if isinstance(value, dict):
        return {k: _resolve(v, top, path) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, top, path) for v in value]
    return value


def load_cosyvoice_yaml(path: Path) -> dict:
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)  # noqa: S506 - our SafeLoader subclass
    except (OSError, yaml.YAMLError) as e:
        raise CheckpointError(f"{path} cannot be read as the CosyVoice config ({type(e).__name__}); download the decoder dir again.") from None
    if not isinstance(raw, dict) or "flow" not in raw or "hift" not in raw:
        raise CheckpointError(f"{path} has no 'flow' and 'hift' sections; it is not a CosyVoice2 decoder config.")
    return _resolve(raw, raw, path)
