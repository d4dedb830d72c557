"""LoRA files for SD 1.5 (UNet and CLIP text encoder) -> peft-named ``lora_A`` / ``lora_B`` state dicts.

Accepted key layouts (one file may mix the UNet and text-encoder parts, not the layouts of one module):

(a) diffusers / peft: ``unet.<module>.lora_A.weight`` / ``lora_B.weight``, ``text_encoder.<module>...``;
    also without the ``unet.`` / ``text_encoder.`` prefix or with peft's ``base_model.model.``
    (the module is then looked up in the UNet, then the text encoder). Per-module alphas come from
    the diffusers safetensors metadata ``lora_adapter_metadata`` (``unet.lora_alpha``,
    ``unet.alpha_pattern``, ...) or ``<module>.alpha`` keys; none means alpha = rank (scale 1).
(b) old diffusers: ``unet.<attn>.processor.{to_q,to_k,to_v,to_out}_lora.{down,up}.weight``
    (``to_out`` is ``to_out.0``), ``<module>.lora.{down,up}.weight``,
    ``<module>.lora_linear_layer.{down,up}.weight`` and the text encoder's
    ``text_encoder.<layer>.self_attn.{to_q,to_k,to_v,to_out}_lora.{down,up}.weight`` (= q/k/v/out_proj).
(c) kohya: ``lora_unet_<module with _ for .>.{lora_down.weight,lora_up.weight,alpha}`` and
    ``lora_te_<text module>...``. The underscore names are matched against the names of the target
    model's modules (never guessed); LDM-named UNet keys (``lora_unet_input_blocks_1_1_proj_in``)
    are matched through the SD 1.5 LDM -> diffusers block map of ``finephys.model.convert.sd15``.

Alpha folding: module m has rank r_m, alpha a_m and scale s_m = a_m / r_m. ``rank`` is the most
common r_m and ``alpha = s * rank`` where s is the most common s_m; every B is rescaled by s_m / s
(bit-exact when s_m == s), so for EVERY module ``W' = W + (alpha / rank) * B @ A``. Modules whose
rank differs from ``rank`` get peft ``rank_pattern`` / ``alpha_pattern`` entries in ``lora_config``
that keep their scale at alpha / rank.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from finephys.model.convert.sd15 import map_module_path, name_list, read_weights, unet_ldm_module_map
from finephys.errors import InputError

_PARTS = ("unet", "text_encoder")
_PEFT = re.compile(r"^(?:(?P<part>unet|text_encoder)\.)?(?P<path>.+)\.lora_(?P<ab>A|B)\.weight$")
_OLD = re.compile(r"^(?:(?P<part>unet|text_encoder)\.)?(?P<path>.+)\.(?:lora|lora_linear_layer)\.(?P<du>down|up)\.weight$")
_PROC = re.compile(r"^(?:(?P<part>unet|text_encoder)\.)?(?P<path>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<du>down|up)\.weight$")
_OLD_TEXT = re.compile(r"^text_encoder\.(?P<path>.+\.self_attn)\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<du>down|up)\.weight$")
_ALPHA = re.compile(r"^(?:(?P<part>unet|text_encoder)\.)?(?P<path>.+)\.alpha$")
_KOHYA = re.compile(r"^lora_(?P<part>unet|te)_(?P<name>[A-Za-z0-9_]+)\.(?P<what>lora_down\.weight|lora_up\.weight|alpha)$")
_PROC_NAMES = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_TEXT_PROC_NAMES = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
_ROLE = {"A": "A", "B": "B", "down": "A", "up": "B", "lora_down.weight": "A", "lora_up.weight": "B", "alpha": "alpha"}


@dataclass(frozen=True)
class LoraWeights:
    """peft-named LoRA weights: ``<module>.lora_A.weight`` (rank, in[, kh, kw]), ``<module>.lora_B.weight`` (out, rank[, 1, 1]).

    Module paths are those of the names passed to ``load_lora``. Alphas are folded into the B
    weights: every module's update is ``(alpha / rank) * B @ A``.
    """

    unet: dict[str, torch.Tensor]
    text_encoder: dict[str, torch.Tensor]
    rank: int
    alpha: float

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def _part(self, part: str) -> dict[str, torch.Tensor]:
        if part not in _PARTS:
            raise ValueError(f"part must be one of {_PARTS}, got {part!r}")
        return self.unet if part == "unet" else self.text_encoder

    def ranks(self, part: str) -> dict[str, int]:
        """Module path -> rank, for the modules of ``part`` that carry a LoRA."""
        sd = self._part(part)
        return {k[: -len(".lora_A.weight")]: int(v.shape[0]) for k, v in sd.items() if k.endswith(".lora_A.weight")}

    def lora_config(self, part: str):
        """A ``peft.LoraConfig`` that gives every module of ``part`` the scale alpha / rank."""
        from peft import LoraConfig

        ranks = self.ranks(part)
        odd = {m: r for m, r in ranks.items() if r != self.rank}
        return LoraConfig(r=self.rank, lora_alpha=self.alpha, target_modules=sorted(ranks), lora_dropout=0.0,
                          rank_pattern=odd, alpha_pattern={m: self.alpha * r / self.rank for m, r in odd.items()})

    def delta_weight(self, part: str, module: str) -> torch.Tensor:
        """``(alpha / rank) * B @ A`` in the module's weight shape (Linear or Conv2d), float32."""
        sd = self._part(part)
        a, b = sd[f"{module}.lora_A.weight"].float(), sd[f"{module}.lora_B.weight"].float()
        if a.ndim == 2:
            return self.scale * (b @ a)
        return self.scale * (b.flatten(1) @ a.flatten(1)).reshape(b.shape[0], *a.shape[1:])


