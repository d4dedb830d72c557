"""SD 1.5 UNet + AnimateDiff motion modules with the pose features added inside the down blocks.

diffusers' ``UNetMotionModel.forward`` takes no ``down_intrablock_additional_residuals``
(T2I-Adapter style features), although its cross-attention down blocks accept them as
``additional_residuals``. ``PoseGuidedUNet`` runs the same modules with the adapter semantics of
``UNet2DConditionModel``: feature k is added to the output of the last resnet/attention pair of
cross-attention down block k, or to the output of a plain down block.
"""
from __future__ import annotations

import torch
from torch import nn


class PoseGuidedUNet(nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    @property
    def dtype(self):
        return self.unet.dtype

    def _begin(self, sample, timestep):
        u = self.unet
        b, _, f, h, w = sample.shape
        t = timestep if torch.is_tensor(timestep) else torch.tensor(timestep, device=sample.device)
        t = t.reshape(-1).to(sample.device).expand(b)
        emb = u.time_embedding(u.time_proj(t).to(dtype=sample.dtype))
        emb = emb.repeat_interleave(f, dim=0)
        x = u.conv_in(sample.permute(0, 2, 1, 3, 4).reshape(b * f, -1, h, w))
        return x, emb

    def _end(self, x, sample):
        u = self.unet
        b, _, f = sample.shape[:3]
        if u.conv_norm_out is not None:
            x = u.conv_act(u.conv_norm_out(x))
        x = u.conv_out(x)
        return x.reshape(b, f, *x.shape[1:]).permute(0, 2, 1, 3, 4)

    @staticmethod
    def _down_pair(block, i, x, emb, ehs, f, extra=None):
        """Pair ``i`` (resnet, attention, motion module) of a down block, as diffusers runs it."""
        x = block.resnets[i](input_tensor=x, temb=emb)
        if getattr(block, "attentions", None) is not None:
            x = block.attentions[i](hidden_states=x, encoder_hidden_states=ehs, return_dict=False)[0]
        x = block.motion_modules[i](x, num_frames=f)
        return x + extra if extra is not None else x

    @staticmethod
    def _up_pair(block, i, x, skip, emb, ehs, f):
        """Pair ``i`` of an up block (no upsampler), as diffusers runs it (FreeU off)."""
        x = block.resnets[i](input_tensor=torch.cat([x, skip], dim=1), temb=emb)
        if getattr(block, "attentions", None) is not None:
            x = block.attentions[i](hidden_states=x, encoder_hidden_states=ehs, return_dict=False)[0]
        return block.motion_modules[i](x, num_frames=f)

    def cache_depths(self) -> range:
        """Valid ``depth`` values of the DeepCache-style calls: 1 .. pairs of the last up block."""
        return range(1, len(self.unet.up_blocks[-1].resnets) + 1)


    def forward(self, sample, timestep, encoder_hidden_states, pose_features=None):
        """sample (B,C,F,h,w); timestep scalar or (B,); encoder_hidden_states (B*F, L, C_text)
        (repeat-interleaved per frame); pose_features: list of (B*F, C_k, h_k, w_k) or None."""
        return self._full(sample, timestep, encoder_hidden_states, pose_features, 0)

    def forward_and_cache(self, sample, timestep, encoder_hidden_states, pose_features, depth: int):
        """The full step, plus the deep features that ``forward_shallow`` reuses: the input of the
        last up block's pair ``n - depth`` (n pairs). Returns (noise, deep)."""
        return self._full(sample, timestep, encoder_hidden_states, pose_features, depth)

    def forward_shallow(self, sample, timestep, encoder_hidden_states, pose_features, deep, depth: int):
        """DeepCache-style partial step: ``conv_in``, the first ``depth - 1`` pairs of the first down
        block, ``deep`` (from an earlier ``forward_and_cache``) through the last ``depth`` pairs of the
        last up block, ``conv_out``. With the same inputs as the caching call it gives its output."""
        u = self.unet
        f = sample.shape[2]
        x, emb = self._begin(sample, timestep)
        skips = [x]
        first = u.down_blocks[0]
        n_down = len(first.resnets)
        extra = pose_features[0] if pose_features and getattr(first, "has_cross_attention", False) else None
        for i in range(depth - 1):
            x = self._down_pair(first, i, x, emb, encoder_hidden_states, f, extra if i == n_down - 1 else None)
            skips.append(x)
        last = u.up_blocks[-1]
        n = len(last.resnets)
        x = deep
        for i in range(n - depth, n):
            x = self._up_pair(last, i, x, skips.pop(), emb, encoder_hidden_states, f)
        return self._end(x, sample)

    def _full(self, sample, timestep, encoder_hidden_states, pose_features, depth):
        u = self.unet
        b, _, f, h, w = sample.shape
        up_factor = 2 ** u.num_upsamplers
        forward_upsample_size = h % up_factor != 0 or w % up_factor != 0
        x, emb = self._begin(sample, timestep)
        skips = (x,)
        feats = list(pose_features) if pose_features is not None else []
        for block in u.down_blocks:
            if getattr(block, "has_cross_attention", False):
                extra = feats.pop(0) if feats else None
                x, res = block(hidden_states=x, temb=emb, encoder_hidden_states=encoder_hidden_states,
                               num_frames=f, additional_residuals=extra)
            else:
                x, res = block(hidden_states=x, temb=emb, num_frames=f)
                if feats:
                    x = x + feats.pop(0)
            skips += res
        if u.mid_block is not None:
            if hasattr(u.mid_block, "motion_modules"):
                x = u.mid_block(x, emb, encoder_hidden_states=encoder_hidden_states, num_frames=f)
            else:
                x = u.mid_block(x, emb, encoder_hidden_states=encoder_hidden_states)
        deep = None
        for i, block in enumerate(u.up_blocks):
            res = skips[-len(block.resnets):]
            skips = skips[: -len(block.resnets)]
            size = skips[-1].shape[2:] if (forward_upsample_size and i < len(u.up_blocks) - 1) else None
            if depth and i == len(u.up_blocks) - 1:  # pair by pair, keeping the input of pair n - depth
                n = len(block.resnets)
                for j in range(n):
                    if j == n - depth:
                        deep = x
                    x = self._up_pair(block, j, x, res[n - 1 - j], emb, encoder_hidden_states, f)
            elif getattr(block, "has_cross_attention", False):
                x = block(hidden_states=x, temb=emb, res_hidden_states_tuple=res,
                          encoder_hidden_states=encoder_hidden_states, upsample_size=size, num_frames=f)
            else:
                x = block(hidden_states=x, temb=emb, res_hidden_states_tuple=res, upsample_size=size,
                          num_frames=f)
        out = self._end(x, sample)
        return (out, deep) if depth else out


def cache_depths_of(unet_config: dict) -> range:
    """``PoseGuidedUNet.cache_depths`` from the UNet's config alone (no weights): diffusers gives
    the last up block ``layers_per_block`` of the first down block + 1 resnets."""
    per_block = unet_config.get("layers_per_block", 2)
    first = per_block[0] if isinstance(per_block, (list, tuple)) else per_block
    return range(1, int(first) + 2)
