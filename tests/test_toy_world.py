"""Toy CLIP pretraining (determinism, open_clip checkpoint format) and the cached toy world (quick mode, CLI)."""

from __future__ import annotations

import open_clip
import pytest
import torch
from click.testing import CliRunner

from mugcp_bench.commands.toy import toy
from mugcp_bench.toy import world as world_mod
from mugcp_bench.toy.pretrain import (
    MODEL_NAME,
    PretrainSettings,
    encode_text_by_length,
    pair_batch,
    pretrain,
    register_model_config,
)
from mugcp_bench.toy.suite import DATASETS, QUICK_SIZES, TOY_SUITE
from mugcp_bench.toy.world import ensure_toy_world, world_settings
from tests.numerics import assert_close_scaled

TINY = PretrainSettings(steps=3, batch_size=16, warmup_steps=1)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny workloads: one thread (oversubscribed OpenMP threads on a shared 2-core machine are 10x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_same_seed_pretrains_identical_weights() -> None:
    torch.manual_seed(123)
    outside = torch.rand(1)
    torch.manual_seed(123)
    a, _ = pretrain(TINY, progress=False, workers=0)
    assert torch.equal(torch.rand(1), outside)  # global RNG state is left alone
    b, _ = pretrain(TINY, progress=False, workers=2)  # batches rendered by two worker processes: same weights
    c, _ = pretrain(PretrainSettings(steps=3, batch_size=16, warmup_steps=1, seed=1), progress=False, workers=0)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.numerics
def test_text_by_length_equals_the_full_context_encoding() -> None:
    """Captions encoded in length groups, cut after their end-of-text token, give open_clip's features (float
    rounding aside), in the captions' order."""
    register_model_config()
    torch.manual_seed(0)
    model = open_clip.create_model(MODEL_NAME).eval()
    texts = pair_batch(PretrainSettings(batch_size=48), 0)[1] + ["a photo of a red circle.", "x."]
    tokens = open_clip.get_tokenizer(MODEL_NAME)(texts)  # (50, 32)
    assert int(tokens.argmax(dim=-1).max()) < tokens.shape[1] - 4  # there is padding to skip
    with torch.no_grad():
        full = model.encode_text(tokens, normalize=True)
        for chunks in (1, 3, 8):
            assert_close_scaled(encode_text_by_length(model, tokens, chunks), full, msg=f"{chunks} groups")


def test_pretraining_progress_in_a_log_file(capsys: pytest.CaptureFixture[str]) -> None:
    """Off a terminal (stderr captured: not a TTY) pretraining writes plain lines, not an empty progress bar."""
    pretrain(TINY, progress=True, workers=0)
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "pretraining toy CLIP: 0/3 steps (0%)"
    assert err[-1].startswith("pretraining toy CLIP: 3/3 steps (100%), done in ") and ", loss " in err[-1]


def test_world_key_covers_settings() -> None:
    keys = {
        world_settings().key(),
        world_settings(quick=True).key(),
        world_settings(steps=7).key(),
        world_settings(steps=7, quick=True).key(),
    }
    assert len(keys) == 4
    assert world_settings().key() == world_settings().key()


@pytest.fixture(scope="module")
def quick_world(session_cache) -> world_mod.ToyWorld:
    """The session's quick toy world (the demo's, when it ran first: prepared once)."""
    return ensure_toy_world(cache_dir=session_cache, quick=True, progress=False)


def test_quick_world_is_complete_and_loadable(quick_world: world_mod.ToyWorld) -> None:
    w = quick_world
    assert w.backbone_name == "toy-clip" and w.suite == TOY_SUITE
    assert w.checkpoint.name == "toy_clip.pt" and w.data_root == w.checkpoint.parent / "data"
    assert w.checkpoint.parent.parent.name == "toy"
    assert sorted(p.name for p in w.data_root.iterdir()) == sorted(DATASETS)
    assert set(w.zero_shot) == {*TOY_SUITE["base2novel"], *TOY_SUITE["domain_targets"]}
    assert all(0.0 <= v <= 100.0 for v in w.zero_shot.values())
    model = open_clip.create_model(MODEL_NAME, pretrained=str(w.checkpoint))
    state = torch.load(w.checkpoint, weights_only=True)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    n_train = len(DATASETS["toy_shapes"].classnames) * QUICK_SIZES.train
    assert n_train >= 16 * len(DATASETS["toy_shapes"].classnames)  # 16-shot sampling works in quick mode


def test_cached_world_is_reused(quick_world: world_mod.ToyWorld, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = quick_world.root.parent.parent
    mtime = quick_world.checkpoint.stat().st_mtime_ns

    def _fail(*args, **kwargs):
        raise AssertionError("a cached world must not be prepared again")

    monkeypatch.setattr(world_mod, "pretrain", _fail)
    monkeypatch.setattr(world_mod, "write_suite", _fail)
    again = ensure_toy_world(cache_dir=cache, quick=True, progress=False)
    assert again.zero_shot == quick_world.zero_shot and again.checkpoint.stat().st_mtime_ns == mtime


def test_interrupted_pretraining_leaves_nothing_half_written(
    quick_world: world_mod.ToyWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = quick_world.root.parent.parent
    state = torch.load(quick_world.checkpoint, weights_only=True)
    quick_world.checkpoint.unlink()
    (quick_world.root / ".data.tmp-stale").mkdir()  # a render killed earlier

    def _interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(world_mod, "pretrain", _interrupted)
    with pytest.raises(KeyboardInterrupt):
        ensure_toy_world(cache_dir=cache, quick=True, progress=False)
    assert not quick_world.checkpoint.exists()
    assert not [p for p in quick_world.root.iterdir() if p.name.startswith(".")]  # no temp files left

    monkeypatch.setattr(world_mod, "pretrain", lambda settings, progress, workers=0: (state, {"seconds": 0.0}))
    again = ensure_toy_world(cache_dir=cache, quick=True, progress=False)
    assert again.checkpoint.is_file() and again.zero_shot == quick_world.zero_shot


def test_cli_prepare_prints_the_zero_shot_table(quick_world: world_mod.ToyWorld) -> None:
    cache = quick_world.root.parent.parent
    result = CliRunner().invoke(toy, ["prepare", "--quick", "--cache-dir", str(cache)], catch_exceptions=False)
    assert result.exit_code == 0
    for name in quick_world.zero_shot:
        assert name in result.output
    assert f"checkpoint: {quick_world.checkpoint}" in result.output
