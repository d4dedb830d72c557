"""Precompiled UNet steps (``engine.precompile``): which steps an engine directory may use on this
machine, the one-line reasons when it may not, the refusal of a tampered file, and (on a GPU) a
compiled engine within DESIGN.md's fp16 rule that loads in a new process without compiling."""
import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from finephys.errors import InputError
from finephys.sampler.options import Plan

from engine.precompile import CompiledSteps, StepCall, StepShape, code_hash, environment, planned_steps, require_steps


def _engine(tmp_path, env=None, code=None, steps=(("forward", None, "2x16x128x128"),), payload=b"compiled bytes"):
    """A stand-in engine directory: a manifest listing compiled steps with their sha256."""
    files, listed = {}, []
    (tmp_path / "compiled").mkdir(exist_ok=True)
    for entry, depth, shape in steps:
        rel = f"compiled/{entry}-{shape}.bin"
        (tmp_path / rel).write_bytes(payload)
        files[rel] = {"sha256": hashlib.sha256(payload).hexdigest(), "bytes": len(payload)}
        listed.append({"entry": entry, "depth": depth, "shape": shape, "file": rel})
    info = {"env": env or environment(), "code": code or code_hash(), "steps": listed}
    return CompiledSteps(tmp_path, info, files), info, files


def test_shape_parsing_and_refusals():
    assert StepShape.parse("16x512x512") == StepShape(2, 16, 512, 512)
    assert StepShape.parse("1x8x256x384") == StepShape(1, 8, 256, 384)
    assert str(StepShape(2, 16, 512, 512)) == "2x16x512x512"
    assert StepShape.of_sample(torch.zeros(2, 4, 16, 64, 48), 8) == StepShape(2, 16, 512, 384)
    assert StepShape.of_sample(torch.zeros(2, 4, 16, 32, 32), 4) == StepShape(2, 16, 128, 128)
    for bad in ("16x512", "16x500x512", "0x16x512x512", "axbxc"):
        with pytest.raises(InputError, match="--compile-shape"):
            StepShape.parse(bad)


def test_usable_steps_and_the_reason_for_each_miss(tmp_path):
    compiled, info, files = _engine(tmp_path)
    assert compiled.why_not is None
    assert compiled.missing("forward", None, StepShape(2, 16, 128, 128)) is None
    miss = compiled.missing("forward", None, StepShape(2, 16, 256, 256))
    assert "no compiled forward" in miss and "2x16x256x256" in miss and "compiled: 2x16x128x128" in miss
    assert "DeepCache depth 1" in compiled.missing("forward_shallow", 1, StepShape(2, 16, 128, 128))

    other_gpu = CompiledSteps(tmp_path, {**info, "env": {**info["env"], "arch": "sm_75"}}, files)
    assert other_gpu.why_not.startswith("built for arch sm_75 (this machine: ")
    assert other_gpu.missing("forward", None, StepShape(2, 16, 128, 128)) == other_gpu.why_not
    other_torch = CompiledSteps(tmp_path, {**info, "env": {**info["env"], "torch": "2.9.0"}}, files)
    assert "torch 2.9.0 (this machine: " + torch.__version__ + ")" in other_torch.why_not
    other_code = CompiledSteps(tmp_path, {**info, "code": "0" * 64}, files)
    assert "another version of the UNet step's code" in other_code.why_not
    assert "no compiled steps" in CompiledSteps(tmp_path, None, {}).why_not


def test_a_tampered_step_is_refused_before_it_runs(tmp_path):
    compiled, _, _ = _engine(tmp_path)
    (tmp_path / "compiled/forward-2x16x128x128.bin").write_bytes(b"compiled bytez")
    with pytest.raises(InputError, match="does not match its sha256.*refusing"):
        compiled.load("forward", None, StepShape(2, 16, 128, 128))


class _Fn:
    """Stands in for a loaded precompiled function: records its calls, guards like Dynamo."""

    def __init__(self, accept=True):
        self.accept, self.calls = accept, []

    def guard_check(self, *args, **kw):
        return self.accept

    def __call__(self, module, sample, *rest, **kw):
        self.calls.append((module, sample.shape, kw))
        return "compiled"


