"""AnimateDiff motion modules (guoyww/AnimateDiff ``mm_sd_v15*.ckpt`` / ``.safetensors``) -> diffusers ``MotionAdapter``.

Original layout (one ``VanillaTemporalModule`` per UNet layer)::

    {down_blocks.B | mid_block | up_blocks.B}.motion_modules.M.temporal_transformer.
        norm.{weight,bias}  proj_in.{weight,bias}  proj_out.{weight,bias}
        transformer_blocks.T.attention_blocks.{0,1}.{to_q,to_k,to_v}.weight
        transformer_blocks.T.attention_blocks.{0,1}.to_out.0.{weight,bias}
        transformer_blocks.T.attention_blocks.{0,1}.pos_encoder.pe        (1, max_len, C)
        transformer_blocks.T.norms.{0,1}.{weight,bias}   transformer_blocks.T.ff_norm.{weight,bias}
        transformer_blocks.T.ff.net.0.proj.{weight,bias}  transformer_blocks.T.ff.net.2.{weight,bias}

diffusers drops ``temporal_transformer.``, renames ``attention_blocks.{0,1}`` -> ``attn{1,2}``,
``norms.{0,1}`` -> ``norm{1,2}``, ``ff_norm`` -> ``norm3``, and keeps ONE positional table per
transformer block (``transformer_blocks.T.pos_embed.pe``, applied before both attentions). The
original stores the same sinusoid twice; we load the file's table and refuse files whose two
tables differ (diffusers could not represent them). diffusers' own converter drops the tables and
recomputes them; keeping them catches a wrong ``motion_max_seq_length``.

Not in the weights and therefore parameters: ``num_attention_heads`` (8 in every public release)
and ``norm_num_groups`` (32). Everything else is inferred from key counts and shapes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch

from finephys.model.convert.sd15 import check_state_dict, name_list, raise_problems, read_weights, target_shapes
from finephys.errors import InputError

_ORIGINAL = re.compile(
    r"^(?P<block>down_blocks\.\d+|mid_block|up_blocks\.\d+)\.motion_modules\.(?P<m>\d+)\.temporal_transformer\.(?P<rest>.+)$")
_ORIGINAL_REST = [  # (pattern on the part after temporal_transformer., diffusers replacement)
    (re.compile(r"^(norm|proj_in|proj_out)\.(weight|bias)$"), r"\1.\2"),
    (re.compile(r"^transformer_blocks\.(\d+)\.attention_blocks\.0\.(to_q|to_k|to_v)\.weight$"), r"transformer_blocks.\1.attn1.\2.weight"),
    (re.compile(r"^transformer_blocks\.(\d+)\.attention_blocks\.1\.(to_q|to_k|to_v)\.weight$"), r"transformer_blocks.\1.attn2.\2.weight"),
    (re.compile(r"^transformer_blocks\.(\d+)\.attention_blocks\.0\.to_out\.0\.(weight|bias)$"), r"transformer_blocks.\1.attn1.to_out.0.\2"),
    (re.compile(r"^transformer_blocks\.(\d+)\.attention_blocks\.1\.to_out\.0\.(weight|bias)$"), r"transformer_blocks.\1.attn2.to_out.0.\2"),
    (re.compile(r"^transformer_blocks\.(\d+)\.attention_blocks\.0\.pos_encoder\.pe$"), r"transformer_blocks.\1.pos_embed.pe"),
    (re.compile(r"^transformer_blocks\.(\d+)\.norms\.0\.(weight|bias)$"), r"transformer_blocks.\1.norm1.\2"),
    (re.compile(r"^transformer_blocks\.(\d+)\.norms\.1\.(weight|bias)$"), r"transformer_blocks.\1.norm2.\2"),
    (re.compile(r"^transformer_blocks\.(\d+)\.ff_norm\.(weight|bias)$"), r"transformer_blocks.\1.norm3.\2"),
    (re.compile(r"^transformer_blocks\.(\d+)\.ff\.net\.(0\.proj|2)\.(weight|bias)$"), r"transformer_blocks.\1.ff.net.\2.\3"),
]
_SECOND_PE = re.compile(r"^transformer_blocks\.(\d+)\.attention_blocks\.1\.pos_encoder\.pe$")
_DIFFUSERS = re.compile(r"^(?P<block>down_blocks\.\d+|mid_block|up_blocks\.\d+)\.motion_modules\.(?P<m>\d+)\.(?P<rest>.+)$")


def _convert_original(state: Mapping[str, torch.Tensor], source: str):
    out, origin, unexpected, second_pe = {}, {}, [], {}
    for key, value in state.items():
        m = _ORIGINAL.match(key)
        if m is None:
            unexpected.append(key)
            continue
        head = f"{m['block']}.motion_modules.{m['m']}."
        rest = m["rest"]
        pe2 = _SECOND_PE.match(rest)
        if pe2:
            second_pe[f"{head}transformer_blocks.{pe2[1]}.pos_embed.pe"] = (key, value)
            continue
        for pattern, repl in _ORIGINAL_REST:
            if pattern.match(rest):
                new = head + pattern.sub(repl, rest)
                out[new], origin[new] = value, key
                break
        else:
            unexpected.append(key)
    if unexpected:
        raise InputError(f"{source}: {len(unexpected)} unexpected keys ({name_list(unexpected)}); "
                         "expected the original AnimateDiff motion-module layout")
    for new, (key, value) in second_pe.items():
        first = out.get(new)
        if first is None:
            raise InputError(f"{source}: {key} has no attention_blocks.0 partner; expected one positional table per attention block")
        if first.shape != value.shape or not torch.equal(first, value):
            raise InputError(f"{source}: the positional tables of attention_blocks.0 and .1 differ at {key}; "
                             "expected equal tables (diffusers' MotionAdapter shares one per transformer block)")
    return out, origin


def _count(keys, pattern: str) -> int:
    found = {int(m[1]) for k in keys if (m := re.match(pattern, k))}
    if found and found != set(range(max(found) + 1)):
        raise InputError(f"motion module: indices {sorted(found)} of {pattern} are not contiguous from 0")
    return len(found)


def _uniform(values: list[int]):
    return values[0] if len(set(values)) == 1 else list(values)


def infer_adapter_config(state: Mapping[str, torch.Tensor], num_attention_heads: int = 8,
                         norm_num_groups: int = 32, source: str = "motion module") -> dict:
    """MotionAdapter config from a diffusers-named motion state dict (counts and shapes)."""
    keys = list(state)
    n = _count(keys, r"^down_blocks\.(\d+)\.")
    if n == 0:
        raise InputError(f"{source}: no down_blocks.*.motion_modules.* keys; expected an AnimateDiff motion module")
    channels, layers, tlayers = [], [], []
    for b in range(n):
        w = state.get(f"down_blocks.{b}.motion_modules.0.proj_in.weight")
        if w is None or w.ndim != 2:
            raise InputError(f"{source}: down_blocks.{b}.motion_modules.0 has no 2-D proj_in.weight; expected one per down block")
        channels.append(int(w.shape[1]))
        layers.append(_count(keys, rf"^down_blocks\.{b}\.motion_modules\.(\d+)\."))
        tlayers.append(_count(keys, rf"^down_blocks\.{b}\.motion_modules\.0\.transformer_blocks\.(\d+)\."))
    pe = state.get("down_blocks.0.motion_modules.0.transformer_blocks.0.pos_embed.pe")
    if pe is None or pe.ndim != 3:
        raise InputError(f"{source}: no 3-D positional table at down_blocks.0.motion_modules.0 "
                         "(pos_encoder.pe / pos_embed.pe); expected one (1, max_len, C)")
    for c in channels:
        if c % num_attention_heads or c % norm_num_groups:
            raise InputError(f"{source}: block width {c} is not divisible by num_attention_heads={num_attention_heads} "
                             f"and norm_num_groups={norm_num_groups}")
    config = {
        "block_out_channels": channels,
        "motion_layers_per_block": _uniform(layers),
        "motion_transformer_layers_per_block": _uniform(tlayers),
        "motion_num_attention_heads": num_attention_heads,
        "motion_norm_num_groups": norm_num_groups,
        "motion_max_seq_length": int(pe.shape[1]),
        "use_motion_mid_block": any(k.startswith("mid_block.") for k in keys),
    }
    if config["use_motion_mid_block"]:
        config["motion_mid_block_layers_per_block"] = _count(keys, r"^mid_block\.motion_modules\.(\d+)\.")
        config["motion_transformer_layers_per_mid_block"] = _count(
            keys, r"^mid_block\.motion_modules\.0\.transformer_blocks\.(\d+)\.")
    return config


def check_fits_base(adapter_config: Mapping, base_unet_config: Mapping) -> None:
    """The adapter must match the base UNet's widths and layers (UNetMotionModel.from_unet2d needs it)."""
    problems = []
    base_ch = list(base_unet_config.get("block_out_channels", ()))
    if list(adapter_config["block_out_channels"]) != base_ch:
        problems.append(f"block_out_channels {list(adapter_config['block_out_channels'])} vs base {base_ch}")
    layers = adapter_config["motion_layers_per_block"]
    layers = layers if isinstance(layers, list) else [layers] * len(adapter_config["block_out_channels"])
    base_layers = base_unet_config.get("layers_per_block", 2)
    base_layers = list(base_layers) if isinstance(base_layers, (list, tuple)) else [base_layers] * len(base_ch)
    if layers != base_layers:
        problems.append(f"motion layers per block {layers} vs base layers_per_block {base_layers}")
    if problems:
        raise InputError("motion module does not fit the base model: " + "; ".join(problems))


