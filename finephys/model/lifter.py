"""In-context 2D -> 3D lifter (after Skeleton-in-Context), DESIGN.md step 2.

Tokens are (frame, joint) pairs. Each token reads the prompt pair (2D, 3D) and the query 2D
with its confidence; blocks alternate attention across joints (within a frame) and across frames
(within a joint). With no prompt, the prompt is the mean pose of the training set (the
"mean-pose prior"), stored as buffers in the checkpoint. Output: S_dd (B,T,J,3), root-relative,
metres, camera axes (x right, y down, z forward).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from finephys.model.config import LifterConfig
from finephys.poses.camera import root_2d

# A standing H36M-17 skeleton in metres, camera axes (y down), root at the origin: the prior
# before any training replaces it.
_STANDING_POSE = [
    [0.0, 0.0, 0.0], [-0.13, 0.0, 0.0], [-0.13, 0.44, 0.0], [-0.13, 0.88, 0.05],
    [0.13, 0.0, 0.0], [0.13, 0.44, 0.0], [0.13, 0.88, 0.05], [0.0, -0.23, 0.0],
    [0.0, -0.48, 0.0], [0.0, -0.58, -0.05], [0.0, -0.68, 0.0], [0.17, -0.46, 0.0],
    [0.19, -0.18, 0.0], [0.2, 0.07, 0.0], [-0.17, -0.46, 0.0], [-0.19, -0.18, 0.0],
    [-0.2, 0.07, 0.0],
]


# Body segments whose length changes little between people and between 3D sources (mocap
# skeletons, skeletons derived from COCO keypoints), with their typical length in metres (the
# CMU subjects' and Panoptic's means, rounded): thighs, shins, upper arms, forearms, the shoulder
# width and the torso sides (hip to shoulder). ``body_scale`` divides each one's 2D length by it.
SCALE_SEGMENTS = ((1, 2), (4, 5), (2, 3), (5, 6), (11, 12), (14, 15), (12, 13), (15, 16), (11, 14), (1, 11),
                  (4, 14))
SEGMENT_METRES = (0.40, 0.40, 0.42, 0.42, 0.28, 0.28, 0.20, 0.20, 0.35, 0.48, 0.48)
SCALE_QUANTILE = 0.75  # foreshortening only shortens a segment in 2D: an upper quantile of the ratios


def body_scale(keypoints: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """(B,T,J,2) pixels, (B,T,J) scores -> (B,) the person's pixels per metre, one per clip:
    every ``SCALE_SEGMENTS`` segment seen in any frame (both ends with score > 0) gives its 2D
    length / its typical length, and the clip's scale is their ``SCALE_QUANTILE`` quantile, so it
    holds with joints missing and limbs pointing at the camera; 1 where no segment is seen."""
    a, b = (torch.tensor(x, device=keypoints.device) for x in zip(*SCALE_SEGMENTS))
    ref = torch.tensor(SEGMENT_METRES, device=keypoints.device, dtype=keypoints.dtype)
    ratio = (keypoints[..., b, :] - keypoints[..., a, :]).norm(dim=-1) / ref  # (B,T,S)
    seen = (scores[..., a] > 0) & (scores[..., b] > 0)
    ratio = torch.where(seen, ratio, torch.full_like(ratio, float("nan"))).flatten(1)
    scale = torch.nanquantile(ratio, SCALE_QUANTILE, dim=1)
    return torch.where(torch.isfinite(scale) & (scale > 0), scale, torch.ones_like(scale))


def normalise_2d(keypoints: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Pixels -> root-centred and divided by the person's ``body_scale`` (so roughly metres at
    the person's depth, whatever the image size, lens or framing); missing joints -> 0.

    keypoints (B,T,J,2), scores (B,T,J). The root is the pelvis (joint 0) where seen, else
    the confidence-weighted centroid of the frame's visible joints. One scale per clip: a
    person walking towards the camera still grows.
    """
    root = root_2d(keypoints, scores)
    out = (keypoints - root[..., None, :]) / body_scale(keypoints, scores)[:, None, None, None]
    return out * (scores > 0)[..., None].to(out.dtype)


def _sinusoid(n: int, dim: int, device) -> torch.Tensor:
    pos = torch.arange(n, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(n, dim, device=device)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq)
    return pe


class _Block(nn.Module):
    """Pre-norm self-attention + MLP over the second-to-last axis of (N, L, C)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class Lifter(nn.Module):
    def __init__(self, cfg: LifterConfig):
        super().__init__()
        self.cfg = cfg
        j, d = cfg.num_joints, cfg.dim
        self.embed = nn.Linear(2 + 3 + 2 + 1, d)
        self.joint_embed = nn.Parameter(torch.randn(j, d) * 0.02)
        self.spatial = nn.ModuleList(_Block(d, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.temporal = nn.ModuleList(_Block(d, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 3)
        prior = torch.zeros(j, 3)
        if j == len(_STANDING_POSE):
            prior = torch.tensor(_STANDING_POSE)
        self.register_buffer("mean_pose_3d", prior)
        self.register_buffer("mean_pose_2d", prior[:, :2])

    def prior_prompt(self, batch: int, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        p2 = self.mean_pose_2d.expand(batch, frames, -1, -1)
        p3 = self.mean_pose_3d.expand(batch, frames, -1, -1)
        return p2, p3

    def forward(self, query_2d, query_scores, prompt_2d=None, prompt_3d=None) -> torch.Tensor:
        """query_2d (B,T,J,2) normalised (see normalise_2d), query_scores (B,T,J);
        prompt_2d (B,T,J,2) / prompt_3d (B,T,J,3) or None for the mean-pose prior."""
        b, t, j, _ = query_2d.shape
        if prompt_2d is None or prompt_3d is None:
            prompt_2d, prompt_3d = self.prior_prompt(b, t)
        seen = (query_scores > 0).to(query_2d.dtype)[..., None]
        tokens = torch.cat([prompt_2d, prompt_3d, query_2d * seen, query_scores[..., None]], dim=-1)
        x = self.embed(tokens) + self.joint_embed
        x = x + _sinusoid(t, self.cfg.dim, x.device)[None, :, None, :]
        d = x.shape[-1]
        for spatial, temporal in zip(self.spatial, self.temporal):
            x = spatial(x.reshape(b * t, j, d)).reshape(b, t, j, d)
            x = x.transpose(1, 2).reshape(b * j, t, d)
            x = temporal(x).reshape(b, j, t, d).transpose(1, 2)
        s = prompt_3d + self.head(self.norm(x))
        return s - s[..., :1, :]


def lift_windows(lifter: Lifter, query_2d: torch.Tensor, query_scores: torch.Tensor) -> torch.Tensor:
    """Lift a clip of any length in overlapping windows of ``cfg.max_frames`` frames (stride 2/3
    of that), blending overlaps with tent weights; a clip that fits is lifted in one pass."""
    t = query_2d.shape[1]
    length = lifter.cfg.max_frames
    if t <= length:
        return lifter(query_2d, query_scores)
    stride = max(1, (2 * length) // 3)
    starts = list(range(0, t - length, stride)) + [t - length]
    total = query_2d.new_zeros(query_2d.shape[:-1] + (3,))
    weight = query_2d.new_zeros(t)
    tent = torch.minimum(torch.arange(1, length + 1), torch.arange(length, 0, -1)).to(query_2d)
    for s in starts:
        out = lifter(query_2d[:, s : s + length], query_scores[:, s : s + length])
        total[:, s : s + length] += out * tent[None, :, None, None]
        weight[s : s + length] += tent
    return total / weight[None, :, None, None]
