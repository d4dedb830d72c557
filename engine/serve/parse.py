"""One HTTP request body -> (GenerateOptions, PoseClip), checked the way ``fpengine generate``
checks its options and its ``--poses`` file, with the same messages.

Two request shapes are accepted:
- ``application/json``: the options at the top level and the clip as a ``clip`` object with the
  clip.npz keys (``keypoints``, ``scores``, ``layout``, ``image_size``, ``fps``, ...);
- ``multipart/form-data``: a part ``options`` (that JSON object, without ``clip``) and a file
  part ``clip`` (a clip.npz).
Both clips go through ``finephys.poses.clip.load_clip`` from a private file in the working folder.
"""
from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

import numpy as np

from finephys.sampler.options import ConfigOnly, GenerateOptions, Plan, plan
from finephys.poses.clip import KEYS, PoseClip, load_clip
from finephys.errors import InputError
from finephys.sampler.poses import prepare_clip
from engine.options import OPTIONS, params

from engine.serve.config import Limits
from engine.serve.files import new_file



class RequestError(InputError):
    """Bad request; ``status`` is the HTTP status it gets."""

    status = 400


class PayloadTooLarge(RequestError):
    status = 413


class UnsupportedMediaType(RequestError):
    status = 415


def parse_options(obj) -> GenerateOptions:
    """The options object -> GenerateOptions, each value converted by the CLI's own parameter
    type (so `"num_frames": "abc"` fails as `--frames abc` does)."""
    import click

    if not isinstance(obj, dict):
        raise RequestError(f"options: expected a JSON object, got {_kind(obj)}")
    unknown = sorted(set(obj) - set(OPTIONS))
    if unknown:
        raise RequestError(f"unknown option '{unknown[0]}', expected only {list(OPTIONS)} and 'clip'")
    values = {}
    for name, param in params().items():
        flag, value = param.opts[0], obj.get(name)
        if value is None:
            if param.required:
                raise RequestError(f"Missing option '{flag}'.")
            values[name] = param.default
            continue
        if isinstance(param.type, click.types.StringParamType):
            if not isinstance(value, str):
                raise RequestError(f"Invalid value for '{flag}': expected a string, got {json.dumps(value)}")
            text = value
        else:
            text = value if isinstance(value, str) else json.dumps(value)
        try:
            values[name] = param.type.convert(text, param, None)
        except click.BadParameter as exc:
            raise RequestError(f"Invalid value for '{flag}': {exc.message}") from None
    return GenerateOptions(**values)


def _kind(value) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            type(None): "null"}.get(type(value), "a number")


def display_name(filename: str | None) -> str:
    """How an uploaded file is named in messages: its last path component, printable, short.
    Never used to open anything."""
    base = re.split(r"[\\/]", filename or "")[-1]
    base = "".join(ch for ch in base if ch.isprintable())[:100]
    return base if base not in ("", ".", "..") else "clip.npz"


def _load(path: Path, name: str, limits: Limits) -> PoseClip:
    try:
        clip = load_clip(path)
    except InputError as exc:
        raise RequestError(str(exc).replace(str(path), name)) from None
    if clip.num_frames > limits.max_clip_frames:
        raise PayloadTooLarge(f"{name}: key 'keypoints' has {clip.num_frames} frames, this service "
                              f"takes clips of at most {limits.max_clip_frames} frames")
    return clip


def clip_from_npz(data: bytes, filename: str | None, root: Path, limits: Limits) -> PoseClip:
    """An uploaded clip.npz, checked by ``load_clip`` from a private file under ``root``."""
    name = display_name(filename)
    path = new_file(root, "uploads", ".npz")
    try:
        path.write_bytes(data)
        try:
            with zipfile.ZipFile(path) as archive:
                unpacked = sum(info.file_size for info in archive.infolist())
        except (zipfile.BadZipFile, OSError, ValueError):
            unpacked = 0  # not a zip: load_clip says so
        if unpacked > limits.max_clip_bytes:
            raise PayloadTooLarge(f"{name}: unpacks to {unpacked} bytes, this service takes clips "
                                  f"of at most {limits.max_clip_bytes} bytes unpacked")
        return _load(path, name, limits)
    finally:
        path.unlink(missing_ok=True)


