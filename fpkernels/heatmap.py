"""Gaussian joint heatmaps (DESIGN.md step 6).

H_j(x, y) = v_j * exp(-((x - u_j)^2 + (y - w_j)^2) / (2 sigma^2)), pixel centres at integer
coordinates; keypoints (B,T,J,2) in pixels (x, y), visibility (B,T,J) -> (B,T,J,H,W).

``render_heatmaps`` dispatches: the Triton kernel on CUDA tensors, the reference elsewhere
(``use_kernel`` forces either; the kernel also runs on CPU tensors under TRITON_INTERPRET=1).
``unshuffle=r`` writes straight into the heatmap encoder's ``PixelUnshuffle(r)`` layout,
(B,T,J*r*r,H/r,W/r) with channel ``j*r*r + dy*r + dx`` holding pixel ``(y*r + dy, x*r + dx)``: the
same numbers as ``pixel_unshuffle(render_heatmaps(...))`` without the extra pass over memory.
"""
import torch

from fpkernels.heatmap_ref import _OUT_DTYPES, _check_heatmap_args, _check_size, render_heatmaps_ref  # noqa: F401
from fpkernels.launch import Launcher, cdiv as _cdiv, next_pow2 as _next_pow2

try:  # fpkernels/ imports only torch and triton; triton is optional off Linux
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None


if triton is not None:

    @triton.jit
    def _render_heatmaps_gauss_kernel(
        out_ptr,  # (B*T*J*R*R, HO, WO) contiguous; plane m = n*R*R + dy*R + dx
        kp_ptr, vis_ptr,  # (B*T*J, 2) x,y pixels and (B*T*J,), contiguous
        HO, WO, tiles_w, tiles_per_plane, inv,  # output plane size, tiles, 1 / (2 sigma^2)
        R: tl.constexpr,  # pixel-unshuffle factor (1 = plain (H, W) maps)
        BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
    ):
        pid = tl.program_id(0)
        m = pid // tiles_per_plane
        tile = pid % tiles_per_plane
        n = m // (R * R)  # joint map (b, t, j)
        dy = (m // R) % R
        dx = m % R
        u = tl.load(kp_ptr + 2 * n).to(tl.float32)
        v = tl.load(kp_ptr + 2 * n + 1).to(tl.float32)
        vis = tl.load(vis_ptr + n).to(tl.float32)
        yo = (tile // tiles_w) * BLOCK_H + tl.arange(0, BLOCK_H)
        xo = (tile % tiles_w) * BLOCK_W + tl.arange(0, BLOCK_W)
        # pixel centres: x = xo*R + dx, y = yo*R + dy
        ex = (xo * R + dx).to(tl.float32) - u
        ey = (yo * R + dy).to(tl.float32) - v
        # H(x, y) = vis * exp(-(y - v)^2 / 2s^2) * exp(-(x - u)^2 / 2s^2), in the reference's order
        gx = tl.exp(-(ex * ex) * inv)
        gy = vis * tl.exp(-(ey * ey) * inv)
        val = gy[:, None] * gx[None, :]
        offs = m.to(tl.int64) * HO * WO + yo[:, None] * WO + xo[None, :]
        tl.store(out_ptr + offs, val.to(out_ptr.dtype.element_ty), mask=(yo[:, None] < HO) & (xo[None, :] < WO))


_launch_heatmaps = Launcher(_render_heatmaps_gauss_kernel) if triton is not None else None


def _render_heatmaps_triton(keypoints, visibility, height, width, sigma, out_dtype, unshuffle,
                            block_h=None, block_w=None, num_warps=4):
    B, T, J, _ = keypoints.shape
    R = unshuffle
    HO, WO = height // R, width // R
    out = torch.empty((B, T, J * R * R, HO, WO), device=keypoints.device, dtype=out_dtype)
    if out.numel() == 0:
        return out
    kp = keypoints.contiguous()
    vis = visibility if visibility.is_floating_point() else visibility.float()
    vis = vis.contiguous()
    bw = block_w or min(_next_pow2(WO), 256)
    bh = block_h or max(1, min(_next_pow2(HO), 4096 // bw))
    tiles_w = _cdiv(WO, bw)
    tiles = tiles_w * _cdiv(HO, bh)
    inv = 1.0 / (2.0 * float(sigma) ** 2)
    _launch_heatmaps((B * T * J * R * R * tiles,), (out, kp, vis, HO, WO, tiles_w, tiles, inv),
                     {"R": R, "BLOCK_H": bh, "BLOCK_W": bw}, num_warps=num_warps)
    return out


def render_heatmaps(keypoints, visibility, height, width, sigma, out_dtype=torch.float32, *,
                    unshuffle=1, use_kernel=None):
    """Heatmaps (B,T,J,H,W), or (B,T,J*r*r,H/r,W/r) with ``unshuffle=r`` (PixelUnshuffle(r) layout).

    ``out_dtype``: float32, float16 or bfloat16 (the math is fp32 either way). ``use_kernel``: None =
    the Triton kernel on CUDA tensors and the reference elsewhere; True = the kernel (CUDA, or CPU
    under TRITON_INTERPRET=1); False = the reference.
    """
    _check_heatmap_args(keypoints, visibility, height, width, sigma)
    if out_dtype not in _OUT_DTYPES:
        raise ValueError(f"out_dtype: expected torch.float32, torch.float16 or torch.bfloat16, got {out_dtype!r}")
    _check_size("unshuffle", unshuffle)
    if height % unshuffle or width % unshuffle:
        raise ValueError(f"unshuffle: {unshuffle} must divide height and width, got {height}x{width}")
    if use_kernel is None:
        use_kernel = keypoints.is_cuda and triton is not None
    if use_kernel:
        return _render_heatmaps_triton(keypoints, visibility, height, width, sigma, out_dtype, unshuffle)
    maps = render_heatmaps_ref(keypoints, visibility, height, width, sigma, out_dtype)
    if unshuffle == 1:
        return maps
    B, T, J = keypoints.shape[:3]
    maps = torch.nn.functional.pixel_unshuffle(maps.reshape(B * T, J, height, width), unshuffle)
    return maps.reshape(B, T, J * unshuffle * unshuffle, height // unshuffle, width // unshuffle)
