"""Scenes for the figure renderer: cameras, clothing, backgrounds and the caption of what was drawn.

A clip is a window of world motion (metres, Y up) seen by one still pinhole camera. The person
wears a shirt and trousers of named colours; the background is a plain wall, a floor under the
sky, grass, or a gym floor, with the ground seen in perspective (each pixel's ray meets the ground
plane). The caption names exactly what was drawn: "a person in a red shirt and black trousers on
grass". ``parse_caption`` reads the colours back from such a prompt.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

from finephys.training.figure import Camera, render_figures
from finephys.training.pose_data import look_rotation

SHIRTS = {
    "red": (0.80, 0.12, 0.12), "blue": (0.13, 0.28, 0.85), "green": (0.12, 0.60, 0.20),
    "yellow": (0.95, 0.82, 0.10), "white": (0.93, 0.93, 0.93), "black": (0.10, 0.10, 0.11),
    "orange": (0.98, 0.50, 0.08), "purple": (0.50, 0.18, 0.65),
}
TROUSERS = {
    "black": (0.09, 0.09, 0.10), "blue": (0.16, 0.24, 0.55), "grey": (0.50, 0.50, 0.52),
    "brown": (0.45, 0.28, 0.14), "white": (0.90, 0.90, 0.88),
}
SKINS = ((0.96, 0.80, 0.69), (0.87, 0.67, 0.52), (0.72, 0.51, 0.36), (0.48, 0.32, 0.22))
HAIRS = ((0.08, 0.06, 0.05), (0.35, 0.22, 0.12), (0.85, 0.72, 0.42), (0.6, 0.6, 0.6))
SHOES = ((0.12, 0.12, 0.12), (0.92, 0.92, 0.92), (0.4, 0.25, 0.15))
BACKGROUNDS = {"wall": "in front of a plain wall", "sky": "under the sky", "grass": "on grass",
               "gym": "in a gym"}
_CAPTION = re.compile(r"\bin an? (\w+) shirt and (\w+) trousers\b")


@dataclass(frozen=True)
class Look:
    """What one clip shows: colour names, background kind and the RGB of every material."""

    shirt: str
    trousers: str
    background: str
    colours: np.ndarray  # (5,3) skin, hair, shirt, trousers, shoes in [0,1]
    hair_fraction: float
    tint: np.ndarray  # (3,) background base colour

    @property
    def caption(self) -> str:
        return f"a person in a {self.shirt} shirt and {self.trousers} trousers {BACKGROUNDS[self.background]}"


def parse_caption(prompt: str) -> tuple[str, str] | None:
    """(shirt, trousers) colour names from a renderer-style prompt, or None if it names none."""
    m = _CAPTION.search(prompt.lower())
    if not m or m.group(1) not in SHIRTS or m.group(2) not in TROUSERS:
        return None
    return m.group(1), m.group(2)


def random_look(rng: np.random.Generator) -> Look:
    shirt = str(rng.choice(list(SHIRTS)))
    trousers = str(rng.choice(list(TROUSERS)))
    bg = str(rng.choice(list(BACKGROUNDS)))
    colours = np.array([SKINS[rng.integers(len(SKINS))], HAIRS[rng.integers(len(HAIRS))], SHIRTS[shirt],
                        TROUSERS[trousers], SHOES[rng.integers(len(SHOES))]])
    colours = np.clip(colours * rng.uniform(0.92, 1.08, (5, 1)), 0, 1)
    tints = {"wall": ((0.85, 0.80, 0.70), (0.75, 0.80, 0.85), (0.70, 0.78, 0.68), (0.88, 0.86, 0.84)),
             "sky": ((0.62, 0.60, 0.56), (0.76, 0.68, 0.52)), "grass": ((0.25, 0.52, 0.18),),
             "gym": ((0.78, 0.55, 0.30),)}[bg]
    tint = np.array(tints[rng.integers(len(tints))]) * rng.uniform(0.9, 1.08)
    return Look(shirt, trousers, bg, colours, float(rng.uniform(0.3, 0.6)), np.clip(tint, 0, 1))


@dataclass(frozen=True)
class SceneCameras:
    """One still camera per clip: rotation R (B,3,3) world -> camera, centre C (B,3), focal (B,)."""

    R: np.ndarray
    C: np.ndarray
    focal: np.ndarray
    size: tuple[int, int]  # (height, width)

    def to_camera(self, world: np.ndarray) -> np.ndarray:
        """world (B,T,J,3) -> camera axes (B,T,J,3): x right, y down, z forward."""
        return np.einsum("bij,btkj->btki", self.R, world - self.C[:, None, None])

    def pixels(self, world: np.ndarray) -> np.ndarray:
        cam = self.to_camera(world)
        h, w = self.size
        return cam[..., :2] / np.maximum(cam[..., 2:3], 1e-3) * self.focal[:, None, None, None] + \
            np.array([(w - 1) / 2, (h - 1) / 2])


def random_cameras(rng: np.random.Generator, world: np.ndarray, size: tuple[int, int],
                   height_frac=(0.35, 0.85)) -> SceneCameras:
    """Cameras at any yaw, -5..25 deg elevation, 3-6 m from the window's mean pelvis, with the
    focal length that makes a 1.7 m person ``height_frac`` of the image height."""
    b = len(world)
    h, _ = size
    rot = look_rotation(rng.uniform(0, 2 * np.pi, b), np.deg2rad(rng.uniform(-5, 25, b)), np.deg2rad(rng.normal(0, 2, b)))
    dist = rng.uniform(3.0, 6.0, b)
    target = world[:, :, 0].mean(1)
    centre = target - dist[:, None] * rot[:, 2]
    depth = np.einsum("btjk,bk->btj", world - centre[:, None, None], rot[:, 2]).min(axis=(1, 2))
    centre = centre - np.maximum(1.0 - depth, 0)[:, None] * rot[:, 2]
    focal = rng.uniform(*height_frac, b) * h * dist / 1.7
    return SceneCameras(rot, centre, focal, size)


def _hash_noise(x: torch.Tensor, y: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    """Deterministic value noise in [0,1) on integer lattice points."""
    v = torch.sin(x * 12.9898 + y * 78.233 + seed * 37.719) * 43758.5453
    return v - torch.floor(v)


def _smooth_noise(u: torch.Tensor, v: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    iu, iv = torch.floor(u), torch.floor(v)
    fu, fv = u - iu, v - iv
    fu, fv = fu * fu * (3 - 2 * fu), fv * fv * (3 - 2 * fv)
    n00, n10 = _hash_noise(iu, iv, seed), _hash_noise(iu + 1, iv, seed)
    n01, n11 = _hash_noise(iu, iv + 1, seed), _hash_noise(iu + 1, iv + 1, seed)
    return (n00 * (1 - fu) + n10 * fu) * (1 - fv) + (n01 * (1 - fu) + n11 * fu) * fv


def backgrounds(looks: list[Look], cams: SceneCameras, ground: np.ndarray, device, seed: int = 0) -> torch.Tensor:
    """(B,3,H,W) backgrounds in [0,1]; ``ground`` (B,) is the floor height (world Y) per clip."""
    h, w = cams.size
    b = len(looks)
    dt = torch.float32
    ys, xs = torch.meshgrid(torch.arange(h, dtype=dt, device=device), torch.arange(w, dtype=dt, device=device), indexing="ij")
    f = torch.as_tensor(cams.focal, dtype=dt, device=device).view(b, 1, 1)
    ray_cam = torch.stack([(xs - (w - 1) / 2) / f, (ys - (h - 1) / 2) / f, torch.ones_like(xs).expand(b, h, w)], -1)
    R = torch.as_tensor(cams.R, dtype=dt, device=device)
    ray = torch.einsum("bji,bhwj->bhwi", R, ray_cam)  # camera -> world directions
    C = torch.as_tensor(cams.C, dtype=dt, device=device)
    height_above = (C[:, 1] - torch.as_tensor(ground, dtype=dt, device=device)).view(b, 1, 1)
    down = -ray[..., 1]
    hit = down > 1e-3
    tt = height_above / down.clamp_min(1e-3)
    gx = C[:, 0].view(b, 1, 1) + tt * ray[..., 0]
    gz = C[:, 2].view(b, 1, 1) + tt * ray[..., 2]
    seeds = torch.arange(b, dtype=dt, device=device).view(b, 1, 1) + seed * 101.0
    tint = torch.as_tensor(np.stack([lk.tint for lk in looks]), dtype=dt, device=device).view(b, 3, 1, 1)
    elev = ray[..., 1].clamp(-1, 1)  # up component of the ray
    fog = (1 - torch.exp(-tt / 25.0)).clamp(0, 1).unsqueeze(1)
    out = []
    for i, lk in enumerate(looks):
        t_i = tint[i]
        if lk.background == "wall":
            shade = 0.92 + 0.08 * (1 - ys / h) + 0.03 * (_smooth_noise(xs / 9, ys / 9, seeds[i]) - 0.5)
            img = t_i * shade
        else:
            sky = torch.stack([0.55 + 0.3 * (1 - elev[i]), 0.72 + 0.2 * (1 - elev[i]), torch.full_like(elev[i], 0.95)])
            if lk.background == "gym":
                sky = torch.tensor([0.86, 0.85, 0.80], device=device).view(3, 1, 1) * (0.95 + 0.05 * elev[i])
            n1 = _smooth_noise(gx[i] * 2.0, gz[i] * 2.0, seeds[i])
            n2 = _smooth_noise(gx[i] * 9.0, gz[i] * 9.0, seeds[i] + 7)
            if lk.background == "grass":
                floor = t_i * (0.75 + 0.35 * n1 + 0.2 * n2)
            elif lk.background == "gym":
                plank = torch.floor(gx[i] / 0.2)
                stripe = (0.88 + 0.12 * _hash_noise(plank, plank * 0.0, seeds[i])) * (0.95 + 0.08 * n2)
                line = ((gz[i] % 4.0) < 0.06).to(dt)
                floor = t_i * stripe * (1 - line) + line * torch.tensor([0.95, 0.95, 0.95], device=device).view(3, 1, 1)
            else:
                floor = t_i * (0.9 + 0.15 * n1 + 0.08 * n2)
            floor = floor * (1 - fog[i]) + sky * fog[i]
            img = torch.where(hit[i], floor, sky)
        out.append(img.clamp(0, 1))
    return torch.stack(out)


def render_clips(world: np.ndarray, looks: list[Look], cams: SceneCameras, device="cpu", seed: int = 0,
                 chunk: int = 64):
    """Frames (B,T,3,H,W) in [0,1] and 2D joints (B,T,17,2) pixels of world windows (B,T,17,3)."""
    b, t = world.shape[:2]
    cam = torch.as_tensor(cams.to_camera(world), dtype=torch.float32, device=device)
    ground = world[..., 1].min(axis=(1, 2)) - 0.06
    bg = backgrounds(looks, cams, ground, device, seed)
    h, w = cams.size
    colours = torch.as_tensor(np.stack([lk.colours for lk in looks]), dtype=torch.float32, device=device)
    hair = torch.as_tensor([lk.hair_fraction for lk in looks], dtype=torch.float32, device=device)
    focal = torch.as_tensor(cams.focal, dtype=torch.float32, device=device).repeat_interleave(t)
    centre = torch.tensor([(w - 1) / 2, (h - 1) / 2], device=device).expand(b * t, 2)
    flat = cam.reshape(b * t, 17, 3)
    frames = []
    for s in range(0, b * t, chunk):
        e = min(s + chunk, b * t)
        idx = torch.arange(s, e, device=device) // t
        frames.append(render_figures(flat[s:e], Camera(focal[s:e], centre[s:e]), colours[idx], bg[idx], hair[idx]))
    frames = torch.cat(frames).view(b, t, 3, h, w)
    return frames, cams.pixels(world)
