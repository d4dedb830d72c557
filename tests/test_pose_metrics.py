"""Issue 22: the eval-pose protocol: framings, noise relative to the person, action classes, foot
metrics (hand-made motions with known answers) and the command's tables and refusals."""
import dataclasses
import json

import numpy as np
import pytest
from click.testing import CliRunner

from engine.cli.app import main
from finephys.errors import InputError
from finephys.model.lifter import _STANDING_POSE
from finephys.training import pose_metrics as pm
from finephys.training.motion_classes import action_class
from finephys.training.pose_data import Motion, find_motion, person_height_px, project
from tests.conftest import made_walk

STANDING = np.array(_STANDING_POSE) * np.array([1.0, -1.0, 1.0]) + np.array([0.0, 0.95, 0.0])  # Y up


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _standing(frames=6):
    return np.repeat(STANDING[None, None], frames, 1).repeat(4, 0)  # (4 views, T, 17, 3)


def _stepping(frames=40, fps=8.0, seed=0):
    """(frames, 17, 3): standing, swaying, the left foot planted, the right one stepping up and
    down (in the air half the time) while sliding 0.1 m/s forward on the ground."""
    t = np.arange(frames) / fps + np.random.default_rng(seed).uniform(0, 1)
    joints = np.repeat(STANDING[None], frames, 0)
    joints[:, [0, 1, 4, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16], 0] += 0.05 * np.sin(2 * np.pi * 0.5 * t)[:, None]
    up = 0.15 * np.maximum(np.sin(2 * np.pi * 0.7 * t), 0)
    joints[:, [2, 3], 1] += up[:, None] * [0.5, 1.0]
    joints[:, 3, 2] += 0.1 * t
    return joints


# --- framings -----------------------------------------------------------------------------------

# issue 22: image (w, h), focal / width, person height px, pelvis-path centre (fractions of w, h)
ASKED = {"medium": ((1920, 1080), 1.0, 500, (0.5, 0.5)), "small": ((1920, 1080), 1.0, 240, (0.5, 0.5)),
         "tiny": ((1920, 1080), 1.0, 100, (0.5, 0.5)), "large": ((3840, 2160), 1.5, 1000, (0.5, 0.5)),
         "off-centre": ((1920, 1080), 0.6, 400, (0.15, 0.30))}


@pytest.mark.parametrize("name", ASKED)
def test_framings_give_the_asked_person_size_and_place(name):
    (w, h), focal, person, centre = ASKED[name]
    world = _standing()
    cams = pm.framing_cameras(world, name, 4)
    uv, _ = project(world, cams)
    np.testing.assert_allclose(cams.f, focal * w)
    np.testing.assert_allclose(cams.c, np.tile([w / 2, h / 2], (4, 1)))
    # a standing person, seen from 4 sides at 10 deg elevation: the asked height within 3%
    np.testing.assert_allclose(person_height_px(uv), person, rtol=0.03)
    np.testing.assert_allclose(uv[:, :, 0], np.broadcast_to(np.multiply(centre, (w, h)), uv[:, :, 0].shape),
                               atol=0.01)  # the pelvis (static: its path's centre) where asked
    assert ((uv >= 0) & (uv <= (w, h))).all()  # the whole body inside the image
    if centre == (0.5, 0.5):  # the cameras' headings: evenly spread, level (roll 0)
        yaw = np.arctan2(cams.R[:, 2, 0], cams.R[:, 2, 2])
        np.testing.assert_allclose(np.diff(np.unwrap(yaw)), np.pi / 2, atol=1e-9)
        np.testing.assert_allclose(cams.R[:, 0, 1], 0.0, atol=1e-12)  # the x axis horizontal
        np.testing.assert_allclose(np.arcsin(-cams.R[:, 2, 1]), np.deg2rad(10.0), atol=1e-9)


def test_legacy_framing_is_the_old_protocol():
    world = _standing()
    cams = pm.framing_cameras(world, "legacy", 4)
    np.testing.assert_allclose(cams.K(0), [[1000, 0, 500], [0, 1000, 375], [0, 0, 1]])
    np.testing.assert_allclose(np.linalg.norm(cams.C - world[:, 0, 0], axis=-1), 4.0)
    uv, _ = project(world, cams)
    np.testing.assert_allclose(uv[:, :, 0], np.broadcast_to([500.0, 375.0], uv[:, :, 0].shape), atol=1e-9)


def test_unknown_framing_names_the_valid_ones():
    with pytest.raises(InputError, match="'wide', expected one of medium, small, tiny, large, off-centre, legacy"):
        pm.get_framing("wide")


# --- noise relative to the person -----------------------------------------------------------------

