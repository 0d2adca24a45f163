"""Where a checkpoint's files lie, and the small atomic files that commit it.

::

    DIR/latest                       "step-000000100\\n", replaced atomically after each commit
    DIR/.lock                        flock held by the saving process (rank 0)
    DIR/step-000000100/rank-00000.lts   one llmtier store per rank (tensors + that rank's JSON tree)
    DIR/step-000000100/manifest.json    written last: the checkpoint exists only once this does

The manifest carries a CRC-32C of its own body; every store carries its own
checksums.  Everything is written to a temporary name, fsynced, renamed, and
the directory fsynced.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import shutil
import time
from typing import Any

from ..errors import CheckpointError, FormatError
from ..store.format import crc32c, load_json
from ..store.writer import fsync_dir

MANIFEST = "manifest.json"
LATEST = "latest"
LOCK = ".lock"
FORMAT = "llmtier-checkpoint"
VERSION = 1
_STEP = re.compile(r"^step-(\d{9,})$")
MAX_MANIFEST = 64 << 20


def step_name(step: int) -> str:
    """The directory name of checkpoint ``step``."""
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"step must be a non-negative integer, got {step!r}")
    return f"step-{step:09d}"


def rank_file(rank: int) -> str:
    """The store file of one rank inside a step directory."""
    return f"rank-{rank:05d}.lts"


def list_steps(directory: str) -> list[int]:
    """Steps that have a directory under ``directory`` (complete or not), newest first."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return sorted((int(m[1]) for n in names if (m := _STEP.match(n))), reverse=True)


def write_atomic(path: str, data: bytes) -> None:
    """Write ``data`` to ``path``: temporary name, fsync, rename, fsync of the directory."""
    d, base = os.path.split(path)
    tmp = os.path.join(d, f".{base}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(d or ".")


def canonical(body: Any) -> bytes:
    """The bytes a body's CRC-32C is computed over (sorted keys, no spaces)."""
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def write_manifest(step_dir: str, *, step: int, files: list[dict[str, Any]], world_size: int,
                   user: dict[str, Any] | None = None, kind: str = "state") -> dict[str, Any]:
    """Commit the checkpoint in ``step_dir`` (every file listed must already be durable)."""
    body = {"format": FORMAT, "version": VERSION, "kind": kind, "step": step, "world_size": world_size,
            "files": files, "created_unix": round(time.time(), 3), "user": user or {}}
    doc = {"crc32c": crc32c(canonical(body)), "manifest": body}
    write_atomic(os.path.join(step_dir, MANIFEST), json.dumps(doc, indent=1, ensure_ascii=False).encode() + b"\n")
    return body


def read_manifest(step_dir: str) -> dict[str, Any]:
    """The validated manifest of ``step_dir``; :class:`CheckpointError` says why it is not a complete checkpoint."""
    path = os.path.join(step_dir, MANIFEST)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_MANIFEST + 1)
    except FileNotFoundError:
        raise CheckpointError(f"{step_dir} is incomplete: it has no {MANIFEST} (the save did not finish)") from None
    if len(raw) > MAX_MANIFEST:
        raise CheckpointError(f"{path} is larger than {MAX_MANIFEST} bytes (damaged)")
    try:
        doc = load_json(raw, path, "manifest")
    except FormatError as exc:
        raise CheckpointError(f"{path} is damaged: {exc}") from None
    body = doc.get("manifest") if isinstance(doc, dict) else None
    if not isinstance(body, dict) or doc.get("crc32c") != crc32c(canonical(body)):
        raise CheckpointError(f"{path} is damaged: its CRC-32C does not match its content")
    if body.get("format") != FORMAT or body.get("version") != VERSION:
        raise CheckpointError(f"{path}: not a version-{VERSION} {FORMAT} manifest")
    files = body.get("files")
    if not isinstance(files, list):
        raise CheckpointError(f"{path}: 'files' must be a list")
    for f in files:
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or "/" in f["name"] or f["name"] in ("", ".", ".."):
            raise CheckpointError(f"{path}: bad file entry {str(f)[:80]}")
        p = os.path.join(step_dir, f["name"])
        try:
            size = os.stat(p).st_size
        except FileNotFoundError:
            raise CheckpointError(f"{step_dir} is damaged: {f['name']} is missing") from None
        if size != f.get("bytes"):
            raise CheckpointError(f"{step_dir} is damaged: {f['name']} is {size} bytes, the manifest says {f.get('bytes')}")
    return body


def write_latest(directory: str, step: int) -> None:
    """Point ``DIR/latest`` at ``step`` (atomic replace)."""
    write_atomic(os.path.join(directory, LATEST), (step_name(step) + "\n").encode())


def read_latest(directory: str) -> int | None:
    """The step ``DIR/latest`` names, or ``None`` when it is absent or unreadable."""
    try:
        with open(os.path.join(directory, LATEST), "rb") as f:
            text = f.read(256).decode("ascii", "replace").strip()
    except OSError:
        return None
    m = _STEP.match(text)
    return int(m[1]) if m else None


def remove_step(directory: str, step: int) -> None:
    """Delete one checkpoint: its manifest first (so a crash midway leaves an incomplete one, never a
    manifest naming missing files), then the rest."""
    path = os.path.join(directory, step_name(step))
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(path, MANIFEST))
        fsync_dir(path)
    shutil.rmtree(path, ignore_errors=True)


def apply_retention(directory: str, keep_last: int | None, newest: int) -> list[int]:
    """Keep the ``keep_last`` newest complete checkpoints (``newest``, just committed, always among them);
    delete older complete ones and every incomplete one other than ``newest``.  Returns the steps deleted."""
    if keep_last is None:
        return []
    if keep_last < 1:
        raise CheckpointError(f"keep_last must be >= 1 (the newest complete checkpoint is never deleted), got {keep_last}")
    complete, dropped = [], []
    for s in list_steps(directory):
        if s == newest:
            continue
        try:
            read_manifest(os.path.join(directory, step_name(s)))
            complete.append(s)
        except CheckpointError:
            if s < newest:  # a dead save's leftovers (a newer one may be a save in flight elsewhere)
                dropped.append(s)
    dropped += complete[keep_last - 1:]
    for s in dropped:
        remove_step(directory, s)
    if dropped:
        fsync_dir(directory)
    return dropped


class DirLock:
    """An exclusive ``flock`` on ``DIR/.lock``: one saving process per checkpoint directory."""

    def __init__(self, directory: str) -> None:
        self.fd: int | None = os.open(os.path.join(directory, LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            self.fd = None
            raise CheckpointError(f"another process is saving checkpoints into {directory}") from None

    def close(self) -> None:
        """Release the lock."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> DirLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
