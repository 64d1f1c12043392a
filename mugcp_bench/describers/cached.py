"""Describing through the shared description cache: cache hits never call a describer; missing descriptions are
generated in batches and appended as they come, so an interrupted fill resumes where it stopped."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from filelock import FileLock

from mugcp_bench.describers.base import Describer
from mugcp_bench.describers.cache import DescriptionCache, Entry
from mugcp_bench.describers.image_keys import image_sha1, item_key
from mugcp_bench.describers.scene import scene_metadata
from mugcp_bench.errors import UserError

log = logging.getLogger(__name__)

AUTO = "auto"


def describer_groups(
    name: str, items: Sequence[Any], make: Callable[[str], Describer]
) -> list[tuple[Describer, list[Any]]]:
    """(describer, items) pairs for a describer name; ``auto`` = ``scene`` for rendered toy images (their dataset
    folder has metadata.jsonl) and ``interrogator`` for every other image. Describers are built only when used."""
    if name != AUTO:
        return [(make(name), list(items))] if items else []
    toy, other = [], []
    for item in items:
        (toy if scene_metadata(item) is not None else other).append(item)
    return [(make(n), group) for n, group in (("scene", toy), ("interrogator", other)) if group]


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
    if missing:
        # Workers of one sweep that miss the same descriptions describe them once: the fill runs under a lock,
        # and whoever waited reads what the first one appended.
        lock_path = cache.path(did, pid)
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        fill_lock = FileLock(str(lock_path) + ".fill.lock")
        fill_lock.acquire()
        known = cache.load(did, pid)
        found = [sha for sha in missing if sha in known]
        if found:
            missing = [sha for sha in missing if sha not in known]
            n_cached += len(found)
            if progress:
                progress(len(found))
    else:
        fill_lock = None
    try:
        _generate(missing, first, describer, cache, new, batch_size, progress)
    finally:
        if fill_lock is not None:
            fill_lock.release()
    if n_corrupted and generate:  # drop the broken lines so they are reported once
        dropped = cache.compact(did, pid)
        log.info("rewrote %s without %d broken or superseded lines", cache.path(did, pid), dropped)
    table = {**known, **new}
    texts = {item_key(item): table[sha].text for sha, item in zip(shas, items)}
    return DescribeOutcome(texts, len(first), n_cached, len(missing), n_corrupted)


def _generate(
    missing: list[str],
    first: dict[str, Any],
    describer: Describer,
    cache: DescriptionCache,
    new: dict[str, Entry],
    batch_size: int | None,
    progress: Callable[[int], None] | None,
) -> None:
    """Describe the `missing` images (by content hash) in batches, appending each batch to the cache and `new`."""
    did, pid = describer.id, describer.prompt_id
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


@dataclass
class DescribeSummary:
    """Descriptions of a list of items, possibly from several describers (``auto``), and how they were obtained."""

    texts: dict[str, str]  # item key (relpath) -> description
    describer_ids: list[str]  # one per describer used, in order
    prompt_ids: list[str]
    n_images: int  # distinct images (by content), summed over the describers
    n_cached: int
    n_generated: int

    @property
    def describer(self) -> str:
        return "+".join(self.describer_ids)

    @property
    def prompt_id(self) -> str:
        return "+".join(self.prompt_ids)


def describe(
    name: str,
    items: Sequence[Any],
    make: Callable[[str], Describer],
    cache: DescriptionCache | None = None,
    generate: bool = True,
    progress: Callable[[int], None] | None = None,
    batch_size: int | None = None,
    datasets_hint: str = "...",
    release: bool = False,
) -> DescribeSummary:
    """The one entry point `mugcp-bench describe` and MuGCP share: group the items by describer (`describer_groups`:
    one describer, or for ``auto`` scene + interrogator), describe each group through the cache (`describe_items`),
    and count. progress(n) is called with the number of ITEMS handled (items sharing an image count each);
    release=True frees each describer's model after its group (an MLLM must not hold GPU memory while a method
    trains)."""
    cache = cache or DescriptionCache()
    summary = DescribeSummary({}, [], [], 0, 0, 0)
    for describer, group in describer_groups(name, items, make):
        outcome = describe_items(
            group, describer, cache, generate, progress, batch_size=batch_size, datasets_hint=datasets_hint
        )
        if progress:
            progress(len(group) - outcome.n_images)  # describe_items counts distinct images
        summary.texts.update(outcome.texts)
        summary.describer_ids.append(describer.id)
        summary.prompt_ids.append(describer.prompt_id)
        summary.n_images += outcome.n_images
        summary.n_cached += outcome.n_cached
        summary.n_generated += outcome.n_generated
        if release:
            describer.release()
    return summary


def ensure_descriptions(
    items: Sequence[Any],
    describer: Describer,
    cache: DescriptionCache | None = None,
    generate: bool = True,
    progress: Callable[[int], None] | None = None,
) -> dict[str, str]:
    """relpath -> description for every item, from the cache or generated (see `describe_items`)."""
    return describe_items(items, describer, cache, generate, progress).texts