def load_motion_module(path, base_unet_config: Mapping, num_attention_heads: int = 8,
                       norm_num_groups: int = 32) -> tuple[dict, dict[str, torch.Tensor]]:
    """An AnimateDiff motion module file -> ``(MotionAdapter config, state dict in diffusers naming)``.

    Accepts the original guoyww layout (v1 without and v2/v3 with the mid-block module) and files
    already in diffusers ``MotionAdapter`` naming. The state dict loads with ``strict=True`` into
    ``MotionAdapter(**config)``; it must fit ``base_unet_config`` (same block widths and layers).
    """
    source = f"motion module {Path(path).name}"
    state = read_weights(path)
    if any(".temporal_transformer." in k for k in state):
        state, origin = _convert_original(state, source)
    else:
        bad = [k for k in state if not _DIFFUSERS.match(k)]
        if bad:
            raise InputError(f"{source}: {len(bad)} unexpected keys ({name_list(bad)}); expected the AnimateDiff "
                             "motion-module layout (original or diffusers MotionAdapter naming)")
        origin = {}
    config = infer_adapter_config(state, num_attention_heads, norm_num_groups, source)
    raise_problems(source, check_state_dict("MotionAdapter", state, target_shapes("motion_adapter", config), origin))
    check_fits_base(config, base_unet_config)
    return config, state