def _unet_ldm_aliases(names: set[str]) -> dict[str, str]:
    """LDM module path -> diffusers module path, for the names of an SD-style UNet (empty otherwise)."""
    def count(fmt: str) -> int:
        n = 0
        while fmt.format(n) in names:
            n += 1
        return n

    n_blocks, layers = count("down_blocks.{}"), count("down_blocks.0.resnets.{}")
    if n_blocks == 0 or layers == 0 or count("up_blocks.{}") != n_blocks:
        return {}
    down = [f"down_blocks.{b}.attentions.0" in names for b in range(n_blocks)]
    up = [f"up_blocks.{b}.attentions.0" in names for b in range(n_blocks)]
    inverse = {d: ldm for ldm, d in unet_ldm_module_map(
        n_blocks, layers, down, up, mid_attn="mid_block.attentions.0" in names).items()}
    out = {}
    for name in names:
        ldm = map_module_path(name, inverse) if name else None
        if ldm is not None and ldm != name:
            out[ldm] = name
    return out


class _Resolver:
    """Exact lookup of module paths (dotted, or kohya underscored) in one model's module names."""

    def __init__(self, names: Iterable[str], text: bool):
        self.names = {n for n in names if n}
        self.alias: dict[str, str] = {n: n for n in self.names}
        if text:  # transformers 5 drops CLIPTextModel's ``text_model.`` prefix; files keep it
            for n in self.names:
                other = n[len("text_model."):] if n.startswith("text_model.") else "text_model." + n
                self.alias.setdefault(other, n)
        else:
            for ldm, n in _unet_ldm_aliases(self.names).items():
                self.alias.setdefault(ldm, n)
        self.underscored: dict[str, set[str]] = {}
        for a, n in self.alias.items():
            self.underscored.setdefault(a.replace(".", "_"), set()).add(n)

    def dotted(self, path: str) -> str | None:
        return self.alias.get(path)

    def kohya(self, name: str) -> str | None:
        found = self.underscored.get(name, set())
        if len(found) > 1:
            raise InputError(f"LoRA key name {name} matches several modules ({name_list(found)}); cannot map it")
        return next(iter(found), None)


def _metadata_alphas(path: Path) -> dict:
    """diffusers' ``lora_adapter_metadata`` (safetensors header), e.g. {"unet.lora_alpha": 8, ...}."""
    if path.suffix.lower() != ".safetensors":
        return {}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        raw = (f.metadata() or {}).get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        meta = json.loads(raw)
    except ValueError:
        raise InputError(f"LoRA {path.name}: lora_adapter_metadata is not valid JSON; expected diffusers' LoraConfig dump") from None
    return meta if isinstance(meta, dict) else {}