@pytest.mark.parametrize("framing", ["medium", "small", "legacy"])
def test_noise_scales_with_person_height(framing):
    walk = Motion("w.npz", made_walk(frames=24, fps=8.0), 8.0)
    clean = pm.eval_inputs(walk, 0, walk.duration, 8.0, phases=1, cameras=3, noise_px=0.0, seed=5, framing=framing)
    noisy = pm.eval_inputs(walk, 0, walk.duration, 8.0, phases=1, cameras=3, noise_px=5.0, seed=5, framing=framing)
    z = np.random.default_rng(5).normal(size=clean.keypoints.shape)  # the draws eval_inputs makes
    height = person_height_px(clean.keypoints)
    sigma = np.full(3, 5.0) if framing == "legacy" else 5.0 * height / 1000.0
    np.testing.assert_allclose(noisy.keypoints - clean.keypoints, z * sigma[:, None, None, None], atol=1e-6)
    np.testing.assert_allclose(noisy.sigma_px, sigma)
    np.testing.assert_allclose(noisy.person_px, height)
    if framing == "small":
        assert 0.2 < sigma.mean() / 5.0 < 0.3  # 240 px person: a quarter of the 1000 px sigma


# --- action classes ---------------------------------------------------------------------------------

def test_action_class():
    expected = {"walk": ["05_01", "06_01", "07_01", "07_99", "08_11", "09_12", "131_01"],
                "run": ["09_01", "09_06", "09_11"], "jump": ["01_01", "01_14"], "climb": ["01_08", "01_10"],
                "dance": ["05_02", "05_11", "05_20"], "sport": ["06_02", "06_08", "06_15"],
                "other": ["01_02", "05_21", "06_16", "09_13", "02_01", "131_02", "walk", "07_01x", "my_walk"]}
    for cls, stems in expected.items():
        for stem in stems:
            assert action_class(f"/data/cmu/{stem}.bvh") == cls, stem
    assert action_class("/work/shared/data/motion/cmu/05_06.BVH") == "dance"
    assert action_class("/x/07_01.npz") == "walk"
    assert action_class("/x/panoptic/hdPose3d_stage1_coco19:body0:139-158") == "other"


# --- foot metrics, hand-made ------------------------------------------------------------------------

FPS = 10.0


def _ankle(x, y, z=None):
    """(T,) coordinates -> (T, 1 ankle, 3) world points."""
    return np.stack([x, y, np.zeros_like(x) if z is None else z], -1)[:, None]


def test_a_planted_foot_does_not_skate():
    t = np.arange(20) / FPS
    planted = _ankle(np.full_like(t, 0.4), np.full_like(t, 0.08))
    assert pm.foot_skating(planted, planted, FPS) == (0.0, 19)
    assert pm.penetration_mm(planted, planted) == 0.0


def test_a_foot_sliding_while_grounded_gives_its_speed():
    t = np.arange(20) / FPS
    planted = _ankle(np.full_like(t, 0.4), np.full_like(t, 0.08))
    # the prediction slides at 0.3 m/s diagonally in the ground plane and bobs up and down
    sliding = _ankle(0.4 + 0.3 * t / np.sqrt(2), 0.08 + 0.02 * (np.arange(20) % 2), 0.3 * t / np.sqrt(2))
    speed, count = pm.foot_skating(sliding, planted, FPS)
    assert speed == pytest.approx(0.3) and count == 19
    # a true foot sliding slowly on the floor is in contact too, and its own skating is its speed
    assert pm.foot_skating(sliding * [1, 0, 1] + [0, 0.08, 0], sliding * [1, 0, 1], FPS) == (pytest.approx(0.3), 19)


def test_a_foot_in_the_air_or_fast_is_not_in_contact():
    t = np.arange(20) / FPS
    # on the floor for 10 frames, then 20 cm up (still): only the first 9 intervals are contact
    lifted = _ankle(np.zeros_like(t), np.where(np.arange(20) < 10, 0.08, 0.28))
    assert pm.contacts(lifted, FPS)[:, 0].tolist() == [True] * 9 + [False] * 10
    swinging = _ankle(np.where(np.arange(20) < 10, 0.0, 2.0 * (t - 0.9)), lifted[:, 0, 1])  # moves in the air
    assert pm.foot_skating(swinging, lifted, FPS) == (0.0, 9)
    # 4 cm above its lowest point still counts as the floor, 6 cm does not
    steps = _ankle(np.zeros(4), np.array([0.08, 0.12, 0.08, 0.14]))
    assert pm.contacts(steps, FPS)[:, 0].tolist() == [True, True, False]
    landing = _ankle(np.zeros(3), np.array([0.14, 0.08, 0.08]))  # both ends of an interval on the floor
    assert pm.contacts(landing, FPS)[:, 0].tolist() == [False, True]
    # on the floor but running over it at 0.6 m/s: not a contact; at 0.4 m/s: a contact
    assert not pm.contacts(_ankle(0.6 * t, np.zeros_like(t)), FPS).any()
    assert pm.contacts(_ankle(0.4 * t, np.zeros_like(t)), FPS).all()
    assert np.isnan(pm.foot_skating(lifted, _ankle(0.6 * t, np.zeros_like(t)), FPS)[0])


