"""token2wav/flow.yaml and token2wav/flow.pt of a Step-Audio-2-mini release: read, write (tiny) and check.

flow.yaml is HyperPyYAML: one key ``flow`` instantiating ``cosyvoice2.flow.flow.CausalMaskedDiffWithXvec``
with a nested ``UpsampleConformerEncoderV2`` encoder and a ``CausalConditionalCFM`` decoder holding
the ``DiT`` estimator (keys and values in NOTES.md). flow.pt is the module's plain fp32 state dict,
loaded strictly by token2wav.py, so every tensor is checked by name and shape against flow.yaml.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch
import yaml

from omnilite.runtime.errors import CheckpointError

from ..omni2.checkpoint import _weight_norm_names
from ..omni2.cosy_yaml import _Loader, _resolve
from ..omni2.hift import HiFT, HiFTConfig
from ..unit_vocoder import fold_weight_norm
from .flow_reference import StepAudio2Flow, StepFlowConfig

FLOW_CLASS = "cosyvoice2.flow.flow.CausalMaskedDiffWithXvec"
ENCODER_CLASS = "cosyvoice2.transformer.upsample_encoder_v2.UpsampleConformerEncoderV2"
DECODER_CLASS = "cosyvoice2.flow.flow_matching.CausalConditionalCFM"
ESTIMATOR_CLASS = "cosyvoice2.flow.decoder_dit.DiT"

_FIX = "download token2wav/flow.yaml again from the Step-Audio-2-mini release"


def flow_yaml(c: StepFlowConfig) -> str:
    """flow.yaml in the release's layout (every key it sets, including the ones inference ignores)."""
    return f"""flow: !new:{FLOW_CLASS}
    input_size: {c.input_size}
    output_size: {c.output_size}
    spk_embed_dim: {c.spk_embed_dim}
    output_type: 'mel'
    vocab_size: {c.vocab_size}
    encoder: !new:{ENCODER_CLASS}
        input_size: {c.input_size}
        output_size: {c.input_size}
        input_layer: 'linear'
        pre_lookahead_len: {c.pre_lookahead_len}
        num_blocks: {c.num_blocks}
        num_up_blocks: {c.num_up_blocks}
        up_stride: {c.up_stride}
        up_scale_factor: {c.up_stride}
        attention_heads: {c.attention_heads}
        pos_enc_layer_type: 'rel_pos_espnet'
        selfattention_layer_type: 'rel_selfattn'
        key_bias: true
        linear_units: {c.linear_units}
        dropout_rate: 0.1
        positional_dropout_rate: 0.1
        attention_dropout_rate: 0.1
        normalize_before: true
    decoder: !new:{DECODER_CLASS}
        inference_cfg_rate: {c.inference_cfg_rate}
        estimator: !new:{ESTIMATOR_CLASS}
            in_channels: {c.in_channels}
            out_channels: {c.output_size}
            mlp_ratio: {c.mlp_ratio}
            depth: {c.depth}
            num_heads: {c.num_heads}
            head_dim: {c.head_dim}
            hidden_size: {c.hidden_size}
"""


def _section(d: object, cls: str, path: Path, where: str) -> dict:
    if not isinstance(d, dict) or d.get("__class__") != cls:
        raise CheckpointError(f"{path}: '{where}' is not a {cls.rsplit('.', 1)[-1]}; {_FIX}.")
    return d


def read_flow_config(path: Path) -> StepFlowConfig:
    """flow.yaml -> StepFlowConfig; a missing file, another model's yaml or a setting the official
    classes would not build the same way is one CheckpointError sentence naming the file."""
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; download the token2wav/ folder of the Step-Audio-2-mini release.")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except (OSError, yaml.YAMLError) as e:
        raise CheckpointError(f"{path} cannot be read as YAML ({type(e).__name__}); {_FIX}.") from None
    if not isinstance(raw, dict) or "flow" not in raw:
        raise CheckpointError(f"{path} has no 'flow' key; it is not the Step-Audio 2 token2wav flow config.")
    raw = _resolve(raw, raw, path)
    flow = _section(raw["flow"], FLOW_CLASS, path, "flow")
    enc = _section(flow.get("encoder"), ENCODER_CLASS, path, "flow.encoder")
    dec = _section(flow.get("decoder"), DECODER_CLASS, path, "flow.decoder")
    est = _section(dec.get("estimator"), ESTIMATOR_CLASS, path, "flow.decoder.estimator")
    values = {"input_size": (flow, "input_size"), "output_size": (flow, "output_size"), "spk_embed_dim": (flow, "spk_embed_dim"),
              "vocab_size": (flow, "vocab_size"), "pre_lookahead_len": (enc, "pre_lookahead_len"),
              "num_blocks": (enc, "num_blocks"), "num_up_blocks": (enc, "num_up_blocks"), "up_stride": (enc, "up_stride"),
              "attention_heads": (enc, "attention_heads"), "linear_units": (enc, "linear_units"),
              "in_channels": (est, "in_channels"), "mlp_ratio": (est, "mlp_ratio"), "depth": (est, "depth"),
              "num_heads": (est, "num_heads"), "head_dim": (est, "head_dim"), "hidden_size": (est, "hidden_size"),
              "inference_cfg_rate": (dec, "inference_cfg_rate")}
    defaults = asdict(StepFlowConfig())
    kw = {}
    for name, (sec, key) in values.items():
        v = sec.get(key, defaults[name])
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
            raise CheckpointError(f"{path}: '{key}' is {v!r}, not a positive number; {_FIX}.")
        kw[name] = type(defaults[name])(v)
    c = StepFlowConfig(**kw)
    # The official classes take these from one another; a yaml where they differ is not the release's.
    checks = [(enc.get("output_size", c.input_size) == c.input_size, "encoder output_size differs from input_size"),
              (float(enc.get("up_scale_factor", c.up_stride)) == c.up_stride, "up_scale_factor differs from up_stride"),
              (est.get("out_channels", c.output_size) == c.output_size, "estimator out_channels differs from output_size"),
              (c.in_channels == 4 * c.output_size, "estimator in_channels is not 4 x output_size (x, mu, spks, cond)"),
              (c.input_size % c.attention_heads == 0, "encoder attention_heads do not divide input_size")]
    for ok, what in checks:
        if not ok:
            raise CheckpointError(f"{path}: {what}, which the official flow cannot be built with; {_FIX}.")
    return c


