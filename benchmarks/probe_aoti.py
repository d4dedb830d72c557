"""Can the triton backend's parts run from AOTInductor packages with nothing but torch? (issue 19's
way to 8 s)

    python benchmarks/probe_aoti.py --work /tmp/aoti [--ckpt DIR | --full-size] [--device cuda]
        [--frames 16 --size 128] [--dtype fp16] [--prepare] [--components unet,vae_decoder,...]

Builds the model (the demo by default; ``--full-size``: SD 1.5 + AnimateDiff v2 shapes, random
weights) and, for each component (the UNet step at batch 2 as guidance runs it, the heatmap
encoder, the text encoder, the VAE decoder), ``torch.export``s it and compiles it with
``aoti_compile_and_package``, the weights outside the ``.so``; ``--prepare`` first applies the
triton backend's UNet preparation (fused QKV, channels-last, the temporal-attention kernel on CUDA,
as ``--kernel`` says).
Then a fresh process that imports only torch and safetensors loads every package, feeds it the
weights by state-dict name (``load_constants``), runs it and compares with the eager output.
Prints one JSON row (times per component, the largest differences, whether diffusers, transformers
or finephys were imported) and appends it to benchmarks/results/aoti_probe.jsonl.

The packages are linked by the compiler ``engine.aoti_toolchain`` chooses, as ``fpengine export
--compile`` does: a ``g++`` wrapper (the lent GPU's ``$CXX``) linked a second libstdc++ into
packages, which crashed on load (benchmarks/RESULTS.md, "AOTInductor probe").
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


COMPONENTS = ("unet", "heatmap_encoder", "text_encoder", "vae_decoder")


def load_and_run(work: Path) -> None:
    """In a fresh process: only torch and safetensors; every component packaged in ``work``."""
    t0 = time.perf_counter()
    import torch
    from safetensors.torch import load_file

    rows = {"import_torch_s": round(time.perf_counter() - t0, 2)}
    meta = json.loads((work / "meta.json").read_text())
    if meta["device"].startswith("cuda"):
        t1 = time.perf_counter()
        torch.ones(1, device=meta["device"]).sum().item()
        rows["cuda_init_s"] = round(time.perf_counter() - t1, 2)
    if os.environ.get("PROBE_SAMPLE"):
        _sample_stacks(work / "load_stacks.txt", [float(x) for x in os.environ["PROBE_SAMPLE"].split(",")])
    for name in meta["components"]:
        t1 = time.perf_counter()
        runner = torch._inductor.aoti_load_package(str(work / f"{name}.pt2"))
        t2 = time.perf_counter()
        if os.environ.get("PROBE_RELOAD"):  # is a package's load cost paid once per process or per load?
            torch._inductor.aoti_load_package(str(work / f"{name}.pt2"))
            rows[f"{name}_reload_s"] = round(time.perf_counter() - t2, 2)
            t2 = time.perf_counter()
        weights = load_file(str(work / f"{name}.safetensors"), device=meta["device"])
        names = runner.get_constant_fqns()
        missing = [n for n in names if n not in weights]
        if missing:
            raise SystemExit(f"{name}: the package wants {len(missing)} constants the weights lack, e.g. {missing[:3]}")
        runner.load_constants({n: weights[n] for n in names}, check_full_update=True, user_managed=True)
        t3 = time.perf_counter()
        io = torch.load(str(work / f"{name}_io.pt"), map_location=meta["device"])
        with torch.no_grad():
            out = runner(*io["args"])
            if torch.cuda.is_available():
                torch.cuda.synchronize()
        t4 = time.perf_counter()
        times = []
        with torch.no_grad():
            for _ in range(5):
                t5 = time.perf_counter()
                runner(*io["args"])
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t5)
        graph_ms = _graph_ms(runner, io["args"]) if meta["device"].startswith("cuda") else None
        out = out if isinstance(out, (list, tuple)) else (out,)
        diff = max(float((o.float() - r.float()).abs().max()) for o, r in zip(out, io["ref"]))
        rows[name] = {"load_package_s": round(t2 - t1, 2), "load_constants_s": round(t3 - t2, 2),
                      "first_call_s": round(t4 - t3, 2),
                      "steady_call_ms": round(1000 * sorted(times)[2], 2),
                      "cuda_graph_ms": graph_ms, "constants": len(names), "max_abs_diff": diff,
                      "ref_abs_max": max(float(r.float().abs().max()) for r in io["ref"])}
    rows["total_s"] = round(time.perf_counter() - t0, 2)
    rows["diffusers_imported"] = any(k.startswith("diffusers") for k in sys.modules)
    rows["transformers_imported"] = any(k.startswith("transformers") for k in sys.modules)
    rows["finephys_imported"] = any(k.startswith("finephys") for k in sys.modules)
    print(json.dumps(rows))


def _graph_ms(runner, args, reps: int = 20) -> float:
    """Median time of ``runner(*args)`` replayed from a CUDA graph (as the triton backend runs a step)."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(side):
        for _ in range(2):
            runner(*args)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        runner(*args)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return round(sorted(times)[reps // 2], 2)


def _sample_stacks(path: Path, at: list[float]) -> None:
    """Diagnosis of slow loads: at each of ``at`` seconds, this process's native stacks (py-spy, else
    gdb) and the process tree (a compiler started at load would show there), appended to ``path``."""
    import shutil
    import threading

    pid, start = os.getpid(), time.perf_counter()

    def run():
        for t in at:
            time.sleep(max(0.0, t - (time.perf_counter() - start)))
            cmds = [["ps", "-eo", "pid,ppid,etime,pcpu,args"]]
            if shutil.which("py-spy"):
                cmds.append(["py-spy", "dump", "--native", "--pid", str(pid)])
            elif shutil.which("gdb"):
                cmds.append(["gdb", "-p", str(pid), "-batch", "-ex", "thread apply all bt 30"])
            with open(path, "a") as f:
                for cmd in cmds:
                    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
                    lines = [ln for ln in r.stdout.splitlines() if not ln.strip().split(None, 4)[-1:][0].startswith("[")] \
                        if cmd[0] == "ps" else r.stdout.splitlines()
                    f.write(f"==== {t} s: {' '.join(cmd)}\n" + "\n".join(lines)[-20000:] + r.stderr[-2000:] + "\n")

    threading.Thread(target=run, daemon=True).start()


def components(model, frames: int, size: int, dtype):
    """name -> (module, example args) of each part the triton backend runs: the ONNX export's graph
    modules (``export.onnx_export.graph_module``), tensors in and out."""
    import torch

    from export.onnx_export import graph_module

    cfg, dev, parts = model.config, model.device, model.parts
    g = torch.Generator().manual_seed(0)
    b, lat = 2, size // 8
    heat = torch.rand(frames, cfg.encoder.num_joints, size, size, generator=g).to(dev, dtype)
    with torch.no_grad():
        feats = [x.repeat(b, 1, 1, 1) for x in parts.encoder(heat)]
    sample = torch.randn(b, model.latent_channels, frames, lat, lat, generator=g).to(dev, dtype)
    text = torch.randn(b * frames, 77, cfg.unet["cross_attention_dim"], generator=g).to(dev, dtype)
    ids = torch.randint(0, cfg.text_encoder["vocab_size"], (1, 77), generator=g).to(dev)
    z = torch.randn(frames, model.latent_channels, lat, lat, generator=g).to(dev, dtype)
    example = {"unet": (sample, torch.tensor(500, device=dev), text, *feats), "heatmap_encoder": (heat,),
               "text_encoder": (ids,), "vae_decoder": (z,)}
    return {name: (graph_module(parts, name), args) for name, args in example.items()}


def _tuple(out) -> tuple:
    return tuple(out) if isinstance(out, (list, tuple)) else (out,)


def build(args) -> dict:
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(ROOT))
    from benchmarks.common import commit
    from engine.aoti_toolchain import package_compiler
    from engine.fast_unet import prepare_unet
    from engine.load import load_model

    dtype = {"fp32": torch.float32, "fp16": torch.float16}[args.dtype]
    ckpt = args.ckpt
    if args.full_size:
        from benchmarks.bench_startup import write_checkpoint

        ckpt = args.work / "ckpt"
        if not ckpt.exists():
            write_checkpoint(ckpt)
    model = load_model(ckpt, args.device, dtype)
    if args.prepare:
        kernel = {"aot": "aot", "op": True, "none": False}[args.kernel] if args.device == "cuda" else False
        prepare_unet(model.unet, temporal_kernel=kernel)
    row = {"bench": "aoti_probe", "device": args.device, "gpu": torch.cuda.get_device_name() if args.device == "cuda"
           else "cpu", "torch": torch.__version__, "commit": commit(), "full_size": args.full_size,
           "shape": f"2x{args.frames}x{args.size}x{args.size}", "dtype": args.dtype, "prepare": args.prepare,
           "kernel": args.kernel if args.prepare and args.device == "cuda" else None,
           "cxx": package_compiler(args.device, print)}
    built = components(model, args.frames, args.size, dtype)
    for name in args.components:
        module, example = built[name]
        with torch.no_grad():
            ref = _tuple(module(*example))
        t0 = time.perf_counter()
        exported = torch.export.export(module, example, strict=False)
        export_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        torch._inductor.aoti_compile_and_package(exported, package_path=str(args.work / f"{name}.pt2"),
                                                 inductor_configs={"aot_inductor.package_constants_in_so": False,
                                                                   "cpp.cxx": (None, row["cxx"])})
        row[name] = {"export_s": round(export_s, 1), "compile_s": round(time.perf_counter() - t0, 1),
                     "package_mb": round((args.work / f"{name}.pt2").stat().st_size / 2**20, 1)}
        # the state dict and the buffers it leaves out (CLIP's position_ids): the package wants both
        tensors = {**dict(module.named_buffers()), **module.state_dict()}
        row[name]["not_in_state_dict"] = sorted(set(tensors) - set(module.state_dict()))
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(args.work / f"{name}.safetensors"))
        torch.save({"args": example, "ref": ref}, str(args.work / f"{name}_io.pt"))
        print(f"{name}: {row[name]}", flush=True)
    (args.work / "meta.json").write_text(json.dumps({"device": str(model.device), "components": args.components}))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--ckpt", type=Path, default=None, help="checkpoint (default: the embedded demo)")
    ap.add_argument("--full-size", action="store_true", help="SD 1.5 + AnimateDiff v2 shapes, random weights")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "fp16"))
    ap.add_argument("--prepare", action="store_true", help="fused QKV, channels-last, temporal kernel (as triton)")
    ap.add_argument("--kernel", default="aot", choices=("aot", "op", "none"),
                    help="with --prepare on CUDA, the temporal-attention kernel: aot (torch.library.triton_op, "
                         "compiled into the package), op (the opaque custom op JIT uses), none (SDPA)")
    ap.add_argument("--components", default=",".join(COMPONENTS), help=f"comma-separated from {', '.join(COMPONENTS)}")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/aoti_probe.jsonl")
    args = ap.parse_args()
    if args.ckpt and args.full_size:
        ap.error("--ckpt or --full-size, not both")
    args.components = [c.strip() for c in args.components.split(",") if c.strip()]
    if not args.components or set(args.components) - set(COMPONENTS):
        ap.error(f"--components {','.join(args.components)}: expected names from {', '.join(COMPONENTS)}")
    if args.size % 8 or args.size < 8 or args.frames < 1:
        ap.error("--size: a multiple of 8; --frames: at least 1")
    args.work.mkdir(parents=True, exist_ok=True)
    row = build(args)
    r = subprocess.run([sys.executable, __file__, "_load", str(args.work)], capture_output=True, text=True)
    if r.returncode != 0:
        row["load"] = f"failed ({r.returncode}): {(r.stderr or r.stdout).strip().splitlines()[-1:]}"
    else:
        loaded = json.loads(r.stdout.strip().splitlines()[-1])
        for name in args.components:
            row[name].update(loaded.pop(name))
        row.update(loaded)
    from benchmarks.common import write_rows

    write_rows([row], args.out)
    print(json.dumps(row))


if __name__ == "__main__":
    if sys.argv[1:2] == ["_load"]:
        load_and_run(Path(sys.argv[2]))
    else:
        main()
