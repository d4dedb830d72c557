import os
from pathlib import Path

import pytest
import torch

# Off CUDA, Triton kernels run through the CPU interpreter; it must be set before any kernel
# module is imported (kernels are defined at import time).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]


def motion_dir() -> Path:
    """The shared real motion data (never copied into the repo): ../shared/data/motion."""
    return Path(os.environ.get("FPENGINE_MOTION_DIR", ROOT.parent / "shared" / "data" / "motion"))


def shared_motion() -> Path:
    """The shared motion folder, or a skip: a fresh clone has no ../shared (.ci/run insists on it)."""
    d = motion_dir()
    if not d.is_dir():
        pytest.skip(f"needs the shared motion data at {d}, which a fresh clone does not have "
                    f"(.ci/run requires it; set FPENGINE_MOTION_DIR to point elsewhere)")
    return d


@pytest.fixture
def motion():
    return shared_motion()


def made_walk(frames: int = 120, fps: float = 30.0, speed: float = 1.2, seed: int = 0):
    """(frames, 17, 3) metres, Y up: a made-up walk (legs and arms swinging in antiphase, the
    pelvis moving along +x and bobbing), for tests that need some motion but not real capture."""
    import numpy as np

    from finephys.model.lifter import _STANDING_POSE

    rng = np.random.default_rng(seed)
    pose = np.array(_STANDING_POSE) * np.array([1.0, -1.0, 1.0]) + np.array([0.0, 0.95, 0.0])
    t = np.arange(frames) / fps
    phase = 2 * np.pi * 0.9 * t + rng.uniform(0, 2 * np.pi)
    joints = np.repeat(pose[None], frames, 0)

    def swing(top, joints_below, angle):  # rotate the chain below ``top`` about the x axis
        c, s = np.cos(angle)[:, None], np.sin(angle)[:, None]
        for j in joints_below:
            rel = joints[:, j] - joints[:, top]
            y, z = rel[:, 1:2], rel[:, 2:3]
            joints[:, j] = joints[:, top] + np.concatenate([rel[:, :1], c * y - s * z, s * y + c * z], 1)

    swing(1, (2, 3), 0.45 * np.sin(phase))  # right hip: knee, ankle
    swing(4, (5, 6), -0.45 * np.sin(phase))  # left hip
    swing(14, (15, 16), 0.35 * np.sin(phase))  # right shoulder: elbow, wrist
    swing(11, (12, 13), -0.35 * np.sin(phase))  # left shoulder
    joints[:, :, 0] += speed * t[:, None]
    joints[:, :, 1] += 0.03 * np.abs(np.sin(phase))[:, None]
    return joints


@pytest.fixture(scope="session")
def made_motion(tmp_path_factory):
    """A folder of two made-up walks as motion npz files (``joints3d``, ``fps``)."""
    import numpy as np

    d = tmp_path_factory.mktemp("made_motion")
    for seed in (0, 1):
        np.savez(d / f"walk{seed}.npz", joints3d=made_walk(seed=seed), fps=np.array(30.0))
    return d


# fixtures whose set-up alone takes 15 s or more on 2 idle cores: their tests are `slow`
SLOW_FIXTURES = {"service"}  # a local Ray instance and Serve application (47 s)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def demo_ckpt(tmp_path_factory):
    """The demo checkpoint written once by `fpengine init --demo` (through CliRunner)."""
    from click.testing import CliRunner

    from engine.cli.app import main

    out = tmp_path_factory.mktemp("ckpt") / "demo"
    result = CliRunner().invoke(main, ["init", "--demo", str(out)])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="session")
def engine16(tmp_path_factory, demo_ckpt):
    """The demo checkpoint exported once through `fpengine export` (fp16; runs its parity check)."""
    from click.testing import CliRunner

    from engine.cli.app import main

    out = tmp_path_factory.mktemp("engine_fp16") / "e"
    r = CliRunner().invoke(main, ["export", "--ckpt", str(demo_ckpt), "--out", str(out)])
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="session")
def engine32(tmp_path_factory, demo_ckpt):
    """The demo checkpoint exported once in fp32 (``export_engine``; runs its parity check)."""
    from engine.check import export_parity
    from export.build import export_engine

    out = tmp_path_factory.mktemp("engine_fp32") / "e"
    export_engine(demo_ckpt, out, precision="fp32", check=export_parity, log=lambda s: None)
    return out


@pytest.fixture(scope="session")
def walk_clip():
    from finephys.poses.clip import load_clip

    return load_clip(ROOT / "examples" / "walk.npz")
