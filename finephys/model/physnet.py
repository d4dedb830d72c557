"""PhysNet (after PhysMoP), DESIGN.md steps 3 and 4, in plain PyTorch.

For every frame t and direction d (0 forward, 1 reverse) an MLP reads the local window of S_dd
and predicts the lower triangle of a symmetric M^-1, the actuation force jtau and the
Coriolis + gravity term. ``integrate`` then applies the Euler-Lagrange step in both directions
and fuses; it is ``fpkernels.physnet_ref.physnet_fused_ref``, the one reference that the fused Triton
kernel is checked against.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from finephys.model.config import PhysNetConfig
from fpkernels.physnet_ref import physnet_fused_ref


def tril_size(d: int) -> int:
    return d * (d + 1) // 2


def tril_to_full(tril: torch.Tensor, d: int) -> torch.Tensor:
    """(..., d(d+1)/2) row-major lower triangle, diagonal included -> symmetric (..., d, d)."""
    rows, cols = torch.tril_indices(d, d, device=tril.device)  # row-major order
    full = tril.new_zeros(tril.shape[:-1] + (d, d))
    full[..., rows, cols] = tril
    full[..., cols, rows] = tril
    return full


# The physics step, (s_pp, s_fused, qdd) = integrate(s_dd, minv_tril, jtau, coriolis, dt, fuse_weight):
# s_dd (B,T,J,3); minv_tril (B,T,2,D(D+1)/2); jtau, coriolis (B,T,2,D); D = 3J.
# qdd = M^-1 (jtau - coriolis) for every frame and direction;
# q_fwd[t+1] = 2 q[t] - q[t-1] + qdd_fwd[t] dt^2 and q_rev[t-1] = 2 q[t] - q[t+1] + qdd_rev[t] dt^2
# for t in 1..T-2; S_pp[t] = mean of the predictions that exist for t (S_dd[t] if none);
# S_fused = w S_dd + (1 - w) S_pp. One reference for the model, training and the fused kernel's
# tests: ``fpkernels.physnet_ref.physnet_fused_ref`` (plain torch, differentiable).
integrate = physnet_fused_ref


def keep_bone_lengths(s: torch.Tensor, edges) -> torch.Tensor:
    """(B,T,J,3) -> the same skeleton with rigid bones: every bone of ``edges`` ((parent, child)
    pairs, parents first) gets its median length over the clip, along its own direction in each
    frame, built outwards from the root. A body's segments do not stretch; the lifter's do."""
    parent, child = (list(x) for x in zip(*edges))
    vec = s[..., child, :] - s[..., parent, :]
    length = vec.norm(dim=-1)
    unit = vec / length.clamp(min=1e-9)[..., None]
    bone = unit * length.median(dim=1, keepdim=True).values[..., None]  # (B,T,E,3)
    out = [None] * s.shape[-2]
    out[parent[0]] = s[..., parent[0], :]
    for e, (p, c) in enumerate(zip(parent, child)):
        out[c] = out[p] + bone[..., e, :]
    return torch.stack([o if o is not None else s[..., j, :] for j, o in enumerate(out)], dim=-2)


class _Head(nn.Module):
    def __init__(self, d: int, hidden: int, layers: int):
        super().__init__()
        dims = [3 * d] + [hidden] * layers
        body = []
        for a, c in zip(dims[:-1], dims[1:]):
            body += [nn.Linear(a, c), nn.SiLU()]
        self.body = nn.Sequential(*body)
        self.minv = nn.Linear(hidden, tril_size(d))
        self.jtau = nn.Linear(hidden, d)
        self.coriolis = nn.Linear(hidden, d)
        # Start near M^-1 = I so an untrained head gives a well-posed system.
        with torch.no_grad():
            self.minv.weight.mul_(0.01)
            rows, cols = torch.tril_indices(d, d)
            self.minv.bias.copy_((rows == cols).float())


class PhysNet(nn.Module):
    def __init__(self, cfg: PhysNetConfig):
        super().__init__()
        self.cfg = cfg
        self.d = 3 * cfg.num_joints
        self.heads = nn.ModuleList(_Head(self.d, cfg.hidden, cfg.layers) for _ in range(2))

    def predict(self, s_dd: torch.Tensor, minv_noise: float = 0.0):
        """s_dd (B,T,J,3) -> (minv_tril (B,T,2,D(D+1)/2), jtau (B,T,2,D), coriolis (B,T,2,D)).

        The forward head reads (q[t-1], q[t], q[t+1]), the reverse head (q[t+1], q[t], q[t-1]),
        with the clip's ends repeated. ``minv_noise`` > 0 (training) perturbs M^-1.
        """
        b, t, j, _ = s_dd.shape
        q = s_dd.reshape(b, t, self.d)
        prev = torch.cat([q[:, :1], q[:, :-1]], dim=1)
        nxt = torch.cat([q[:, 1:], q[:, -1:]], dim=1)
        outs = []
        for head, window in zip(self.heads, ((prev, q, nxt), (nxt, q, prev))):
            h = head.body(torch.cat(window, dim=-1))
            minv = head.minv(h)
            if minv_noise > 0:
                minv = minv + minv_noise * torch.randn_like(minv)
            outs.append((minv, head.jtau(h), head.coriolis(h)))
        return tuple(torch.stack(parts, dim=2) for parts in zip(*outs))

    def forward(self, s_dd: torch.Tensor, dt: float, fuse_weight: float = 0.5, minv_noise: float = 0.0):
        if not (math.isfinite(dt) and dt > 0):
            raise ValueError(f"dt: expected a finite number > 0, got {dt}")
        minv, jtau, cor = self.predict(s_dd, minv_noise)
        return integrate(s_dd, minv, jtau, cor, dt, fuse_weight)
