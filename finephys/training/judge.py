"""The judge: a small top-down 2D pose network for the renderer's figures (and videos of them).

``fpengine eval-video`` needs joints detected in a generated video that are independent of the
joints that guided it. MediaPipe does that for real footage; for the demo's figures this network,
trained on rendered frames only, does it through ``fpengine detect``'s ``--pose-model`` path
(exported to ONNX: input ``(1,3,128,128)`` RGB / 255, output COCO-17 heatmaps ``(1,17,32,32)``).

Its COCO-17 joints are the renderer's H36M-17 joints under names: limbs as named, nose = the H36M
neck/nose joint, eyes and ears = the top of the head; ``coco17 -> h36m17`` gives them back.
Training crops are those ``detect`` makes: the whole frame, or a square around the person (1.2-1.8x
the joints' extent, shifted a little), with blur, noise, colour and contrast changes.
"""
from __future__ import annotations

import itertools
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

JUDGE_ONNX = Path(__file__).resolve().parents[1] / "assets" / "judge_pose.onnx"
SIZE = 128
STRIDE = 4
# COCO-17 joint k is H36M-17 joint COCO_FROM_H36M[k]
COCO_FROM_H36M = (9, 10, 10, 10, 10, 11, 14, 12, 15, 13, 16, 4, 1, 5, 2, 6, 3)


