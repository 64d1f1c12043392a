"""The describer base class, the options bag every describer reads from, and the factory."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from mugcp_bench.describers.image_keys import image_path
from mugcp_bench.errors import UserError
from mugcp_bench.registry import DESCRIBERS, suggest


def open_rgb(item: Any):
    """The image of an item as an RGB PIL image; UserError naming the file when it is missing or unreadable."""
    from mugcp_bench.datasets.base import IMAGE_ERRORS, read_rgb

    path = image_path(item)
    try:
        return read_rgb(path)
    except IMAGE_ERRORS as e:
        what = type(e).__name__
        raise UserError(f"image {path} is missing or unreadable ({what}); re-download or re-extract it") from None


@dataclass
class DescriberOptions:
    """Everything a describer may need; each describer reads the fields it uses."""

    model: str | None = None  # mllm: hub id or local folder
    revision: str | None = None  # mllm: hub revision (branch, tag or commit)
    prompt_id: str | None = None
    file: str | None = None  # file: the JSONL
    data_root: str | None = None  # file: root for relative paths
    backbone: Any = None  # interrogator: a mugcp_bench.model.backbone.Backbone
    device: str | None = None  # mllm: where the model runs (default: cuda if available)
    batch_size: int | None = None
    scene_drop: float = 0.2  # scene: probability an attribute is left out
    scene_swap: float = 0.1  # scene: probability an attribute is replaced by another value
    top_k: int = 5  # interrogator: phrases per description


class Describer:
    """Base class: ``describe(items) -> list[str]`` for `Datum`s or image paths, deterministic."""

    name: ClassVar[str] = ""
    default_prompt_id: ClassVar[str] = ""
    prompt_ids: ClassVar[tuple[str, ...] | None] = None  # None: any prompt id is accepted
    batch_size: int = 32

    def __init__(self, prompt_id: str | None = None, batch_size: int | None = None) -> None:
        pid = prompt_id or self.default_prompt_id
        if self.prompt_ids is not None and pid not in self.prompt_ids:
            raise UserError(
                f"describer '{self.name}' has no prompt id '{pid}'.{suggest(pid, self.prompt_ids)} "
                f"Prompt ids: {', '.join(self.prompt_ids)}"
            )
        self.prompt_id = pid
        if batch_size:
            self.batch_size = int(batch_size)

    @classmethod
    def from_options(cls, opts: DescriberOptions) -> Describer:
        raise NotImplementedError

    @property
    def id(self) -> str:
        """Describer id including the model revision and every setting that changes the text."""
        raise NotImplementedError

    def describe(self, items: Sequence[Any]) -> list[str]:
        raise NotImplementedError

    def count_tokens(self, text: str) -> int:
        """Length of a description (words; the mllm describer counts its tokenizer's tokens)."""
        return len(text.split())

    def cli_args(self) -> str:
        """The `mugcp-bench describe` options that rebuild this describer."""
        return f"--describer {self.name} --prompt-id {self.prompt_id}"

    def release(self) -> None:
        """Free what describing loaded (models, GPU memory); the next `describe` loads it again."""


def build_describer(name: str, opts: DescriberOptions | None = None, **kwargs: Any) -> Describer:
    """A describer by registered name; options as a `DescriberOptions` and/or keyword fields of it."""
    opts = dataclasses.replace(opts or DescriberOptions(), **kwargs)
    return DESCRIBERS.get(name).from_options(opts)
