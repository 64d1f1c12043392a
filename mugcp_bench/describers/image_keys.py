"""How images are known: their file path, their id within a run (relpath) and their content hash.

Used by the description cache (keyed by content) and by the describers (which read the files); it imports neither.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from mugcp_bench.errors import UserError

_HASH_CHUNK = 1 << 20
_SHA1_MEMO: dict[tuple[str, int, int], str] = {}


def image_path(item: Any) -> str:
    """The image file of an item: a `Datum` (its `.impath`) or a path."""
    return os.path.abspath(item.impath if hasattr(item, "impath") else os.fspath(item))


def item_key(item: Any) -> str:
    """The id an item is known by in a run (its relpath; the absolute path for plain paths)."""
    return item.relpath if hasattr(item, "relpath") else image_path(item)


def image_sha1(item: Any) -> str:
    """SHA-1 of the image file's bytes (memoised per path, size and modification time)."""
    path = image_path(item)
    try:
        st = os.stat(path)
    except OSError as e:
        raise UserError(f"image {path} is missing or unreadable ({e.strerror}); re-download or re-extract it") from None
    memo_key = (path, st.st_size, st.st_mtime_ns)
    digest = _SHA1_MEMO.get(memo_key)
    if digest is None:
        h = hashlib.sha1()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
                h.update(chunk)
        digest = _SHA1_MEMO[memo_key] = h.hexdigest()
    return digest
