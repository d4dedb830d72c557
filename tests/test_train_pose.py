"""Issue 5: training and evaluating the pose stack on real motion (CPU, a few seconds each)."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from engine.cli.app import main
from finephys.poses.bvh import CMU_SCALE, bvh_to_h36m, read_bvh
from finephys.model.config import LifterConfig, PhysNetConfig, PoseConfig
from finephys.errors import InputError
from finephys.model.lifter import Lifter
from finephys.model.physnet import PhysNet
from finephys.training.pose_data import find_motion, mirror, read_panoptic
from finephys.training.pose_metrics import bone_std_mm, evaluate, joint_accelerations, mpjpe_mm
from finephys.model.pose_weights import DEMO_WEIGHTS, load_pose_stack, load_pose_weights_into, save_pose_weights
from finephys.training.train_pose import TrainOptions, directional_predictions, train_pose

TINY = PoseConfig(lifter=LifterConfig(dim=16, depth=1, heads=2), physnet=PhysNetConfig(hidden=16, layers=1))


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


# --- BVH forward kinematics against an independent chain computed from the file's text --------

def _rot(axis, deg):
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return {"X": np.array([[1, 0, 0], [0, c, -s], [0, s, c]]),
            "Y": np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]]),
            "Z": np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])}[axis]


def _chain_position(text, frame, target):
    """World position of joint ``target`` by walking the hierarchy text by hand."""
    toks = text.split()
    stack, joints, col, i = [], {}, 0, 0
    while toks[i] != "MOTION":
        t = toks[i]
        if t in ("ROOT", "JOINT"):
            stack.append(toks[i + 1])
            joints[toks[i + 1]] = {"parent": stack[-2] if len(stack) > 1 else None}
            i += 2
        elif t == "End":
            stack.append(None)
            i += 2
        elif t == "OFFSET" and stack[-1] is not None:
            joints[stack[-1]]["offset"] = np.array([float(v) for v in toks[i + 1:i + 4]])
            i += 4
        elif t == "CHANNELS":
            n = int(toks[i + 1])
            joints[stack[-1]]["channels"] = [(c, col + k) for k, c in enumerate(toks[i + 2:i + 2 + n])]
            col += n
            i += 2 + n
        elif t == "}":
            stack.pop()
            i += 1
        else:
            i += 1
    lines = text.splitlines()
    values = [float(v) for v in lines[lines.index("MOTION") + 3 + frame].split()]
    chain = [target]
    while joints[chain[-1]]["parent"] is not None:
        chain.append(joints[chain[-1]]["parent"])
    pos, rot = np.zeros(3), np.eye(3)
    for name in reversed(chain):
        local, trans = np.eye(3), joints[name]["offset"].copy()
        for ch, c in joints[name]["channels"]:
            if ch.endswith("rotation"):
                local = local @ _rot(ch[0], values[c])
            else:
                trans["XYZ".index(ch[0])] += values[c]
        pos, rot = pos + rot @ trans, rot @ local
    return pos * CMU_SCALE


def test_bvh_fk_reproduces_known_walk_positions(motion):
    path = motion / "131_01.bvh"
    text = path.read_text()
    h36m = bvh_to_h36m(read_bvh(path))
    for frame in (0, 500, 993):
        for index, name in ((13, "LeftWrist"), (16, "RightWrist"), (6, "LeftAnkle"), (3, "RightAnkle")):
            np.testing.assert_allclose(h36m[frame, index], _chain_position(text, frame, name), atol=1e-9)
    # the subject walks: the pelvis covers metres; the ankles stay below the pelvis
    assert np.linalg.norm(h36m[-1, 0, [0, 2]] - h36m[0, 0, [0, 2]]) > 2.0
    assert (h36m[:, [3, 6], 1] < h36m[:, :1, 1]).all()


# --- motion files ---------------------------------------------------------------------------

def test_panoptic_and_mirror(motion):
    bodies = read_panoptic(motion / "panoptic_160906_band2" / "hdPose3d_stage1_coco19")
    assert len(bodies) == 3 and all(b.joints.shape == (20, 17, 3) for b in bodies)
    seated = bodies[0].joints
    assert (seated[:, 10, 1] > seated[:, 0, 1]).all()  # Y up: head above pelvis
    assert 0.3 < np.linalg.norm(seated[0, 10] - seated[0, 0]) < 1.0  # metres
    m = mirror(seated)
    np.testing.assert_allclose(m[:, 4, 0], -seated[:, 1, 0])  # left hip <- mirrored right hip
    np.testing.assert_allclose(mirror(m), seated)


@pytest.mark.parametrize("command", ["train-pose", "eval-pose"])
def test_bad_motion_files(motion, tmp_path, command):
    text = (motion / "131_01.bvh").read_text()
    (tmp_path / "cut.bvh").write_text(text[: len(text) // 3])
    np.savez(tmp_path / "shape.npz", joints3d=np.zeros((40, 16, 3)), fps=np.array(8.0))
    nan = np.zeros((40, 17, 3))
    nan[3, 4, 1] = np.nan
    np.savez(tmp_path / "nan.npz", joints3d=nan, fps=np.array(8.0))
    np.savez(tmp_path / "nofps.npz", joints3d=np.zeros((40, 17, 3)))
    (tmp_path / "empty").mkdir()
    (tmp_path / "m.txt").write_text("1 2 3")
    cases = {"cut.bvh": "truncated", "shape.npz": "'joints3d' has shape (40, 16, 3)",
             "nan.npz": "NaN", "nofps.npz": "missing key 'fps'", "empty": "no .bvh, .npz",
             "m.txt": "unsupported motion file type", "none.bvh": "not found"}
    for name, expected in cases.items():
        extra = ["--out", tmp_path / "w.safetensors"] if command == "train-pose" else []
        result = _cli(command, "--motion", tmp_path / name, *extra)
        assert result.exit_code == 2, (name, result.output)
        line = result.output.strip()
        assert line.startswith("error: ") and "\n" not in line and expected in line, (name, line)
        assert name in line
    assert not (tmp_path / "w.safetensors").exists()


def test_motion_too_short_for_training(tmp_path):
    np.savez(tmp_path / "short.npz", joints3d=np.zeros((4, 17, 3)), fps=np.array(8.0))
    with pytest.raises(InputError, match="no window of 5 frames"):
        train_pose(find_motion([tmp_path / "short.npz"]), TINY, 8.0, TrainOptions(epochs=1, steps_per_epoch=1),
                   progress=False, log=None)


# --- training ---------------------------------------------------------------------------------

def test_short_training_lowers_the_loss_and_is_deterministic(motion, tmp_path):
    torch.set_num_threads(1)
    walk = find_motion([motion / "131_01.bvh"])
    opts = TrainOptions(epochs=3, physnet_epochs=3, steps_per_epoch=6, batch_size=8, max_frames=8, seed=3)
    lifter, physnet, hist, info = train_pose(walk, TINY, 8.0, opts, progress=False, log=None)
    assert hist.lifter[-1] < hist.lifter[0] and hist.physnet[-1] < hist.physnet[0]
    assert len(hist.val_dd) == 6 and info["held_out"][0][1] == pytest.approx(0.8 * walk[0].duration, abs=1e-3)
    assert "fuse_weight" not in info  # the config's weight is kept unless asked to fit
    # the prior buffers come from the training data: a standing person, head above the feet
    prior = lifter.mean_pose_3d
    assert prior[10, 1] < -0.4 < 0.6 < prior[3, 1] and prior[0].abs().max() < 1e-6
    tiny = TrainOptions(epochs=1, physnet_epochs=1, steps_per_epoch=2, batch_size=4, max_frames=6, seed=3)
    runs = [train_pose(walk, TINY, 8.0, o, progress=False, log=None)[:2]
            for o in (tiny, tiny, TrainOptions(**{**tiny.__dict__, "seed": 4}))]
    same = [[torch.equal(a, b) for a, b in zip(runs[0][k].state_dict().values(), runs[i][k].state_dict().values())]
            for i in (1, 2) for k in (0, 1)]
    assert all(same[0]) and all(same[1])  # the same seed gives the same weights
    assert not all(same[3])  # another seed does not


def test_train_pose_cli_writes_weights_and_curve(motion, tmp_path):
    out = tmp_path / "pose.safetensors"
    result = _cli("train-pose", "--motion", motion / "131_01.bvh", "--out", out, "--epochs", 2,
                  "--physnet-epochs", 1, "--steps-per-epoch", 2, "--batch-size", 4, "--threads", 1, "--quiet",
                  "--fuse-weight", "fit")
    assert result.exit_code == 0, result.output
    assert out.is_file() and out.with_suffix(".png").is_file()
    from PIL import Image

    assert Image.open(out.with_suffix(".png")).size == (720, 440)
    lifter, physnet, meta = load_pose_stack(out)
    assert meta["fps"] == 8.0 and meta["info"]["options"]["seed"] == 0
    w = meta["fuse_weight"]  # fitted per joint, stored in the file's pose config
    assert isinstance(w, tuple) and len(w) == 17 and all(0 <= x <= 1 for x in w) and "fuse_weight" not in meta["info"]
    again = _cli("train-pose", "--motion", motion / "131_01.bvh", "--out", out)
    assert again.exit_code == 2 and "already exists" in again.output
    for command, value in (("train-pose", "2"), ("train-pose", "half"), ("eval-pose", "fit"), ("eval-pose", "-0.1")):
        extra = ["--out", tmp_path / "w2.safetensors"] if command == "train-pose" else []
        bad = _cli(command, "--motion", motion / "131_01.bvh", "--fuse-weight", value, *extra)
        assert bad.exit_code == 2 and bad.output.count("\n") == 1 and "--fuse-weight" in bad.output, bad.output
    assert not (tmp_path / "w2.safetensors").exists()


def test_directional_predictions_match_integrate():
    torch.manual_seed(0)
    physnet = PhysNet(PhysNetConfig(hidden=16, layers=1))
    s = torch.randn(2, 7, 17, 3) * 0.3
    fwd, rev = directional_predictions(physnet, s, 0.125)
    s_pp, _, _ = physnet(s, 0.125)
    torch.testing.assert_close(s_pp[:, 2:-2], 0.5 * (fwd[:, :-2] + rev[:, 2:]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s_pp[:, :2], rev[:, :2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s_pp[:, -2:], fwd[:, -2:], rtol=1e-5, atol=1e-5)


# --- evaluation -------------------------------------------------------------------------------

def _windmill(fps=8.0, frames=40, omega=math.pi):
    """Standing still but the left arm, which swings round the shoulder at constant angular
    speed: the elbow (0.28 m) and wrist (0.53 m) accelerate by r * 2 (1 - cos(w dt)) / dt^2."""
    from finephys.model.lifter import _STANDING_POSE

    pose = np.array(_STANDING_POSE) * np.array([1.0, -1.0, 1.0]) + np.array([0.0, 0.95, 0.0])
    joints = np.repeat(pose[None], frames, 0)
    a = omega * np.arange(frames) / fps
    circle = np.stack([np.zeros(frames), -np.cos(a), np.sin(a)], -1)
    joints[:, 12] = pose[11] + 0.28 * circle
    joints[:, 13] = pose[11] + 0.53 * circle
    dt = 1 / fps
    factor = 2 * (1 - math.cos(omega * dt)) / dt**2
    return joints, 0.28 * factor, 0.53 * factor


def test_accelerations_of_known_motion():
    joints, elbow, wrist = _windmill()
    acc = joint_accelerations(joints, 8.0)
    np.testing.assert_allclose(acc[:, 12], elbow, rtol=1e-9)
    np.testing.assert_allclose(acc[:, 13], wrist, rtol=1e-9)
    assert np.abs(np.delete(acc, [12, 13], axis=1)).max() < 1e-9
    assert bone_std_mm(joints) < 1e-6  # a rigid swing keeps every bone length
    shifted = joints + np.array([5.0, 0.0, 0.0])
    assert mpjpe_mm(shifted, joints).max() < 1e-9  # root alignment


def test_eval_pose_reports_known_accelerations(tmp_path):
    joints, elbow, wrist = _windmill()
    np.savez(tmp_path / "windmill.npz", joints3d=joints, fps=np.array(8.0))
    out = tmp_path / "eval.json"
    result = _cli("eval-pose", "--motion", tmp_path / "windmill.npz", "--phases", 1, "--cameras", 2,
                  "--json", out, "--threads", 1)
    assert result.exit_code == 0, result.output
    assert "MPJPE" in result.output and "windmill.npz" in result.output
    (clip,) = json.loads(out.read_text())["clips"]
    assert clip["views"] == 2 and clip["frames"] == 40
    assert (clip["framing"], clip["noise_px"], clip["action_class"]) == ("medium", 2.0, "other")  # the defaults
    assert clip["accel_true"] == pytest.approx((elbow + wrist) / 17, rel=1e-5)
    assert clip["accel_p95_true"] == pytest.approx(wrist, rel=1e-5)
    assert clip["bone_std_true"] < 1e-3
    for key in ("mpjpe_dd", "mpjpe_pp", "mpjpe_fused", "accel_dd", "accel_fused", "bone_std_fused", "reproj_fused"):
        assert np.isfinite(clip[key]) and clip[key] >= 0


# --- the shipped demo weights -------------------------------------------------------------------

def test_pose_weights_are_strict(tmp_path):
    lifter, physnet = Lifter(TINY.lifter), PhysNet(TINY.physnet)
    path = save_pose_weights(tmp_path / "w.safetensors", lifter, physnet, TINY, 8.0, {"b": 1, "a": 2})
    again = save_pose_weights(tmp_path / "w2.safetensors", lifter, physnet, TINY, 8.0, {"b": 1, "a": 2})
    assert path.read_bytes() == again.read_bytes()  # one file per content, whatever the hash order
    with pytest.raises(InputError, match="config"):
        load_pose_weights_into(path, Lifter(LifterConfig(dim=32, depth=1, heads=2)), physnet)
    (tmp_path / "bad.safetensors").write_bytes(b"nope")
    with pytest.raises(InputError, match="bad.safetensors"):
        load_pose_stack(tmp_path / "bad.safetensors")
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    save_file(load_file(str(path)), str(tmp_path / "v1.safetensors"), metadata={**meta, "format_version": "1"})
    with pytest.raises(InputError, match="format version 1.*divided by the image width.*retrain"):
        load_pose_stack(tmp_path / "v1.safetensors")


def test_whole_files_are_held_out_by_name(motion):
    from finephys.training.pose_data import split_held_out

    motions = find_motion([motion / "cmu"])
    kept, held = split_held_out(motions, ["09_11", "05_0[6-7]"])
    assert sorted(m.name.rsplit("/", 1)[1] for m in held) == ["05_06.bvh", "05_07.bvh", "09_11.bvh"]
    assert len(kept) == len(motions) - 3 and not set(map(id, kept)) & set(map(id, held))
    with pytest.raises(InputError, match="--hold-out '10_01': matches none of the 47"):
        split_held_out(motions, ["10_01"])
    with pytest.raises(InputError, match="holds out every motion"):
        split_held_out(motions, ["*"])


def test_demo_ships_trained_pose_stack_that_meets_the_targets(motion):
    from finephys.model.demo import demo_config, load_demo

    assert DEMO_WEIGHTS.is_file() and DEMO_WEIGHTS.stat().st_size < 5_000_000  # issue 22: at most 5 MB
    lifter, physnet, meta = load_pose_stack(DEMO_WEIGHTS)
    cfg = demo_config()
    assert meta["lifter"] == cfg.pose.lifter and meta["physnet"] == cfg.pose.physnet and meta["fps"] == cfg.fps
    demo = load_demo()
    for a, b in zip(lifter.state_dict().values(), demo.lifter.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(physnet.state_dict().values(), demo.physnet.state_dict().values()):
        assert torch.equal(a, b)
    assert sorted(Path(n).stem for n, t0, _ in meta["info"]["held_out"] if t0 == 0) == sorted(HELD_OUT_FILES)
    # a held-out file, never trained on (README: S_dd 64.2, S_fused 63.1 mm at 5 px, medium framing)
    (r,) = evaluate(lifter, physnet, find_motion([motion / "cmu" / "07_11.bvh"]), meta["fps"], meta["fuse_weight"],
                    noise_px=5.0)
    assert r.mpjpe_fused < r.mpjpe_dd < 64.2 * 1.1
    assert r.bone_std_fused < 10 < r.bone_std_dd


# README, "Training the pose stack": held-out tails per class (medium framing, 2 px), S_fused MPJPE mm.
HELD_OUT_FILES = ("07_11", "09_11", "01_14", "05_06", "06_14")
TAIL_MPJPE = {"walk": 47.1, "dance": 64.4}


def test_per_class_metrics_on_held_out_tails_match_the_readme(motion):
    """Issue 22: the walk and dance classes' S_fused MPJPE on the last 20% of their training files
    stays within 10% of the README's table."""
    from finephys.training.motion_classes import action_class
    from finephys.training.pose_metrics import class_means

    lifter, physnet, meta = load_pose_stack(DEMO_WEIGHTS)
    files = [p for p in sorted((motion / "cmu").glob("*.bvh")) + [motion / "131_01.bvh"]
             if action_class(p.name) in TAIL_MPJPE and p.stem not in HELD_OUT_FILES]
    results = evaluate(lifter, physnet, find_motion(files), meta["fps"], meta["fuse_weight"], tail=0.2)
    means = {r.action_class: r.mpjpe_fused for r in class_means(results)}
    for action, readme in TAIL_MPJPE.items():
        assert abs(means[action] / readme - 1) < 0.1, (action, means[action], readme)


