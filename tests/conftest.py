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
def walk_clip():
    from finephys.clip import load_clip

    return load_clip(ROOT / "examples" / "walk.npz")
