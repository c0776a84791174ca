"""The one way minitrain writes a file or a folder that someone may read later: into a temporary name beside it,
flushed to disk, then renamed into place. A reader (or a restarted run) sees the old version or the new one, never
half of one, even after a kill or a power cut. Temporary names start with "." and hold ".tmp", so a crash leaves
only something that is recognisably not a result.
"""

import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path


def temp_path(final: Path, tag: str = "") -> Path:
    """A hidden temporary name beside `final`, unique to this process (and `tag`, e.g. the node) and to this call:
    processes of two containers sharing a folder can have the same pid."""
    return final.with_name(f".{final.name}.tmp-{tag}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable."""
    fsync_file(path)


def write_bytes(path: Path, data: bytes) -> None:
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


def publish_folder(tmp: Path, final: Path) -> None:
    """Make a filled temporary folder `final` (replacing an existing one): flushed, renamed, the rename durable."""
    for path in sorted(tmp.rglob("*"), reverse=True):  # files, then the folders holding them
        fsync_file(path)
    fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    fsync_dir(final.parent)


@contextmanager
def atomic_folder(final: Path, tag: str = "", replace: bool = True, complete=lambda folder: True):
    """Yield a temporary folder to fill; on success it becomes `final`. An existing `final` is replaced when
    `replace`; otherwise, if `complete(final)` (another writer got there first with the same content), the new
    folder is discarded. On any error, and on a kill before the rename, no `final` appears."""
    tmp = temp_path(final, tag)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        for path in sorted(tmp.rglob("*"), reverse=True):  # files, then the folders holding them
            fsync_file(path)
        fsync_dir(tmp)
        if final.exists() and replace:
            shutil.rmtree(final)
        try:
            tmp.rename(final)
        except OSError:
            if replace or not (final.exists() and complete(final)):
                raise
            shutil.rmtree(tmp)  # not replacing: the existing complete folder stays
        fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