def test_the_shipped_stack_sees_one_person_whatever_the_lens(motion):
    """Issue 22: the same 3D through a 0.5x and a 2x focal length (a person 4x smaller or bigger
    in the image, about an off-centre principal point) gives the same S_fused within 5 mm, with
    the clip's camera matrix and without one: the lifter reads 2D normalised by the person, not
    by the frame."""
    from types import SimpleNamespace

    from finephys.model.demo import load_demo_pose_parts
    from finephys.sampler.poses import pose_stack
    from finephys.training.pose_data import place_cameras, project, sample_at

    cfg, lifter, physnet = load_demo_pose_parts()
    (walk,) = find_motion([motion / "cmu" / "07_11.bvh"])
    world = np.repeat(sample_at(walk, np.arange(16) / cfg.fps)[None], 2, axis=0)
    fused = {}
    for focal, known in ((0.5, True), (2.0, True), (0.5, False), (2.0, False)):
        cams = place_cameras(world, np.array([0.4, 2.0]), np.full(2, 0.15), np.zeros(2), np.full(2, 4.0),
                             np.full(2, 1920.0), np.full(2, 1920.0 * focal))
        # with its camera matrix the clip may have any principal point; without, it is the centre
        centre = np.array([[1260.0, 440.0]] if known else [[960.0, 540.0]]).repeat(2, 0)
        cams = type(cams)(cams.R, cams.C, cams.f, centre, cams.width)
        uv, _ = project(world, cams)
        kp = torch.as_tensor(uv, dtype=torch.float32)
        out = pose_stack(SimpleNamespace(lifter=lifter, physnet=physnet), kp, torch.ones(kp.shape[:-1]),
                         cfg.fps, cfg.pose.fuse_weight, K=torch.as_tensor(cams.K(0)) if known else None)
        fused[focal, known] = out[2].double().numpy()
    for known in (True, False):  # with the clip's camera, and with none (the default camera)
        assert np.abs(fused[0.5, known] - fused[2.0, known]).max() * 1000 < 5.0


