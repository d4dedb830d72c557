"""Safetensors files read onto a CUDA device in the background, for the packaged triton backend's
start-up (issue 19): the weights leave the critical path while the pose networks, the tokenizer
and the pose stack run on the main thread.

A thread streams each file through two pinned host buffers into one device buffer per file, on a
stream of its own. Torch's side streams do not wait for the legacy default stream, so the pose
stack's kernels do not queue behind the copies (they did behind ``safetensors.torch.load_file``'s,
which copies on the default stream). File reads and copies release the GIL. ``get(path)`` waits
for that file, makes the caller's stream wait for its copies and returns its tensors, each a view
of the device buffer (cloned where a view would start off a 16-byte boundary: compiled kernels
assume aligned pointers).
"""
from __future__ import annotations

import json
import struct
import threading
from pathlib import Path

import torch

from finephys.errors import InputError

CHUNK = 64 << 20  # bytes per pinned buffer
ALIGN = 16
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}


def read_header(fh) -> tuple[dict, int]:
    """(tensor entries, byte offset of the data) of an open safetensors file."""
    raw = bytearray(8)
    if _read_exact(fh, memoryview(raw)) != 8:
        raise InputError(f"{fh.name}: not a safetensors file (shorter than its header); re-export the engine")
    (n,) = struct.unpack("<Q", raw)
    text = bytearray(n)
    if _read_exact(fh, memoryview(text)) != n:
        raise InputError(f"{fh.name}: not a safetensors file (its header is cut short); re-export the engine")
    try:
        header = json.loads(text)
    except ValueError:
        raise InputError(f"{fh.name}: not a safetensors file (its header is not JSON); re-export the engine") from None
    if not isinstance(header, dict):
        raise InputError(f"{fh.name}: not a safetensors file (its header is not a JSON object); re-export the engine")
    header.pop("__metadata__", None)
    return header, 8 + n


def _read_exact(fh, view: memoryview) -> int:
    """Fill ``view`` from ``fh`` (a raw file may return fewer bytes than asked before its end);
    returns the bytes read, fewer only at the end of the file."""
    got = 0
    while got < len(view):
        n = fh.readinto(view[got:])
        if not n:
            break
        got += n
    return got


def _entries(header: dict, name: str) -> list[tuple]:
    """(key, dtype, start, stop, shape) of every tensor of a safetensors header, checked."""
    out = []
    for key, entry in header.items():
        try:
            dtype, (start, stop) = DTYPES.get(entry["dtype"]), (int(v) for v in entry["data_offsets"])
            shape = [int(d) for d in entry["shape"]]
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{name}: tensor {key}'s entry {entry!r:.80} is not a safetensors entry (a corrupt file; "
                             "re-export the engine)") from None
        if dtype is None:
            raise InputError(f"{name}: tensor {key} has dtype {entry['dtype']}, which this reader does not know")
        count = 1
        for d in shape:
            count *= d
        if start < 0 or stop - start != count * dtype.itemsize:
            raise InputError(f"{name}: tensor {key} takes bytes {start}..{stop}, not the {count * dtype.itemsize} of "
                             f"{entry['dtype']} {shape} (a corrupt file; re-export the engine)")
        out.append((key, dtype, start, stop, shape))
    return out


def _tensors(buf: torch.Tensor, entries: list[tuple]) -> dict:
    out = {}
    for key, dtype, start, stop, shape in entries:
        t = buf[start:stop].view(dtype).view(shape)
        out[key] = t if t.data_ptr() % ALIGN == 0 else t.clone()
    return out


class Stopped(Exception):
    """The reader was closed before it read this file."""


