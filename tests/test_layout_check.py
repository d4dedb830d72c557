"""A clip whose motion does not fit its declared layout gets one warning line; real clips in their
own layout get none. Real motion: the shared CMU mocap (H36M-17) and CMU Panoptic (COCO-17),
projected to 2D; made-up motion covers the same where ../shared is absent."""
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from engine.cli.app import main
from finephys.poses.camera import project_pinhole
from finephys.poses.clip import PoseClip, save_clip
from finephys.poses.layout_check import layout_warning, misfits
from finephys.poses.layouts import convert_keypoints, get_layout
from finephys.training.pose_data import COCO19_TO_COCO17, find_motion, place_cameras, project, sample_at
from tests.conftest import made_walk, shared_motion


def clip_of(kp: np.ndarray, layout: str) -> PoseClip:
    return PoseClip(kp.astype(np.float32), np.ones(kp.shape[:2], np.float32), layout, (1080, 1920), 30.0)


def swap_hips(kp: np.ndarray, layout: str) -> np.ndarray:
    """The hips, knees and ankles labelled the other side's (MMPose's H36M trap)."""
    names, out = get_layout(layout).joints, kp.copy()
    for part in ("hip", "knee", "ankle"):
        a, b = names.index("l_" + part), names.index("r_" + part)
        out[:, [a, b]] = kp[:, [b, a]]
    return out


def front_view(world: np.ndarray) -> np.ndarray:
    """(T,J,3) metres, Y up, H36M-17 -> (T,J,2) pixels seen from in front of the first frame's shoulders."""
    side = world[0, 11] - world[0, 14]  # right to left shoulder
    yaw = np.arctan2(side[2], -side[0])  # looking along the direction the chest faces
    cams = place_cameras(world[None], np.array([yaw]), np.array([0.1]), np.array([0.0]), np.array([4.0]),
                         np.array([1920.0]), np.array([1500.0]))
    return project(world[None], cams)[0][0]


# --- made-up motion: runs everywhere ---------------------------------------------------------

def made_coco(world: np.ndarray) -> np.ndarray:
    """A COCO-17 walk from the made-up H36M-17 one: the limbs as they are, a face made around the head."""
    h36m = get_layout("h36m17").joints
    j = {n: world[:, h36m.index(n)] for n in h36m}
    across = (j["l_shoulder"] - j["r_shoulder"]) / np.linalg.norm(j["l_shoulder"] - j["r_shoulder"], axis=-1)[:, None]
    head = (j["head"] + j["neck"]) / 2
    face = {"nose": head, "l_eye": head + 0.03 * across, "r_eye": head - 0.03 * across,
            "l_ear": head + 0.07 * across, "r_ear": head - 0.07 * across}
    return np.stack([face[n] if n in face else j[n] for n in get_layout("coco17").joints], 1)


def test_made_motion_warns_only_when_mislabelled():
    walk = made_walk()
    h36m, coco = front_view(walk), front_view(made_coco(walk))
    assert misfits(h36m, np.ones(h36m.shape[:2]), "h36m17") == []
    assert misfits(coco, np.ones(coco.shape[:2]), "coco17") == []
    assert "it fits h36m17" in layout_warning(clip_of(h36m, "coco17"))
    assert "it fits coco17" in layout_warning(clip_of(coco, "h36m17"))
    for kp, layout in ((h36m, "h36m17"), (coco, "coco17")):
        line = layout_warning(clip_of(swap_hips(kp, layout), layout))
        assert "the hips point the other way from the shoulders in 100% of the frames" in line


def test_too_few_visible_frames_say_nothing():
    kp = front_view(made_walk(frames=12))
    scores = np.ones(kp.shape[:2], np.float32)
    scores[2:, 3] = 0  # the right ankle lost after two frames: nothing to judge by
    assert misfits(kp, scores, "coco17") == []
    assert misfits(kp, np.ones_like(scores), "coco17") != []


