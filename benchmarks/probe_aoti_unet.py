"""Can the UNet step run from an AOTInductor package with nothing but torch? (issue 19's way to 8 s)

    python benchmarks/probe_aoti_unet.py --work /tmp/aoti [--ckpt DIR | --full-size] [--device cuda]
        [--frames 16 --size 128] [--dtype fp16] [--prepare]

Builds the model's ``PoseGuidedUNet`` (the demo by default; ``--full-size``: SD 1.5 + AnimateDiff
v2 shapes, random weights), ``torch.export``s one step (batch 2, as guidance runs it) and compiles
it with ``aoti_compile_and_package`` with the weights outside the ``.so``; ``--prepare`` first
applies the triton backend's preparation (fused QKV, channels-last, the temporal-attention kernel).
Then a fresh process that imports only torch and safetensors loads the package, feeds it the
weights by name (``load_constants``), runs the step and compares it with the eager output. Prints
one JSON row (times, the largest difference, whether diffusers was imported) and appends it to
benchmarks/results/aoti_probe.jsonl.

Inductor links the package with ``$CXX``; where that is unset and ``/usr/bin/g++`` exists it is
used: a ``g++`` wrapper first on ``PATH`` linked a second libstdc++ into packages on the lent GPU's
image, which crashed on load (benchmarks/RESULTS.md, "AOTInductor probe").
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


def load_and_run(work: Path) -> None:
    """In a fresh process: only torch and safetensors."""
    t0 = time.perf_counter()
    import torch
    from safetensors.torch import load_file

    t1 = time.perf_counter()
    runner = torch._inductor.aoti_load_package(str(work / "unet.pt2"))
    t2 = time.perf_counter()
    weights = load_file(str(work / "weights.safetensors"), device=json.loads((work / "meta.json").read_text())["device"])
    names = runner.get_constant_fqns()
    missing = [n for n in names if n not in weights]
    if missing:
        raise SystemExit(f"the package wants {len(missing)} constants the weights lack, e.g. {missing[:3]}")
    runner.load_constants({n: weights[n] for n in names}, check_full_update=True, user_managed=True)
    t3 = time.perf_counter()
    io = torch.load(str(work / "io.pt"), map_location=weights[names[0]].device)
    with torch.no_grad():
        out = runner(*io["args"])
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    t4 = time.perf_counter()
    out = out[0] if isinstance(out, (list, tuple)) else out
    ref = io["ref"]
    print(json.dumps({"import_torch_s": round(t1 - t0, 2), "load_package_s": round(t2 - t1, 2),
                      "load_constants_s": round(t3 - t2, 2), "first_call_s": round(t4 - t3, 2),
                      "constants": len(names), "max_abs_diff": float((out.float() - ref.float()).abs().max()),
                      "ref_abs_max": float(ref.float().abs().max()),
                      "diffusers_imported": any(k.startswith("diffusers") for k in sys.modules),
                      "finephys_imported": any(k.startswith("finephys") for k in sys.modules)}))


def build(args) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    from benchmarks.common import commit
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
    unet = model.unet.eval()
    if args.prepare:
        prepare_unet(unet, temporal_kernel=args.device == "cuda")
    cfg, dev = model.config, model.device
    g = torch.Generator().manual_seed(0)
    b, f, s = 2, args.frames, args.size
    sample = torch.randn(b, model.latent_channels, f, s // 8, s // 8, generator=g).to(dev, dtype)
    text = torch.randn(b * f, 77, cfg.unet["cross_attention_dim"], generator=g).to(dev, dtype)
    heat = torch.rand(f, cfg.encoder.num_joints, s, s, generator=g)
    with torch.no_grad():
        feats = [x.repeat(b, 1, 1, 1) for x in model.encode_pose(heat)]
        step = (sample, torch.tensor(500, device=dev), text, feats)
        ref = unet(*step)
    row = {"bench": "aoti_probe", "device": args.device, "gpu": torch.cuda.get_device_name() if args.device == "cuda"
           else "cpu", "torch": torch.__version__, "commit": commit(), "full_size": args.full_size,
           "shape": f"2x{f}x{s}x{s}", "dtype": args.dtype, "prepare": args.prepare,
           "cxx": os.environ.get("CXX", "g++ on PATH")}
    t0 = time.perf_counter()
    exported = torch.export.export(unet, step, strict=False)
    row["export_s"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    torch._inductor.aoti_compile_and_package(exported, package_path=str(args.work / "unet.pt2"),
                                             inductor_configs={"aot_inductor.package_constants_in_so": False})
    row["compile_s"] = round(time.perf_counter() - t0, 1)
    row["package_mb"] = round((args.work / "unet.pt2").stat().st_size / 2**20, 1)
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in unet.state_dict().items()}
    save_file(state, str(args.work / "weights.safetensors"))
    torch.save({"args": step, "ref": ref}, str(args.work / "io.pt"))
    (args.work / "meta.json").write_text(json.dumps({"device": str(dev)}))
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
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/aoti_probe.jsonl")
    args = ap.parse_args()
    if args.ckpt and args.full_size:
        ap.error("--ckpt or --full-size, not both")
    if args.size % 8 or args.size < 8 or args.frames < 1:
        ap.error("--size: a multiple of 8; --frames: at least 1")
    if "CXX" not in os.environ and Path("/usr/bin/g++").exists():
        os.environ["CXX"] = "/usr/bin/g++"
    args.work.mkdir(parents=True, exist_ok=True)
    row = build(args)
    r = subprocess.run([sys.executable, __file__, "_load", str(args.work)], capture_output=True, text=True)
    if r.returncode != 0:
        row["load"] = f"failed ({r.returncode}): {(r.stderr or r.stdout).strip().splitlines()[-1:]}"
    else:
        row.update(json.loads(r.stdout.strip().splitlines()[-1]))
    from benchmarks.common import write_rows

    write_rows([row], args.out)
    print(json.dumps(row))


if __name__ == "__main__":
    if sys.argv[1:2] == ["_load"]:
        load_and_run(Path(sys.argv[2]))
    else:
        main()
