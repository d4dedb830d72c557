"""Training the pose stack (lifter + PhysNet) on real 3D motion (``fpengine train-pose``).

Every step draws a batch of windows (random length, phase, speed, scale, mirroring, time
reversal) from the training part of the motion, sees them through random cameras and makes
detector-like 2D (``pose_data``). Stage 1: the lifter learns root-relative camera-axes 3D from
that 2D, prompted by the mean-pose prior (or, with ``prompt_prob``, by a real (2D, 3D) pair from
another window); the prior buffers are set from the training data first. Stage 2: PhysNet, which
starts as the pass-through physics (its predictions reproduce the neighbouring input frames),
learns forward and reverse Euler-Lagrange predictions that match the next and previous true
frames, from the frozen lifter's S_dd and from true 3D with noise, with Gaussian noise on M^-1
(DESIGN.md step 3). The last ``val_fraction`` of every motion, and every ``val_motion``, is
never trained on. Deterministic for a fixed seed and thread count.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from finephys.model.config import PoseConfig
from finephys.errors import InputError
from finephys.model.lifter import Lifter, normalise_2d
from finephys.poses.camera import to_camera_axes, virtual_camera
from finephys.model.physnet import PhysNet, integrate
from finephys.training.pose_data import Motion, WindowSampler, detector_noise, project, random_cameras, split_ranges
from finephys.training.pose_metrics import eval_inputs, mpjpe_mm, run_stack
from finephys.model.pose_weights import save_pose_weights

MIN_FRAMES = 5


@dataclass(frozen=True)
class TrainOptions:
    epochs: int = 40  # lifter epochs (stage 1)
    physnet_epochs: int = 20  # PhysNet epochs on the frozen lifter (stage 2)
    steps_per_epoch: int = 50
    batch_size: int = 32
    seed: int = 0
    val_fraction: float = 0.2
    lr: float = 2e-3
    physnet_lr: float = 3e-4
    weight_decay: float = 1e-4
    minv_noise: float = 0.01  # std of the M^-1 perturbation, relative to its initial scale fps^2
    noise_px: float = 10.0  # detector noise sigma (up to), pixels at 1000 px person height
    drop: float = 0.15  # dropped-joint rate (up to)
    prompt_prob: float = 0.25
    phys_offset_m: float = 0.08  # PhysNet's noisy-truth input: per-joint offsets (up to), kept
    phys_drift_m: float = 0.03  # ... linear drift over the window (up to), kept
    phys_jitter_m: float = 0.03  # ... frame-to-frame jitter (up to), removed
    max_frames: int = 24

    def check(self) -> None:
        if self.physnet_epochs < 0:
            raise InputError(f"--physnet-epochs: {self.physnet_epochs}, expected >= 0")
        for name in ("epochs", "steps_per_epoch", "batch_size"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')}: {getattr(self, name)}, expected >= 1")
        if not 0 <= self.val_fraction < 1:
            raise InputError(f"--val-fraction: {self.val_fraction}, expected a fraction in [0, 1)")
        if self.max_frames < MIN_FRAMES:
            raise InputError(f"max_frames: {self.max_frames}, expected >= {MIN_FRAMES}")


@dataclass
class History:
    lifter_step: list = field(default_factory=list)
    lifter: list = field(default_factory=list)  # training MPJPE of S_dd, mm (epoch mean)
    physnet_step: list = field(default_factory=list)
    physnet: list = field(default_factory=list)  # training error of the predictions, mm
    val_step: list = field(default_factory=list)
    val_dd: list = field(default_factory=list)  # held-out MPJPE, mm
    val_fused: list = field(default_factory=list)


_FULL_INDEX: dict[int, torch.Tensor] = {}


def _full_index(d: int) -> torch.Tensor:
    """(d, d) positions in the row-major lower triangle: M[r, c] = tril[idx[r, c]]."""
    if d not in _FULL_INDEX:
        r, c = torch.meshgrid(torch.arange(d), torch.arange(d), indexing="ij")
        hi, lo = torch.maximum(r, c), torch.minimum(r, c)
        _FULL_INDEX[d] = hi * (hi + 1) // 2 + lo
    return _FULL_INDEX[d]


def directional_predictions(physnet: PhysNet, s: torch.Tensor, dt: float, minv_noise: float = 0.0):
    """PhysNet's forward predictions of frames 2..T-1 and reverse predictions of frames 0..T-3
    (B,T-2,J,3) each: the two terms ``integrate`` averages into S_pp, kept apart for training."""
    b, t, j, _ = s.shape
    d = 3 * j
    minv, jtau, cor = physnet.predict(s, minv_noise)
    minv, force = minv[:, 1:-1], (jtau - cor)[:, 1:-1]  # frames 1..T-2 make the predictions
    qdd = (minv[..., _full_index(d)] @ force[..., None])[..., 0]  # (B,T-2,2,D)
    q = s.reshape(b, t, d)
    fwd = 2 * q[:, 1:-1] - q[:, :-2] + qdd[:, :, 0] * dt**2
    rev = 2 * q[:, 1:-1] - q[:, 2:] + qdd[:, :, 1] * dt**2
    return fwd.reshape(b, t - 2, j, 3), rev.reshape(b, t - 2, j, 3)


@torch.no_grad()
def init_physnet_passthrough(physnet: PhysNet, fps: float, lift: float = 10.0) -> None:
    """Start PhysNet as the physics that trusts its input: M^-1 = fps^2 I and
    jtau - coriolis = q[t+1] - 2 q[t] + q[t-1] (the window's second difference), so the forward
    and reverse predictions reproduce the neighbouring input frames and S_pp = S_dd; training
    then learns the corrections. The difference passes the SiLU layers on units biased by
    ``lift`` (SiLU(x + lift) = x + lift to 5e-4). Needs hidden >= D; else only M^-1 is scaled."""
    d = physnet.d
    for head in physnet.heads:
        head.minv.bias.mul_(fps**2)
        linears = [m for m in head.body if isinstance(m, torch.nn.Linear)]
        if physnet.cfg.hidden < d:
            continue
        eye = torch.eye(d)
        first = linears[0]
        first.weight[:d].copy_(torch.cat([eye, -2 * eye, eye], dim=1))  # window (a, q, b): a - 2q + b
        first.bias[:d].fill_(lift)
        for layer in linears[1:]:
            layer.weight[:d].zero_()
            layer.weight[:d, :d].copy_(eye)
            layer.weight[d:, :d].zero_()
            layer.bias[:d].zero_()
        head.minv.weight.zero_()
        head.jtau.weight.zero_()
        head.jtau.weight[:, :d].copy_(eye)
        head.jtau.bias.fill_(-lift)
        head.coriolis.weight.zero_()
        head.coriolis.bias.zero_()


def _mpjpe(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).norm(dim=-1).mean()


class _Batcher:
    """Turns world windows into (2D normalised, scores, true 3D) tensors."""

    def __init__(self, sampler: WindowSampler, opts: TrainOptions):
        self.sampler, self.opts = sampler, opts

    def views(self, rng, world, noisy=True):
        cams = random_cameras(rng, world)
        uv, true = project(world, cams)
        if noisy:
            kp, sc = detector_noise(rng, uv, self.opts.noise_px, self.opts.drop)
        else:
            kp, sc = uv, np.ones(uv.shape[:-1])
        kp, sc = torch.as_tensor(kp, dtype=torch.float32), torch.as_tensor(sc, dtype=torch.float32)
        K = torch.as_tensor(cams.matrices(), dtype=torch.float32)
        view, turn = virtual_camera(kp, sc, K)  # as at inference; the targets in the same axes
        true = to_camera_axes(torch.as_tensor(true, dtype=torch.float32), turn.transpose(1, 2))
        return normalise_2d(view, sc), sc, true

    def batch(self, rng, frames):
        return self.views(rng, self.sampler.sample(rng, self.opts.batch_size, frames))


@torch.no_grad()
def estimate_prior(batcher: _Batcher, rng, frames: int, windows: int = 512):
    """Mean root-relative 3D (camera axes) and mean normalised 2D of clean training views."""
    x2, sc, y3 = batcher.views(rng, batcher.sampler.sample(rng, windows, frames), noisy=False)
    return y3.mean(dim=(0, 1)), x2.mean(dim=(0, 1))


def _lr_factor(step: int, total: int, warmup: int = 100) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))


def _val_sets(ranges, fps, max_frames, seed):
    sets = []
    for k, (m, t0, t1) in enumerate(ranges):
        inputs = eval_inputs(m, t0, t1, fps, phases=2, cameras=3, seed=seed + k, max_frames=max_frames)
        if inputs is not None:
            sets.append(inputs)
    return sets


def _validate(lifter, physnet, sets, fps, fuse_weight):
    if not sets:
        return None
    errs = {"dd": [], "fused": []}
    for inputs in sets:
        s_dd, _, s_fused = run_stack(lifter, physnet, inputs, fps, fuse_weight)
        errs["dd"].append(mpjpe_mm(s_dd, inputs.true).ravel())
        errs["fused"].append(mpjpe_mm(s_fused, inputs.true).ravel())
    return {k: float(np.concatenate(v).mean()) for k, v in errs.items()}


def _lifter_step(lifter, batcher, sampler, rng, frames, opts):
    """One batch of the lifter's loss: MPJPE (metres) of S_dd, prompted by the mean-pose prior
    or (with ``prompt_prob``) by a real (2D, 3D) pair from another window."""
    x2, sc, y3 = batcher.batch(rng, frames)
    p2, p3 = (v.clone() for v in lifter.prior_prompt(len(x2), frames))
    real = rng.random(len(x2)) < opts.prompt_prob
    if real.any():
        q2, _, q3 = batcher.views(rng, sampler.sample(rng, int(real.sum()), frames), noisy=False)
        p2[torch.as_tensor(real)], p3[torch.as_tensor(real)] = q2, q3
    return _mpjpe(lifter(x2, sc, p2, p3), y3)


def _physnet_step(lifter, physnet, batcher, rng, frames, fps, opts):
    """One batch of PhysNet's loss: error (metres) of its forward and reverse predictions.

    Two inputs per window: S_dd of the (frozen) lifter, whose predictions must match the true
    frames; and the true 3D plus per-joint offsets and drift (which it must keep: a lifter's
    slow errors, which no neighbouring frame reveals) plus frame-to-frame jitter (which it must
    remove)."""
    x2, sc, y3 = batcher.batch(rng, frames)
    with torch.no_grad():
        s_dd = lifter(x2, sc)
    b, t = y3.shape[:2]
    f32 = lambda a: torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
    amp = lambda hi: f32(rng.uniform(0, hi, (b, 1, 1, 1)))  # noqa: E731
    slow = amp(opts.phys_offset_m) * f32(rng.normal(size=(b, 1, 17, 3)))
    slow = slow + amp(opts.phys_drift_m) * f32(rng.normal(size=(b, 1, 17, 3))) * torch.linspace(-1, 1, t)[:, None, None]
    kept = y3 + slow
    kept = kept - kept[:, :, :1]
    jitter = amp(opts.phys_jitter_m) * f32(rng.normal(size=tuple(y3.shape)))
    jitter[:, :, 0] = 0
    s_in, target = torch.cat([s_dd, kept + jitter]), torch.cat([y3, kept])
    fwd, rev = directional_predictions(physnet, s_in, 1.0 / fps, opts.minv_noise * fps**2)
    return 0.5 * (_mpjpe(fwd, target[:, 2:]) + _mpjpe(rev, target[:, :-2]))


@torch.no_grad()
def fit_fuse_weights(lifter, physnet, batcher: _Batcher, rng, fps: float, frames: int,
                     windows: int = 640) -> tuple[float, ...]:
    """Per joint, the w that minimises |w S_dd + (1 - w) S_pp - truth|^2 over noisy training
    windows, in closed form (``best_blend``). The root gets 1: S_dd's root is 0, as the truth's
    (root-relative), while S_pp's is not quite."""
    terms = []
    for _ in range(max(1, windows // batcher.opts.batch_size)):
        x2, sc, y3 = batcher.batch(rng, frames)
        s_dd = lifter(x2, sc)
        minv, jtau, cor = physnet.predict(s_dd)
        terms.append((s_dd, integrate(s_dd, minv, jtau, cor, 1.0 / fps, 0.0)[0], y3))
    return best_blend(terms)


def best_blend(terms) -> tuple[float, ...]:
    """[(S_dd, S_pp, truth) (B,T,J,3), ...] -> per joint the least-squares w of
    w S_dd + (1 - w) S_pp ~ truth, clipped to [0, 1], rounded to 4 places; 0.5 where S_dd = S_pp."""
    num = den = 0.0
    for s_dd, s_pp, truth in terms:
        a, b = (s_dd - s_pp).double(), (truth - s_pp).double()
        num, den = num + (a * b).sum(dim=(0, 1, 3)), den + (a * a).sum(dim=(0, 1, 3))
    w = torch.where(den > 1e-12, num / den.clamp(min=1e-12), torch.full_like(den, 0.5)).clamp(0, 1)
    return tuple(round(float(x), 4) for x in w)


def train_pose(motions: list[Motion], pose_cfg: PoseConfig, fps: float, opts: TrainOptions,
               val_motions: list[Motion] = (), progress: bool = True, log=print, fit_fuse_weight: bool = False):
    """Train a lifter and PhysNet of ``pose_cfg`` at ``fps``; -> (lifter, physnet, History, info).

    Stage 1 (``epochs``) trains the lifter; stage 2 (``physnet_epochs``) trains PhysNet on the
    frozen lifter, starting from the pass-through physics (``init_physnet_passthrough``). With
    ``fit_fuse_weight``, one fusion weight per joint is then fitted (``fit_fuse_weights``) and
    returned as ``info["fuse_weight"]`` (``save_trained`` puts it into the file's pose config)."""
    opts.check()
    train_ranges, val_ranges = split_ranges(motions, opts.val_fraction)
    val_ranges += [(m, 0.0, m.duration) for m in val_motions]
    sampler = WindowSampler(train_ranges, fps)
    longest = max((f for f in range(MIN_FRAMES, opts.max_frames + 1) if sampler.usable(f)), default=0)
    if longest < MIN_FRAMES:
        raise InputError(f"the training part of the motion ({sum(t1 - t0 for _, t0, t1 in train_ranges):.2f} s"
                         f" in {len(train_ranges)} sequences) holds no window of {MIN_FRAMES} frames at "
                         f"{fps:g} fps, expected longer motion")
    rng = np.random.default_rng(opts.seed)
    torch.manual_seed(opts.seed)
    lifter, physnet = Lifter(pose_cfg.lifter), PhysNet(pose_cfg.physnet)
    init_physnet_passthrough(physnet, fps)
    batcher = _Batcher(sampler, opts)
    mean3, mean2 = estimate_prior(batcher, np.random.default_rng(opts.seed + 1), longest)
    lifter.mean_pose_3d.copy_(mean3)
    lifter.mean_pose_2d.copy_(mean2)
    val_sets = _val_sets(val_ranges, fps, opts.max_frames, opts.seed + 2)
    hist = History()
    start = time.perf_counter()
    n = opts.steps_per_epoch
    stages = (("lifter", lifter, opts.epochs, opts.lr), ("physnet", physnet, opts.physnet_epochs, opts.physnet_lr))
    bar = tqdm(total=n * (opts.epochs + opts.physnet_epochs), desc="train-pose", disable=not progress, unit="step")
    step = 0
    for name, module, epochs, lr in stages:
        params = list(module.parameters())
        optim = torch.optim.AdamW(params, lr=lr, weight_decay=opts.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s, total=epochs * n: _lr_factor(s, total))
        module.train()
        for epoch in range(epochs):
            total = 0.0
            for _ in range(n):
                frames = int(rng.integers(MIN_FRAMES, longest + 1))
                if name == "lifter":
                    loss = _lifter_step(lifter, batcher, sampler, rng, frames, opts)
                else:
                    loss = _physnet_step(lifter, physnet, batcher, rng, frames, fps, opts)
                optim.zero_grad(set_to_none=True)
                loss.backward()
                norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
                value, grad = torch.stack([loss.detach(), norm.to(loss.dtype)]).tolist()  # one read back a step
                if not (math.isfinite(value) and math.isfinite(grad)):  # NaN weights otherwise
                    raise InputError(f"the {name} loss diverged at step {step + 1} (loss {value:g}, gradient "
                                     f"norm {grad:g}), expected finite; no weights written")
                optim.step()
                sched.step()
                total += value
                step += 1
                bar.update(1)
                bar.set_postfix({f"{name}_mm": f"{value * 1000:.0f}"})
            getattr(hist, name).append(total / n * 1000)
            getattr(hist, f"{name}_step").append(step)
            module.eval()
            val = _validate(lifter, physnet, val_sets, fps, pose_cfg.fuse_weight)
            module.train()
            if val is not None:
                hist.val_step.append(step)
                hist.val_dd.append(val["dd"])
                hist.val_fused.append(val["fused"])
            if log is not None and (epoch == epochs - 1 or not progress):
                msg = f"{name} epoch {epoch + 1}/{epochs}: train error {total / n * 1000:.1f} mm"
                if val is not None:
                    msg += f"; held-out MPJPE S_dd {val['dd']:.1f} mm, S_fused {val['fused']:.1f} mm"
                log(msg)
        module.eval()
    bar.close()
    fuse_weight = fitted_val = None
    if fit_fuse_weight:
        fuse_weight = fit_fuse_weights(lifter, physnet, batcher, np.random.default_rng(opts.seed + 3), fps,
                                       min(16, longest))
        val = _validate(lifter, physnet, val_sets, fps, fuse_weight)
        fitted_val = None if val is None else val["fused"]
        if log is not None:
            msg = f"fitted one fusion weight per joint: {', '.join(f'{w:.2f}' for w in fuse_weight)}"
            if val is not None and hist.val_fused:
                msg += f"; held-out MPJPE S_fused {val['fused']:.1f} mm (fixed {pose_cfg.fuse_weight}: {hist.val_fused[-1]:.1f})"
            log(msg)
    info = {
        "options": dataclasses.asdict(opts), "fps": fps,
        "train": [[m.name, round(t0, 4), round(t1, 4)] for m, t0, t1 in train_ranges],
        "held_out": [[m.name, round(t0, 4), round(t1, 4)] for m, t0, t1 in val_ranges],
        "seconds": round(time.perf_counter() - start, 1),
        "final": {"train_lifter_mm": hist.lifter[-1] if hist.lifter else None,
                  "train_physnet_mm": hist.physnet[-1] if hist.physnet else None,
                  "val_dd_mm": hist.val_dd[-1] if hist.val_dd else None,
                  "val_fused_mm": hist.val_fused[-1] if hist.val_fused else None},
    }
    if fuse_weight is not None:
        info["final"]["val_fused_fitted_mm"] = fitted_val
        info["fuse_weight"] = list(fuse_weight)
    return lifter, physnet, hist, info


def save_trained(path, lifter, physnet, pose_cfg: PoseConfig, fps: float, info: dict) -> Path:
    """Write the weights (fp16; ``load_pose_stack`` reads them back as fp32)."""
    for module in (lifter, physnet):
        if not all(torch.isfinite(t).all() for t in module.state_dict().values() if t.is_floating_point()):
            raise InputError(f"{path}: the trained weights hold NaN or inf, expected finite; not written")
    info = dict(info)
    info.pop("seconds", None)  # keep the file identical across runs of one seed
    if "fuse_weight" in info:  # the fitted weights go into the file's pose config
        pose_cfg = dataclasses.replace(pose_cfg, fuse_weight=info.pop("fuse_weight"))
    return save_pose_weights(Path(path), lifter, physnet, pose_cfg, fps, info)