def test_generate_warns_in_one_line_and_goes_on(tmp_path):
    clip = tmp_path / "h36m_as_coco.npz"
    save_clip(clip_of(front_view(made_walk(frames=24, fps=8.0)), "coco17"), clip)
    out = tmp_path / "v.mp4"
    r = CliRunner().invoke(main, ["generate", "--poses", str(clip), "--prompt", "a walk", "--out", str(out),
                                  "--frames", "3", "--height", "32", "--width", "32", "--steps", "1"])
    assert r.exit_code == 0 and out.exists(), r.output
    warnings = [line for line in r.output.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "do not fit its layout coco17" in warnings[0] and "it fits h36m17" in warnings[0]


def test_the_example_clip_fits_its_layout():
    from finephys.poses.clip import load_clip
    from tests.conftest import ROOT

    assert layout_warning(load_clip(ROOT / "examples" / "walk.npz")) is None


# --- real motion: ../shared/data/motion ------------------------------------------------------

def cmu_views(motions, frames=48, fps=30.0, every=4.0, cameras=4, joints=lambda world: world):
    """Windows of every motion (``frames`` at ``fps``, one every ``every`` seconds), each seen by
    ``cameras`` random cameras looking at the person (any yaw, elevation -5..35 deg, 3-6 m, focal
    0.8-1.3 x the width): (T,17,2) H36M-17, or what ``joints`` makes of the (T,17,3) H36M-17 world
    joints."""
    rng = np.random.default_rng(0)
    for m in motions:
        for t0 in np.arange(0, m.duration - frames / fps, every):
            world = np.repeat(joints(sample_at(m, t0 + np.arange(frames) / fps))[None], cameras, 0)
            n, width = len(world), rng.uniform(480, 1920, len(world))
            cams = place_cameras(world, rng.uniform(0, 2 * np.pi, n), np.deg2rad(rng.uniform(-5, 35, n)),
                                 np.deg2rad(rng.normal(0, 3, n)), rng.uniform(3, 6, n), width,
                                 width * rng.uniform(0.8, 1.3, n))
            for uv in project(world, cams)[0]:
                yield f"{m.name}@{t0:g}s", uv


def panoptic_views(motion_dir):
    """Each Panoptic body (COCO-17) seen by each real HD camera that has all of it in view: (T,17,2)."""
    folder = motion_dir / "panoptic_160906_band2"
    bodies = {}
    for path in sorted((folder / "hdPose3d_stage1_coco19").glob("body3DScene_*.json")):
        for body in json.loads(path.read_text())["bodies"]:
            joints = np.asarray(body["joints19"]).reshape(19, 4)[list(COCO19_TO_COCO17), :3]
            bodies.setdefault(body["id"], []).append(joints)
    cameras = [c for c in json.loads((folder / "calibration_160906_band2.json").read_text())["cameras"]
               if c["type"] == "hd"]
    for body, joints in bodies.items():
        world = np.stack(joints)
        for cam in cameras:
            local = world @ np.array(cam["R"]).T + np.array(cam["t"]).reshape(3)
            if (local[..., 2] <= 0).any():
                continue
            uv = project_pinhole(torch.as_tensor(local)[None], torch.zeros(1, len(local), 3), np.array(cam["K"]),
                                 np.array(cam["distCoef"]))[0].numpy()
            width, height = cam["resolution"]
            if ((uv < 0) | (uv > [width, height])).any():
                continue
            yield f"body {body} in camera {cam['name']}", uv


@pytest.fixture(scope="module")
def real():
    d = shared_motion()
    cmu = find_motion([d / "cmu", d / "131_01.bvh"])
    return {"h36m17": list(cmu_views(cmu)), "coco17": list(panoptic_views(d)),
            "coco17 (real body, made face)": list(cmu_views(cmu, cameras=2, joints=made_coco))}


def test_real_clips_in_their_own_layout_do_not_warn(real):
    assert len(real["h36m17"]) > 300 and len(real["coco17"]) > 30
    for key, views in real.items():
        layout = key.split()[0]
        false_alarms = [(name, misfits(uv, np.ones(uv.shape[:2]), layout)) for name, uv in views]
        assert [f for f in false_alarms if f[1]] == [], key
    for name, uv in real["coco17"]:  # and as OpenPose-18 (the neck added between the shoulders)
        op18, sc = convert_keypoints(uv, np.ones(uv.shape[:2]), "coco17", "openpose18")
        assert misfits(op18, sc, "openpose18") == [], name


def test_real_clips_in_the_other_layout_warn(real):
    for key, other in (("h36m17", "coco17"), ("coco17", "h36m17"), ("coco17 (real body, made face)", "h36m17")):
        layout = key.split()[0]
        for name, uv in real[key]:
            line = layout_warning(clip_of(uv, other))
            assert line is not None and f"it fits {layout}" in line and "\n" not in line, (name, other)
    for name, uv in real["coco17"]:
        assert "hips point the other way" in layout_warning(clip_of(swap_hips(uv, "coco17"), "coco17")), name


def test_real_motion_with_swapped_hips_warns_seen_from_the_front():
    d = shared_motion()
    for m in find_motion([d / "cmu"])[::6]:
        uv = front_view(sample_at(m, np.arange(48) / 30.0))
        assert misfits(uv, np.ones(uv.shape[:2]), "h36m17") == [], m.name
        assert "hips point the other way" in layout_warning(clip_of(swap_hips(uv, "h36m17"), "h36m17")), m.name
