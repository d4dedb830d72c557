import os
from pathlib import Path

import pytest

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
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