# --- input checks -------------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["train-pose", "eval-pose"])
def test_motion_of_absurd_magnitude_is_refused(tmp_path, command):
    """joints3d x 1e30 trained NaN weights and evaluated to an MPJPE of 4.6e32 mm."""
    from tests.conftest import made_walk

    walk = made_walk(frames=40, fps=8.0)
    np.savez(tmp_path / "huge.npz", joints3d=walk * 1e30, fps=np.array(8.0))
    peak = np.abs(walk).max() * 1e30
    out = tmp_path / "w.safetensors"
    extra = ["--out", out] if command == "train-pose" else ["--json", tmp_path / "e.json"]
    result = _cli(command, "--motion", tmp_path / "huge.npz", *extra)
    assert result.exit_code == 2, result.output
    assert result.output.strip() == (f"error: {tmp_path / 'huge.npz'}: joint coordinates reach {peak:.3g} m, "
                                     f"expected metres with |x| <= 1,000 (H36M-17, Y up)")
    assert not out.exists() and not out.with_suffix(".png").exists() and not (tmp_path / "e.json").exists()


def test_a_diverging_loss_writes_no_weights(tmp_path, monkeypatch):
    import finephys.training.train_pose as tp
    from finephys.training.train_pose import save_trained
    from tests.conftest import made_walk

    np.savez(tmp_path / "walk.npz", joints3d=made_walk(frames=40, fps=8.0), fps=np.array(8.0))
    step = tp._lifter_step
    monkeypatch.setattr(tp, "_lifter_step", lambda *a: step(*a) * float("nan"))
    out = tmp_path / "w.safetensors"
    result = _cli("train-pose", "--motion", tmp_path / "walk.npz", "--out", out, "--epochs", 1, "--physnet-epochs", 0,
                  "--steps-per-epoch", 2, "--batch-size", 2, "--threads", 1, "--quiet")
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines()[-1] == ("error: the lifter loss diverged at step 1 (loss nan, gradient "
                                                      "norm nan), expected finite; no weights written")
    assert not out.exists() and not out.with_suffix(".png").exists()
    lifter, physnet = Lifter(TINY.lifter), PhysNet(TINY.physnet)
    with torch.no_grad():
        next(lifter.parameters()).fill_(float("inf"))
    with pytest.raises(InputError, match="the trained weights hold NaN or inf, expected finite; not written"):
        save_trained(out, lifter, physnet, TINY, 8.0, {})
    assert not out.exists()


