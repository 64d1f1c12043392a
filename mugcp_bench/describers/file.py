"""The ``file`` describer: imports descriptions from a JSONL of ``{"image": path, "text": ...}``."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mugcp_bench.describers.base import Describer, DescriberOptions
from mugcp_bench.describers.image_keys import image_path
from mugcp_bench.errors import UserError
from mugcp_bench.registry import DESCRIBERS


@DESCRIBERS.register("file")
class FileDescriber(Describer):
    """Imports descriptions from a JSONL file of {"image": path, "text": ...} (path absolute or data-root relative)."""

    name = "file"
    default_prompt_id = "file"
    batch_size = 4096

    def __init__(self, file: str, prompt_id: str | None = None, data_root: str | None = None) -> None:
        super().__init__(prompt_id)
        self.file = Path(file)
        if not self.file.is_file():
            raise UserError(f"description file {self.file} does not exist; pass --file PATH to a JSONL file")
        raw = self.file.read_bytes()
        self._digest = hashlib.sha1(raw).hexdigest()[:12]
        self.data_root = os.path.abspath(data_root) if data_root else None
        self._by_abs: dict[str, str] = {}
        self._by_rel: dict[str, str] = {}
        for number, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                path, text = obj["image"], obj["text"]
                if not isinstance(path, str) or not isinstance(text, str):
                    raise TypeError
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(
                    f"description file {self.file} line {number} is not a JSON object with string fields "
                    '"image" and "text"; fix or remove the line'
                ) from None
            text = " ".join(text.split())
            if os.path.isabs(path):
                self._by_abs[os.path.normpath(path)] = text
            else:
                rel = Path(os.path.normpath(path)).as_posix()
                self._by_rel[rel] = text
                if self.data_root:
                    self._by_abs[os.path.normpath(os.path.join(self.data_root, path))] = text

    @classmethod
    def from_options(cls, opts: DescriberOptions) -> FileDescriber:
        if not opts.file:
            raise UserError("the 'file' describer needs a JSONL file: pass --file PATH (or --set describer_file=PATH)")
        return cls(opts.file, opts.prompt_id, opts.data_root)

    @property
    def id(self) -> str:
        return f"file-{self.file.stem}-{self._digest}"

    def _lookup(self, item: Any) -> str | None:
        path = os.path.normpath(image_path(item))
        if path in self._by_abs:
            return self._by_abs[path]
        rel = getattr(item, "relpath", None)  # relative to the item's own data root
        return self._by_rel.get(Path(os.path.normpath(rel)).as_posix()) if rel is not None else None

    def describe(self, items: Sequence[Any]) -> list[str]:
        texts = [self._lookup(item) for item in items]
        missing = [image_path(item) for item, t in zip(items, texts) if t is None]
        if missing:
            raise UserError(
                f"description file {self.file} has no line for {len(missing)} of {len(items)} images "
                f"(first: {missing[0]}); add them, or pass --data-root if its paths are relative"
            )
        return [t for t in texts if t is not None]

    def cli_args(self) -> str:
        return f"--describer file --file {self.file} --prompt-id {self.prompt_id}"
