"""The service's working folder: every file it writes (uploaded clips while they are checked,
videos while they are encoded, library temp files) lies under it, under a name the service makes
up; no name or path from a request is ever used to open a file."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from finephys.errors import InputError

SUBDIRS = ("uploads", "videos", "tmp", "cache")  # cache: library caches (torch's), kept while it runs
REQUEST_SUBDIRS = SUBDIRS[:3]  # what requests leave behind


def inside(root: Path, path: Path) -> Path:
    """``path`` resolved, if it lies under ``root`` (symlinks followed); else an error."""
    root, resolved = Path(root).resolve(), Path(path).resolve()
    if resolved != root and root not in resolved.parents:
        raise PermissionError(f"{path} lies outside the working folder {root}")
    return resolved


def prepare_workdir(workdir) -> Path:
    """Create the working folder and its sub-folders (private to this user); returns it resolved."""
    root = Path(workdir).expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        for name in SUBDIRS:
            sub = root / name
            sub.mkdir(exist_ok=True, mode=0o700)
            if sub.is_symlink():
                raise InputError(f"--workdir {workdir}: {name} is a symlink, expected a plain folder")
    except (FileExistsError, NotADirectoryError):
        raise InputError(f"--workdir {workdir}: is a file, expected a folder") from None
    except PermissionError as exc:
        raise InputError(f"--workdir {workdir}: cannot be written ({exc.strerror})") from None
    return root.resolve()


def new_file(root: Path, sub: str, suffix: str) -> Path:
    """A new empty file ``root/sub/<random><suffix>``, created exclusively (mode 0600)."""
    if sub not in SUBDIRS:
        raise ValueError(f"unknown working sub-folder {sub!r}")
    fd, name = tempfile.mkstemp(prefix="fp-", suffix=suffix, dir=Path(root) / sub)
    os.close(fd)
    return inside(root, Path(name))


def leftovers(root: Path) -> list[Path]:
    """Files the service wrote and has not removed yet."""
    root = Path(root)
    return sorted(p for name in REQUEST_SUBDIRS if (root / name).is_dir() for p in (root / name).rglob("*"))


def clean_workdir(root: Path) -> None:
    """Remove what the service wrote (its sub-folders), leaving the folder itself."""
    for name in SUBDIRS:
        shutil.rmtree(Path(root) / name, ignore_errors=True)
