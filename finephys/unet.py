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

    def forward(self, sample, timestep, encoder_hidden_states, pose_features=None):
        """sample (B,C,F,h,w); timestep scalar or (B,); encoder_hidden_states (B*F, L, C_text)
        (repeat-interleaved per frame); pose_features: list of (B*F, C_k, h_k, w_k) or None."""
        u = self.unet
        b, _, f, h, w = sample.shape
        up_factor = 2 ** u.num_upsamplers
        forward_upsample_size = h % up_factor != 0 or w % up_factor != 0
        t = timestep if torch.is_tensor(timestep) else torch.tensor(timestep, device=sample.device)
        t = t.reshape(-1).to(sample.device).expand(b)
        emb = u.time_embedding(u.time_proj(t).to(dtype=sample.dtype))
        emb = emb.repeat_interleave(f, dim=0)
        x = sample.permute(0, 2, 1, 3, 4).reshape(b * f, -1, h, w)
        x = u.conv_in(x)
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
        for i, block in enumerate(u.up_blocks):
            res = skips[-len(block.resnets):]
            skips = skips[: -len(block.resnets)]
            size = skips[-1].shape[2:] if (forward_upsample_size and i < len(u.up_blocks) - 1) else None
            if getattr(block, "has_cross_attention", False):
                x = block(hidden_states=x, temb=emb, res_hidden_states_tuple=res,
                          encoder_hidden_states=encoder_hidden_states, upsample_size=size, num_frames=f)
            else:
                x = block(hidden_states=x, temb=emb, res_hidden_states_tuple=res, upsample_size=size,
                          num_frames=f)
        if u.conv_norm_out is not None:
            x = u.conv_act(u.conv_norm_out(x))
        x = u.conv_out(x)
        return x.reshape(b, f, *x.shape[1:]).permute(0, 2, 1, 3, 4)