@pytest.mark.parametrize("args, message", [
    (["--epochs", 0], "--epochs: 0, expected >= 1"),
    (["--steps-per-epoch", 0], "--steps-per-epoch: 0, expected >= 1"),
    (["--batch-size", 0], "--batch-size: 0, expected >= 1"),
    (["--val-fraction", 1], "--val-fraction: 1.0, expected a fraction in [0, 1)"),
])
def test_training_options_are_checked_before_any_motion_is_read(tmp_path, monkeypatch, args, message):
    import finephys.training.pose_data

    monkeypatch.setattr(finephys.training.pose_data, "find_motion", lambda *a: pytest.fail("motion read first"))
    out = tmp_path / "w.safetensors"
    result = _cli("train-pose", "--motion", tmp_path / "none.npz", "--out", out, *args)
    assert result.exit_code == 2 and result.output.strip() == f"error: {message}", result.output
    assert not out.exists()


def test_eval_pose_weights_that_are_a_folder(tmp_path):
    from tests.conftest import made_walk

    np.savez(tmp_path / "walk.npz", joints3d=made_walk(frames=40, fps=8.0), fps=np.array(8.0))
    (tmp_path / "w").mkdir()
    result = _cli("eval-pose", "--motion", tmp_path / "walk.npz", "--weights", tmp_path / "w",
                  "--json", tmp_path / "e.json")
    assert result.exit_code == 2, result.output
    assert result.output.strip() == (f"error: --weights {tmp_path / 'w'}: is a folder, expected a pose weights file "
                                     f"(.safetensors from fpengine train-pose)")
    assert not (tmp_path / "e.json").exists()
