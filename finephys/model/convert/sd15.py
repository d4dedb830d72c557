"""Stable Diffusion 1.5 weights: original LDM single files and diffusers folders -> diffusers naming.

Both loaders are strict (DESIGN.md, convention 8): every source key is mapped by an explicit rule or
is on the short list of known-irrelevant keys below; after mapping, key sets AND shapes are compared
with the models the configs build (on the ``meta`` device: no memory, no init cost) and any
unexpected / missing / mis-shaped key is an ``InputError`` that names it.

Ignored LDM keys (never loaded, never an error):
  * ``model_ema.*`` - the EMA copy of the UNet (we load the live ``model.diffusion_model.*`` weights,
    as diffusers does by default; an "emaonly" file already stores the EMA weights there);
  * the DDPM schedule / loss buffers of ``LatentDiffusion`` at the top level (``betas``,
    ``alphas_cumprod``, ``posterior_*``, ``logvar``, ...; see ``LDM_IGNORED_KEYS``): the scheduler is
    rebuilt from its config;
  * ``cond_stage_model.transformer[.text_model].embeddings.position_ids`` (a constant ``arange``
    buffer, not persistent in transformers >= 4.31).
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Iterable, Mapping
from functools import lru_cache
from pathlib import Path

import torch

from finephys.errors import InputError

SD15_UNET_CONFIG: dict = {  # runwayml/stable-diffusion-v1-5 unet/config.json
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}

SD15_VAE_CONFIG: dict = {  # runwayml/stable-diffusion-v1-5 vae/config.json
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}

SD15_TEXT_CONFIG: dict = {  # CLIP ViT-L/14 text tower, as in stable-diffusion-v1-5 text_encoder/config.json
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "projection_dim": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "attention_dropout": 0.0,
    "dropout": 0.0,
    "initializer_range": 0.02,
    "initializer_factor": 1.0,
    "pad_token_id": 1,
    "bos_token_id": 0,
    "eos_token_id": 2,
}

LDM_UNET_PREFIX = "model.diffusion_model."
LDM_VAE_PREFIX = "first_stage_model."
LDM_TEXT_PREFIXES = ("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer.")
LDM_IGNORED_PREFIXES = ("model_ema.",)
LDM_IGNORED_KEYS = frozenset({
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2", "logvar", "lvlb_weights",
    "cond_stage_model.transformer.text_model.embeddings.position_ids",
    "cond_stage_model.transformer.embeddings.position_ids",
})

_TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


# ----------------------------------------------------------------------------------------- helpers

def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}".rstrip(": ")


def name_list(names: Iterable[str], limit: int = 5) -> str:
    """'a, b, c, d, e and 7 more' (sorted) for one-line error messages."""
    names = sorted(names)
    head = ", ".join(names[:limit])
    return head + (f" and {len(names) - limit} more" if len(names) > limit else "")


def read_weights(path) -> dict[str, torch.Tensor]:
    """Read a flat ``{name: tensor}`` dict from ``.safetensors`` or a torch file (weights_only).

    ``.ckpt/.pt/.pth/.bin`` go through ``torch.load(map_location="cpu", weights_only=True)``: nothing
    but tensors and plain containers is unpickled. A top-level ``state_dict`` entry (Lightning /
    LDM checkpoints) is unwrapped and the other top-level entries (``global_step``, ...) dropped.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"weights file {p}: not found (expected an existing .safetensors, .ckpt, .pt, .pth or .bin file)")
    suffix = p.suffix.lower()
    if suffix == ".safetensors":
        import safetensors.torch

        try:
            obj = safetensors.torch.load_file(str(p), device="cpu")
        except Exception as e:  # safetensors raises SafetensorError / OSError on bad headers
            raise InputError(f"weights file {p}: not a readable safetensors file ({_one_line(e)})") from None
    elif suffix in _TORCH_SUFFIXES:
        import zipfile

        with open(p, "rb") as f:
            pickled = f.read(1) == b"\x80"  # a pickle's protocol opcode (torch.save's legacy format)
        if not (pickled or zipfile.is_zipfile(p)):
            raise InputError(f"weights file {p}: not a torch checkpoint (neither torch.save's zip archive nor a "
                             f"pickle), expected {suffix} weights or a .safetensors file")
        try:
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise InputError(
                f"weights file {p}: refused, it holds pickled objects other than tensors "
                f"(read with torch.load(weights_only=True); convert it to .safetensors) ({_one_line(e)})"
            ) from None
        except Exception as e:
            raise InputError(f"weights file {p}: not a readable torch checkpoint ({_one_line(e)})") from None
    else:
        raise InputError(f"weights file {p}: unsupported suffix {p.suffix!r} (expected .safetensors, .ckpt, .pt, .pth or .bin)")
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise InputError(f"weights file {p}: holds a {type(obj).__name__}, expected a dict of tensors")
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise InputError(f"weights file {p}: {len(bad)} entries are not named tensors ({name_list(bad)}); expected a dict of tensors")
    return dict(obj)


