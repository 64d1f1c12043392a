"""The shared cache of per-image descriptions (MuGCP's SCP text; docs/methods/mugcp.md §7.3 (A), our design).

Keyed by (SHA-1 of the image bytes, describer id including the model revision, prompt id). One JSONL file per
(describer id, prompt id): ``<cache_dir>/descriptions/<describer-id>/<prompt-id>.jsonl``; one line per image with
``image_sha1, text, n_tokens, wall_s, image`` (a path hint, not part of the key) and ``checksum`` (SHA-1 of the other
fields). Lines are appended whole (one write, flush, fsync) under a file lock, so runs and executor processes can
share the cache. A line that does not parse or whose checksum does not match is reported (a warning naming the file
and line) and its image is described again; the file is then rewritten without the broken lines (temp file +
``os.replace``). Content-keyed: renaming or moving images keeps their descriptions, a changed image gets a new one.

This module only stores; `mugcp_bench.describers.cached` fills it through the describers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mugcp_bench.atomic import atomic_write_text
from mugcp_bench.paths import default_cache_dir

try:  # POSIX advisory locks; elsewhere appends are still whole lines
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

CACHE_SUBDIR = "descriptions"
FIELDS = ("image_sha1", "text", "n_tokens", "wall_s")


# --- entries and files -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    """One cached description."""

    image_sha1: str
    text: str
    n_tokens: int
    wall_s: float
    image: str = ""  # where the image was seen first (a hint for people reading the file)

    def record(self) -> dict[str, Any]:
        body = {
            "image_sha1": self.image_sha1,
            "text": self.text,
            "n_tokens": int(self.n_tokens),
            "wall_s": round(float(self.wall_s), 6),
            "image": self.image,
        }
        return {**body, "checksum": checksum(body)}

    def line(self) -> str:
        return json.dumps(self.record(), ensure_ascii=False, sort_keys=True) + "\n"


def checksum(body: dict[str, Any]) -> str:
    """SHA-1 (16 hex digits) of a record's fields other than the checksum, in canonical JSON."""
    payload = json.dumps({k: v for k, v in body.items() if k != "checksum"}, ensure_ascii=False, sort_keys=True)
    return hashlib.sha1(payload.encode("utf-8")).hexdigest()[:16]


def parse_line(line: str) -> Entry:
    """An Entry from one JSONL line; ValueError naming what is wrong."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    missing = [k for k in (*FIELDS, "checksum") if k not in obj]
    if missing:
        raise ValueError(f"missing fields {missing}")
    if obj["checksum"] != checksum(obj):
        raise ValueError("checksum mismatch")
    if not isinstance(obj["text"], str) or not isinstance(obj["image_sha1"], str):
        raise ValueError("wrong field types")
    return Entry(obj["image_sha1"], obj["text"], int(obj["n_tokens"]), float(obj["wall_s"]), str(obj.get("image", "")))


def safe_name(name: str) -> str:
    """A file-system-safe version of a describer or prompt id."""
    out = "".join(c if c.isalnum() or c in "._-@+=" else "_" for c in name.strip())
    return out.strip(".") or "_"


class DescriptionCache:
    """JSONL files of descriptions under ``<root>/<describer-id>/<prompt-id>.jsonl``.

    root: default ``<default_cache_dir()>/descriptions`` ($MUGCP_CACHE, else ~/.cache/mugcp-bench).
    """

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(root) if root is not None else default_cache_dir() / CACHE_SUBDIR
        self._loaded: dict[Path, tuple[tuple[int, int], dict[str, Entry], list[int]]] = {}

    def path(self, describer_id: str, prompt_id: str) -> Path:
        return self.root / safe_name(describer_id) / f"{safe_name(prompt_id)}.jsonl"

    @contextlib.contextmanager
    def _lock(self, path: Path, shared: bool = False) -> Iterator[None]:
        """Exclusive (writers) or shared (readers: no half-written last line) advisory lock on a sidecar file."""
        path.parent.mkdir(parents=True, exist_ok=True)
        if fcntl is None:  # pragma: no cover
            yield
            return
        with open(str(path) + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    @staticmethod
    def _read(path: Path, report: bool) -> tuple[dict[str, Entry], list[int]]:
        """Valid entries (the last line for an image wins) and the numbers of broken lines (1-based)."""
        entries: dict[str, Entry] = {}
        broken: list[int] = []
        with open(path, encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    entry = parse_line(line)
                except ValueError as e:
                    broken.append(number)
                    if report:
                        log.warning(
                            "description cache %s line %d is corrupted (%s); ignoring it, the image is described again",
                            path,
                            number,
                            e,
                        )
                    continue
                entries[entry.image_sha1] = entry
        return entries, broken

    def load(self, describer_id: str, prompt_id: str) -> dict[str, Entry]:
        """Every valid entry of a (describer, prompt) file, by image SHA-1 (corrupted lines are reported)."""
        path = self.path(describer_id, prompt_id)
        try:
            st = path.stat()
        except FileNotFoundError:
            return {}
        stamp = (st.st_size, st.st_mtime_ns)
        cached = self._loaded.get(path)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        with self._lock(path, shared=True):
            entries, broken = self._read(path, report=True)
        self._loaded[path] = (stamp, entries, broken)
        return entries

    def broken_lines(self, describer_id: str, prompt_id: str) -> list[int]:
        """Line numbers of corrupted lines found by the last `load`."""
        self.load(describer_id, prompt_id)
        cached = self._loaded.get(self.path(describer_id, prompt_id))
        return list(cached[2]) if cached else []

    def append(self, describer_id: str, prompt_id: str, entries: Sequence[Entry]) -> None:
        """Append whole lines (one write, flush, fsync) under the file lock."""
        if not entries:
            return
        path = self.path(describer_id, prompt_id)
        data = "".join(e.line() for e in entries)
        with self._lock(path):
            with open(path, "a", encoding="utf-8") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())

    def compact(self, describer_id: str, prompt_id: str) -> int:
        """Rewrite a file without broken or superseded lines (atomic); returns the number of lines dropped."""
        path = self.path(describer_id, prompt_id)
        if not path.is_file():
            return 0
        with self._lock(path):
            entries, broken = self._read(path, report=False)
            with open(path, encoding="utf-8", errors="replace") as f:
                n_lines = sum(1 for line in f if line.strip())
            atomic_write_text(path, "".join(e.line() for e in entries.values()))
        self._loaded.pop(path, None)
        return n_lines - len(entries)


__all__ = ["DescriptionCache", "Entry", "checksum", "parse_line", "safe_name"]
