"""Kernel tests run the Triton kernels on the CPU through Triton's interpreter where no GPU is present.

TRITON_INTERPRET=1 must be set before triton is first imported (triton.jit, and triton.language's own
jitted helpers such as tl.sum, pick the interpreter at decoration time): this conftest sets it when no
GPU is present, which is early enough unless a test module collected before this folder imported
triton; then the CPU-kernel tests fail with that explanation (set TRITON_INTERPRET=1 in CI's
environment to be safe). On a CUDA machine the interpreter stays off and the CPU-kernel tests are
skipped: the ``gpu``-marked tests cover the compiled kernels.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _interpreting():
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


@pytest.fixture
def interp():
    """Marks a test that runs a Triton kernel on CPU tensors through the interpreter."""
    try:
        import triton  # noqa: F401
    except ImportError:
        pytest.skip("triton is not installed")
    if not _interpreting():
        pytest.skip("CPU kernel tests need TRITON_INTERPRET=1 (set automatically where no GPU is present)")
    import fpkernels.physnet

    if type(fpkernels.physnet._physnet_fused_slots_kernel).__name__ != "InterpretedFunction":
        pytest.fail("triton was imported before TRITON_INTERPRET=1 was set: set it in the test environment")


@pytest.fixture
def gen():
    """A seeded generator: every test draws fresh, non-zero random data from it."""
    return torch.Generator().manual_seed(1234)