def check_state_dict(
    what: str,
    state: Mapping[str, torch.Tensor],
    target: Mapping[str, tuple],
    source_names: Mapping[str, str] | None = None,
) -> list[str]:
    """Compare key sets and shapes; return problem phrases (empty when ``state`` fits ``target``).

    ``source_names`` maps a converted key back to its name in the file, so that unexpected and
    mis-shaped keys are reported as the user sees them.
    """
    src = source_names or {}
    unexpected = [src.get(k, k) for k in state if k not in target]
    missing = [k for k in target if k not in state]
    shaped = [
        f"{src.get(k, k)} {tuple(state[k].shape)} vs model {tuple(target[k])}"
        for k in state if k in target and tuple(state[k].shape) != tuple(target[k])
    ]
    out = []
    if unexpected:
        out.append(f"{len(unexpected)} unexpected keys ({name_list(unexpected)})")
    if missing:
        out.append(f"{len(missing)} missing ({name_list(missing)})")
    if shaped:
        out.append(f"{len(shaped)} mis-shaped ({name_list(shaped, 3)})")
    return [f"{what}: " + ", ".join(out)] if out else []


def raise_problems(source: str, problems: list[str]) -> None:
    if problems:
        raise InputError(f"{source}: " + "; ".join(problems))


def _shapes(model: torch.nn.Module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("position_ids")}


@lru_cache(maxsize=16)
def _target_shapes_cached(kind: str, config_json: str) -> tuple:
    config = json.loads(config_json)
    with torch.device("meta"):
        if kind == "unet":
            from diffusers import UNet2DConditionModel

            model = UNet2DConditionModel.from_config(config)
        elif kind == "vae":
            from diffusers import AutoencoderKL

            model = AutoencoderKL.from_config(config)
        elif kind == "text_encoder":
            from transformers import CLIPTextConfig, CLIPTextModel

            model = CLIPTextModel(CLIPTextConfig(**config))
        elif kind == "motion_adapter":
            from diffusers import MotionAdapter

            model = MotionAdapter.from_config(config)
        else:
            raise ValueError(kind)
    return tuple(_shapes(model).items())


def target_shapes(kind: str, config: Mapping) -> dict[str, tuple]:
    """``{key: shape}`` of the model ``kind`` built from ``config`` (on meta; cached per config)."""
    try:
        return dict(_target_shapes_cached(kind, json.dumps(dict(config), sort_keys=True, default=list)))
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"{kind} config: cannot build the model from it ({_one_line(e)})") from None


# --------------------------------------------------------------------- LDM -> diffusers key maps

_LDM_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
               "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
_VAE_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def unet_ldm_module_map(n_blocks: int, layers: int, down_attn, up_attn, mid_attn: bool = True) -> dict[str, str]:
    """LDM ``openaimodel.UNetModel`` module path -> diffusers ``UNet2DConditionModel`` module path.

    Resnets are mapped child by child (their inner names differ); a SpatialTransformer maps as a
    whole subtree (LDM and diffusers share its inner names). Index arithmetic follows LDM:
    ``input_blocks`` = conv_in, then per level ``layers`` x (res[, attn]) and a downsampler except
    on the last level; ``output_blocks`` = per level ``layers + 1`` x (res[, attn]) and on the last
    of them an upsampler (``.1.conv`` or ``.2.conv`` after an attention) except on the last level.
    """
    m = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
         "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"}

    def res(ldm: str, dif: str) -> None:
        for a, b in _LDM_RESNET.items():
            m[f"{ldm}.{a}"] = f"{dif}.{b}"

    i = 1
    for b in range(n_blocks):
        for j in range(layers):
            res(f"input_blocks.{i}.0", f"down_blocks.{b}.resnets.{j}")
            if down_attn[b]:
                m[f"input_blocks.{i}.1"] = f"down_blocks.{b}.attentions.{j}"
            i += 1
        if b != n_blocks - 1:
            m[f"input_blocks.{i}.0.op"] = f"down_blocks.{b}.downsamplers.0.conv"
            i += 1
    res("middle_block.0", "mid_block.resnets.0")
    if mid_attn:
        m["middle_block.1"] = "mid_block.attentions.0"
        res("middle_block.2", "mid_block.resnets.1")
    else:
        res("middle_block.1", "mid_block.resnets.1")
    o = 0
    for b in range(n_blocks):
        for j in range(layers + 1):
            res(f"output_blocks.{o}.0", f"up_blocks.{b}.resnets.{j}")
            k = 1
            if up_attn[b]:
                m[f"output_blocks.{o}.1"] = f"up_blocks.{b}.attentions.{j}"
                k = 2
            if b != n_blocks - 1 and j == layers:
                m[f"output_blocks.{o}.{k}.conv"] = f"up_blocks.{b}.upsamplers.0.conv"
            o += 1
    return m


