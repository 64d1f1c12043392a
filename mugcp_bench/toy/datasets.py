"""The toy world's datasets (group "toy"): rendered by `mugcp-bench toy prepare` in CoOp layout and read by the same
`ZhouJsonSpec` as the real JSON datasets. Definitions (classes, templates, renderers): `mugcp_bench.toy.suite`."""

from __future__ import annotations

from mugcp_bench.datasets.base import register_dataset
from mugcp_bench.datasets.zhou_json import ZhouJsonSpec
from mugcp_bench.toy.suite import DATASETS as TOY_DATASETS
from mugcp_bench.toy.suite import IMAGE_DIR, METADATA_FILE, TOY_SUITE

TOY_SOURCE = (
    "Rendered procedurally, offline: run 'mugcp-bench toy prepare' (or 'mugcp-bench run' with no --data-root), "
    "which writes the toy suite under the cache dir ($MUGCP_CACHE, else ~/.cache/mugcp-bench)/toy/<hash>/data/."
)


def _roles(name: str) -> tuple[str, ...]:
    """The dataset's parts in the toy suite (TOY_SUITE): its base-to-novel datasets are its few-shot ones too."""
    roles = []
    if name in TOY_SUITE["base2novel"]:
        roles += ["base2novel", "few_shot"]
    if name == TOY_SUITE["source"]:
        roles.append("source")
    if name in TOY_SUITE["cross_dataset_targets"]:
        roles.append("cross_dataset")
    if name in TOY_SUITE["domain_targets"]:
        roles.append("domain_generalization")
    return tuple(roles)


def _toy_spec(name: str) -> ZhouJsonSpec:
    ds = TOY_DATASETS[name]
    spec = ZhouJsonSpec(
        ds.name,
        ds.name,
        IMAGE_DIR,
        ds.split_file,
        ds.template,
        TOY_SOURCE,
        homepage="'mugcp-bench toy prepare'",
        group="toy",
        roles=_roles(name),
        order=list(TOY_DATASETS).index(name),  # the suite's own order: the source first, as ImageNet
        image_dir_comment=f"{len(ds.classnames)} class folders of 32 px PNGs ({ds.description})",
        extra_tree=[(METADATA_FILE, "scene attributes of every image (read by the 'scene' describer)")],
    )
    if ds.test_only:  # a shifted domain: test-only, train list = test list, the source's label space
        spec.test_only = True
        spec.label_space = ds.source
    return spec


SPECS = [_toy_spec(name) for name in TOY_DATASETS]

for _spec in SPECS:
    register_dataset(_spec)