def clip_from_json(obj, root: Path, limits: Limits) -> PoseClip:
    """JSON keypoints (an object with the clip.npz keys), checked exactly as a clip.npz is."""
    name = "clip"
    if not isinstance(obj, dict):
        raise RequestError(f"{name}: expected an object with the clip.npz keys {list(KEYS[:5])}, "
                           f"got {_kind(obj)} (the service opens no file by name)")
    arrays = {}
    for key, value in obj.items():
        if key not in KEYS:
            raise RequestError(f"{name}: unknown key '{key}', expected only {list(KEYS)}")
        try:
            arr = np.asarray(value)
        except ValueError:
            raise RequestError(f"{name}: key '{key}' is a ragged nested list, expected a "
                               f"rectangular array") from None
        if arr.dtype == object:
            raise RequestError(f"{name}: key '{key}' holds null or mixed values, expected numbers "
                               f"(a score of 0 marks a missing joint)")
        arrays[key] = arr
    path = new_file(root, "uploads", ".npz")
    try:
        with open(path, "wb") as f:
            np.savez(f, **arrays)
        return _load(path, name, limits)
    finally:
        path.unlink(missing_ok=True)


def split_multipart(body: bytes, content_type: str) -> dict[str, tuple[str | None, bytes]]:
    """The parts of a multipart/form-data body: name -> (filename, bytes), in memory."""
    from email import policy
    from email.parser import BytesParser

    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1", "replace")
    msg = BytesParser(policy=policy.HTTP).parsebytes(head + body)
    if not msg.is_multipart():
        raise RequestError("request body: not a multipart/form-data body, expected parts "
                           "'options' and 'clip'")
    parts = {}
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str) or not name:
            raise RequestError("request body: a multipart part has no name, expected 'options' and 'clip'")
        if name in parts:
            raise RequestError(f"request body: part '{name}' appears twice, expected it once")
        parts[name] = (part.get_filename(), part.get_payload(decode=True) or b"")
    return parts


def _json(data: bytes, what: str):
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(f"{what}: not valid JSON ({exc})") from None
    except RecursionError:
        raise RequestError(f"{what}: JSON nested too deeply") from None


def parse_request(body: bytes, content_type: str | None, root: Path,
                  limits: Limits) -> tuple[GenerateOptions, PoseClip]:
    """A ``POST /generate`` body -> (options, clip); RequestError with the status to answer."""
    if len(body) > limits.max_upload_bytes:
        raise PayloadTooLarge(f"request body: {len(body)} bytes, this service takes at most "
                              f"{limits.max_upload_bytes} bytes")
    mime = (content_type or "").split(";")[0].strip().lower()
    if mime == "application/json":
        obj = _json(body, "request body")
        if not isinstance(obj, dict):
            raise RequestError(f"request body: expected a JSON object, got {_kind(obj)}")
        if "clip" not in obj:
            raise RequestError("clip: missing, expected a 'clip' object (JSON keypoints) or a "
                               "multipart upload of clip.npz")
        obj = dict(obj)
        clip_obj = obj.pop("clip")
        opts = parse_options(obj)
        return opts, clip_from_json(clip_obj, root, limits)
    if mime == "multipart/form-data":
        parts = split_multipart(body, content_type)
        unknown = sorted(set(parts) - {"options", "clip"})
        if unknown:
            raise RequestError(f"request body: unknown part '{unknown[0]}', expected 'options' and 'clip'")
        if "clip" not in parts:
            raise RequestError("clip: missing, expected a file part 'clip' holding a clip.npz")
        opts = parse_options(_json(parts["options"][1], "options") if "options" in parts else {})
        filename, data = parts["clip"]
        return opts, clip_from_npz(data, filename, root, limits)
    raise UnsupportedMediaType(f"Content-Type {mime or '(none)'}: expected application/json or "
                               f"multipart/form-data")


def check_request(config, clip: PoseClip, opts: GenerateOptions, limits: Limits) -> tuple[Plan, list[str]]:
    """What ``generate_stream`` would check, plus the service's limits; no weights needed."""
    model = ConfigOnly(config)  # the service's replicas run the reference backend
    frames_at_model_fps = int(round((clip.num_frames - 1) * config.fps / clip.fps)) + 1
    if frames_at_model_fps > limits.max_clip_frames:
        raise PayloadTooLarge(f"clip: {clip.num_frames} frames at {clip.fps:g} fps are "
                              f"{frames_at_model_fps} frames at the model's {config.fps:g} fps, this "
                              f"service takes clips of at most {limits.max_clip_frames} frames")
    prepared, notes = prepare_clip(clip, model)
    p = plan(model, prepared, opts)
    if p.frames > limits.max_frames:
        raise RequestError(f"--frames {p.frames}: this service makes at most {limits.max_frames} "
                           f"frames a request")
    if max(p.height, p.width) > limits.max_side:
        raise RequestError(f"--height/--width {p.height}x{p.width}: this service makes at most "
                           f"{limits.max_side} pixels a side")
    if p.steps > limits.max_steps:
        raise RequestError(f"--steps {p.steps}: this service runs at most {limits.max_steps} steps")
    return p, notes
