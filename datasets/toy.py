"""The toy world's datasets (group "toy"): rendered by `mugcp-bench toy prepare` in CoOp layout and read by the same
`ZhouJsonSpec` as the real JSON datasets. Definitions (classes, templates, renderers): `mugcp_bench.toy.suite`."""

from __future__ import annotations

from mugcp_bench.datasets.zhou_json import ZhouJsonSpec
from mugcp_bench.registry import DATASETS
from mugcp_bench.toy.suite import DATASETS as TOY_DATASETS
from mugcp_bench.toy.suite import IMAGE_DIR, METADATA_FILE

TOY_SOURCE = (
    "Rendered procedurally, offline: run 'mugcp-bench toy prepare' (or 'mugcp-bench run' with no --data-root), "
    "which writes the toy suite under the cache dir ($MUGCP_CACHE, else ~/.cache/mugcp-bench)/toy/<hash>/data/."
)


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
        image_dir_comment=f"{len(ds.classnames)} class folders of 32 px PNGs ({ds.description})",
        extra_tree=[(METADATA_FILE, "scene attributes of every image (read by the 'scene' describer)")],
    )
    if ds.test_only:  # a shifted domain: test-only, train list = test list, the source's label space
        spec.test_only = True
        spec.label_space = ds.source
    return spec


SPECS = [_toy_spec(name) for name in TOY_DATASETS]

for _spec in SPECS:
    DATASETS.add(_spec.name, _spec)
