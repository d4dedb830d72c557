"""Host-side helpers shared by the kernel launchers (plain Python: cheap per call)."""
import os

import torch

try:
    import triton
    from triton import knobs
    from triton.runtime import driver
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = knobs = driver = None


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


class Launcher:
    """Launches one ``@triton.jit`` kernel with less host work per call than ``kernel[grid](...)``.

    ``kernel[grid](...)`` binds and specialises every argument and hashes a cache key on each call
    (tens of microseconds, far longer than a small kernel runs). On CUDA this keeps the compiled
    kernel per *specialisation key* computed here, a superset of what Triton specialises on (each
    tensor's dtype and 16-byte alignment; each int's ``== 1``, ``% 16 == 0`` and 32-bit range; the
    constexprs and launch options), and replays it through the compiled kernel's own launcher,
    skipping Triton's launch hooks and their metadata while none is registered.
    The first call for a key, and every call off CUDA (the interpreter), takes Triton's own path.
    A tuple for the ``maxnreg`` option lists register caps to try: the first whose build spills
    nothing is kept.
    ``args`` are the kernel's non-constexpr arguments in order; ``consts`` its constexprs, in the
    order they follow the arguments in the signature.
    """

    def __init__(self, kernel):
        self.kernel, self.compiled, self._tensor_positions, self._stream = kernel, {}, {}, None

    @staticmethod
    def _arg_key(a):
        if isinstance(a, bool):
            return ("b", a)
        if isinstance(a, int):
            return ("i", a == 1, a % 16 == 0, -(2**31) <= a < 2**31)
        if isinstance(a, float):
            return "f"
        return (a.dtype, a.data_ptr() % 16 == 0)

    def __call__(self, grid, args, consts: dict, spec=None, **options):
        """``spec``: optional hashable that, with the tensors' dtypes and alignment, determines every
        int argument (e.g. shapes and strides) and which arguments are tensors: then only the
        tensors are inspected per call."""
        a0 = args[0]
        if not a0.is_cuda:
            return kernel_for(self.kernel, a0.device)[grid](*args, **consts, **options)
        device = a0.get_device()
        if spec is None:
            arg_key = tuple(map(self._arg_key, args))
        else:  # where the tensors are is fixed per spec: look it up once, then read only those
            where = self._tensor_positions.get((device, spec))
            if where is None:
                where = tuple(i for i, a in enumerate(args) if isinstance(a, torch.Tensor))
                self._tensor_positions[(device, spec)] = where
            arg_key = (spec, tuple([(args[i].dtype, args[i].data_ptr() % 16 == 0) for i in where]))
        key = (device, arg_key, tuple(consts.items()), tuple(options.items()))
        compiled = self.compiled.get(key)
        if compiled is None:
            caps = options.get("maxnreg")
            if not isinstance(caps, tuple):
                self.compiled[key] = self.kernel[grid](*args, **consts, **options)
                return None
            compiled = self.compiled[key] = self._first_without_spills(grid, args, consts, options, caps)
        if self._stream is None:
            self._stream = driver.active.get_current_stream
        full = (*args, *consts.values())
        g = (*grid, 1, 1)
        enter, leave = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
        if _no_hooks(enter) and _no_hooks(leave):  # the usual case: no metadata to build, no hooks to call
            compiled.run(g[0], g[1], g[2], self._stream(device), compiled.function, compiled.packed_metadata,
                         None, None, None, *full)
            return None
        stream = self._stream(device)
        meta = compiled.launch_metadata(g, stream, *full)
        compiled.run(g[0], g[1], g[2], stream, compiled.function, compiled.packed_metadata, meta, enter, leave,
                     *full)
        return None

    def _first_without_spills(self, grid, args, consts, options, caps):
        """Build with each register cap in ``caps`` in turn; keep the first build that spills nothing to
        local memory (fewer registers per thread, more programs per SM), else the last."""
        for cap in caps:
            compiled = self.kernel.warmup(*args, grid=grid, **consts, **{**options, "maxnreg": cap})
            compiled._init_handles()
            if compiled.n_spills == 0:
                break
        return compiled


def _no_hooks(hook):
    """True for no launch hook: None, or an empty ``HookChain`` (Triton >= 3.4 always has one)."""
    return hook is None or getattr(hook, "calls", True) == []
