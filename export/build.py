"""``fpengine export``: a FinePhys checkpoint -> an engine directory (see ``export.manifest``).

Stages, each keyed by the hash of everything its output depends on:
    weights          LoRA merged (checked against the unmerged model), cast, saved as safetensors
    onnx:<component> the four graphs, traced with their contracts
    tensorrt:<comp.> plans, where TensorRT works here (else one line says why and the stage is skipped)
    compiled         with --compile (a CUDA GPU): the triton backend's UNet steps, precompiled for
                     the given shapes (``engine.precompile``); kept as they are without --compile
    check            the onnxruntime backend against the reference on small shapes; the report goes
                     into the manifest and a failure fails the export

A stage whose key matches the existing engine directory's manifest, and whose files are there with
the sha256 the manifest lists, is carried over instead of rebuilt (TensorRT plans only where
TensorRT runs: an export elsewhere drops them). Everything is written into a
temporary sibling folder that replaces ``out`` only once complete: an interrupted or failed export
leaves the previous directory (or nothing) in place.
"""
from __future__ import annotations

import errno
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from finephys.files import check_parent, sha256, share_tree, write_json
from finephys.model.checkpoint import MANIFEST as CKPT_MANIFEST, read_config
from finephys.errors import InputError
from finephys.precision import Precision

from export.contract import COMPONENTS, ShapeProfile, contracts, trace_dims
from export.manifest import (
    ENGINE_FORMAT_VERSION, MANIFEST, file_entry, read_engine_manifest, stage_key, tool_versions,
)
from export.onnx_export import EXTERNAL_DATA_LIMIT, OPSET, export_onnx, graph_module

# the parity check export runs: small shapes (the profile's smallest size), 2 steps
_CHECK_SETTINGS = {"num_frames": 4, "num_inference_steps": 2, "seed": 0}


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


class _Stages:
    """Carries stages over from the previous manifest or records freshly built ones."""

    def __init__(self, tmp: Path, old_dir: Path | None, old: dict | None, log):
        self.tmp, self.old_dir, self.old, self.log = tmp, old_dir, old or {}, log
        self.stages: dict = {}
        self.files: dict = {}

    def reuse(self, name: str, key: str) -> bool:
        st = self.old.get("stages", {}).get(name)
        if not st or st.get("key") != key or self.old_dir is None:
            return False
        old_files = self.old.get("files", {})
        for rel in st["files"]:
            path = self.old_dir / rel
            if rel not in old_files or not path.is_file() or sha256(path) != old_files[rel]["sha256"]:
                return False
        for rel in st["files"]:
            _link_or_copy(self.old_dir / rel, self.tmp / rel)
            self.files[rel] = old_files[rel]
        self.stages[name] = st
        self.log(f"{name}: up to date, kept")
        return True

    def record(self, name: str, key: str, files: list, info: dict | None = None) -> None:
        rels = sorted(str(Path(f).relative_to(self.tmp)) if Path(f).is_absolute() else str(f) for f in files)
        for rel in rels:
            self.files[rel] = file_entry(self.tmp / rel)
        self.stages[name] = {"key": key, "files": rels, "info": info or {}}


def _previous(out: Path, source_hash: str, overwrite: bool) -> dict | None:
    """The manifest of the engine directory at ``out`` to carry stages over from, or None."""
    if not out.exists():
        return None
    try:
        old = read_engine_manifest(out)
    except InputError as exc:
        if overwrite:
            return None
        raise InputError(f"{out} already exists and is not an engine directory this fpengine can update "
                         f"({exc}); pass --overwrite to replace it") from None
    if old.get("source", {}).get("sha256") != source_hash and not overwrite:
        raise InputError(f"{out} already holds an engine exported from another checkpoint (pass --overwrite to replace it)")
    return old