def unet_ldm_module_map_for_config(config: Mapping) -> dict[str, str]:
    layers = config.get("layers_per_block", 2)
    if not isinstance(layers, int):
        raise InputError(f"unet config: layers_per_block={layers!r}; the LDM key map supports one int (SD 1.5: 2)")
    n = len(config["block_out_channels"])
    down = [t.startswith("CrossAttn") for t in config["down_block_types"]]
    up = [t.startswith("CrossAttn") for t in config["up_block_types"]]
    mid_type = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid_type not in ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D"):
        raise InputError(f"unet config: mid_block_type={mid_type!r}; expected UNetMidBlock2DCrossAttn (SD 1.5)")
    return unet_ldm_module_map(n, layers, down, up, mid_attn=mid_type == "UNetMidBlock2DCrossAttn")


def vae_ldm_module_map(n_blocks: int, layers: int) -> dict[str, str]:
    """LDM ``Encoder``/``Decoder`` module path -> diffusers ``AutoencoderKL`` module path.

    The decoder's ``up.{i}`` runs from the lowest resolution at ``i = n - 1`` upwards, diffusers'
    ``up_blocks`` the other way round: ``up.{i}`` -> ``up_blocks.{n - 1 - i}``.
    """
    m = {"quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv"}
    for side in ("encoder", "decoder"):
        m[f"{side}.conv_in"] = f"{side}.conv_in"
        m[f"{side}.conv_out"] = f"{side}.conv_out"
        m[f"{side}.norm_out"] = f"{side}.conv_norm_out"
        for r in (1, 2):
            for a, b in _VAE_RESNET.items():
                m[f"{side}.mid.block_{r}.{a}"] = f"{side}.mid_block.resnets.{r - 1}.{b}"
        for a, b in _VAE_ATTN.items():
            m[f"{side}.mid.attn_1.{a}"] = f"{side}.mid_block.attentions.0.{b}"
    for i in range(n_blocks):
        for j in range(layers):
            for a, b in _VAE_RESNET.items():
                m[f"encoder.down.{i}.block.{j}.{a}"] = f"encoder.down_blocks.{i}.resnets.{j}.{b}"
        if i != n_blocks - 1:
            m[f"encoder.down.{i}.downsample.conv"] = f"encoder.down_blocks.{i}.downsamplers.0.conv"
        d = n_blocks - 1 - i
        for j in range(layers + 1):
            for a, b in _VAE_RESNET.items():
                m[f"decoder.up.{i}.block.{j}.{a}"] = f"decoder.up_blocks.{d}.resnets.{j}.{b}"
        if i != 0:
            m[f"decoder.up.{i}.upsample.conv"] = f"decoder.up_blocks.{d}.upsamplers.0.conv"
    return m


