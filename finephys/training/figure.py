"""A person-like figure drawn from H36M-17 joints in camera space (training data for the demo).

The body is a set of tapered capsules (limbs, torso, neck, feet) and discs (head, hands), each
with radii in metres that the pinhole camera turns into pixels. Every pixel takes the nearest
covering part (a z-buffer over the parts, with the bulge of each part towards the camera), is
shaded by the part's surface normal and its depth, and is blended onto the background by a
soft coverage edge. All in torch, batched over frames: (N,17,3) joints -> (N,3,H,W) images.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# H36M-17 joint ids
PELVIS, R_HIP, R_KNEE, R_ANKLE, L_HIP, L_KNEE, L_ANKLE = range(7)
SPINE, THORAX, NECK, HEAD, L_SHO, L_ELB, L_WRI, R_SHO, R_ELB, R_WRI = range(7, 17)

# Part materials: indices into the (skin, hair, shirt, trousers, shoes) colours of a figure.
SKIN, HAIR, SHIRT, TROUSERS, SHOES = range(5)

# Capsules: (joint a, joint b, radius at a (m), radius at b (m), material). Sleeves are short:
# the upper arm is shirt, the forearm skin.
CAPSULES = (
    (PELVIS, THORAX, 0.135, 0.15, SHIRT),
    (L_HIP, L_SHO, 0.085, 0.075, SHIRT),
    (R_HIP, R_SHO, 0.085, 0.075, SHIRT),
    (L_SHO, R_SHO, 0.07, 0.07, SHIRT),
    (L_HIP, R_HIP, 0.1, 0.1, TROUSERS),
    (THORAX, NECK, 0.05, 0.045, SKIN),
    (L_SHO, L_ELB, 0.055, 0.045, SHIRT),
    (R_SHO, R_ELB, 0.055, 0.045, SHIRT),
    (L_ELB, L_WRI, 0.042, 0.033, SKIN),
    (R_ELB, R_WRI, 0.042, 0.033, SKIN),
    (L_HIP, L_KNEE, 0.085, 0.06, TROUSERS),
    (R_HIP, R_KNEE, 0.085, 0.06, TROUSERS),
    (L_KNEE, L_ANKLE, 0.06, 0.045, TROUSERS),
    (R_KNEE, R_ANKLE, 0.06, 0.045, TROUSERS),
)
HEAD_RADIUS = 0.105
HAND_RADIUS = 0.045
FOOT = (0.13, 0.045, 0.04)  # length forward of the ankle, radius at the heel and at the toe (m)
EDGE_PX = 0.6  # width of the soft silhouette edge, pixels


@dataclass(frozen=True)
class Camera:
    """Pinhole intrinsics per frame: focal (N,) and principal point (N,2), pixels."""

    focal: torch.Tensor
    centre: torch.Tensor


def _extra_points(cam: torch.Tensor):
    """Head centre, hand centres and toe points (N,·,3) from camera-space joints (N,17,3)."""
    head = 0.35 * cam[:, NECK] + 0.65 * cam[:, HEAD]
    up = cam[:, HEAD] - cam[:, NECK]
    head = head - 0.15 * up  # the H36M head joint is the top of the head
    hands = []
    for elb, wri in ((L_ELB, L_WRI), (R_ELB, R_WRI)):
        d = cam[:, wri] - cam[:, elb]
        d = d / d.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        hands.append(cam[:, wri] + 0.06 * d)
    # forward = across the hips x body up, made horizontal-ish by the pelvis -> thorax axis
    across = cam[:, L_HIP] - cam[:, R_HIP]
    body_up = cam[:, THORAX] - cam[:, PELVIS]
    fwd = torch.linalg.cross(across, body_up, dim=-1)
    fwd = fwd / fwd.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    toes = [cam[:, a] + FOOT[0] * fwd for a in (L_ANKLE, R_ANKLE)]
    return head, hands, toes


def _parts(cam: torch.Tensor):
    """Segments (N,P,2,3), radii (P,2) metres and materials (P,) of every body part; discs are
    capsules of zero length."""
    head, hands, toes = _extra_points(cam)
    ends, radii, mats = [], [], []
    for a, b, ra, rb, mat in CAPSULES:
        ends.append(torch.stack([cam[:, a], cam[:, b]], 1))
        radii.append((ra, rb))
        mats.append(mat)
    for ankle, toe in zip((L_ANKLE, R_ANKLE), toes):
        ends.append(torch.stack([cam[:, ankle], toe], 1))
        radii.append(FOOT[1:])
        mats.append(SHOES)
    for hand in hands:
        ends.append(torch.stack([hand, hand], 1))
        radii.append((HAND_RADIUS, HAND_RADIUS))
        mats.append(SKIN)
    ends.append(torch.stack([head, head], 1))
    radii.append((HEAD_RADIUS, HEAD_RADIUS))
    mats.append(SKIN)
    return torch.stack(ends, 1), torch.tensor(radii, dtype=cam.dtype, device=cam.device), mats


def project(points: torch.Tensor, camera: Camera) -> torch.Tensor:
    """Camera-space points (N,...,3) (z forward, metres) -> pixels (N,...,2)."""
    z = points[..., 2:3].clamp_min(1e-3)
    shape = (-1,) + (1,) * (points.dim() - 2)
    f = camera.focal.to(points).view(*shape, 1)
    c = camera.centre.to(points).view(*shape[:1], *(1,) * (points.dim() - 2), 2)
    return points[..., :2] / z * f + c


def body_scale(cam: torch.Tensor) -> torch.Tensor:
    """(N,) size of each skeleton relative to the one the part radii are made for: the chain
    ankle-knee-hip-pelvis-thorax-neck-head, 1.45 m on an adult."""
    chain = (R_ANKLE, R_KNEE, R_HIP, PELVIS, THORAX, NECK, HEAD)
    length = sum((cam[:, a] - cam[:, b]).norm(dim=-1) for a, b in zip(chain[:-1], chain[1:]))
    return (length / 1.45).clamp(0.6, 1.4)


def segment_offsets(a: torch.Tensor, b: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor):
    """For segments a->b (...,2) pixels and pixel grids xs (..., 1, W), ys (..., H, 1): where along
    each segment the nearest point lies (t in [0,1]) and the pixel's offset from it (dx, dy),
    each (..., H, W)."""
    ab = b - a
    len2 = (ab * ab).sum(-1).clamp_min(1e-6)[..., None, None]
    ax, ay = a[..., 0, None, None], a[..., 1, None, None]
    abx, aby = ab[..., 0, None, None], ab[..., 1, None, None]
    t = (((xs - ax) * abx + (ys - ay) * aby) / len2).clamp(0, 1)
    return t, xs - ax - t * abx, ys - ay - t * aby


def render_figures(cam: torch.Tensor, camera: Camera, colours: torch.Tensor, background: torch.Tensor,
                   hair_fraction: torch.Tensor | None = None, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Draw the figures over ``background``.

    cam (N,17,3) camera-space joints (x right, y down, z forward, metres); colours (N,5,3) RGB in
    [0,1] for (skin, hair, shirt, trousers, shoes); background (N,3,H,W) in [0,1]; hair_fraction
    (N,) how far down the head the hair reaches (0..1, default 0.45); scale (N,) multiplies the
    part radii (default ``body_scale``). Returns (N,3,H,W) in [0,1].
    """
    n, _, height, width = background.shape
    dev, dt = background.device, background.dtype
    cam = cam.to(dev, dt)
    ends, radii_m, mats = _parts(cam)  # (N,P,2,3), (P,2)
    depth = ends[..., 2].clamp_min(1e-3)  # (N,P,2)
    px = project(ends, camera)  # (N,P,2,2)
    f = camera.focal.to(dev, dt).view(n, 1, 1)
    size = (body_scale(cam) if scale is None else scale.to(dev, dt)).view(n, 1, 1)
    radii_m = radii_m.unsqueeze(0) * size  # (N,P,2)
    radii = radii_m * f / depth  # (N,P,2) pixels

    ys = torch.arange(height, device=dev, dtype=dt).view(1, 1, height, 1)
    xs = torch.arange(width, device=dev, dtype=dt).view(1, 1, 1, width)
    t, dx, dy = segment_offsets(px[:, :, 0], px[:, :, 1], xs, ys)  # (N,P,H,W)
    dist = torch.sqrt(dx * dx + dy * dy + 1e-12)
    r = radii[..., 0, None, None] + t * (radii[..., 1, None, None] - radii[..., 0, None, None])
    cover = ((r - dist) / EDGE_PX + 0.5).clamp(0, 1)  # soft edge
    inside = (1 - (dist / r.clamp_min(1e-3)).clamp(max=1) ** 2).sqrt()  # 1 on the axis, 0 at the rim
    r_m = radii_m[..., 0, None, None] + t * (radii_m[..., 1, None, None] - radii_m[..., 0, None, None])
    z = depth[..., 0, None, None] + t * (depth[..., 1, None, None] - depth[..., 0, None, None]) - r_m * inside
    z = torch.where(cover > 0, z, torch.full_like(z, float("inf")))
    front = z.argmin(dim=1, keepdim=True)  # (N,1,H,W) nearest part
    alpha = cover.max(dim=1).values.unsqueeze(1)

    # shading: a light from the upper left and in front, on the part's approximate normal
    nx = dx / dist.clamp_min(1e-6) * (1 - inside * inside).clamp_min(0).sqrt()
    ny = dy / dist.clamp_min(1e-6) * (1 - inside * inside).clamp_min(0).sqrt()
    light = (-0.35 * nx - 0.45 * ny + 0.82 * inside).clamp_min(0)
    shade = 0.45 + 0.6 * light
    z_front = torch.gather(torch.where(torch.isinf(z), torch.zeros_like(z), z), 1, front)
    z_mid = depth.mean(dim=(1, 2)).view(n, 1, 1, 1)
    shade = torch.gather(shade, 1, front) * (1 - 0.25 * (z_front - z_mid)).clamp(0.7, 1.15)

    mat_index = torch.tensor(mats, device=dev)[front.squeeze(1)]  # (N,H,W)
    colour = torch.gather(colours.to(dev, dt), 1, mat_index.view(n, -1, 1).expand(-1, -1, 3))
    colour = colour.view(n, height, width, 3).permute(0, 3, 1, 2)
    # hair: the head disc's pixels on the far side of the face line
    head_part = len(mats) - 1
    hc = px[:, head_part, 0]  # (N,2)
    up = project(cam[:, HEAD:HEAD + 1], camera)[:, 0] - project(cam[:, NECK:NECK + 1], camera)[:, 0]
    up = up / up.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    along = ((xs - hc[:, 0, None, None, None]) * up[:, 0, None, None, None]
             + (ys - hc[:, 1, None, None, None]) * up[:, 1, None, None, None]) / radii[:, head_part, 0].view(n, 1, 1, 1)
    frac = (hair_fraction if hair_fraction is not None else torch.full((n,), 0.45)).to(dev, dt).view(n, 1, 1, 1)
    is_hair = (front == head_part) & (along > 1 - 2 * frac)
    colour = torch.where(is_hair, colours[:, HAIR].to(dev, dt).view(n, 3, 1, 1), colour)
    figure = (colour * shade).clamp(0, 1)
    return alpha * figure + (1 - alpha) * background