def _disk_full(exc: BaseException) -> bool:
    """ENOSPC, also as the libraries that write for us report it (safetensors, the ONNX exporter)."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return True
    text = str(exc)
    return isinstance(exc, Exception) and ("No space left on device" in text or "StorageFull" in text)


def _swap_into_place(tmp: Path, out: Path) -> None:
    share_tree(tmp)
    if not out.exists():
        os.replace(tmp, out)
        return
    trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
    os.replace(out, trash / "engine")
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(trash / "engine", out)
        raise
    finally:
        shutil.rmtree(trash, ignore_errors=True)


def export_engine(ckpt: Path, out: Path, precision: str = "fp16", profile: ShapeProfile | None = None,
                  overwrite: bool = False, force: bool = False, check: Callable | None = None,
                  log: Callable[[str], None] = print, external_limit: int = EXTERNAL_DATA_LIMIT,
                  compile=None, graphs: bool = True) -> dict:
    """Export ``ckpt`` to the engine directory ``out``; returns the manifest written.

    ``check``: the parity check, ``check(engine_dir, ckpt, settings, log) -> report`` (the CLI
    passes ``engine.check.export_parity``: onnxruntime against the reference); None skips it.
    ``compile``: what builds the compiled stage (the CLI passes ``engine.backends.triton.
    CompileSpec``): ``key_inputs() -> dict`` and ``run(engine_dir, log) -> info``.
    ``graphs=False``: no ONNX graphs, TensorRT plans or check (an engine for the triton backend)."""
    ckpt, out = Path(ckpt), Path(out)
    try:
        precision = Precision.of(precision).value
    except InputError:
        raise InputError(f"--precision {precision}: expected fp16 or fp32") from None
    cfg = read_config(ckpt)
    profile = profile or ShapeProfile.default(cfg)
    max_frames = cfg.max_frames
    if profile.frames[2] > max_frames:
        raise InputError(f"--frames {':'.join(map(str, profile.frames))}: this model's motion modules see at most "
                         f"{max_frames} frames")
    check_parent(out, "--out")  # an engine there already is updated in place (_previous)
    if out.exists() and out.resolve() == ckpt.resolve():
        raise InputError(f"--out {out} is the checkpoint folder itself")
    source_hash = sha256(ckpt / CKPT_MANIFEST)
    old = _previous(out, source_hash, overwrite)
    if force:
        old = None  # rebuild every stage
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent)).absolute()
    try:
        manifest = _build(ckpt, out, tmp, cfg, precision, profile, source_hash, old, check if graphs else None,
                          log, external_limit, compile, graphs)
        _swap_into_place(tmp, out)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if _disk_full(exc):
            raise InputError(f"--out {out}: no space left on the device (nothing was written)") from None
        raise
    return manifest


def _build(ckpt, out, tmp, cfg, precision, profile, source_hash, old, check, log, external_limit, compile,
           graphs) -> dict:
    import torch

    stages = _Stages(tmp, out if old else None, old, log)
    model = None
    merge_info = {}

    def merged_model():
        nonlocal model, merge_info
        if model is None:
            from export.merge import load_merged

            log("loading the checkpoint and merging its LoRA ...")
            model, merge_info = load_merged(ckpt)
        return model

    base = {"format": ENGINE_FORMAT_VERSION, "source": source_hash, "precision": precision}
    weights_key = stage_key(stage="weights", **base)
    if not stages.reuse("weights", weights_key):
        from export.merge import save_weights

        m = merged_model()
        files = save_weights(m, tmp, precision, ckpt / "tokenizer")
        stages.record("weights", weights_key, files, merge_info)
        log(f"weights: {precision}, LoRA merged: {merge_info.get('lora_merged')}")

    cons = contracts(cfg)
    cast = False
    for component in COMPONENTS if graphs else ():
        key = stage_key(stage="onnx", component=component, weights=weights_key, contract=asdict(cons[component]),
                        opset=OPSET, torch=torch.__version__, external_limit=external_limit)
        if stages.reuse(f"onnx:{component}", key):
            continue
        m = merged_model()
        if precision == "float16" and not cast:
            from export.merge import quiet_diffusers

            with quiet_diffusers():
                for part in (m.parts.encoder, m.parts.unet, m.parts.vae, m.parts.text_encoder):
                    part.to(torch.float16)
            cast = True
        inputs = cons[component].sample_inputs(trace_dims(cfg), precision)
        (tmp / "onnx").mkdir(exist_ok=True)
        files = export_onnx(graph_module(m.parts, component), cons[component], inputs, tmp / "onnx", external_limit)
        stages.record(f"onnx:{component}", key, files)
        log(f"onnx: {component} ({sum(f.stat().st_size for f in files) / 2**20:.1f} MiB)")
    model = None  # free the merged model before the TensorRT build and the check

    trt_info = _tensorrt_stage(tmp, cfg, cons, profile, stages, log) if graphs else {"status": "not built", "plans": {}}

    manifest = {
        "format_version": ENGINE_FORMAT_VERSION,
        "name": cfg.name,
        "source": {"path": str(ckpt.resolve()), "sha256": source_hash},
        "config": cfg.to_dict(),
        "precision": precision,
        "profile": profile.to_dict(),
        "contracts": {c: asdict(con) for c, con in cons.items()},
        "opset": OPSET,
        "tensorrt": trt_info,
        "tools": tool_versions(),
        "stages": stages.stages,
        "files": stages.files,
        "parity": None,
    }
    write_json(tmp / MANIFEST, manifest)
    manifest["compiled"] = _compiled_stage(tmp, cfg, precision, compile, stages, old, log)
    write_json(tmp / MANIFEST, manifest)
    if check is not None:
        onnx_hashes = {rel: e["sha256"] for rel, e in stages.files.items() if rel.startswith("onnx/")}
        key = stage_key(stage="check", onnx=onnx_hashes, pose=[stages.files[r]["sha256"] for r in
                        ("pose/lifter.safetensors", "pose/physnet.safetensors")], settings=_CHECK_SETTINGS,
                        profile=profile.to_dict())
        st = (old or {}).get("stages", {}).get("check")
        if st and st.get("key") == key and (old or {}).get("parity"):
            manifest["parity"] = old["parity"]
            log("check: up to date, kept")
        else:
            log("check: onnxruntime against the reference on small shapes ...")
            settings = {**_CHECK_SETTINGS, "num_frames": min(max(_CHECK_SETTINGS["num_frames"], profile.frames[0]),
                                                             profile.frames[2])}
            report = check(tmp, ckpt, settings, log)
            if not report["passed"]:
                raise InputError(f"export: the onnxruntime engine is outside its tolerance ({report['rule']}); "
                                 "nothing was written")
            manifest["parity"] = report
        manifest["stages"]["check"] = {"key": key, "files": [], "info": {}}
        write_json(tmp / MANIFEST, manifest)
    return manifest


def _tensorrt_stage(tmp: Path, cfg, cons, profile: ShapeProfile, stages: _Stages, log) -> dict:
    from export.tensorrt_build import TIMING_CACHE, build_plan, gpu_name, plan_name, tensorrt_status

    ok, status = tensorrt_status()
    if not ok:
        log(f"tensorrt: skipped ({status})")
        return {"status": status, "plans": {}}
    import tensorrt as trt

    version, gpu = trt.__version__, gpu_name()
    cache = tmp / TIMING_CACHE
    if stages.old_dir is not None and (stages.old_dir / TIMING_CACHE).is_file():
        cache.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(stages.old_dir / TIMING_CACHE, cache)  # copied, not linked: the build appends to it
    plans = {}
    for component in COMPONENTS:
        graph = stages.files[f"onnx/{component}.onnx"]["sha256"]
        shapes = cons[component].profile_shapes(profile, cfg)
        rel = plan_name(component, version, gpu, graph)
        key = stage_key(stage="tensorrt", component=component, graph=graph, shapes=shapes, version=version, gpu=gpu)
        if not stages.reuse(f"tensorrt:{component}", key):
            log(f"tensorrt: building {component} ...")
            build_plan(tmp / f"onnx/{component}.onnx", shapes, tmp / rel, cache)
            stages.record(f"tensorrt:{component}", key, [rel])
        plans[component] = {"file": rel, "version": version, "gpu": gpu}
    if cache.is_file():
        stages.files[TIMING_CACHE] = file_entry(cache)
    return {"status": status, "version": version, "gpu": gpu, "plans": plans}


def _compiled_stage(tmp: Path, cfg, precision: str, compile, stages: _Stages, old: dict | None, log) -> dict | None:
    """The compiled UNet steps and component packages: rebuilt with ``compile`` unless up to
    date, else carried over."""
    previous = (old or {}).get("compiled")
    if compile is None:
        st = (old or {}).get("stages", {}).get("compiled")
        return previous if st and previous and stages.reuse("compiled", st["key"]) else None
    key = stage_key(stage="compiled", config=cfg.to_dict(), precision=precision, **compile.key_inputs())
    if previous and stages.reuse("compiled", key):
        return previous
    info = compile.run(tmp, log)
    packages = info.get("packages", [])
    files = {s["file"] for s in info["steps"]} | {p["file"] for p in packages} | {p["buffers"] for p in packages
                                                                                  if p.get("buffers")}
    stages.record("compiled", key, sorted(files))
    return info
