"""The C++ compiler that AOTInductor links the engine's packages with, checked before an export
spends minutes compiling (issue 19).

Inductor takes ``$CXX``, else the first ``g++`` on ``PATH``. On the lent GPU's image that is a
wrapper script whose linked ``.so`` carries a second copy of libstdc++'s locale symbols; a package
built with it kills the process that loads it (SIGSEGV in the package's constructor;
benchmarks/RESULTS.md, "AOTInductor probe"), the exporting process included. A crash cannot be
caught, so before compiling, a one-op package is built and loaded in a subprocess with each
candidate compiler (all at once), and the first in this order that works builds the real packages:

- ``$CXX`` where it is set, else Inductor's default (``g++`` on ``PATH``);
- then ``/usr/bin/g++`` where that is another file (the lent GPU's image sets ``CXX`` to the
  wrapper), after one line saying why.
"""
from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from finephys.errors import InputError

SYSTEM_GXX = "/usr/bin/g++"
PROBE_TIMEOUT_S = 300.0
_PROBE = r"""
import sys, torch
class Probe(torch.nn.Module):
    def forward(self, x):
        return x * 2 + 1
x = torch.arange(8, dtype=torch.float32, device=sys.argv[2])
ep = torch.export.export(Probe(), (x,), strict=False)
path = torch._inductor.aoti_compile_and_package(ep, package_path=sys.argv[1])
index = torch.cuda.current_device() if x.is_cuda else -1
loader = torch._C._aoti.AOTIModelPackageLoader(path, "model", True, 1, index)
out = loader.run([x])[0]
if not torch.equal(out, x * 2 + 1):
    sys.exit("the probe package gave wrong values")
"""


def host_isa_configs(device: str) -> dict:
    """Inductor settings for a package on ``device``: on a GPU, no probe of the host's vector
    instruction sets. Every AOTInductor compile otherwise builds and runs a test program per x86
    instruction set (``pick_vec_isa``), although a GPU package's host code is only the launcher;
    on the lent GPU a process's first package took ~70 s and a one-op probe ~80 s."""
    return {"cpp.vec_isa_ok": False} if device == "cuda" else {}


def _inductor_cache() -> str:
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return cache_dir()


def probe(cxx: str | None, device: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None where a one-op package linked by ``cxx`` (None: Inductor's default) loads and runs in a
    fresh process on ``device`` ('cpu' or 'cuda'); else what went wrong, in words."""
    env = {k: v for k, v in os.environ.items() if k != "CXX"}
    if cxx is not None:
        env["CXX"] = cxx
    if host_isa_configs(device):
        env["TORCHINDUCTOR_VEC_ISA_OK"] = "0"
    with tempfile.TemporaryDirectory() as d:
        env.setdefault("TORCHINDUCTOR_CACHE_DIR", _inductor_cache())  # the cache stays where it was
        env["TMPDIR"] = d  # the loader unpacks the package under TMPDIR; a crashed probe leaves it here, not in /tmp
        try:
            r = subprocess.run([sys.executable, "-c", _PROBE, str(Path(d) / "probe.pt2"), device], env=env,
                               capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return f"timed out after {timeout:.0f} s"
    if r.returncode == 0:
        return None
    if r.returncode < 0:
        try:
            name = signal.Signals(-r.returncode).name
        except ValueError:
            name = f"signal {-r.returncode}"
        return f"its package crashed the process that loaded it ({name})"
    lines = [ln.strip() for ln in r.stderr.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if "Error" in ln.split(":")[0] or ln.startswith("error")]
    return f"failed: {(errors or lines or [f'exit {r.returncode}'])[-1]}"


def candidates(env_cxx: str | None, default_gxx: str | None, system_exists: bool) -> list[str | None]:
    """The compilers to try, in order: ``$CXX`` where set (else None: Inductor's default,
    ``default_gxx`` on PATH), then ``/usr/bin/g++`` where that is another file."""
    first = (shutil.which(env_cxx) or env_cxx) if env_cxx else default_gxx
    out: list[str | None] = [env_cxx or None]
    if system_exists and (first is None or os.path.realpath(first) != os.path.realpath(SYSTEM_GXX)):
        out.append(SYSTEM_GXX)
    return out


def package_compiler(device: str, log=None) -> str:
    """The compiler to build packages with on ``device``, after the probe (once per process and
    device: a changed ``$CXX`` is not seen again); an InputError naming every compiler tried where
    none works (not cached: a retry probes again)."""
    cxx, note = _choose(device)
    if note and log is not None:
        log(note)
    return cxx


@functools.cache
def _choose(device: str) -> tuple[str, str | None]:
    """(compiler, a line saying why it is not the first candidate, or None). The default (None)
    is returned as ``g++``, what Inductor takes without ``$CXX``, so the export passes it explicitly
    (an empty ``$CXX`` would otherwise reach Inductor)."""
    default = shutil.which("g++")
    order = candidates(os.environ.get("CXX"), default, Path(SYSTEM_GXX).exists())
    # every candidate's probe at once: each is a process of its own that spends over a minute on the
    # lent GPU (import, export, compile, load), and the first candidate is the one that crashes there
    with ThreadPoolExecutor(len(order)) as pool:
        verdicts = list(pool.map(lambda cxx: probe(cxx, device), order))
    tried = []
    for i, (cxx, why) in enumerate(zip(order, verdicts)):
        chosen = cxx or "g++"
        if why is None:
            return chosen, (f"compile: {tried[-1]}; linking packages with {chosen} instead" if tried else None)
        name = (f"CXX={cxx}" if i == 0 else cxx) if cxx else f"g++ on PATH ({default or 'none found'})"
        tried.append(f"{name}: {why}")
    raise InputError("--compile: no C++ compiler here builds AOTInductor packages that load ("
                     + "; ".join(tried) + "); set CXX to a working g++ or export without --compile")