def _step(tmp_path, monkeypatch, require=False, accept=True, depth=None):
    compiled, _, _ = _engine(tmp_path, steps=(("forward" if depth is None else "forward_shallow", depth, "2x16x128x128"),))
    fn = _Fn(accept)
    monkeypatch.setattr(compiled, "load", lambda *a: fn)
    lines, jit = [], []
    call = StepCall("module", "forward" if depth is None else "forward_shallow", depth, compiled,
                    lambda: jit.append(1) or (lambda *a: "jit"), require, lines.append, factor=8)
    return call, fn, lines, jit


def test_step_call_uses_the_compiled_step_and_compiles_only_other_shapes(tmp_path, monkeypatch):
    call, fn, lines, jit = _step(tmp_path, monkeypatch)
    x = torch.zeros(2, 4, 16, 16, 16)
    assert call(x, 1) == "compiled" and call(x, 2) == "compiled"
    assert fn.calls[0][0] == "module" and call.compiled_calls == 1 and not jit and not lines
    assert call(torch.zeros(2, 4, 16, 32, 32), 1) == "jit"
    assert jit == [1] and len(lines) == 1 and "2x16x256x256" in lines[0] and "just in time" in lines[0]


def test_step_call_binds_the_depth_of_deep_cache_steps(tmp_path, monkeypatch):
    call, fn, _, _ = _step(tmp_path, monkeypatch, depth=1)
    assert call(torch.zeros(2, 4, 16, 16, 16), 1, "deep") == "compiled"
    assert fn.calls[0][2] == {"depth": 1}


def test_step_call_falls_back_when_the_guards_refuse_and_require_makes_it_an_error(tmp_path, monkeypatch):
    call, fn, lines, jit = _step(tmp_path, monkeypatch, accept=False)
    assert call(torch.zeros(2, 4, 16, 16, 16), 1) == "jit"
    assert "does not accept these inputs" in lines[0] and not fn.calls
    call, _, _, jit = _step(tmp_path, monkeypatch, require=True)
    with pytest.raises(InputError, match="--require-compiled: no compiled forward for .* 2x16x256x256"):
        call(torch.zeros(2, 4, 16, 32, 32), 1)
    assert not jit


def test_planned_steps_follow_guidance_windows_and_deep_cache():
    p = Plan(frames=40, height=256, width=384, steps=10, guidance=7.5, length=16, stride=12)
    assert planned_steps(p) == [("forward", None, StepShape(2, 16, 256, 384))]
    p = Plan(frames=8, height=128, width=128, steps=10, guidance=1.0, length=16, stride=12, deep_cache=(3, 2))
    assert planned_steps(p) == [("forward_and_cache", 2, StepShape(1, 8, 128, 128)),
                                ("forward_shallow", 2, StepShape(1, 8, 128, 128))]


def test_require_steps_reads_the_engine_manifest(tmp_path):
    _, info, files = _engine(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format_version": 1, "config": {}, "precision": "float16",
                                                        "profile": {}, "stages": {}, "files": files,
                                                        "compiled": info}))
    require_steps(tmp_path, Plan(16, 128, 128, 10, 7.5, 16, 12))
    with pytest.raises(InputError, match="--require-compiled: no compiled forward for .* 2x16x64x64"):
        require_steps(tmp_path, Plan(16, 64, 64, 10, 7.5, 16, 12))


def test_cli_refusals_before_any_slow_work(tmp_path, demo_ckpt):
    from click.testing import CliRunner

    from engine.cli.app import main

    r = CliRunner().invoke(main, ["export", "--ckpt", str(demo_ckpt), "--out", str(tmp_path / "e"),
                                  "--compile-shape", "16x128x128"])
    assert r.exit_code == 2 and "go with --compile" in r.output
    if not torch.cuda.is_available():
        r = CliRunner().invoke(main, ["export", "--ckpt", str(demo_ckpt), "--out", str(tmp_path / "e"), "--compile"])
        assert r.exit_code == 2 and "--compile needs a CUDA GPU" in r.output
    r = CliRunner().invoke(main, ["generate", "--poses", "examples/walk.npz", "--prompt", "a person", "--out",
                                  str(tmp_path / "a.mp4"), "--require-compiled"])
    assert r.exit_code == 2 and "--require-compiled goes with --engine" in r.output
    assert not (tmp_path / "e").exists() and not (tmp_path / "a.mp4").exists()