class DeviceWeights:
    """``paths`` read in order onto ``device`` by a thread started here; ``get(path)`` their tensors,
    ``drop(path)`` forgets a file's (its memory goes back), ``close()`` stops the reading. On the
    CPU each file is read straight into its buffer."""

    def __init__(self, paths: list[Path], device: torch.device, chunk: int = CHUNK):
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:  # the caller's device, not the thread's (a caller
            # that chose one has started CUDA; asking otherwise would start it here, on the critical path)
            device = torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_initialized() else 0)
        self.device, self.chunk = device, chunk
        self._done = {Path(p): threading.Event() for p in paths}
        self._result: dict = {}
        self._dropped: set[Path] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read_all, name="device-weights", daemon=True)
        self._thread.start()

    def _read_all(self) -> None:
        cuda = self.device.type == "cuda"
        stream, pins, copied = None, None, [None, None]
        for path, done in self._done.items():
            try:
                if self._stop.is_set():
                    raise Stopped(f"{path}: not read (the model was closed)")
                if cuda and stream is None:
                    stream = torch.cuda.Stream(self.device)
                    pins = [torch.empty(self.chunk, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
                if cuda:
                    with torch.cuda.stream(stream):
                        self._result[path] = self._read(path, stream, pins, copied)
                else:
                    self._result[path] = self._read(path)
            except BaseException as e:  # handed to the caller of get(), without the frames that hold buffers
                self._result[path] = e.with_traceback(None)
            done.set()

    def _read(self, path: Path, stream=None, pins=None, copied=None) -> tuple[dict, torch.cuda.Event | None]:
        with open(path, "rb", buffering=0) as fh:
            header, base = read_header(fh)
            entries = _entries(header, str(path))
            size = max((e[3] for e in entries), default=0)
            buf = torch.empty(size, dtype=torch.uint8, device=self.device)
            fh.seek(base)
            if stream is None:  # the CPU: straight into the buffer
                got = _read_exact(fh, memoryview(buf.numpy())) if size else 0
                if got != size:
                    raise InputError(f"{path}: truncated safetensors file ({base + got} of {base + size} bytes); "
                                     "re-export the engine")
                return _tensors(buf, entries), None
            off, k = 0, 0
            while off < size:
                if self._stop.is_set():
                    raise Stopped(f"{path}: not read to the end (the model was closed)")
                n = min(self.chunk, size - off)
                if copied[k] is not None:
                    copied[k].synchronize()  # this pinned buffer's last copy is done
                view = memoryview(pins[k].numpy())[:n]
                got = _read_exact(fh, view)
                if got != n:
                    raise InputError(f"{path}: truncated safetensors file ({base + off + got} of {base + size} bytes); "
                                     "re-export the engine")
                buf[off:off + n].copy_(pins[k][:n], non_blocking=True)
                copied[k] = torch.cuda.Event()
                copied[k].record(stream)
                off, k = off + n, k ^ 1
        tensors = _tensors(buf, entries)
        ready = torch.cuda.Event()
        ready.record(stream)
        return tensors, ready

    def __contains__(self, path) -> bool:
        """Whether ``get(path)`` gives its tensors (read, or being read; not dropped)."""
        return Path(path) in self._done and Path(path) not in self._dropped

    def wait(self) -> None:
        """Until every file is read (or the reader stopped): no CUDA call of the thread can then
        meet a CUDA graph being captured."""
        self._thread.join()

    def close(self) -> None:
        """Stop reading (after the current chunk) and wait for the thread."""
        self._stop.set()
        self._thread.join()

    def drop(self, path: Path) -> None:
        """Forget ``path``'s tensors (read or not yet): a run that will not use them. Later callers
        read the file themselves (``path in reader`` is False)."""
        path = Path(path)
        if path not in self._done:
            return
        self._dropped.add(path)
        self._done[path].wait()
        self._result.pop(path, None)

    def get(self, path: Path) -> dict:
        """The tensors of ``path``, usable on the current stream."""
        path = Path(path)
        if path not in self:
            raise KeyError(f"{path}: not among the weights read in the background (or dropped)")
        self._done[path].wait()
        got = self._result[path]
        if isinstance(got, BaseException):
            raise got
        tensors, ready = got
        if ready is None:
            return tensors
        current = torch.cuda.current_stream(self.device)
        current.wait_event(ready)
        for t in tensors.values():
            t.record_stream(current)  # freed with the model: not reused before the current stream is done
        return tensors
