"""Atomic file writes: a temp file in the target's folder, then `os.replace`. Readers never see half a file, an
interrupted write leaves the old file (or none), and the result gets the permissions `open()` would give."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _umask() -> int:
    # os.umask can only be read by setting it; restored at once (not thread-safe, like every umask read)
    mask = os.umask(0)
    os.umask(mask)
    return mask


def default_mode(directory: bool = False) -> int:
    """The mode a plain open() / mkdir() gives under the current umask (mkstemp / mkdtemp give 0600 / 0700)."""
    return (0o777 if directory else 0o666) & ~_umask()


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path next to `path`; write it inside the block. On success it replaces `path` (mode 0666 minus
    the umask, not mkstemp's 0600); on any error it is removed. Temp names are `.<name>.<random>.tmp`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8, newlines as given) atomically and durably (fsync before the rename)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    return Path(path)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """`torch.save` atomically (checkpoints, feature caches)."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


__all__ = ["atomic_path", "atomic_torch_save", "atomic_write_text", "default_mode"]