_FRESH = textwrap.dedent("""
    import sys, torch, torch._dynamo.utils as du
    from engine.backends import load_backend
    from engine.backends.triton import load_triton_backend
    from finephys.poses.clip import load_clip
    from finephys.sampler.options import GenerateOptions
    from finephys.sampler.stream import generate
    if sys.argv[3] == "jit":
        model = load_triton_backend(sys.argv[1])
        model.compiled = None
    else:  # the AOTInductor packages (engine.backends.aoti)
        model = load_backend(sys.argv[1], "triton", "cuda", require_compiled=True)
    opts = GenerateOptions("a person walking", num_frames=8, height=128, width=128, num_inference_steps=3, seed=1,
                           deep_cache=int(sys.argv[4]), deep_cache_depth=1)
    out = generate(model, load_clip("examples/walk.npz"), opts, progress=False)
    torch.save({"latents": out.latents.cpu(), "frames": dict(du.counters["frames"]),
                "compiled_calls": model.compiled_steps_used()}, sys.argv[2])
""")


@pytest.mark.gpu
def test_compiled_engine_matches_jit_and_a_new_process_does_not_compile(tmp_path, demo_ckpt):
    """The plain step and DeepCache's (interval 2, depth 1) from the engine's packages, each in a
    fresh process, within DESIGN.md's fp16 rule of the fp32 reference (err <= 2 * err(eager fp16)
    + atol, as tests/test_triton_backend.py checks the just-in-time path); a fresh process of the
    just-in-time path shows that the frame counter does count a compile."""
    from engine.backends.triton import CompileSpec
    from export.build import export_engine
    from finephys.model.assembly import assemble
    from finephys.model.demo import load_demo
    from finephys.poses.clip import load_clip
    from finephys.sampler.options import GenerateOptions
    from finephys.sampler.stream import generate

    t0 = time.perf_counter()

    def log(line):  # seen with -s: where a device run that ran out of time spent it
        print(f"[{time.perf_counter() - t0:6.1f} s] {line}", flush=True)

    eng = tmp_path / "e"
    export_engine(demo_ckpt, eng, compile=CompileSpec([StepShape(2, 8, 128, 128)], [1]), graphs=False, log=log)
    log("export done; three fresh processes at once (each with an empty Inductor cache of its own)")
    procs = {}
    for mode, interval in (("compiled", 1), ("compiled", 2), ("jit", 1)):
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / f"cache_{mode}{interval}")}
        procs[mode, interval] = subprocess.Popen(
            [sys.executable, "-c", _FRESH, str(eng), str(tmp_path / f"{mode}{interval}.pt"), mode, str(interval)],
            env=env)
    refs = {}  # meanwhile, here: the fp32 reference and eager fp16, same options as the fresh processes
    for dtype in (torch.float32, torch.float16):
        model = assemble(load_demo(), device="cuda", dtype=dtype)
        for interval in (1, 2):
            opts = GenerateOptions("a person walking", num_frames=8, height=128, width=128, num_inference_steps=3,
                                   seed=1, deep_cache=interval, deep_cache_depth=1)
            refs[dtype, interval] = generate(model, load_clip("examples/walk.npz"), opts,
                                             progress=False).latents.float().cpu()
    runs = {}
    for (mode, interval), proc in procs.items():
        assert proc.wait() == 0, (mode, interval, proc.returncode)
        runs[mode, interval] = torch.load(tmp_path / f"{mode}{interval}.pt")
        log(f"fresh process done: {mode}, DeepCache interval {interval}")
    # the plain run loads the UNet step's package; DeepCache's loads its full and shallow ones
    assert runs["compiled", 1]["compiled_calls"] == 1 and runs["compiled", 2]["compiled_calls"] == 2
    assert runs["jit", 1]["compiled_calls"] == 0
    assert runs["jit", 1]["frames"].get("total", 0) >= 1  # the counter does count a compile
    for (mode, interval), run in runs.items():
        if mode == "compiled":
            assert run["frames"].get("total", 0) == 0, run["frames"]  # Dynamo traced nothing
        want = refs[torch.float32, interval]
        err = (run["latents"].float() - want).abs().max().item()
        err_eager = (refs[torch.float16, interval] - want).abs().max().item()
        log(f"{mode}, interval {interval}: error {err:.4f} against fp32 (eager fp16: {err_eager:.4f})")
        assert err <= 2 * err_eager + 1e-3, (mode, interval, err, err_eager)