def test_a_foot_under_the_floor_half_the_time_penetrates_by_half_its_depth():
    t = np.arange(20)
    true = np.concatenate([_ankle(np.zeros(20), 0.1 + 0.2 * np.abs(np.sin(t))),
                           _ankle(np.zeros(20), 0.05 + 0.2 * np.abs(np.sin(t)))], 1)  # 2 ankles, floors 0.1, 0.05
    pred = true.copy()
    pred[::2, :, 1] = [0.1 - 0.03, 0.05 - 0.03]  # 3 cm under either floor every other frame
    assert pm.penetration_mm(pred, true) == pytest.approx(15.0)
    pred[::2, :, 1] = 0.5  # above: 0
    assert pm.penetration_mm(pred, true) == 0.0


def test_the_truth_through_the_fitted_camera_lands_on_the_true_world():
    walk = Motion("07_01.npz", _stepping(), 8.0)
    for framing in ("off-centre", "legacy"):
        inputs = pm.eval_inputs(walk, 0, walk.duration, 8.0, phases=1, cameras=3, noise_px=0.0, framing=framing)
        world = pm.to_world(pm.placed(inputs.true, inputs), inputs.cams)
        np.testing.assert_allclose(world, inputs.world, atol=2e-4)
        r = pm.clip_metrics(walk.name, inputs, inputs.true, inputs.true, inputs.true, 8.0, framing, 0.0)
        assert r.skate_fused == pytest.approx(r.skate_true, abs=1e-3) and r.pen_fused < 0.05
        assert r.reproj_fused < 1e-2 and r.action_class == "walk" and r.contacts > 30
        assert 0.01 < r.skate_true < 0.1  # the right foot slides 0.1 m/s, the left is planted


def test_real_walk_feet_are_in_contact_about_half_the_time(motion):
    (walk,) = find_motion([motion / "cmu" / "07_11.bvh"])
    inputs = pm.eval_inputs(walk, 0, walk.duration, 8.0, phases=1, cameras=1, noise_px=0.0)
    share = pm.contacts(inputs.world[:, :, pm.ANKLES], 8.0).mean()
    # the ankle (not the toe) stays low and slow in the middle of the stance phase only
    assert 0.15 < share < 0.4, share
    assert 0.05 < pm.foot_skating(inputs.world[:, :, pm.ANKLES], inputs.world[:, :, pm.ANKLES], 8.0)[0] < 0.2


def _row(clip, views, frames, contacts, skate, mpjpe):
    fields = {f.name: 0.0 for f in dataclasses.fields(pm.ClipMetrics)}
    fields.update(clip=clip, action_class=action_class(clip), framing="medium", views=views, frames=frames,
                  contacts=contacts, skate_fused=skate, mpjpe_fused=mpjpe)
    return pm.ClipMetrics(**fields)


def test_means_weight_skating_by_contacts_and_the_rest_by_frames():
    rows = [_row("07_01", 4, 25, 30, 1.0, 100.0), _row("05_02", 4, 75, 10, 2.0, 200.0),
            _row("08_01", 4, 25, 0, float("nan"), 300.0)]  # no contact: no skating
    walk, dance, everything = pm.class_means(rows)
    assert (walk.clip, dance.clip, everything.clip) == ("walk mean", "dance mean", "all clips")
    assert walk.skate_fused == 1.0 and walk.mpjpe_fused == 200.0 and walk.contacts == 30 and walk.views == 8
    assert everything.skate_fused == pytest.approx((30 * 1.0 + 10 * 2.0) / 40)
    assert everything.mpjpe_fused == pytest.approx((100 * 100 + 300 * 200 + 100 * 300) / 500)
    assert np.isnan(pm.mean_row(rows[2:]).skate_fused)


# --- the command ------------------------------------------------------------------------------------

def _motions(tmp_path):
    for stem, seed in (("07_01", 0), ("05_02", 1), ("mine", 2)):
        np.savez(tmp_path / f"{stem}.npz", joints3d=_stepping(seed=seed), fps=np.array(8.0))
    return [a for stem in ("07_01", "05_02", "mine") for a in ("--motion", tmp_path / f"{stem}.npz")]


