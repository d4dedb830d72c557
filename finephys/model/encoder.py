"""Multi-scale heatmap encoder (after the T2I-Adapter / Follow-Your-Pose pose encoder), step 7.

(N, J, H, W) heatmaps -> PixelUnshuffle(8) -> one feature map per UNet down block, with the
block's width, at H/8, H/16, ... (stride-2 3x3 convolutions with padding 1, the same size
arithmetic as the UNet's downsamplers). The features are added inside the UNet's down blocks.
"""
from __future__ import annotations

import torch
from torch import nn

from finephys.model.config import EncoderConfig


class _ResBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.act = nn.SiLU()
        self.conv2 = nn.Conv2d(c, c, 1)

    def forward(self, x):
        return x + self.conv2(self.act(self.conv1(x)))


class HeatmapEncoder(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.unshuffle = nn.PixelUnshuffle(cfg.unshuffle)
        c_in = cfg.num_joints * cfg.unshuffle**2
        self.conv_in = nn.Conv2d(c_in, cfg.channels[0], 3, padding=1)
        self.downs = nn.ModuleList()
        self.stages = nn.ModuleList()
        self.outs = nn.ModuleList(nn.Conv2d(c, c, 1) for c in cfg.channels)  # zero them: no effect
        prev = cfg.channels[0]
        for i, c in enumerate(cfg.channels):
            self.downs.append(nn.Identity() if i == 0 else nn.Conv2d(prev, c, 3, stride=2, padding=1))
            self.stages.append(nn.Sequential(*[_ResBlock(c) for _ in range(cfg.num_res_blocks)]))
            prev = c

    def forward(self, heatmaps: torch.Tensor) -> list[torch.Tensor]:
        """heatmaps (N, J, H, W) with H, W multiples of the unshuffle factor -> list of features."""
        x = self.conv_in(self.unshuffle(heatmaps))
        feats = []
        for down, stage, out in zip(self.downs, self.stages, self.outs):
            x = stage(down(x))
            feats.append(out(x))
        return feats

    def zero_outputs(self) -> "HeatmapEncoder":
        """ControlNet-style start: an untrained encoder leaves the UNet unchanged."""
        for conv in self.outs:
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)
        return self