def _block(cin, cout, stride):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class _Residual(nn.Module):
    """Two 3x3 convolutions (the second dilated) added to their input: context without downsampling."""

    def __init__(self, c: int, dilation: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
                                  nn.Conv2d(c, c, 3, 1, dilation, dilation, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return torch.relu(x + self.body(x))


class JudgeNet(nn.Module):
    """A small encoder-decoder: 128x128 RGB -> 17 heatmaps at 32x32. ``depth`` residual blocks
    after each of the two lowest levels (16x16, 8x8) widen its view of the whole figure."""

    def __init__(self, width: int = 32, depth: int = 0, joints: int = 17):
        super().__init__()
        w = width
        self.e1, self.e2 = _block(3, w, 2), _block(w, 2 * w, 2)  # 64, 32
        self.e3, self.e4 = _block(2 * w, 4 * w, 2), _block(4 * w, 4 * w, 2)  # 16, 8
        self.r3 = nn.Sequential(*[_Residual(4 * w, 2) for _ in range(depth)])
        self.r4 = nn.Sequential(*[_Residual(4 * w, 1 + i % 2) for i in range(depth)])
        self.d3, self.d2 = _block(8 * w, 4 * w, 1), _block(6 * w, 2 * w, 1)
        self.head = nn.Conv2d(2 * w, joints, 1)

    def forward(self, x):
        x1 = self.e1(x)
        x2 = self.e2(x1)
        x3 = self.r3(self.e3(x2))
        x4 = self.r4(self.e4(x3))
        up = lambda t: nn.functional.interpolate(t, scale_factor=2.0, mode="nearest")  # noqa: E731
        y3 = self.d3(torch.cat([up(x4), x3], 1))
        y2 = self.d2(torch.cat([up(y3), x2], 1))
        return self.head(y2)


def _target(kp: torch.Tensor, size: int, sigma: float = 1.0) -> torch.Tensor:
    """(N,J,2) crop pixels -> (N,J,size/STRIDE,size/STRIDE) Gaussians of peak 1."""
    h = size // STRIDE
    c = (kp + 0.5) / STRIDE - 0.5
    g = torch.arange(h, device=kp.device, dtype=kp.dtype)
    gx = torch.exp(-((g.view(1, 1, 1, h) - c[..., 0, None, None]) ** 2) / (2 * sigma**2))
    gy = torch.exp(-((g.view(1, 1, h, 1) - c[..., 1, None, None]) ** 2) / (2 * sigma**2))
    return gx * gy


def random_crops(frames: torch.Tensor, kp: torch.Tensor, gen: torch.Generator, whole: float = 0.4):
    """Crops (N,3,SIZE,SIZE) of frames (N,3,H,W) like ``detect``'s regions, and the joints in them."""
    n, _, height, width = frames.shape
    dev = frames.device
    lo, hi = kp.min(1).values, kp.max(1).values
    extent = (hi - lo).max(-1).values
    rand = lambda *s: torch.rand(*s, generator=gen, device=dev)  # noqa: E731
    side = extent * (1.2 + 0.6 * rand(n))
    centre = (lo + hi) / 2 + (rand(n, 2) - 0.5) * 0.2 * side[:, None]
    use_whole = rand(n) < whole
    side = torch.where(use_whole, torch.full_like(side, float(max(height, width))), side)
    centre = torch.where(use_whole[:, None], torch.tensor([(width - 1) / 2, (height - 1) / 2], device=dev), centre)
    # crop pixel u -> frame pixel centre + (u + 0.5 - SIZE/2) * side / SIZE; grid_sample wants [-1, 1]
    u = (torch.arange(SIZE, device=dev, dtype=frames.dtype) + 0.5 - SIZE / 2) / SIZE
    fx = centre[:, 0, None] + u[None] * side[:, None]
    fy = centre[:, 1, None] + u[None] * side[:, None]
    gx = (fx + 0.5) / width * 2 - 1
    gy = (fy + 0.5) / height * 2 - 1
    grid = torch.stack([gx[:, None, :].expand(n, SIZE, SIZE), gy[:, :, None].expand(n, SIZE, SIZE)], -1)
    crops = nn.functional.grid_sample(frames, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    kp_crop = (kp - centre[:, None]) / side[:, None, None] * SIZE + SIZE / 2 - 0.5
    return crops, kp_crop


def hue_rotation(angle: torch.Tensor) -> torch.Tensor:
    """(N,) radians -> (N,3,3) rotations of RGB about the grey axis: every hue turns by ``angle``
    while grey stays grey and brightness (the mean of the channels) is kept."""
    k = torch.full((3,), 3 ** -0.5, device=angle.device, dtype=angle.dtype)
    cross = torch.zeros(3, 3, device=angle.device, dtype=angle.dtype)
    cross[0, 1], cross[0, 2], cross[1, 2] = -k[2], k[1], -k[0]
    cross = cross - cross.T
    s, c = angle.sin()[:, None, None], angle.cos()[:, None, None]
    return torch.eye(3, device=angle.device, dtype=angle.dtype) + s * cross + (1 - c) * (cross @ cross)


def recolour(x: torch.Tensor, rand) -> torch.Tensor:
    """Colour changes of whole crops, wide enough that the pose does not hang on the palette: half
    the crops turn their hues by any angle, saturation goes 0.3-1.5x and each channel 0.8-1.2x.
    (The demo paints some prompts in colours the renderer never draws, such as a pale green-white
    ground for "under the sky", and a judge trained on the palette alone misreads those frames.)"""
    n = x.shape[0]
    angle = (rand(n) * 2 - 1) * math.pi * (rand(n) < 0.5).to(x.dtype)
    x = torch.einsum("nij,njhw->nihw", hue_rotation(angle), x)
    grey = x.mean(1, keepdim=True)
    x = grey + (x - grey) * (0.3 + 1.2 * rand(n, 1, 1, 1))
    return x * (0.8 + 0.4 * rand(n, 3, 1, 1))


def degrade(x: torch.Tensor, gen: torch.Generator, wide_colours: bool = False) -> torch.Tensor:
    """Blur (some through a lower resolution), noise, brightness, contrast and colour changes: each
    channel 0.9-1.1x (the shipped judge's), or with ``wide_colours`` those of ``recolour``."""
    n = x.shape[0]
    dev = x.device
    rand = lambda *s: torch.rand(*s, generator=gen, device=dev)  # noqa: E731
    low = nn.functional.interpolate(nn.functional.interpolate(x, scale_factor=0.5, mode="bilinear", antialias=True),
                                    size=x.shape[-2:], mode="bilinear")
    pick = (rand(n, 1, 1, 1) < 0.5).float()
    x = pick * low + (1 - pick) * x
    k = torch.tensor([1.0, 2.0, 1.0], device=dev)
    k = (k[:, None] * k[None]) / 16
    blur = nn.functional.conv2d(nn.functional.pad(x, (1, 1, 1, 1), mode="replicate"),
                                k.expand(3, 1, 3, 3), groups=3)
    pick = (rand(n, 1, 1, 1) < 0.5).float()
    x = pick * blur + (1 - pick) * x
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * (0.7 + 0.6 * rand(n, 1, 1, 1)) + mean * (0.8 + 0.4 * rand(n, 1, 1, 1))
    x = recolour(x, rand) if wide_colours else x * (0.9 + 0.2 * rand(n, 3, 1, 1))
    x = x + torch.randn(x.shape, generator=gen, device=dev) * 0.04 * rand(n, 1, 1, 1)
    return x.clamp(0, 1)


TIMED_STEPS = 20  # steps at the starting rate before the schedule (timed under a time limit)


def one_cycle(step: int, total: int, peak: float) -> float:
    """The learning rate: peak/25 for the first TIMED_STEPS steps, up to ``peak`` by 10% of
    ``total`` and down to peak/25e4 at its end, on cosines (torch's OneCycleLR after the start).
    Runs under about 210 steps rise in one step, right after the first TIMED_STEPS."""
    lo, end = peak / 25, peak / 25e4
    if step < TIMED_STEPS:
        return lo
    rise = max(int(0.1 * total), TIMED_STEPS + 1)
    if step < rise:
        f = (step - TIMED_STEPS) / (rise - TIMED_STEPS)
        return lo + (peak - lo) * (1 - math.cos(math.pi * f)) / 2
    f = (step - rise) / max(total - 1 - rise, 1)
    return end + (peak - end) * (1 + math.cos(math.pi * min(f, 1.0))) / 2


REPLAN_EVERY = 50  # steps between two checks of the pace under a time limit


def _replan(step: int, steps: int, mark: tuple[int, float], deadline: float) -> tuple[int, tuple[int, float]]:
    """The total step count that still fits before ``deadline`` at the pace since ``mark`` (a step
    and its time); only ever shorter (a longer run would raise the falling learning rate again)."""
    now = time.monotonic()
    pace = (now - mark[1]) / max(step - mark[0], 1)
    fit = step + max(int((deadline - now) / pace), 1)
    if fit < steps * 0.98:
        tqdm.write(f"the judge: slower than timed ({pace * 1000:.0f} ms a step), {fit} steps fit now")
        steps = fit
    return steps, (step, now)


def train_judge(source, steps: int = 3000, batch: int = 16, lr: float = 2e-3, device="cpu", seed: int = 0,
                progress: bool = True, width: int = 32, depth: int = 0,
                time_limit: float | None = None, wide_colours: bool = False) -> tuple[JudgeNet, list[float]]:
    """Train on ``source`` (a ``RenderSource``; ``batch`` clips of its frames per step), bf16 on CUDA.

    With ``time_limit`` (minutes) steps 5-19 are timed and ``steps`` becomes as many as fit
    (at most ``steps``), so the learning-rate schedule still runs to its end; the count is logged
    and ``steps`` = that count repeats the run without the limit. Every REPLAN_EVERY steps the
    pace since the last check is measured again, and where the steps left no longer fit (another
    job took the device) the run is shortened, its schedule with it, and a line says so; such a
    run is not repeated by ``steps`` alone."""
    torch.manual_seed(seed)
    net = JudgeNet(width, depth).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    gen = torch.Generator(device).manual_seed(seed)
    bf16 = torch.device(device).type == "cuda"
    losses, start, mark = [], 0.0, (0, 0.0)
    bar = tqdm(total=steps, desc="training the judge", disable=not progress)
    for step in itertools.count():
        if step == 5:
            start = time.monotonic()  # the first steps warm up the device: not timed
        if step == TIMED_STEPS and time_limit is not None:
            per_step = (time.monotonic() - start) / (TIMED_STEPS - 5)
            steps = min(steps, max(TIMED_STEPS + 1, int(time_limit * 60 / per_step)))
            bar.total = steps
            tqdm.write(f"the judge: {per_step * 1000:.0f} ms a step, {steps} steps fit in {time_limit:g} min")
            mark = (step, time.monotonic())
        elif time_limit is not None and step > TIMED_STEPS and step % REPLAN_EVERY == 0 and step < steps:
            steps, mark = _replan(step, steps, mark, start + time_limit * 60)
            bar.total = steps
        if step >= steps:
            break
        for group in opt.param_groups:
            group["lr"] = one_cycle(step, steps, lr)
        rng = np.random.default_rng([seed, step])
        b = source.batch(rng, batch, device)
        frames = (b.frames.flatten(0, 1) + 1) / 2
        kp = b.keypoints.flatten(0, 1)[:, list(COCO_FROM_H36M)]
        crops, kp_crop = random_crops(frames, kp, gen)
        x = degrade(crops, gen, wide_colours)
        with torch.autocast("cuda", torch.bfloat16, enabled=bf16):
            pred = net(x)
        loss = ((pred.float() - _target(kp_crop, SIZE)) ** 2).mean() * 1000
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.detach())  # no sync with the device each step
        bar.update(1)
    bar.close()
    return net.eval(), torch.stack(losses).tolist() if losses else []


def export_judge(net: JudgeNet, path) -> None:
    """ONNX with fp16 weights (half the bytes of the package's assets) cast to fp32 on load."""
    net = net.cpu().eval()
    torch.onnx.export(net, (torch.zeros(1, 3, SIZE, SIZE),), str(path), input_names=["image"],
                      output_names=["heatmaps"], opset_version=17, dynamo=False)
    store_half(path)


def store_half(path) -> None:
    """Rewrite an fp32 ONNX file in place: every float initializer of 16+ values is stored as fp16
    and a Cast node turns it back to fp32 at the graph's start, so the arithmetic stays fp32."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(path))
    graph, casts = model.graph, []
    for init in graph.initializer:
        w = numpy_helper.to_array(init)
        if init.data_type != TensorProto.FLOAT or w.size < 16:
            continue
        name = init.name
        init.CopyFrom(numpy_helper.from_array(w.astype(np.float16), name + "_fp16"))
        casts.append(helper.make_node("Cast", [name + "_fp16"], [name], to=TensorProto.FLOAT))
    nodes = casts + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
