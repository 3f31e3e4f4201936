"""Write a checkpoint folder so that a reader sees the old one or the new one, whole.

    with staged_dir(path) as tmp:       # .NAME.tmp-PID-xxxx beside path, umask permissions
        write files into tmp
    # on leaving the block: files and folder fsynced, then swapped in (replace_dir)

The swap is two renames: the old folder aside to .NAME.old-PID, the new one in,
then the old one deleted. A crash between the two renames leaves no folder at
`path` and the previous checkpoint whole at .NAME.old-PID: `recover(path)` (run
by every load and save) renames it back. Leftovers of dead processes are removed
by the next save of the same path.
"""
from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def staged_dir(path: Path, is_whole: Callable[[Path], bool]) -> Iterator[Path]:
    """A fresh folder beside `path`; on success it replaces `path` (replace_dir), on any error
    (Ctrl-C included) it is removed. `is_whole(folder)`: whether a folder holds a complete save."""
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path, is_whole)
    _remove_dead_leftovers(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))
    try:
        yield tmp
        sync_tree(tmp)
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sync_tree(folder: Path) -> None:
    """Give every file and folder under `folder` the umask's permissions (mkdtemp makes 0700)
    and flush it to disk, so the rename that follows never publishes unwritten data."""
    mask = umask()
    for p in sorted(folder.rglob("*"), reverse=True) + [folder]:  # contents before their folder
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)
        fsync(p)


def fsync(p: Path) -> None:
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_dir(tmp: Path, path: Path) -> None:
    """Rename the complete folder `tmp` to `path`, replacing what is there."""
    if not path.exists():
        os.rename(tmp, path)
        fsync(path.parent)
        return
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.rename(old, path)  # put the previous checkpoint back
        raise
    fsync(path.parent)
    shutil.rmtree(old, ignore_errors=True)


def recover(path: Path, is_whole: Callable[[Path], bool]) -> bool:
    """If a save died between its two renames (no `path`, a whole .NAME.old-PID beside it), rename
    the previous checkpoint back to `path`. True when it did."""
    if path.exists() or path.is_symlink():
        return False
    for old in sorted(path.parent.glob(f".{glob.escape(path.name)}.old-*")):
        if old.is_dir() and is_whole(old):
            os.rename(old, path)
            fsync(path.parent)
            return True
    return False


def _remove_dead_leftovers(path: Path) -> None:
    """Temporary and set-aside folders of saves to `path` whose process is gone."""
    for p in path.parent.glob(f".{glob.escape(path.name)}.*-*"):
        kind, _, rest = p.name[len(path.name) + 2:].partition("-")
        pid = rest.split("-")[0]
        if kind in ("tmp", "old") and pid.isdigit() and p.is_dir() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def write_atomic(path: Path, data: "bytes | str") -> Path:
    """Write one file so that a reader sees the old file or the new one, whole: a temp file beside
    it, fsynced, then renamed over it. -> path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path