def _alpha_from_metadata(meta: dict, part: str, module: str, rank: int) -> float:
    for pattern, value in (meta.get(f"{part}.alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return float(value)
    return float(meta.get(f"{part}.lora_alpha", rank))


def load_lora(path, unet_module_names, text_module_names=None) -> LoraWeights:
    """Read a LoRA file (diffusers/peft, old diffusers or kohya naming) and fold its alphas.

    ``unet_module_names`` / ``text_module_names``: the dotted module names of the target models
    (``dict(model.named_modules())`` or its keys). When a name -> module mapping is given, each
    LoRA pair is also checked against the module's type (Linear / Conv2d) and shape.
    """
    path = Path(path)
    source = f"LoRA {path.name}"
    state = read_weights(path)
    resolvers = {"unet": _Resolver(unet_module_names, text=False),
                 "text_encoder": _Resolver(text_module_names or (), text=True)}
    entries: dict[tuple[str, str], dict[str, tuple[str, torch.Tensor]]] = {}
    unknown, duplicate = [], []

    def resolve(part: str | None, path_: str) -> tuple[str, str] | None:
        if path_.startswith("base_model.model."):
            path_ = path_[len("base_model.model."):]
        for p in ([part] if part else list(_PARTS)):
            module = resolvers[p].dotted(path_)
            if module is not None:
                return p, module
        return None

    for key, value in state.items():
        hit = None
        if m := _KOHYA.match(key):
            part = "unet" if m["part"] == "unet" else "text_encoder"
            module = resolvers[part].kohya(m["name"])
            hit = (part, module, _ROLE[m["what"]]) if module else None
        elif m := _PROC.match(key):
            r = resolve(m["part"] or "unet", f"{m['path']}.{_PROC_NAMES[m['proj']]}")
            hit = (*r, _ROLE[m["du"]]) if r else None
        elif m := _OLD_TEXT.match(key):
            r = resolve("text_encoder", f"{m['path']}.{_TEXT_PROC_NAMES[m['proj']]}")
            hit = (*r, _ROLE[m["du"]]) if r else None
        elif (m := _PEFT.match(key)) or (m := _OLD.match(key)):
            r = resolve(m["part"], m["path"])
            hit = (*r, _ROLE[m["ab"] if "ab" in m.groupdict() else m["du"]]) if r else None
        elif m := _ALPHA.match(key):
            r = resolve(m["part"], m["path"])
            hit = (*r, "alpha") if r else None
        if hit is None:
            unknown.append(key)
            continue
        part, module, role = hit
        slot = entries.setdefault((part, module), {})
        if role in slot:
            duplicate.append(key)
        slot[role] = (key, value)
    if unknown:
        what = "UNet" + (" / text encoder" if text_module_names is not None else " (no text encoder names given)")
        raise InputError(f"{source}: {len(unknown)} keys match no LoRA layout or no module of the {what} ({name_list(unknown)})")
    if duplicate:
        raise InputError(f"{source}: {len(duplicate)} keys give a module's weights a second time ({name_list(duplicate)})")
    if not entries:
        raise InputError(f"{source}: no LoRA weights; expected lora_A/lora_B, lora_down/lora_up or *_lora.down/up keys")

    meta = _metadata_alphas(path)
    problems, modules = [], {}
    for (part, module), slot in sorted(entries.items()):
        if "A" not in slot or "B" not in slot:
            have = (slot.get("A") or slot.get("B") or slot["alpha"])[0]
            problems.append(f"{have} has no {'down/A' if 'A' not in slot else 'up/B'} partner")
            continue
        (ka, a), (kb, b) = slot["A"], slot["B"]
        r = int(a.shape[0])
        if a.ndim not in (2, 4) or b.ndim != a.ndim or b.shape[1] != r or (b.ndim == 4 and tuple(b.shape[2:]) != (1, 1)):
            problems.append(f"{ka} {tuple(a.shape)} / {kb} {tuple(b.shape)} are not a rank-{r} pair")
            continue
        if "alpha" in slot:
            alpha = float(slot["alpha"][1].float().reshape(-1)[0])
        else:
            alpha = _alpha_from_metadata(meta, part, module, r)
        if not alpha > 0:
            problems.append(f"{ka}: alpha {alpha} (expected > 0)")
            continue
        modules[(part, module)] = (a, b, r, alpha / r, ka)
    if problems:
        raise InputError(f"{source}: " + "; ".join(problems[:5]) + (f" and {len(problems) - 5} more" if len(problems) > 5 else ""))

    for part, names in (("unet", unet_module_names), ("text_encoder", text_module_names)):
        if isinstance(names, Mapping):
            _check_modules(source, part, names, {m: v for (p, m), v in modules.items() if p == part})

    rank = max(Counter(v[2] for v in modules.values()).items(), key=lambda kv: (kv[1], kv[0]))[0]
    scale = max(Counter(v[3] for v in modules.values()).items(), key=lambda kv: (kv[1], kv[0]))[0]
    out = {"unet": {}, "text_encoder": {}}
    for (part, module), (a, b, r, s, _) in modules.items():
        if s != scale:
            b = (b.float() * (s / scale)).to(b.dtype)
        out[part][f"{module}.lora_A.weight"] = a
        out[part][f"{module}.lora_B.weight"] = b
    return LoraWeights(unet=out["unet"], text_encoder=out["text_encoder"], rank=rank, alpha=scale * rank)


def _check_modules(source: str, part: str, modules: Mapping, pairs: dict) -> None:
    bad = []
    for name, (a, b, r, _, ka) in pairs.items():
        mod = modules.get(name)
        if isinstance(mod, torch.nn.Linear):
            ok = a.ndim == 2 and tuple(a.shape) == (r, mod.in_features) and tuple(b.shape) == (mod.out_features, r)
            want = f"A ({r}, {mod.in_features}), B ({mod.out_features}, {r})"
        elif isinstance(mod, torch.nn.Conv2d):
            ok = a.ndim == 4 and tuple(a.shape) == (r, mod.in_channels, *mod.kernel_size) \
                and tuple(b.shape) == (mod.out_channels, r, 1, 1)
            want = f"A ({r}, {mod.in_channels}, {mod.kernel_size[0]}, {mod.kernel_size[1]}), B ({mod.out_channels}, {r}, 1, 1)"
        else:
            bad.append(f"{ka}: {part} module {name} is a {type(mod).__name__}, expected Linear or Conv2d")
            continue
        if not ok:
            bad.append(f"{ka}: A {tuple(a.shape)}, B {tuple(b.shape)} vs {want}")
    if bad:
        raise InputError(f"{source}: {len(bad)} mis-shaped LoRA pairs ({name_list(bad, 3)})")
