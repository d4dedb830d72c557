"""PhysNet's physics step in plain torch: the argument checks and ``physnet_fused_ref``, the ground
truth of the fused kernel in ``fpkernels.physnet`` (see its docstring for the contract). Imports no
triton: the reference path (the CPU, the packaged backends) loads without it."""
import math
import numbers

import torch

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # the kernel's; the reference also takes float64


# --------------------------------------------------------------------------------------------------
# argument checks (shared by the kernel and the reference)
# --------------------------------------------------------------------------------------------------
def _is_real(v):
    """A real number that is not a bool (float and int first: ``numbers.Real`` is a slow ABC check)."""
    t = type(v)
    return t is float or t is int or (t is not bool and isinstance(v, numbers.Real))


def _check_physnet_args(s_dd, minv_tril, jtau, coriolis, dt, fuse_weight, dtypes=_DTYPES + (torch.float64,)):
    """Validate; return (B, T, J, D). Every error is a ValueError whose message starts with the argument."""
    dims = _check_tensors(s_dd, minv_tril, jtau, coriolis, dtypes)
    _check_numbers(dt, fuse_weight)
    return dims


def _check_tensors(s_dd, minv_tril, jtau, coriolis, dtypes):
    """The four tensors' types, shapes, dtypes and devices; return (B, T, J, D)."""
    for name, x in (("s_dd", s_dd), ("minv_tril", minv_tril), ("jtau", jtau), ("coriolis", coriolis)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if s_dd.dim() != 4 or s_dd.shape[-1] != 3 or s_dd.shape[2] < 1:
        raise ValueError(f"s_dd: expected shape (B,T,J,3), got {tuple(s_dd.shape)}")
    B, T, J, _ = s_dd.shape
    if T < 3:
        raise ValueError(f"s_dd: PhysNet needs at least 3 frames (one-sided predictions at both ends), got T={T}")
    if s_dd.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"s_dd: expected dtype {names}, got {s_dd.dtype}")
    D = 3 * J
    P = D * (D + 1) // 2
    for name, x, shape in (
        ("minv_tril", minv_tril, (B, T, 2, P)),
        ("jtau", jtau, (B, T, 2, D)),
        ("coriolis", coriolis, (B, T, 2, D)),
    ):
        if x.shape != shape:
            raise ValueError(
                f"{name}: expected shape (B,T,2,{'D(D+1)/2' if name == 'minv_tril' else 'D'}) = {shape} "
                f"for s_dd of shape {tuple(s_dd.shape)} (D = 3J = {D}), got {tuple(x.shape)}"
            )
        if x.dtype != s_dd.dtype:
            raise ValueError(f"{name}: expected dtype {s_dd.dtype} (the dtype of s_dd), got {x.dtype}")
        if x.device != s_dd.device:
            raise ValueError(f"{name}: expected device {s_dd.device} (the device of s_dd), got {x.device}")
    return B, T, J, D


def _check_numbers(dt, fuse_weight):
    if not _is_real(dt) or not math.isfinite(dt) or dt <= 0:
        raise ValueError(f"dt: expected a finite number > 0 (1/fps), got {dt!r}")
    if not _is_real(fuse_weight) or not (0.0 <= fuse_weight <= 1.0):
        raise ValueError(f"fuse_weight: expected a number in [0, 1], got {fuse_weight!r}")


# --------------------------------------------------------------------------------------------------
# reference
# --------------------------------------------------------------------------------------------------
def _tril_index(D, device):
    """(D,D) index of M[i,k] in the packed row-major lower triangle: max*(max+1)/2 + min."""
    r = torch.arange(D, device=device)
    hi = torch.maximum(r[:, None], r[None, :])
    lo = torch.minimum(r[:, None], r[None, :])
    return hi * (hi + 1) // 2 + lo


def physnet_fused_ref(s_dd, minv_tril, jtau, coriolis, dt, fuse_weight=0.5):
    """Plain-torch reference: fp32 math (fp64 for fp64 inputs), outputs in the input dtype.

    Returns (s_pp, s_fused, qdd).
    """
    B, T, J, D = _check_physnet_args(s_dd, minv_tril, jtau, coriolis, dt, fuse_weight)
    dtype = s_dd.dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    q = s_dd.to(acc).reshape(B, T, D)
    minv = minv_tril.to(acc)[..., _tril_index(D, s_dd.device)]  # (B,T,2,D,D), symmetric
    f = jtau.to(acc) - coriolis.to(acc)  # (B,T,2,D)
    qdd = torch.matmul(minv, f.unsqueeze(-1)).squeeze(-1)  # (B,T,2,D)
    dt2 = float(dt) * float(dt)
    # predictions made at t = 1..T-2: forward lands on t+1 (frames 2..T-1), reverse on t-1 (frames 0..T-3)
    q_fwd = 2 * q[:, 1:-1] - q[:, :-2] + qdd[:, 1:-1, 0] * dt2
    q_rev = 2 * q[:, 1:-1] - q[:, 2:] + qdd[:, 1:-1, 1] * dt2
    total = torch.zeros_like(q)
    count = torch.zeros(1, T, 1, device=q.device, dtype=q.dtype)
    total[:, 2:] += q_fwd
    count[:, 2:] += 1
    total[:, :-2] += q_rev
    count[:, :-2] += 1
    s_pp = torch.where(count > 0, total / count.clamp(min=1), q)
    w = float(fuse_weight)
    s_fused = w * q + (1.0 - w) * s_pp
    return (
        s_pp.reshape(B, T, J, 3).to(dtype),
        s_fused.reshape(B, T, J, 3).to(dtype),
        qdd.to(dtype),
    )
