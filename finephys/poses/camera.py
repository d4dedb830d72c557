"""Per-clip camera fit and projection back to 2D (DESIGN.md step 5).

Weak perspective (default): u = s X + c_t, one scale s per clip and one image offset c_t per
frame (the subject moves), fitted in closed form by confidence-weighted least squares.
Pinhole with distortion (when the clip carries a camera matrix): the per-frame translation of
the root-relative skeleton is the weighted least-squares solution of the linear projection
equations in undistorted normalised coordinates; projection applies OpenCV's k1,k2,p1,p2,k3.

Virtual camera (``virtual_camera``): before lifting, the 2D is seen by a camera turned to look
straight at the person (one turn per clip, towards the mean ray of its root), so a person at
the edge of a wide shot looks to the lifter as one in the middle; its 3D comes back to the real
camera's axes with the same turn (``to_camera_axes``). A clip without a camera matrix is not
turned: with its focal length unknown, any turn would bend the 2D differently for a wide and a
long lens, and the lifter's input would no longer be the same for every framing.
"""
from __future__ import annotations

import torch


def _fill_empty_frames(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """values (B,T,C), valid (B,T) bool: frames without data copy the nearest valid frame."""
    t = values.shape[1]
    idx = torch.arange(t, device=values.device).expand(valid.shape)
    big = t * 4
    dist = (idx[:, :, None] - idx[:, None, :]).abs() + (~valid[:, None, :]) * big  # (B,T,T)
    nearest = dist.argmin(-1)
    return torch.gather(values, 1, nearest[..., None].expand_as(values))


def fit_weak_perspective(s3d, kp2d, weights):
    """s3d (B,T,J,3), kp2d (B,T,J,2) pixels, weights (B,T,J) >= 0 -> (scale (B,), offset (B,T,2))."""
    w = weights.float().clamp(min=0)
    x3 = s3d[..., :2].float()
    x2 = kp2d.float()
    wsum = w.sum(-1, keepdim=True)  # (B,T,1)
    valid = wsum[..., 0] > 0
    den = wsum.clamp(min=1e-9)[..., None]
    m3 = (x3 * w[..., None]).sum(-2, keepdim=True) / den
    m2 = (x2 * w[..., None]).sum(-2, keepdim=True) / den
    c3, c2 = x3 - m3, x2 - m2
    num = (w[..., None] * c3 * c2).sum(dim=(1, 2, 3))
    var = (w[..., None] * c3 * c3).sum(dim=(1, 2, 3)).clamp(min=1e-12)
    scale = num / var
    offset = (m2 - scale[:, None, None, None] * m3)[..., 0, :]
    return scale, _fill_empty_frames(offset, valid)


def project_weak_perspective(s3d, scale, offset):
    return scale[:, None, None, None] * s3d[..., :2].float() + offset[:, :, None, :]


def distort(xn, dist):
    """Normalised coords (...,2) -> distorted, OpenCV model: k1,k2,p1,p2[,k3[,k4,k5,k6]]."""
    if dist is None:
        return xn
    k = torch.zeros(8, dtype=xn.dtype, device=xn.device)
    dist = torch.as_tensor(dist, dtype=xn.dtype, device=xn.device).flatten()
    if dist.numel() not in (4, 5, 8):
        raise ValueError(f"dist_coeffs: expected 4, 5 or 8 numbers, got {dist.numel()}")
    k[: dist.numel()] = dist
    x, y = xn[..., 0], xn[..., 1]
    r2 = x * x + y * y
    radial = (1 + r2 * (k[0] + r2 * (k[1] + r2 * k[4]))) / (1 + r2 * (k[5] + r2 * (k[6] + r2 * k[7])))
    xd = x * radial + 2 * k[2] * x * y + k[3] * (r2 + 2 * x * x)
    yd = y * radial + k[2] * (r2 + 2 * y * y) + 2 * k[3] * x * y
    return torch.stack([xd, yd], dim=-1)


def undistort(xd, dist, iterations: int = 20):
    """Inverse of ``distort`` by fixed-point iteration (as OpenCV's undistortPoints)."""
    if dist is None:
        return xd
    xn = xd.clone()
    for _ in range(iterations):
        err = distort(xn, dist) - xd
        xn = xn - err
    return xn


def _to_normalised(kp2d, K):
    """Pixels (B,T,J,2) -> normalised image coordinates of camera K, (3,3) or one per clip (B,3,3)."""
    K = torch.as_tensor(K, dtype=kp2d.dtype, device=kp2d.device)
    if K.dim() == 3:
        K = K[:, None, None]  # (B,1,1,3,3) against (B,T,J)
    return torch.stack([(kp2d[..., 0] - K[..., 0, 2]) / K[..., 0, 0], (kp2d[..., 1] - K[..., 1, 2]) / K[..., 1, 1]],
                       dim=-1)


def fit_pinhole_translation(s3d, kp2d, weights, K, dist=None):
    """Per-frame translation (B,T,3) that puts the root-relative s3d in front of camera K."""
    xn = undistort(_to_normalised(kp2d.float(), K), dist)
    X = s3d.float()
    w = weights.float().clamp(min=0)
    zeros, ones = torch.zeros_like(xn[..., 0]), torch.ones_like(xn[..., 0])
    rows_x = torch.stack([ones, zeros, -xn[..., 0]], dim=-1)  # (B,T,J,3)
    rows_y = torch.stack([zeros, ones, -xn[..., 1]], dim=-1)
    rhs_x = xn[..., 0] * X[..., 2] - X[..., 0]
    rhs_y = xn[..., 1] * X[..., 2] - X[..., 1]
    A = torch.cat([rows_x, rows_y], dim=-2)  # (B,T,2J,3)
    r = torch.cat([rhs_x, rhs_y], dim=-1)  # (B,T,2J)
    ww = torch.cat([w, w], dim=-1)
    ata = (A * ww[..., None]).transpose(-1, -2) @ A + 1e-9 * torch.eye(3, device=A.device)
    atb = ((A * ww[..., None]).transpose(-1, -2) @ r[..., None])[..., 0]
    trans = torch.linalg.solve(ata, atb)
    valid = (w > 0).sum(-1) >= 2
    return _fill_empty_frames(trans, valid)


def project_pinhole(s3d, trans, K, dist=None):
    X = s3d.float() + trans[:, :, None, :]
    xn = X[..., :2] / X[..., 2:3].clamp(min=1e-6)
    xd = distort(xn, dist)
    K = torch.as_tensor(K, dtype=xd.dtype, device=xd.device)
    return torch.stack([xd[..., 0] * K[0, 0] + K[0, 2], xd[..., 1] * K[1, 1] + K[1, 2]], dim=-1)


def fit_and_project(s3d, kp2d, weights, K=None, dist=None):
    """Fit the clip's camera to the input 2D and project s3d with it -> (B,T,J,2) pixels."""
    if K is None:
        scale, offset = fit_weak_perspective(s3d, kp2d, weights)
        return project_weak_perspective(s3d, scale, offset)
    trans = fit_pinhole_translation(s3d, kp2d, weights, K, dist)
    return project_pinhole(s3d, trans, K, dist)


def root_2d(keypoints, scores):
    """(B,T,J,2), (B,T,J) -> (B,T,2): the pelvis (joint 0) where seen, else the confidence-weighted
    centroid of the frame's visible joints."""
    w = scores.clamp(min=0)
    centroid = (keypoints * w[..., None]).sum(-2) / w.sum(-1, keepdim=True).clamp(min=1e-6)
    return torch.where((scores[..., 0] > 0)[..., None], keypoints[..., 0, :], centroid)


def turn_towards(directions: torch.Tensor) -> torch.Tensor:
    """(N,3) unit vectors d -> (N,3,3) rotations Q with Q @ (0, 0, 1) = d (the shortest turn)."""
    d = directions.double()
    z = torch.zeros_like(d)
    z[:, 2] = 1.0
    axis = torch.linalg.cross(z, d)
    sin = axis.norm(dim=-1)
    k = axis / sin.clamp(min=1e-12)[:, None]
    kx = torch.zeros(len(d), 3, 3, dtype=d.dtype, device=d.device)
    kx[:, 0, 1], kx[:, 0, 2], kx[:, 1, 2] = -k[:, 2], k[:, 1], -k[:, 0]
    kx = kx - kx.transpose(1, 2)
    eye = torch.eye(3, dtype=d.dtype, device=d.device)
    return (eye + sin[:, None, None] * kx + (1 - d[:, 2])[:, None, None] * (kx @ kx)).to(directions.dtype)


def virtual_camera(keypoints, scores, K, dist=None):
    """keypoints (B,T,J,2) pixels of a camera K (3,3) or (B,3,3) -> (the joints as a camera turned
    towards the clip's mean root ray sees them (B,T,J,2), focal 1 and principal point 0; the turn
    Q (B,3,3): real camera axes = Q @ virtual camera axes). Joints with score 0 give 0. K None:
    the pixels as they are, no turn."""
    if K is None:
        eye = torch.eye(3, dtype=keypoints.dtype, device=keypoints.device).expand(keypoints.shape[0], 3, 3)
        return keypoints * (scores > 0)[..., None].to(keypoints.dtype), eye
    xn = undistort(_to_normalised(keypoints, K), dist)
    seen = (scores.sum(-1) > 0).to(xn.dtype)  # (B,T)
    root = (root_2d(xn, scores) * seen[..., None]).sum(1) / seen.sum(1).clamp(min=1)[:, None]  # (B,2)
    ray = torch.cat([root, torch.ones_like(root[:, :1])], dim=-1)
    turn = turn_towards(ray / ray.norm(dim=-1, keepdim=True))
    rays = torch.cat([xn, torch.ones_like(xn[..., :1])], dim=-1)
    v = torch.einsum("bji,btkj->btki", turn, rays)  # Q^T r
    view = v[..., :2] / v[..., 2:3].clamp(min=1e-6)
    return view * (scores > 0)[..., None].to(view.dtype), turn


def to_camera_axes(s, turn):
    """(B,T,J,3) in the virtual camera's axes -> the real camera's (Q @ x)."""
    return torch.einsum("bij,btkj->btki", turn.to(s.dtype), s)
