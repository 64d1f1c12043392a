"""Atomic file writes: a temp file in the target's folder, then `os.replace`. Readers never see half a file, an
interrupted write leaves the old file (or none), and the result gets the permissions `open()` would give."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from mugcp_bench.errors import DiskFull


def _umask() -> int:
    # os.umask can only be read by setting it; restored at once (not thread-safe, like every umask read)
    mask = os.umask(0)
    os.umask(mask)
    return mask


def default_mode(directory: bool = False) -> int:
    """The mode a plain open() / mkdir() gives under the current umask (mkstemp / mkdtemp give 0600 / 0700)."""
    return (0o777 if directory else 0o666) & ~_umask()


FULL = (errno.ENOSPC, errno.EDQUOT)


def human_size(n: float) -> str:
    """1536 -> '1.5 KB' (binary units)."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def disk_full(path: Path, needed: int) -> DiskFull:
    """The one-line error for a write of about `needed` bytes to `path` that found its disk (or quota) full."""
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = 0
    return DiskFull(
        f"no space left in {path.parent} writing {path.name} ({human_size(free)} free, about {human_size(needed)} "
        "needed): free some space or pass --results-dir on another disk, then rerun the same command to resume"
    )


@contextlib.contextmanager
def atomic_path(path: str | Path, size_hint: Callable[[], int] | None = None) -> Iterator[Path]:
    """Yield a temp path next to `path`; write it inside the block. On success it replaces `path` (mode 0666 minus
    the umask, not mkstemp's 0600); on any error it is removed. Temp names are `.<name>.<random>.tmp`.

    A full disk or quota (ENOSPC, EDQUOT) becomes `DiskFull` (a UserError: one line naming the folder, the free
    space and about how much the file needs: `size_hint()`, else what was written plus the old file's size)."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        yield Path(tmp)
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
    except BaseException as e:
        written = Path(tmp).stat().st_size if tmp and Path(tmp).exists() else 0
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        if _is_full(e):
            old = path.stat().st_size if path.exists() else 0
            raise disk_full(path, size_hint() if size_hint else max(written, old, 1)) from None
        raise


def _is_full(e: BaseException) -> bool:
    """An OSError of a full disk, also when a library wrapped it (torch.save raises RuntimeError from its writer)."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in FULL:
            return True
        if isinstance(e, RuntimeError) and ("No space left on device" in str(e) or "Disk quota exceeded" in str(e)):
            return True
        e = e.__cause__ or e.__context__
    return False


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8, newlines as given) atomically and durably (fsync before the rename)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    return Path(path)


__all__ = ["atomic_path", "atomic_write_text", "default_mode", "disk_full"]
