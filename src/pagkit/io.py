"""Atomic file writes and pickle-free state files (safetensors + JSON).

Long jobs (training, sampling, sweeps) write every result through these helpers,
so a kill leaves either the old file or the new one, never half of one.
"""
from __future__ import annotations

import errno
import json
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load_file, save_file


class InputNotFound(FileNotFoundError, ValueError):
    """A file or folder the user named is missing: a FileNotFoundError, and a ValueError like every bad input."""


class NotAFolder(NotADirectoryError, ValueError):
    """A file where the user should name a folder (or a folder that cannot be made)."""


class RunLocked(ValueError):
    """Another pagkit run (alive) is writing into the same output folder."""


TMP_SUFFIX = ".tmp"  # every half-written file is ``.<name>.<random>.tmp`` beside its final name


def _commit(tmp: str | Path, path: Path) -> None:
    """Move a finished temporary file into place (one rename: readers see the old file or the new one)."""
    os.replace(tmp, path)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it into place only if the block succeeds.

    A failed write (a full disk: ``OSError`` ENOSPC) leaves no partial file and is re-raised as an OSError
    naming ``path``."""
    path = Path(path)
    if path.is_dir():
        raise NotAFolder(f"cannot write {path}: it is a folder; give a file name")
    make_folder(path.parent)
    tmp = ""
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
        os.close(fd)
        yield Path(tmp)
        _commit(tmp, path)
    except OSError as err:
        if isinstance(err, ValueError) or not err.errno:
            raise
        raise OSError(err.errno, f"cannot write {path}: {os.strerror(err.errno)}") from None
    finally:
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)


def make_folder(folder: str | Path, what: str = "output folder") -> Path:
    """``folder``, made if missing; a clear error if it is a file, lies under a file, or cannot be written."""
    folder = Path(folder)
    for parent in (folder, *folder.parents):
        if parent.exists() and not parent.is_dir():
            raise NotAFolder(f"{what} {folder} cannot be made: {parent} is a file")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise NotAFolder(f"{what} {folder} cannot be made: {err.strerror or err}") from None
    try:  # a real write (permissions, a read-only mount, a full disk), not os.access, which root passes
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".pagkit-write-test.", suffix=TMP_SUFFIX)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise NotAFolder(f"{what} {folder} is not writable: {err.strerror or err}") from None
    return folder


def check_output_folder(folder: str | Path, what: str = "output folder") -> Path:
    """Check, before any work and without making anything, that ``folder`` can be made and written: no file in
    its way, and its nearest existing ancestor writable."""
    folder = Path(folder)
    for parent in (folder, *folder.parents):
        if parent.exists():
            if not parent.is_dir():
                raise NotAFolder(f"{what} {folder} cannot be made: {parent} is a file")
            try:
                fd, probe = tempfile.mkstemp(dir=parent, prefix=".pagkit-write-test.", suffix=TMP_SUFFIX)
                os.close(fd)
                os.unlink(probe)
            except OSError as err:
                raise NotAFolder(f"{what} {folder} cannot be made or written: {parent} is not writable "
                                 f"({err.strerror or err})") from None
            return folder
    return folder


def check_output_file(path: str | Path) -> Path:
    """Check, before any work, that ``path`` can be written as a file (its folder is made)."""
    path = Path(path)
    if path.is_dir():
        raise NotAFolder(f"--out {path} is a folder; give a file name (e.g. {path / 'out.png'})")
    check_output_folder(path.parent, "the folder of --out")
    return path


SAFETENSORS_TMP = re.compile(r"\.tmp[A-Za-z0-9_]{6}")  # safetensors >= 0.7 writes through ``.tmpXXXXXX`` itself


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the half-written files a killed run left under ``folder`` (call it holding the lock): ours,
    ``.*.tmp``, and the ``.tmpXXXXXX`` that safetensors' own atomic write leaves when killed mid-file."""
    stale = [p for p in Path(folder).rglob(".*") if p.is_file()
             and (p.name.endswith(TMP_SUFFIX) or SAFETENSORS_TMP.fullmatch(p.name))]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


LOCK_NAME = ".pagkit.lock"


@contextmanager
def run_lock(folder: str | Path) -> Iterator[Path]:
    """Hold ``folder/.pagkit.lock`` while a run writes into ``folder``; a second run on it is refused.

    The lock is the kernel's ``flock`` on that file, which holds the owner's pid: taken atomically, and
    released by the kernel when its process ends, even by SIGKILL, so a stale lock (its pid dead) is taken over.
    Taken, it also clears the half-written files a killed run left behind (``remove_stale_temporaries``).
    Re-entrant within one process (a sweep inside a command that already holds it)."""
    import fcntl
    folder = make_folder(folder)
    path = folder / LOCK_NAME
    key = str(path.resolve())
    if key in _HELD:
        yield path
        return
    while True:
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            owner = path.read_text().strip() or "?"
            raise RunLocked(f"{folder} is in use by another pagkit run (pid {owner}); wait for it to finish "
                            "or choose another --out") from None
        if os.path.exists(path) and os.fstat(fd).st_ino == os.stat(path).st_ino:
            break  # locked the file that is there (not one a finishing owner has just removed)
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        _HELD.add(key)
        remove_stale_temporaries(folder)
        yield path
    finally:
        _HELD.discard(key)
        os.close(fd)


_HELD: set[str] = set()


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def claim(path: str | Path, record: dict) -> dict | None:
    """Write ``record`` to ``path`` if absent. Returns the other record if ``path`` holds a different one,
    so that results made one way are never mixed with results made another (callers raise)."""
    path = Path(path)
    if path.is_file():
        old = read_json(path)
        return old if old != record else None
    write_json(path, record)
    return None


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    if not Path(path).is_file():
        raise InputNotFound(f"no such file: {path}")
    from safetensors import SafetensorError
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:  # corrupt, truncated, or not safetensors at all
        raise ValueError(f"{path} is not a readable safetensors file (corrupt or truncated?): {err}") from None


def shard_seconds(path: str | Path) -> float:
    """The ``seconds`` a sample shard took, from its safetensors metadata (the tensors are not read)."""
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        return float((f.metadata() or {}).get("seconds", "nan"))


def optimizer_to_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into tensors (for safetensors) and plain JSON."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for name, value in list(tensors.items()) + list(meta["scalars"].items()):
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
