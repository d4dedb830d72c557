"""Start-up of ``fpengine generate --engine E --backend triton`` in a new process (issue 19):
wall time from process start to exit, and to the last frame written (``*_last_frame_s``: the
output's newest file time; CUDA's teardown comes after it), for a full-size random-weight
engine (SD 1.5 + AnimateDiff v2 shapes) with and without precompiled UNet steps.

    python benchmarks/bench_startup.py --work /tmp/startup --size 512 [--frames 16 --steps 25] [--cases ...]

Cases (each a fresh process):
    jit_cold     engine without compiled steps, empty Inductor cache (today's first run); at its
                 end it saves Inductor's portable cache (torch.compiler.save_cache_artifacts)
    jit_warm     the same engine again, with the Inductor cache the cold run left
    portable     the same engine, empty Inductor cache, the portable cache loaded first
                 (torch.compiler.load_cache_artifacts)
    precompiled  engine exported with --compile, empty Inductor cache (run twice; the second run
                 under cProfile, its costliest calls by cumulative time in precompiled_again.log)
The video goes to an mp4 where imageio-ffmpeg is installed, else to a folder of PNGs.
Python must find cached bytecode, as on a pip-installed machine: where packages were installed
with --no-compile (wheels carried to the lent GPU), run ``python -m compileall -q DIR`` over them
first, without PYTHONPYCACHEPREFIX (with it, Python ignores the __pycache__ beside the sources).
Also: export time without and with --compile, compiled-step size on disk. Rows go to
benchmarks/results/startup.jsonl with the card, versions and FPENGINE_COMMIT.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_t0 = time.perf_counter()
import torch  # noqa: E402

IMPORT_TORCH_S = time.perf_counter() - _t0
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import write_rows  # noqa: E402


def run(cmd: list[str], env: dict | None = None, log: Path | None = None) -> float:
    t0 = time.perf_counter()
    with open(log or os.devnull, "w") as f:
        r = subprocess.run(cmd, env={**os.environ, **(env or {})}, stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}); see {log}")
    return wall


def last_written(target: Path) -> float:
    """When the output was last written (the mp4, or the newest frame of a PNG folder), as time.time()."""
    files = list(target.iterdir()) if target.is_dir() else [target]
    return max(p.stat().st_mtime for p in files)


PEAK = "bench_startup peak_gpu_mb="


def peak_mb(log: Path) -> int | None:
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.startswith(PEAK)]
    return int(lines[-1][len(PEAK):]) if lines else None


def run_cli(load: str, save: str, args: list[str]) -> None:
    """One case in this process: ``fpengine ARGS``, with Inductor's portable cache loaded from
    ``load`` first and saved to ``save`` after (either may be '-')."""
    if load != "-":
        torch.compiler.load_cache_artifacts(Path(load).read_bytes())
    profile = os.environ.get("BENCH_STARTUP_PROFILE") == "1"
    if profile:
        import cProfile
        import pstats

        print(f"bench_startup import_torch_s={IMPORT_TORCH_S:.2f}", flush=True)
        prof = cProfile.Profile()
        prof.enable()
    from engine.cli.app import main as cli

    try:
        cli(args, standalone_mode=False)
    finally:
        if profile:
            prof.disable()
            stats = pstats.Stats(prof).sort_stats("cumulative")
            stats.print_stats(25)
            stats.print_stats(r"/(engine|finephys|export|fpkernels)/", 50)  # the project's own calls
        if save != "-":
            saved = torch.compiler.save_cache_artifacts()
            if saved is not None:
                Path(save).write_bytes(saved[0])
        if torch.cuda.is_initialized():
            print(f"{PEAK}{torch.cuda.max_memory_allocated() / 2**20:.0f}", flush=True)


def write_checkpoint(ckpt: Path) -> None:
    from benchmarks.bench_generate import full_size_parts
    from finephys.model.checkpoint import save_checkpoint
    from finephys.model.text import write_clip_tokenizer

    tok = Path(tempfile.mkdtemp())
    write_clip_tokenizer(tok)
    save_checkpoint(full_size_parts(), ckpt, tok)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/startup.jsonl")
    ap.add_argument("--cases", default="precompiled,precompiled_again,jit_cold,portable,jit_warm",
                    help="comma-separated subset of the cases, in this order (portable needs jit_cold's cache)")
    a = ap.parse_args()
    wanted = {c.strip() for c in a.cases.split(",") if c.strip()}
    unknown = wanted - {"precompiled", "precompiled_again", "jit_cold", "portable", "jit_warm"}
    if unknown or not wanted:
        ap.error(f"--cases {a.cases}: expected a subset of precompiled, precompiled_again, jit_cold, portable, "
                 f"jit_warm")
    if ("portable" in wanted or "jit_warm" in wanted) and "jit_cold" not in wanted:
        ap.error("--cases: portable and jit_warm use the cache jit_cold leaves; add jit_cold")
    a.work.mkdir(parents=True, exist_ok=True)
    fp = [sys.executable, "-m", "engine"]
    ckpt, plain, comp = a.work / "ckpt", a.work / "engine", a.work / "engine_compiled"
    shape = f"{a.frames}x{a.size}x{a.size}"
    row = {"bench": "startup", "size": a.size, "frames": a.frames, "steps": a.steps, "gpu": torch.cuda.get_device_name(),
           "torch": torch.__version__, "commit": os.environ.get("FPENGINE_COMMIT")}
    if not ckpt.exists():
        t0 = time.perf_counter()
        write_checkpoint(ckpt)
        row["write_checkpoint_s"] = round(time.perf_counter() - t0, 1)
    profile = ["--height", f"{min(256, a.size)}:{a.size}:{max(1024, a.size)}",
               "--width", f"{min(256, a.size)}:{a.size}:{max(1024, a.size)}"]
    row["export_s"] = round(run(fp + ["export", "--ckpt", str(ckpt), "--out", str(plain), "--triton-only", "--overwrite"]
                                + profile, log=a.work / "export.log"), 1)
    if wanted & {"precompiled", "precompiled_again"}:
        subprocess.run(["cp", "-rl", str(plain), str(comp)], check=True)  # hard links: the compile reuses the weights
        row["export_compile_s"] = round(run(fp + ["export", "--ckpt", str(ckpt), "--out", str(comp), "--triton-only",
                                                  "--compile", "--compile-shape", shape] + profile,
                                            env={"TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp()},
                                            log=a.work / "export_compile.log"), 1)
        row["compiled_mb"] = round(sum(f.stat().st_size for f in (comp / "compiled").glob("*")) / 2**20, 1)
    gen = ["generate", "--backend", "triton", "--poses", str(ROOT / "examples/walk.npz"), "--prompt", "a person walking",
           "--frames", str(a.frames), "--height", str(a.size), "--width", str(a.size), "--steps", str(a.steps),
           "--overwrite"]
    row["output"] = "mp4" if importlib.util.find_spec("imageio_ffmpeg") else "png"
    portable = a.work / "portable_cache.bin"
    cache = tempfile.mkdtemp()
    cases = [("precompiled", comp, tempfile.mkdtemp(), "-", "-"), ("precompiled_again", comp, tempfile.mkdtemp(), "-", "-"),
             ("jit_cold", plain, cache, "-", str(portable)), ("portable", plain, tempfile.mkdtemp(), str(portable), "-"),
             ("jit_warm", plain, cache, "-", "-")]
    for name, eng, cdir, load, save in (c for c in cases if c[0] in wanted):
        extra = ["--require-compiled"] if eng == comp else []
        target = a.work / f"{name}.mp4" if row["output"] == "mp4" else a.work / f"{name}_frames"
        out = ["--out" if row["output"] == "mp4" else "--frames-dir", str(target)]
        env = {"TORCHINDUCTOR_CACHE_DIR": cdir, "BENCH_STARTUP_PROFILE": "1" if name == "precompiled_again" else "0"}
        started = time.time()
        row[f"{name}_s"] = round(run([sys.executable, __file__, "_run", load, save] + gen + out + ["--engine", str(eng)]
                                     + extra, env=env, log=a.work / f"{name}.log"), 1)
        row[f"{name}_last_frame_s"] = round(last_written(target) - started, 1)  # the process ends after (teardown)
        row[f"{name}_peak_gpu_mb"] = peak_mb(a.work / f"{name}.log")
        if name == "jit_cold":
            row["portable_cache_mb"] = round(portable.stat().st_size / 2**20, 1) if portable.exists() else None
        print(json.dumps(row), flush=True)
    write_rows([row], a.out)
    print(json.dumps(row, indent=1))


if __name__ == "__main__":
    if sys.argv[1:2] == ["_run"]:
        run_cli(sys.argv[2], sys.argv[3], sys.argv[4:])
    else:
        main()
