"""Host-side helpers shared by the kernel launchers (plain Python: cheap per call)."""
import os

try:
    import triton
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None


def cdiv(a, b):  # triton.cdiv is a jit function and costs microseconds per host call
    return -(-a // b)


def next_pow2(n):
    return 1 << max(int(n) - 1, 0).bit_length()


def interpreting():
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def kernel_for(kernel, device):
    """The launchable kernel for ``device``: the compiled one on CUDA, the interpreter on the CPU."""
    if triton is None:
        raise ValueError("use_kernel: triton is not installed; pass use_kernel=False (the reference)")
    if device.type == "cuda":
        return kernel
    if not interpreting():
        raise ValueError(f"use_kernel: the Triton kernel needs CUDA tensors (got {device}) or TRITON_INTERPRET=1")
    if type(kernel).__name__ != "InterpretedFunction":
        raise ValueError(
            "use_kernel: TRITON_INTERPRET=1 was set after triton was imported; set it in the environment "
            "before anything imports triton to run the kernel on CPU tensors"
        )
    return kernel