def test_eval_pose_prints_tables_per_class_framing_and_noise(tmp_path):
    out = tmp_path / "eval.json"
    result = _cli("eval-pose", *_motions(tmp_path), "--framing", "small", "--framing", "off-centre",
                  "--noise-px", 0, "--noise-px", 5, "--phases", 1, "--cameras", 2, "--threads", 1, "--json", out)
    assert result.exit_code == 0, result.output
    text = result.output
    headers = [line for line in text.splitlines() if line.startswith("== framing")]
    assert len(headers) == 4 and "small" in headers[0] and "noise 0 px" in headers[0]
    assert "off-centre" in headers[3] and "noise 5 px per 1000 px of person height" in headers[3]
    block = text.split("== framing")[1]
    for cls in ("walk", "dance", "other"):
        table = block.split(f"class {cls}:\n")[1].split("\n\n")[0].splitlines()
        assert len(table) == 3 and table[2].startswith(f"{cls} mean"), table  # head, clip, mean
    assert block.index("class walk:") < block.index("class dance:") < block.index("class other:")
    means = block.split("class means:\n")[1].strip().splitlines()
    assert [row.split()[0] for row in means[1:]] == ["walk", "dance", "other", "all"]
    assert "skate dd/fused/true m/s" in means[0] and "penetr. dd/fused/true mm" in means[0]
    data = json.loads(out.read_text())
    assert len(data["clips"]) == 12 and len(data["means"]) == 16
    clip = data["clips"][-1]
    assert (clip["action_class"], clip["framing"], clip["noise_px"]) == ("other", "off-centre", 5.0)
    for key in ("mpjpe_fused", "skate_dd", "skate_fused", "skate_true", "pen_dd", "pen_fused", "reproj_fused"):
        assert np.isfinite(clip[key]) and clip[key] >= 0, key
    assert data["framings"]["small"].startswith("person 240 px tall")


@pytest.mark.parametrize("args, expected", [
    (("--framing", "wide"), "--framing: 'wide', expected one of medium, small, tiny, large, off-centre, legacy"),
    (("--framing", "medium", "--framing", "Small"), "--framing: 'Small', expected one of medium, small, tiny, "
                                                    "large, off-centre, legacy"),
    (("--noise-px", -1), "--noise-px: -1, expected a finite sigma >= 0 (pixels per 1000 px of person height)"),
    (("--noise-px", 2, "--noise-px", "inf"), "--noise-px: inf, expected a finite sigma >= 0 (pixels per 1000 px "
                                             "of person height)"),
    (("--drop", 1), "--drop: 1, expected a fraction in [0, 1)"),
    (("--tail", 0), "--tail: 0, expected a fraction in (0, 1]"),
    (("--phases", 0), "--phases: 0, expected 1..64"),
    (("--phases", 100000), "--phases: 100000, expected 1..64"),
    (("--cameras", 0), "--cameras: 0, expected 1..64"),
    (("--threads", 0), "--threads: 0, expected >= 1"),
])
def test_eval_pose_refuses_bad_values_in_one_line_before_reading_motion(tmp_path, args, expected):
    # the motion does not exist: the option's refusal comes first, before any slow work
    result = _cli("eval-pose", "--motion", tmp_path / "none.bvh", *args)
    assert (result.exit_code, result.output) == (2, f"error: {expected}\n")


def test_eval_pose_help_names_every_framing():
    text = " ".join(CliRunner().invoke(main, ["eval-pose", "--help"], terminal_width=200).output.split())
    for name in pm.FRAMINGS:
        assert f"{name} (" in text, name


def test_eval_pose_leaves_out_motions_too_short_for_the_tail(tmp_path):
    """Of several motions, one whose tail holds fewer than 3 frames (a 1 s run at --tail 0.2) is
    left out with one line; alone, it is an error."""
    motions = _motions(tmp_path)
    np.savez(tmp_path / "09_01.npz", joints3d=_stepping(frames=9), fps=np.array(8.0))
    result = _cli("eval-pose", *motions, "--motion", tmp_path / "09_01.npz", "--tail", 0.2, "--phases", 1,
                  "--cameras", 1, "--threads", 1)
    assert result.exit_code == 0, result.output
    assert result.output.count("skipped ") == 1 and "09_01.npz: its last 0.2 spans" in result.output
    assert "class run" not in result.output and "class walk" in result.output
    alone = _cli("eval-pose", "--motion", tmp_path / "09_01.npz", "--tail", 0.2, "--phases", 1, "--threads", 1)
    assert alone.exit_code == 2 and "fewer than 3 frames" in alone.output and "Traceback" not in alone.output
