"""The shared cache of per-image descriptions (MuGCP's SCP text; methods.md §7.3 (A), our design).

Keyed by (SHA-1 of the image bytes, describer id including the model revision, prompt id). One JSONL file per
(describer id, prompt id): ``<cache_dir>/descriptions/<describer-id>/<prompt-id>.jsonl``; one line per image with
``image_sha1, text, n_tokens, wall_s, image`` (a path hint, not part of the key) and ``checksum`` (SHA-1 of the other
fields). Lines are appended whole (one write, flush, fsync) under a file lock, so runs and executor processes can
share the cache. A line that does not parse or whose checksum does not match is reported (a warning naming the file
and line) and its image is described again; the file is then rewritten without the broken lines (temp file +
``os.replace``). Content-keyed: renaming or moving images keeps their descriptions, a changed image gets a new one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mugcp_bench.atomic import atomic_write_text
from mugcp_bench.datapaths import default_cache_dir
from mugcp_bench.errors import UserError

if TYPE_CHECKING:
    from mugcp_bench.describers import Describer

try:  # POSIX advisory locks; elsewhere appends are still whole lines
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

CACHE_SUBDIR = "descriptions"
FIELDS = ("image_sha1", "text", "n_tokens", "wall_s")
_HASH_CHUNK = 1 << 20


# --- image hashing ---------------------------------------------------------------------------------------------------
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


# --- filling and reading ---------------------------------------------------------------------------------------------
@dataclass
class DescribeOutcome:
    """Descriptions of a list of items and how they were obtained."""

    texts: dict[str, str]  # item key (relpath) -> description
    n_images: int  # distinct images (by content)
    n_cached: int  # distinct images found in the cache
    n_generated: int  # distinct images described now
    n_corrupted: int  # corrupted cache lines found (reported and regenerated)


def describe_command_hint(describer: Describer, datasets: str = "...") -> str:
    return f"mugcp-bench describe --datasets {datasets} {describer.cli_args()}".strip()


def describe_items(
    items: Sequence[Any],
    describer: Describer,
    cache: DescriptionCache | None = None,
    generate: bool = True,
    progress: Callable[[int], None] | None = None,
    batch_size: int | None = None,
    datasets_hint: str = "...",
) -> DescribeOutcome:
    """Descriptions of `items` from the cache; missing ones are generated in batches and appended as they come
    (an interrupted fill resumes where it stopped). Cache hits never call the describer.

    generate=False: missing entries raise UserError naming how many are missing and the command that fills them.
    progress(n): called with the number of distinct images handled (cached ones at once, then per batch).
    """
    cache = cache or DescriptionCache()
    did, pid = describer.id, describer.prompt_id
    shas = [image_sha1(item) for item in items]
    known = cache.load(did, pid)
    n_corrupted = len(cache.broken_lines(did, pid))
    first: dict[str, Any] = {}
    for sha, item in zip(shas, items):
        first.setdefault(sha, item)
    missing = [sha for sha in first if sha not in known]
    n_cached = len(first) - len(missing)
    if progress and n_cached:
        progress(n_cached)
    if missing and not generate:
        raise UserError(
            f"{len(missing)} of {len(first)} images have no cached description for describer '{did}' / prompt "
            f"'{pid}'; fill the cache with '{describe_command_hint(describer, datasets_hint)}' "
            "or run without --no-describe"
        )
    new: dict[str, Entry] = {}
    size = max(1, batch_size or describer.batch_size)
    for start in range(0, len(missing), size):
        chunk = missing[start : start + size]
        chunk_items = [first[sha] for sha in chunk]
        t0 = time.perf_counter()
        texts = describer.describe(chunk_items)
        wall = (time.perf_counter() - t0) / max(len(chunk), 1)
        if len(texts) != len(chunk):
            raise RuntimeError(f"describer '{did}' returned {len(texts)} descriptions for {len(chunk)} images")
        batch = [
            Entry(sha, text, describer.count_tokens(text), wall, item_key(item))
            for sha, item, text in zip(chunk, chunk_items, texts)
        ]
        cache.append(did, pid, batch)
        new.update((e.image_sha1, e) for e in batch)
        if progress:
            progress(len(batch))
    if n_corrupted and generate:  # drop the broken lines so they are reported once
        dropped = cache.compact(did, pid)
        log.info("rewrote %s without %d broken or superseded lines", cache.path(did, pid), dropped)
    table = {**known, **new}
    texts = {item_key(item): table[sha].text for sha, item in zip(shas, items)}
    return DescribeOutcome(texts, len(first), n_cached, len(missing), n_corrupted)


def ensure_descriptions(
    items: Sequence[Any],
    describer: Describer,
    cache: DescriptionCache | None = None,
    generate: bool = True,
    progress: Callable[[int], None] | None = None,
) -> dict[str, str]:
    """relpath -> description for every item, from the cache or generated (see `describe_items`)."""
    return describe_items(items, describer, cache, generate, progress).texts


__all__ = [
    "DescribeOutcome",
    "DescriptionCache",
    "Entry",
    "describe_items",
    "ensure_descriptions",
    "image_sha1",
    "item_key",
]
