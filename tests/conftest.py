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


@pytest.fixture
def motion():
    d = motion_dir()
    if not d.is_dir():
        pytest.fail(f"shared motion data not found at {d} (set FPENGINE_MOTION_DIR)")
    return d


def pytest_collection_modifyitems(config, items):
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

    from engine.cli import main

    out = tmp_path_factory.mktemp("ckpt") / "demo"
    result = CliRunner().invoke(main, ["init", "--demo", str(out)])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="session")
def engine16(tmp_path_factory, demo_ckpt):
    """The demo checkpoint exported once through `fpengine export` (fp16; runs its parity check)."""
    from click.testing import CliRunner

    from engine.cli import main

    out = tmp_path_factory.mktemp("engine_fp16") / "e"
    r = CliRunner().invoke(main, ["export", "--ckpt", str(demo_ckpt), "--out", str(out)])
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="session")
def engine32(tmp_path_factory, demo_ckpt):
    """The demo checkpoint exported once in fp32 (``export_engine``; runs its parity check)."""
    from export.build import export_engine

    out = tmp_path_factory.mktemp("engine_fp32") / "e"
    export_engine(demo_ckpt, out, precision="fp32", log=lambda s: None)
    return out


@pytest.fixture(scope="session")
def walk_clip():
    from finephys.clip import load_clip

    return load_clip(ROOT / "examples" / "walk.npz")
