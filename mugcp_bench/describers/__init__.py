"""Describers: images -> one-sentence descriptions, MuGCP's source of semantic conditional prompts (SCP).

docs/methods/mugcp.md §7.3 (A) (our design). Every describer is deterministic, registered by lowercase name in
`mugcp_bench.registry.DESCRIBERS`, and has an ``id`` (name + model revision + settings) and a versioned
``prompt_id``; together with the image's content hash they key the description cache
(`mugcp_bench.describers.cache`). One module per describer:

- ``mllm`` (`.mllm`): any transformers image-text-to-text / vision-to-sequence model (hub id or local folder).
- ``file`` (`.file`): imports a JSONL of ``{"image": path, "text": ...}`` (paths absolute or data-root relative).
- ``scene`` (`.scene`): toy world only, a documented STAND-IN for an MLLM (the rendered scene's metadata + noise).
- ``interrogator`` (`.interrogator`): CLIP retrieval over a fixed phrase bank with the run's backbone.

`.base` holds the base class, the options and the factory; `.cached` describes through the cache, and its
`describe` (group items by describer -> describe through the cache -> count) is the one entry point that
`mugcp-bench describe` and MuGCP share.
Importing this package imports every module in it, so a new describer is one new file here that registers itself
(see CONTRIBUTING.md).
"""

from mugcp_bench.describers.base import Describer, DescriberOptions, build_describer
from mugcp_bench.describers.cached import (
    AUTO,
    DescribeOutcome,
    DescribeSummary,
    describe,
    describe_command_hint,
    describe_items,
    describer_groups,
    ensure_descriptions,
)
from mugcp_bench.describers.file import FileDescriber
from mugcp_bench.describers.interrogator import PHRASE_BANK, InterrogatorDescriber
from mugcp_bench.describers.mllm import PROMPTS, MLLMDescriber, check_tokenizer
from mugcp_bench.describers.scene import SceneDescriber, scene_metadata
from mugcp_bench.registry import import_submodules  # noqa: E402

import_submodules(__name__, __path__)

__all__ = [
    "AUTO",
    "PHRASE_BANK",
    "PROMPTS",
    "DescribeOutcome",
    "DescribeSummary",
    "Describer",
    "DescriberOptions",
    "FileDescriber",
    "InterrogatorDescriber",
    "MLLMDescriber",
    "SceneDescriber",
    "build_describer",
    "check_tokenizer",
    "describe",
    "describe_command_hint",
    "describe_items",
    "describer_groups",
    "ensure_descriptions",
    "scene_metadata",
]
