"""``fpengine train``: trains FinePhys guidance on (video, 2D pose clip, caption) samples.

The conditioning path is the one inference takes: 2D joints (through the pose stack with
``pose_stack``), heatmaps at the video size, the heatmap encoder, its features added inside the
UNet's down blocks. The loss is DDPM noise prediction (epsilon, the scheduler's training betas),
with the caption dropped to "" for ``text_dropout`` of the clips (classifier-free guidance).

What is trained (``--train``):
- ``encoder,lora``: the heatmap encoder and a LoRA on the UNet's spatial attention; the backbone
  is frozen (the recipe for SD 1.5 + AnimateDiff weights);
- ``all``: every module of a small model: first the VAE alone (``vae_steps``, reconstruction +
  a small KL term; the latent scaling factor is then measured), then UNet, motion modules,
  text encoder, heatmap encoder and LoRA together.

Training state (weights, EMA, optimiser, losses) goes to ``<out>.training/`` every
``checkpoint_every`` steps and when ``time_limit`` minutes are up; ``resume`` continues from it.
Batches and noise of step k come from ``(seed, k)`` and the learning rate is constant after its
warm-up, so a resumed run, or one cut short by ``time_limit``, follows what an unbroken run of
the same number of steps does. (With ``lr_schedule="cosine"`` the rate falls to 0 at ``steps``:
a run cut short stops above 0, and a resumed one must keep its ``steps``.) The result, written to
``out`` when the run ends or stops, is a normal FinePhys checkpoint (EMA weights).
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from finephys.files import check_new_path
from finephys.model.checkpoint import load_checkpoint, read_config, save_checkpoint
from finephys.model.config import LoraConfig
from finephys.errors import InputError
from finephys.training.loss_plot import plot_history
from finephys.model.assembly import apply_lora, new_lora, new_parts
from finephys.model.build import build_scheduler
from finephys.model.encoder import HeatmapEncoder
from finephys.sampler.poses import guidance_heatmaps, pose_stack
from finephys.sampler.options import check_video_size
from finephys.model.text import tokenize
from finephys.model.unet import PoseGuidedUNet
from finephys.poses.layouts import H36M17
from finephys.training.figure import segment_offsets

MODULES = ("encoder", "lora", "unet", "text_encoder", "vae", "vae_decoder")
DIFFUSION_MODULES = ("encoder", "lora", "unet", "text_encoder")
PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class GenTrainOptions:
    train: tuple[str, ...] = ("encoder", "lora")
    steps: int = 1000
    vae_steps: int = 0
    vae_batch_size: int = 48  # frames per VAE step
    vae_figure_weight: float = 0.0  # extra weight of the pixels on the figure in the VAE loss
    figure_weight: float = 0.0  # extra weight of the latent pixels on the figure in the diffusion loss
    batch_size: int = 4  # clips per step
    frames: int | None = None  # default: the model's num_frames
    height: int | None = None  # default: the model's size
    width: int | None = None
    lr: float = 1e-4
    lr_schedule: str = "constant"  # after the warm-up: constant, or cosine down to 0 at ``steps``
    vae_lr: float = 1e-3
    weight_decay: float = 1e-2
    warmup: int = 200
    ema: float = 0.999
    text_dropout: float = 0.1
    lora_rank: int | None = None  # a new LoRA's rank (default: the checkpoint's, else 64)
    pose_stack: bool = False
    precision: str = "fp32"
    seed: int = 0
    val_fraction: float = 0.2
    val_every: int = 100
    checkpoint_every: int = 500
    time_limit: float | None = None  # minutes for this call
    compile: bool = False  # torch.compile the UNet for the training steps (GPU)
    vae_from: str | None = None  # a checkpoint whose VAE (and latent scaling) replaces the one of ckpt

    def check(self) -> None:
        bad = [m for m in self.train if m not in MODULES]
        if not self.train or bad:
            raise InputError(f"--train {','.join(self.train)}: expected 'all' or a comma-separated subset of "
                             f"{', '.join(MODULES)}")
        for name in ("steps", "batch_size", "vae_batch_size", "val_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')}: {getattr(self, name)}, expected >= 1")
        if self.frames is not None and self.frames < 3:  # unset: the model's (as the CLI checks them)
            raise InputError(f"--frames {self.frames}: expected at least 3")
        if self.height is not None or self.width is not None:
            check_video_size(8 if self.height is None else self.height, 8 if self.width is None else self.width)
        if "vae" in self.train and "vae_decoder" in self.train:
            raise InputError("--train: vae (the whole VAE) or vae_decoder (its decoder alone), not both")
        trains_vae = "vae" in self.train or "vae_decoder" in self.train
        if self.vae_steps < 0 or (self.vae_steps and not trains_vae):
            raise InputError(f"--vae-steps {self.vae_steps}: expected >= 0, and 0 unless the VAE is trained")
        if trains_vae and not self.vae_steps:
            raise InputError("--vae-steps 0: the VAE is trained, expected the number of VAE steps")
        for name in ("vae_figure_weight", "figure_weight"):
            if not math.isfinite(getattr(self, name)) or getattr(self, name) < 0:
                raise InputError(f"--{name.replace('_', '-')} {getattr(self, name)}: expected a number >= 0")
        if self.precision not in PRECISIONS:
            raise InputError(f"--precision {self.precision!r}: expected one of {', '.join(PRECISIONS)}")
        if not 0 <= self.text_dropout < 1 or not 0 < self.val_fraction < 1:
            raise InputError("--text-dropout / --val-fraction: expected fractions in [0, 1) / (0, 1)")
        if not math.isfinite(self.lr) or self.lr <= 0:
            raise InputError(f"--lr {self.lr}: expected a number > 0")
        if self.lr_schedule not in LR_SCHEDULES:
            raise InputError(f"--lr-schedule {self.lr_schedule}: expected one of {', '.join(LR_SCHEDULES)}")
        if self.lora_rank is not None and self.lora_rank < 1:
            raise InputError(f"--lora-rank {self.lora_rank}: expected >= 1")
        if self.time_limit is not None and not self.time_limit > 0:
            raise InputError(f"--time-limit {self.time_limit}: expected minutes > 0")


@dataclass
class TrainHistory:
    vae_step: list = field(default_factory=list)
    vae: list = field(default_factory=list)
    step: list = field(default_factory=list)
    loss: list = field(default_factory=list)
    val_step: list = field(default_factory=list)
    val: list = field(default_factory=list)

    @property
    def vae_mean(self) -> list:
        return _running_mean(self.vae)

    @property
    def loss_mean(self) -> list:
        return _running_mean(self.loss)


def _running_mean(values: list, n: int = 50) -> list:
    """Mean of the last ``n`` values at every step (what the loss curve draws: one step is noise)."""
    c = np.cumsum([0.0, *values])
    return [(c[i + 1] - c[max(0, i + 1 - n)]) / (i + 1 - max(0, i + 1 - n)) for i in range(len(values))]


SERIES = (("vae_mean", "vae_step", "VAE reconstruction loss (mean of 50 steps)", (120, 120, 120)),
          ("loss_mean", "step", "train noise MSE (mean of 50 steps)", (40, 110, 220)),
          ("val", "val_step", "held-out noise MSE", (200, 40, 60)))


class _Ema:
    def __init__(self, params, decay: float):
        self.params, self.decay = list(params), decay
        self.shadow = [p.detach().clone().float() for p in self.params]

    @torch.no_grad()
    def update(self, step: int):
        d = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.shadow, [p.float() for p in self.params], 1 - d)

    @torch.no_grad()
    def copy_to_model(self):
        for p, s in zip(self.params, self.shadow):
            p.copy_(s.to(p.dtype))


def figure_weights(keypoints: torch.Tensor, height: int, width: int, reach: float = 0.08,
                   scores: torch.Tensor | None = None) -> torch.Tensor:
    """(N,1,H,W) in [0,1]: how close each pixel lies to the figure drawn on H36M-17 joints
    (N,17,2) pixels: a Gaussian of the distance to the nearest bone, its sigma ``reach`` x the
    skeleton's larger side (the limbs and head around the bones, a little background). With
    ``scores`` (N,17), a joint scored 0 (not found) adds no bone and no extent."""
    kp = keypoints.float()
    seen = torch.ones(kp.shape[:2], dtype=torch.bool, device=kp.device) if scores is None else scores > 0
    edges = torch.tensor(H36M17.edges, device=kp.device)
    a, b = kp[:, edges[:, 0]], kp[:, edges[:, 1]]  # (N,E,2)
    ys = torch.arange(height, device=kp.device, dtype=kp.dtype).view(1, 1, height, 1)
    xs = torch.arange(width, device=kp.device, dtype=kp.dtype).view(1, 1, 1, width)
    _, dx, dy = segment_offsets(a, b, xs, ys)  # (N,E,H,W)
    d2 = dx * dx + dy * dy
    bone = (seen[:, edges[:, 0]] & seen[:, edges[:, 1]])[..., None, None]  # (N,E,1,1)
    d2 = d2.masked_fill(~bone, float("inf")).amin(dim=1, keepdim=True)  # (N,1,H,W)
    hi = kp.masked_fill(~seen[..., None], -float("inf")).amax(1)
    lo = kp.masked_fill(~seen[..., None], float("inf")).amin(1)
    side = (hi - lo).amax(-1).clamp_min(4.0).view(-1, 1, 1, 1)  # none seen: -inf, so 4
    return torch.exp(-d2 / (2 * (reach * side) ** 2))


def latent_figure_weights(keypoints: torch.Tensor, scores: torch.Tensor, height: int, width: int,
                          latent: tuple[int, int]) -> torch.Tensor:
    """``figure_weights`` (N,17,2) -> (N,1,H,W) averaged over each latent pixel: (N,1,h,w). Done a
    few frames at a time, so the (frames, bones, H, W) distances stay near 2^24 values."""
    chunk = max(1, (1 << 24) // (len(H36M17.edges) * height * width))
    return torch.cat([torch.nn.functional.adaptive_avg_pool2d(
        figure_weights(keypoints[i:i + chunk], height, width, scores=scores[i:i + chunk]), latent)
        for i in range(0, len(keypoints), chunk)])


def _swap_vae(parts, donor: Path, seed: int = 0) -> None:
    """Put the VAE of checkpoint ``donor`` (with its latent scaling) into ``parts``. A VAE with
    another scale factor (pixels per latent pixel) also moves the UNet to the new latent size: the
    heatmap encoder then unshuffles by the new factor, its first convolution (the only weights
    that depend on it) made anew from ``seed``, the rest kept."""
    other = load_checkpoint(donor)
    latent = other.vae.config.latent_channels
    if latent != parts.unet.config.in_channels:
        raise InputError(f"--vae-from {donor}: its VAE has {latent} latent channels, expected the UNet's "
                         f"{parts.unet.config.in_channels}")
    cfg = dataclasses.replace(parts.config, vae=dict(other.config.vae))
    factor = cfg.vae_scale_factor
    if factor != parts.config.encoder.unshuffle:
        enc = dataclasses.replace(cfg.encoder, unshuffle=factor)
        cfg = dataclasses.replace(cfg, encoder=enc, unet=dict(cfg.unet, sample_size=cfg.height // factor))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            encoder = HeatmapEncoder(enc)
        kept = {k: v for k, v in parts.encoder.state_dict().items() if not k.startswith("conv_in.")}
        encoder.load_state_dict({**encoder.state_dict(), **kept})
        parts.encoder = encoder
    parts.vae = other.vae
    parts.config = cfg


LR_SCHEDULES = ("constant", "cosine")


def _short_warmup(warmup: int, total: int) -> int:
    """The warm-up of a run of ``total`` steps: at most a quarter of it (a short run still gets past it)."""
    return min(warmup, total // 4 + 1)


def _lr(step: int, warmup: int, schedule: str = "constant", total: int = 1) -> float:
    """Linear warm-up, then constant (the EMA does the averaging), so a run cut short by
    ``time_limit`` has followed the same schedule as a longer one; or, with ``cosine``, down to 0
    at ``total`` on half a cosine (a last stage that settles: give it the steps that fit)."""
    if schedule == "cosine":
        warmup = _short_warmup(warmup, total)  # a short run still falls
    rise = min(1.0, (step + 1) / warmup)
    if schedule == "constant" or step < warmup:
        return rise
    f = min((step - warmup) / max(total - warmup, 1), 1.0)
    return (1 + math.cos(math.pi * f)) / 2


def check_run(ckpt: Path, out: Path, opts: GenTrainOptions, resume: bool = False, overwrite: bool = False) -> Path:
    """The options, the output and its training state, and the LoRA rank against the checkpoint's,
    checked before any data is read; returns the training-state folder (OUT.training)."""
    opts.check()
    out = Path(out)
    state_dir = out.with_name(out.name + ".training")
    if state_dir.exists() and not resume and not overwrite:
        raise InputError(f"{state_dir} holds an earlier run's training state: pass --resume to continue "
                         f"it or --overwrite to start again")
    if resume and not (state_dir / "state.json").is_file():
        raise InputError(f"--resume: no training state in {state_dir}")
    if out.exists() and out.resolve() == Path(ckpt).resolve():
        raise InputError(f"--out {out} is the checkpoint folder itself (--ckpt): pick a new folder")
    check_new_path(out, overwrite or resume, "--out", folder=True)
    lora = read_config(ckpt).lora
    if opts.lora_rank is not None and lora is not None and lora.rank != opts.lora_rank and \
            (Path(ckpt) / "lora").is_dir():
        raise InputError(f"--lora-rank {opts.lora_rank}: {ckpt} already has a LoRA of rank {lora.rank}, which "
                         "training goes on with (leave --lora-rank out, or start from a checkpoint without one)")
    return state_dir


class Trainer:
    def __init__(self, ckpt: Path, source, out: Path, opts: GenTrainOptions, device="cpu",
                 resume: bool = False, overwrite: bool = False, progress: bool = True):
        self.state_dir = check_run(ckpt, out, opts, resume, overwrite)
        self.opts, self.source, self.out, self.device, self.progress = opts, source, Path(out), torch.device(device), progress
        self.ckpt = Path(ckpt)
        parts = load_checkpoint(self.ckpt)
        if opts.vae_from:
            _swap_vae(parts, Path(opts.vae_from), opts.seed)
        self.trains = set(opts.train)
        if "lora" in self.trains and not parts.lora:
            rank = opts.lora_rank or (parts.config.lora.rank if parts.config.lora else 64)
            parts.config = dataclasses.replace(parts.config, lora=LoraConfig(rank=rank, alpha=float(rank)))
            parts.lora = new_lora(parts, rank, torch.Generator().manual_seed(opts.seed), text=False,
                                  a_std=1.0 / rank, b_std=0.0)
        self.parts = parts
        self.base_cfg = parts.config
        apply_lora(parts)
        self.modules = {"encoder": parts.encoder, "unet": parts.unet, "text_encoder": parts.text_encoder,
                        "vae": parts.vae, "lifter": parts.lifter, "physnet": parts.physnet}
        for m in self.modules.values():
            m.to(self.device).requires_grad_(False).eval()
        self.params = self._select()
        self.vae_params = self._vae_params()
        self.unet = PoseGuidedUNet(parts.unet)
        self.train_unet = torch.compile(self.unet) if opts.compile and self.device.type == "cuda" else self.unet
        self._pending = []  # (step, loss tensor) not yet read back: reading every step stalls the GPU queue
        self.sched = build_scheduler(parts.config)
        self.alphas = self.sched.alphas_cumprod.to(self.device, torch.float32)
        self.opt = torch.optim.AdamW(self.params, lr=opts.lr, weight_decay=opts.weight_decay) if self.params else None
        self.vae_opt = torch.optim.AdamW(self.vae_params, lr=opts.vae_lr) if self.vae_params else None
        self.ema = _Ema(self.params, opts.ema)
        self.hist, self.step, self.vae_step = TrainHistory(), 0, 0
        self.scaling = float(parts.vae.config.scaling_factor)
        cfg = parts.config
        self.frames = cfg.num_frames if opts.frames is None else opts.frames
        self.size = (cfg.height if opts.height is None else opts.height, cfg.width if opts.width is None else opts.width)
        self.amp = PRECISIONS[opts.precision] if self.device.type == "cuda" else None
        self.scaler = torch.amp.GradScaler("cuda") if self.amp == torch.float16 else None
        if resume:
            self._load_state()

    def _vae_params(self) -> list:
        """The VAE's trainable parameters: all of it ('vae'), or the decoder alone ('vae_decoder',
        the latent space, and so a trained UNet, stays as it is)."""
        vae = self.parts.vae
        if "vae" in self.trains:
            params = list(vae.parameters())
        elif "vae_decoder" in self.trains:
            params = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
        else:
            return []
        for p in params:
            p.requires_grad_(True)
        return params

    def _select(self) -> list:
        """Trainable parameters of the diffusion modules; 'lora' = the peft adapter factors."""
        out = []
        for name in ("encoder", "unet", "text_encoder"):
            for pname, p in self.modules[name].named_parameters():
                is_lora = ".lora_" in pname
                if (is_lora and "lora" in self.trains) or (not is_lora and name in self.trains):
                    p.requires_grad_(True)
                    out.append(p)
        if not out and self.trains & set(DIFFUSION_MODULES):
            raise InputError(f"--train {','.join(sorted(self.trains))}: nothing to train in this checkpoint")
        return out

    # ---- one step -----------------------------------------------------------------------
    def _rng(self, step: int, stage: int):
        rng = np.random.default_rng([self.opts.seed, stage, step])
        gen = torch.Generator(self.device).manual_seed(int(rng.integers(1 << 62)))
        return rng, gen

    def _autocast(self):
        if self.amp is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.amp)

    def _latents(self, frames: torch.Tensor, gen) -> torch.Tensor:
        b, t = frames.shape[:2]
        with torch.no_grad(), self._autocast():
            dist = self.parts.vae.encode(frames.flatten(0, 1)).latent_dist
            z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen, device=self.device)
        z = z.float() * self.scaling
        return z.view(b, t, *z.shape[1:]).permute(0, 2, 1, 3, 4)

    def _guidance(self, batch):
        kp, sc = batch.keypoints, batch.scores
        h, w = self.size
        if self.opts.pose_stack:
            cfg = self.parts.config
            kp = pose_stack(self.parts, kp, sc, cfg.fps, cfg.pose.fuse_weight)[3]
            sc = torch.ones_like(sc)
        return guidance_heatmaps(self.parts.config, kp, (sc > 0).float(), h, w).flatten(0, 1)

    def diffusion_loss(self, batch, gen, rng, weighted: bool = True) -> torch.Tensor:
        """The DDPM noise MSE; with ``figure_weight`` w (and ``weighted``), a latent pixel near the
        figure's skeleton weighs up to 1 + w (the mean of its pixels' weights)."""
        b, t = batch.frames.shape[:2]
        latents = self._latents(batch.frames, gen)
        captions = ["" if rng.random() < self.opts.text_dropout else c for c in batch.captions]
        ids = tokenize(self.parts.tokenizer, captions).to(self.device)
        steps = torch.randint(0, len(self.alphas), (b,), generator=gen, device=self.device)
        noise = torch.randn(latents.shape, generator=gen, device=self.device)
        a = self.alphas[steps].view(b, 1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        with self._autocast():
            feats = self.parts.encoder(self._guidance(batch))
            text = self.parts.text_encoder(ids)[0].repeat_interleave(t, dim=0)
            pred = self.train_unet(noisy, steps, text, feats)
        if not (weighted and self.opts.figure_weight):
            return torch.nn.functional.mse_loss(pred.float(), noise)
        near = latent_figure_weights(batch.keypoints.flatten(0, 1), batch.scores.flatten(0, 1),
                                     *batch.frames.shape[-2:], noise.shape[-2:])  # (B*T,1,h,w)
        weight = (1 + self.opts.figure_weight * near).view(b, t, 1, *noise.shape[-2:]).transpose(1, 2)
        err = (pred.float() - noise) ** 2 * weight
        return err.sum() / (weight.sum() * noise.shape[1])

    def _compiled_loss(self, batch, gen, rng) -> torch.Tensor:
        """The loss through the compiled UNet; if compiling fails, one line and the eager UNet."""
        if self.train_unet is self.unet:
            return self.diffusion_loss(batch, gen, rng)
        try:
            return self.diffusion_loss(batch, gen, rng)
        except Exception as exc:  # noqa: BLE001 - any compiler failure: train eagerly instead
            tqdm.write(f"torch.compile failed ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); "
                       "training eagerly")
            self.train_unet = self.unet
            return self.diffusion_loss(batch, gen, rng)

    def _flush(self) -> None:
        """Read the pending losses back into the history (one synchronisation for many steps)."""
        if self._pending:
            values = torch.stack([v for _, v in self._pending]).float().tolist()
            self.hist.step.extend(s for s, _ in self._pending)
            self.hist.loss.extend(values)
            self._pending = []

    def vae_loss(self, frames: torch.Tensor, gen, keypoints: torch.Tensor | None = None,
                 scores: torch.Tensor | None = None) -> torch.Tensor:
        """L1 + L2/2 reconstruction (+ a small KL term when the encoder trains); with
        ``vae_figure_weight`` w, a pixel near the figure's skeleton weighs up to 1 + w."""
        vae = self.parts.vae
        decoder_only = "vae" not in self.trains
        with self._autocast():
            with torch.set_grad_enabled(not decoder_only and torch.is_grad_enabled()):
                dist = vae.encode(frames).latent_dist
            z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen, device=self.device)
            rec = vae.decode(z).sample.float()
        err = (rec - frames).abs() + 0.5 * (rec - frames) ** 2
        if self.opts.vae_figure_weight and keypoints is not None:
            w = 1 + self.opts.vae_figure_weight * figure_weights(keypoints, *frames.shape[-2:], scores=scores)
            err = (err * w).sum(dim=(1, 2, 3)) / (w.sum(dim=(1, 2, 3)) * err.shape[1])
        loss = err.mean()
        if decoder_only:
            return loss
        return loss + 1e-4 * dist.kl().float().mean() / frames[0].numel()

    def _backward(self, loss, opt, params):
        opt.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            self.scaler.step(opt)
            self.scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()

    # ---- the run --------------------------------------------------------------------------
    def run(self) -> dict:
        o = self.opts
        start = time.monotonic()
        out_of_time = lambda: o.time_limit is not None and time.monotonic() - start > o.time_limit * 60  # noqa: E731
        bar = tqdm(total=o.vae_steps + (o.steps if self.params else 0), initial=self.vae_step + self.step, desc="training",
                   disable=not self.progress)
        if self.vae_params:
            self.parts.vae.train()
            per_step = max(1, o.vae_batch_size // self.frames)
            while self.vae_step < o.vae_steps and not out_of_time():
                rng, gen = self._rng(self.vae_step, 0)
                batch = self.source.batch(rng, per_step, self.device)
                for g in self.vae_opt.param_groups:
                    g["lr"] = o.vae_lr * _lr(self.vae_step, _short_warmup(o.warmup, o.vae_steps))
                loss = self.vae_loss(batch.frames.flatten(0, 1), gen, batch.keypoints.flatten(0, 1),
                                      batch.scores.flatten(0, 1))
                self._backward(loss, self.vae_opt, self.vae_params)
                self.vae_step += 1
                self.hist.vae_step.append(self.vae_step)
                self.hist.vae.append(loss.item())
                bar.update(1)
                bar.set_postfix(stage="vae", loss=f"{self.hist.vae[-1]:.4f}")
                if self.vae_step % o.checkpoint_every == 0:
                    self.save_state()
            self.parts.vae.eval().requires_grad_(False)
            if "vae" in self.trains and self.step == 0:  # also when cut short: the latents' scale so far
                self.scaling = self.measure_scaling()
        while self.params and self.vae_step >= o.vae_steps and self.step < o.steps and not out_of_time():
            rng, gen = self._rng(self.step, 1)
            batch = self.source.batch(rng, o.batch_size, self.device)
            for g in self.opt.param_groups:
                g["lr"] = o.lr * _lr(self.step, o.warmup, o.lr_schedule, o.steps)
            for m in ("encoder", "unet", "text_encoder"):
                self.modules[m].train()
            loss = self._compiled_loss(batch, gen, rng)
            self._backward(loss, self.opt, self.params)
            self.ema.update(self.step)
            self.step += 1
            self._pending.append((self.step, loss.detach()))
            bar.update(1)
            if len(self._pending) >= 25:
                self._flush()
                bar.set_postfix(stage="diffusion", loss=f"{sum(self.hist.loss[-25:]) / 25:.4f}")
            if self.step % o.val_every == 0 or self.step == o.steps:
                self.hist.val_step.append(self.step)
                self.hist.val.append(self.validate())
            if self.step % o.checkpoint_every == 0:
                self.save_state()
        bar.close()
        self.save_state()
        done = self.vae_step >= o.vae_steps and (self.step >= o.steps or not self.params)
        if self.step > 0 or self.vae_step > 0:  # also when cut short: the EMA weights so far, usable as they are
            self.write_checkpoint()
        return {"done": done, "step": self.step, "vae_step": self.vae_step, "state": str(self.state_dir),
                "out": str(self.out), "loss_png": str(self.state_dir / "loss.png")}

    @torch.no_grad()
    def measure_scaling(self) -> float:
        zs = []
        for k in range(4):
            rng, gen = self._rng(k, 2)
            frames = self.source.batch(rng, max(1, 32 // self.frames), self.device).frames
            zs.append(self._latents(frames, gen) / self.scaling)
        return float(1.0 / torch.cat(zs).std())

    @torch.no_grad()
    def validate(self, clips: int = 8) -> float:
        """Noise MSE on held-out clips at fixed timesteps and noise (the same every time), every
        latent pixel alike (with or without ``figure_weight``, so runs compare)."""
        for m in ("encoder", "unet", "text_encoder"):
            self.modules[m].eval()
        rng, gen = self._rng(0, 3)
        batch = self.source.batch(rng, clips, self.device, split="val")
        losses = [float(self.diffusion_loss(batch, gen, np.random.default_rng(k), weighted=False)) for k in range(2)]
        return float(np.mean(losses))

    # ---- state and output -------------------------------------------------------------
    def _weights(self) -> dict:
        sd = {}
        for name in ("encoder", "unet", "text_encoder", "vae"):
            for k, v in self.modules[name].state_dict().items():
                sd[f"{name}.{k}"] = v.detach().cpu().contiguous()
        return sd

    def save_state(self) -> None:
        self._flush()
        d = self.state_dir
        d.mkdir(parents=True, exist_ok=True)
        ema = {f"ema.{i}": s.cpu().contiguous() for i, s in enumerate(self.ema.shadow)}
        save_file({**self._weights(), **ema}, str(d / "weights.safetensors.tmp"))
        opt = {"opt": self.opt.state_dict() if self.opt else None, "vae_opt": self.vae_opt.state_dict() if self.vae_opt else None}
        torch.save(opt, d / "optimizer.pt.tmp")
        info = {"step": self.step, "vae_step": self.vae_step, "scaling_factor": self.scaling,
                "options": dataclasses.asdict(self.opts), "ckpt": str(self.ckpt), "source": self.source.description,
                "history": dataclasses.asdict(self.hist), "lora": dataclasses.asdict(self.parts.config.lora)
                if self.parts.config.lora else None}
        for name in ("weights.safetensors", "optimizer.pt"):
            (d / f"{name}.tmp").replace(d / name)
        (d / "state.json").write_text(json.dumps(info))
        plot_history(self.hist, d / "loss.png", series=SERIES, title="fpengine train: loss (log scale) vs step")

    def _load_state(self) -> None:
        d = self.state_dir
        info = json.loads((d / "state.json").read_text())
        defaults = {f.name: f.default for f in dataclasses.fields(GenTrainOptions) if f.default is not dataclasses.MISSING}
        saved = json.loads(json.dumps({**defaults, **info["options"]}))  # a state written before an option existed ran at its default
        same = {k: v for k, v in saved.items() if k not in ("steps", "time_limit", "checkpoint_every", "compile")}
        mine = {k: v for k, v in dataclasses.asdict(self.opts).items() if k in same}
        mine = json.loads(json.dumps(mine))
        if mine != same:
            diff = sorted(k for k in same if same[k] != mine.get(k))
            raise InputError(f"--resume: options {diff} differ from the run in {d}; only --steps, --time-limit, --checkpoint-every and --compile may change")
        if self.opts.lr_schedule == "cosine" and saved.get("steps") != self.opts.steps:
            raise InputError(f"--resume: --steps {self.opts.steps}, but the run in {d} has {saved.get('steps')} "
                             "(its cosine learning rate ends there); keep --steps")
        sd = load_file(str(d / "weights.safetensors"))
        for name in ("encoder", "unet", "text_encoder", "vae"):
            prefix = name + "."
            self.modules[name].load_state_dict({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)})
        for i, s in enumerate(self.ema.shadow):
            s.copy_(sd[f"ema.{i}"])
        opt = torch.load(d / "optimizer.pt", weights_only=True, map_location=self.device)
        if self.opt is not None:
            self.opt.load_state_dict(opt["opt"])
        if self.vae_opt is not None and opt["vae_opt"] is not None:
            self.vae_opt.load_state_dict(opt["vae_opt"])
        self.step, self.vae_step, self.scaling = info["step"], info["vae_step"], info["scaling_factor"]
        self.hist = TrainHistory(**info["history"])

    def write_checkpoint(self) -> Path:
        """The EMA weights as a normal FinePhys checkpoint at ``out`` (LoRA kept apart, peft naming)."""
        from peft import get_peft_model_state_dict

        self.ema.copy_to_model()
        cfg = self.parts.config
        vae_cfg = dict(cfg.vae, scaling_factor=self.scaling)
        cfg = dataclasses.replace(cfg, vae=vae_cfg)
        clean = new_parts(cfg, self.parts.tokenizer)
        clean.lifter.load_state_dict(self.parts.lifter.state_dict())
        clean.physnet.load_state_dict(self.parts.physnet.state_dict())
        lora = {}
        for name in ("encoder", "unet", "text_encoder", "vae"):
            module = self.modules[name]
            sd = {k.replace(".base_layer.", "."): v for k, v in module.state_dict().items() if ".lora_" not in k}
            getattr(clean, name).load_state_dict(sd, strict=True)
            if name in ("unet", "text_encoder") and any(".lora_" in k for k in module.state_dict()):
                for k, v in get_peft_model_state_dict(module).items():
                    lora[f"{name}.{k}"] = v.detach().cpu()
        clean.lora = lora
        save_checkpoint(clean, self.out, self.ckpt / "tokenizer", overwrite=True)
        return self.out