def expected_flow_shapes(c: StepFlowConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in StepAudio2Flow(c).state_dict().items()}


def load_flow_state(path: Path, c: StepFlowConfig) -> dict[str, torch.Tensor]:
    """flow.pt checked tensor by tensor against flow.yaml (names, shapes, nothing extra)."""
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; download the token2wav/ folder of the Step-Audio-2-mini release.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same thing to the user
        raise CheckpointError(f"{path} cannot be read as a PyTorch state dict ({type(e).__name__}); download it again.") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a state dict; download token2wav/flow.pt again.")
    expected = expected_flow_shapes(c)
    for name, shape in expected.items():
        if name not in state:
            raise CheckpointError(f"{path} is missing tensor '{name}' (expected shape {shape}); the file is incomplete or "
                                  "not the Step-Audio 2 flow, download it again.")
        got = tuple(state[name].shape)
        if got != shape:
            raise CheckpointError(f"{path}: tensor '{name}' has shape {got}, expected {shape} from flow.yaml; flow.pt and "
                                  "flow.yaml do not belong together.")
    extra = sorted(set(state) - set(expected))
    if extra:
        raise CheckpointError(f"{path} holds tensor '{extra[0]}', which the flow of flow.yaml does not have; flow.pt and "
                              "flow.yaml do not belong together.")
    return state


def load_flow(t2w: Path) -> StepAudio2Flow:
    """The reference flow with the release's weights (fp32, eval)."""
    c = read_flow_config(t2w / "flow.yaml")
    model = StepAudio2Flow(c)
    model.load_state_dict({k: v.float() for k, v in load_flow_state(t2w / "flow.pt", c).items()}, strict=True)
    return model.eval()


def load_hift(t2w: Path) -> HiFT:
    """hift.pt (``generator.`` keys, weight-norm pairs) as the reference HiFT. token2wav.py builds
    flashcosyvoice's ``HiFTGenerator()`` with its defaults (CosyVoice2's 24 kHz configuration); the two
    widths are read from the tensors instead, so the tiny checkpoint's narrower HiFT loads too (the
    release's are the defaults, 512 and 512)."""
    path = t2w / "hift.pt"
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; download the token2wav/ folder of the Step-Audio-2-mini release.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path} cannot be read as a PyTorch state dict ({type(e).__name__}); download it again.") from None
    state = fold_weight_norm(_weight_norm_names({k.removeprefix("generator."): v for k, v in state.items()}))
    widths = {}
    for field, name in (("base_channels", "conv_pre.weight"), ("f0_cond_channels", "f0_predictor.condnet.0.weight")):
        if name not in state:
            raise CheckpointError(f"{path} is missing tensor '{name}'; download token2wav/hift.pt again.")
        widths[field] = int(state[name].shape[0])
    model = HiFT(HiFTConfig(**widths))
    expected = model.state_dict()
    for name, ref in expected.items():
        if name not in state:
            raise CheckpointError(f"{path} is missing tensor '{name}' (expected shape {tuple(ref.shape)}); download token2wav/hift.pt again.")
        if tuple(state[name].shape) != tuple(ref.shape):
            raise CheckpointError(f"{path}: tensor '{name}' has shape {tuple(state[name].shape)}, expected {tuple(ref.shape)} "
                                  "(HiFTGenerator's defaults); download token2wav/hift.pt again.")
    model.load_state_dict({k: state[k].float() for k in expected}, strict=True)
    return model.eval()