def map_module_path(name: str, module_map: Mapping[str, str]) -> str | None:
    """Rename ``name`` by its longest dotted prefix found in ``module_map`` (None: no rule)."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        head = ".".join(parts[:cut])
        if head in module_map:
            return ".".join([module_map[head], *parts[cut:]])
    return None


def _rename(state: Mapping[str, torch.Tensor], module_map: Mapping[str, str], prefix: str):
    out, origin, unmapped = {}, {}, []
    for key, value in state.items():
        new = map_module_path(key, module_map)
        if new is None:
            unmapped.append(prefix + key)
            continue
        out[new] = value
        origin[new] = prefix + key
    return out, origin, unmapped


def _squeeze_vae_attention(state: dict[str, torch.Tensor], target: Mapping[str, tuple]) -> None:
    """LDM's VAE attention q/k/v/proj_out are 1x1 convs (C, C, 1, 1); diffusers' are Linear (C, C)."""
    for key, w in list(state.items()):
        if ".mid_block.attentions.0.to_" in key and key.endswith("weight") and w.ndim == 4 \
                and tuple(w.shape[2:]) == (1, 1) and len(target.get(key, ())) == 2:
            state[key] = w[:, :, 0, 0].contiguous() if w.device.type != "meta" else w[:, :, 0, 0]


def _text_prefix(target: Mapping[str, tuple]) -> str:
    """transformers < 5 names CLIPTextModel weights ``text_model.*``; transformers 5 drops the prefix."""
    return "text_model." if any(k.startswith("text_model.") for k in target) else ""


def convert_sd15_ldm(state: Mapping[str, torch.Tensor], unet_config: Mapping = SD15_UNET_CONFIG,
                     vae_config: Mapping = SD15_VAE_CONFIG, text_config: Mapping = SD15_TEXT_CONFIG,
                     source: str = "SD1.5 checkpoint") -> dict:
    """Strictly convert an in-memory LDM state dict (see ``load_sd15_single_file``)."""
    if not any(k.startswith(LDM_UNET_PREFIX) for k in state):
        hint = ""
        if any(k.startswith("conditioner.embedders.") for k in state):
            hint = " (this looks like an SDXL checkpoint)"
        elif any(k.startswith("cond_stage_model.model.") for k in state):
            hint = " (this looks like an SD 2.x / OpenCLIP checkpoint)"
        elif any(k.startswith(("down_blocks.", "conv_in.")) for k in state):
            hint = " (this looks like a diffusers-named file: pass the diffusers folder instead)"
        raise InputError(f"{source}: no model.diffusion_model.* keys; expected an original SD 1.5 LDM checkpoint{hint}")
    parts: dict[str, dict] = {"unet": {}, "vae": {}, "text": {}}
    outside = []
    text_prefix = LDM_TEXT_PREFIXES[0] if any(k.startswith(LDM_TEXT_PREFIXES[0]) for k in state) else LDM_TEXT_PREFIXES[1]
    for key, value in state.items():
        if key in LDM_IGNORED_KEYS or key.startswith(LDM_IGNORED_PREFIXES):
            continue
        if key.startswith(LDM_UNET_PREFIX):
            parts["unet"][key[len(LDM_UNET_PREFIX):]] = value
        elif key.startswith(LDM_VAE_PREFIX):
            parts["vae"][key[len(LDM_VAE_PREFIX):]] = value
        elif key.startswith(text_prefix):
            parts["text"][key[len(text_prefix):]] = value
        else:
            outside.append(key)
    problems = []
    if outside:
        problems.append(f"{len(outside)} unexpected keys outside the UNet / VAE / CLIP prefixes ({name_list(outside)})")

    unet_target = target_shapes("unet", unet_config)
    unet, unet_origin, unet_unmapped = _rename(parts["unet"], unet_ldm_module_map_for_config(unet_config), LDM_UNET_PREFIX)
    vae_target = target_shapes("vae", vae_config)
    vae_layers = vae_config.get("layers_per_block", 2)
    vae, vae_origin, vae_unmapped = _rename(
        parts["vae"], vae_ldm_module_map(len(vae_config["block_out_channels"]), vae_layers), LDM_VAE_PREFIX)
    _squeeze_vae_attention(vae, vae_target)
    text_target = target_shapes("text_encoder", text_config)
    tp = _text_prefix(text_target)
    text = {tp + k: v for k, v in parts["text"].items()}
    text_origin = {tp + k: text_prefix + k for k in parts["text"]}

    for what, sd, target, origin, unmapped in (("unet", unet, unet_target, unet_origin, unet_unmapped),
                                               ("vae", vae, vae_target, vae_origin, vae_unmapped),
                                               ("text encoder", text, text_target, text_origin, [])):
        found = check_state_dict(what, sd, target, origin)
        if unmapped:
            phrase = f"{len(unmapped)} keys with no LDM rule ({name_list(unmapped)})"
            found = [found[0] + ", " + phrase] if found else [f"{what}: {phrase}"]
        problems += found
    raise_problems(source, problems)
    return {"unet": unet, "vae": vae, "text_encoder": text,
            "configs": {"unet": dict(unet_config), "vae": dict(vae_config), "text_encoder": dict(text_config)}}


def load_sd15_single_file(path, unet_config: Mapping = SD15_UNET_CONFIG, vae_config: Mapping = SD15_VAE_CONFIG,
                          text_config: Mapping = SD15_TEXT_CONFIG) -> dict:
    """An original SD 1.5 checkpoint (``.safetensors`` / ``.ckpt``) -> diffusers/transformers state dicts.

    Returns ``dict(unet=..., vae=..., text_encoder=..., configs=dict(unet=..., vae=..., text_encoder=...))``;
    each state dict loads with ``load_state_dict(strict=True)`` into the model its config builds.
    Accepts the text tower as ``cond_stage_model.transformer.text_model.*`` and the older
    ``cond_stage_model.transformer.*``. Raises ``InputError`` naming unexpected / missing / mis-shaped keys.
    """
    return convert_sd15_ldm(read_weights(path), unet_config, vae_config, text_config,
                            source=f"SD1.5 checkpoint {Path(path).name}")


# ------------------------------------------------------------------------------ diffusers folder

_FOLDER_PARTS = {  # sub-folder: (model kind, weights stem)
    "unet": ("unet", "diffusion_pytorch_model"),
    "vae": ("vae", "diffusion_pytorch_model"),
    "text_encoder": ("text_encoder", "model"),
}
_CONFIG_META = ("_class_name", "_diffusers_version", "_name_or_path", "architectures", "transformers_version",
                "model_type", "torch_dtype", "dtype", "_commit_hash", "_use_default_values")


def _read_folder_weights(sub: Path, stem: str) -> tuple[dict, str]:
    for name in (f"{stem}.safetensors", f"{stem}.bin", f"{stem}.fp16.safetensors", f"{stem}.fp16.bin"):
        if (sub / name).is_file():
            return read_weights(sub / name), name
    index = sub / f"{stem}.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except Exception as e:
            raise InputError(f"{index}: not a readable weight index ({_one_line(e)})") from None
        out = {}
        for shard in shards:
            out.update(read_weights(sub / shard))
        return out, index.name
    raise InputError(f"diffusers folder: {sub} has no {stem}.safetensors (or .bin); expected the weights of this component")


def load_sd15_diffusers_folder(path) -> dict:
    """A diffusers SD 1.5 folder (``unet/``, ``vae/``, ``text_encoder/``, each config.json + weights).

    Returns the same dict as ``load_sd15_single_file`` with ``configs`` read from the folder; each
    state dict is checked strictly against the model its own config builds.
    """
    root = Path(path)
    if not root.is_dir():
        raise InputError(f"diffusers folder {root}: not found (expected a directory with unet/, vae/, text_encoder/)")
    out, configs, problems = {}, {}, []
    for sub_name, (kind, stem) in _FOLDER_PARTS.items():
        sub = root / sub_name
        if not sub.is_dir():
            raise InputError(f"diffusers folder {root}: missing sub-folder {sub_name}/ (expected unet/, vae/, text_encoder/)")
        cfg_path = sub / "config.json"
        if not cfg_path.is_file():
            raise InputError(f"diffusers folder {root}: missing {sub_name}/config.json")
        try:
            raw = json.loads(cfg_path.read_text())
        except Exception as e:
            raise InputError(f"{cfg_path}: not valid JSON ({_one_line(e)})") from None
        if not isinstance(raw, dict):
            raise InputError(f"{cfg_path}: holds a {type(raw).__name__}, expected a JSON object")
        config = {k: v for k, v in raw.items() if k not in _CONFIG_META}
        state, fname = _read_folder_weights(sub, stem)
        target = target_shapes(kind, config)
        origin = {}
        if kind == "text_encoder":  # files saved by transformers 4 carry text_model.*; 5 drops it (and back)
            state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
            want, have = _text_prefix(target), "text_model." if any(k.startswith("text_model.") for k in state) else ""
            if want != have:
                renamed = {}
                for k, v in state.items():
                    new = want + k[len(have):] if k.startswith(have) else k
                    renamed[new], origin[new] = v, k
                state = renamed
        problems += check_state_dict(f"{sub_name}/{fname}", state, target, origin)
        out[sub_name] = state
        configs[sub_name] = config
    raise_problems(f"diffusers folder {root.name}", problems)
    out["configs"] = configs
    return out
