"""Generic file helpers: permissions under the umask, writes that never leave a half-written
file, hashes and JSON."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from finephys.errors import InputError


def file_mode(directory: bool = False) -> int:
    """Permissions of a new file (or folder) under the current umask; temp ones start private."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def share_tree(folder: Path) -> None:
    """Give ``folder`` and everything in it the umask's permissions (a temporary folder and some
    writers, safetensors among them, start private), before it is renamed into place."""
    folder = Path(folder)
    for p in [folder, *folder.rglob("*")]:
        if not p.is_symlink():
            os.chmod(p, file_mode(directory=p.is_dir()))


def writable_folder(folder: Path) -> bool:
    """Whether a new file can be made in ``folder``: tried, not read from the mode bits, which
    root, ACLs, immutable folders and read-only mounts all overrule."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def check_parent(path: Path, option: str) -> None:
    """That the folder ``path`` goes in exists and takes new files."""
    parent = Path(path).parent
    if not parent.is_dir():
        raise InputError(f"{option} {path}: the folder {parent} does not exist")
    if not writable_folder(parent):
        raise InputError(f"{option} {path}: cannot write in the folder {parent} (no permission, or read-only)")


def check_new_path(path: Path, overwrite: bool, option: str, folder: bool = False) -> None:
    """That ``path`` can be written as a new file (``folder``: a new folder) before any work
    starts: its folder exists and takes new files, and what is there already is replaced only
    with ``overwrite`` and only by the same kind of thing."""
    path = Path(path)
    check_parent(path, option)
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise InputError(f"{option} {path}: already exists (pass --overwrite to replace it)")
        if path.is_dir() != folder:
            raise InputError(f"{option} {path}: is a {'folder' if path.is_dir() else 'file'}, expected "
                             f"{'a folder' if folder else 'a file'} to replace (remove it or pick another path)")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def read_npz(path: Path, what: str) -> dict:
    """Every array of the npz archive at ``path``; InputError (naming ``what`` was expected, e.g.
    "a clip.npz file") for a folder, a missing, truncated or corrupt file, a lone .npy array or
    pickled objects."""
    import zipfile

    import numpy as np

    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: is a folder, expected {what}")
    if not path.exists():
        raise InputError(f"{path}: file not found, expected {what}")
    if not path.is_file():  # a pipe or a device: read once, or never ends
        raise InputError(f"{path}: not a regular file, expected {what}")
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic == b"\x93NUMPY":
        raise InputError(f"{path}: holds a single .npy array, expected an npz archive of named arrays ({what})")
    if not zipfile.is_zipfile(path):
        raise InputError(f"{path}: is not an npz (zip) archive, or is truncated, expected {what}")
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise InputError(f"{path}: cannot be read as an npz archive ({type(exc).__name__}: "
                         f"{_one_line(exc)}), expected {what}") from None
    data = {}
    with archive:
        for key in archive.files:
            try:
                data[key] = archive[key]
            except ValueError as exc:
                if "pickle" in str(exc):
                    raise InputError(f"{path}: key '{key}' holds Python objects, expected a "
                                     f"plain numeric or string array") from None
                raise InputError(f"{path}: key '{key}' is corrupt ({_one_line(exc)})") from None
            except Exception as exc:  # zlib.error, BadZipFile, EOFError, CRC errors
                raise InputError(f"{path}: key '{key}' is corrupt ({type(exc).__name__}: "
                                 f"{_one_line(exc)})") from None
    return data


@contextmanager
def atomic_path(path: Path):
    """A private temporary path beside ``path`` to write to: when the block ends it gets the
    umask's permissions and is renamed onto ``path``; if the block raises it is removed, so
    ``path`` is never left half-written."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, data) -> None:
    """``data`` as indented JSON at ``path``, written atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
