"""TCP specifics: parameter counts, templates, the class-aware tokens at the injected layer (with the knowledge
zeroed: CoOp with a class-independent context there), the knowledge-guided loss, the Adam recipe."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mugcp_bench.engine import trainer
from mugcp_bench.errors import UserError
from mugcp_bench.methods.base import TrainConfig, apply_overrides, split_overrides
from mugcp_bench.methods.tcp import TCP, knowledge_template, prompt_tail
from mugcp_bench.model.backbone import load_backbone
from tests.method_harness import (
    CLASSNAMES,
    build_method,
    load_images,
    make_batch,
    shared_tiny_backbone,
    vit_b16_backbone,
    write_items,
)
from tests.numerics import GRAD, assert_close_scaled, assert_differs

CPU = torch.device("cpu")


def perturbed(**overrides) -> TCP:
    method = build_method("tcp", **overrides)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in method.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return method


@pytest.fixture
def batch(tmp_path):
    return make_batch(tmp_path, n=3)


def test_parameter_count_vit_b16():
    """ctx 4·512 + Linear(512 → 128) + Linear(128 → 2048) = 2,048 + 65,664 + 264,192 (trainers/tcp.py)."""
    cfg, _ = split_overrides(TCP, TCP.recipe("paper", "base2novel", 16, "caltech101"))
    assert TCP(vit_b16_backbone(), ["cat", "dog"], TCP.make_config(cfg), dataset="caltech101").n_trainable() == 331_904
    no_tke = TCP(vit_b16_backbone(), ["cat"], TCP.make_config({**cfg, "tke": False}), dataset="caltech101")
    assert no_tke.n_trainable() == 2_048


def test_paper_recipe_is_adam_with_the_readme_eps_for_50_epochs():
    r = TCP.recipe("paper", "base2novel", 16, "oxford_pets")
    assert (r["optimizer"], r["adam_eps"], r["lr"], r["batch_size"], r["epochs"]) == ("adam", 1e-3, 0.002, 32, 50)
    assert (r["insert_layer"], r["kg_weight"], r["n_ctx"]) == (8, 8.0, 4)
    assert TCP.recipe("paper", "few_shot", 4, "dtd") == r
    assert TCP.recipe("dassl-eps", "base2novel", 16, "dtd")["adam_eps"] == 1e-8
    assert TCP.recipe("paper", "xd", 16, "imagenet") == r  # no xd config in the repository: ours
    method_keys, train_keys = split_overrides(TCP, r)
    cfg = apply_overrides(TrainConfig(), train_keys, "training")
    opt, _ = trainer.make_optimizer(build_method("tcp"), cfg)
    assert isinstance(opt, torch.optim.Adam) and opt.param_groups[0]["eps"] == 1e-3
    assert opt.param_groups[0]["betas"] == (0.9, 0.999) and opt.param_groups[0]["weight_decay"] == 5e-4
    note = TCP.provenance["paper"].note
    assert "eps 1e-3" in note and "issue #7" in note and "xd" in note


def test_templates_follow_the_reference_tables():
    assert prompt_tail("stanford_cars", "a photo of a {}.") == "{}, a type of car"  # no final period
    assert prompt_tail("ucf101", "a photo of a person doing {}.") == "person doing {}."
    assert prompt_tail("dtd", "{} texture.") == "{} texture."
    assert knowledge_template("fgvc_aircraft", "a photo of a {}, a type of aircraft.") == "a photo of an aircraft {}."
    assert knowledge_template("food101", "a photo of {}, a type of food.") == "a photo of a {}, a type of food."
    # other datasets: their own template, and the class name with what follows it after the context
    assert knowledge_template("toy_shapes", "a photo of a {}, a type of shape.") == "a photo of a {}, a type of shape."
    assert prompt_tail("toy_shapes", "a photo of a {}, a type of shape.") == "{}, a type of shape."
    bb = shared_tiny_backbone()
    method = TCP(bb, ["golden_retriever"], build_method("tcp").cfg, "a photo of a {}, a type of pet.", "oxford_pets")
    want = bb.tokenize(["X X X X golden retriever, a type of pet."])[:, : method.prompts.tokens.shape[1]]
    assert torch.equal(method.prompts.tokens, want)
    kg = F.normalize(bb.text_features(["a photo of a golden retriever, a type of pet."], normalize=False), dim=-1)
    assert_close_scaled(method.kg_text, kg, msg="knowledge features")


def test_insert_layer_beyond_the_backbone_is_one_line_with_the_fix():
    with pytest.raises(UserError, match=r"insert_layer=8 but 'tiny' has 4 text blocks; --set insert_layer= a block"):
        build_method("tcp", insert_layer=8)


def coop_with_second_context(method: TCP, second: torch.Tensor, at: int) -> torch.Tensor:
    """Text features of CoOp's prompts [SOS][ctx][tail] whose positions 1 … n are set to `second` (n, Dt), the same
    for every class, at the input of text block `at`: written out block by block on the backbone."""
    bb, n = method.backbone, method.n_ctx
    x, mask, eot = bb.text_embed(method.prompts.build(method.ctx), method.prompts.tokens)
    for i in range(bb.text_layers):
        if i == at:
            x = torch.cat([x[:, :1], second.unsqueeze(0).expand(x.shape[0], -1, -1), x[:, 1 + n :]], dim=1)
        x = bb.text_block(i, x, mask)
    return bb.text_head(x, eot)


@pytest.mark.numerics
@pytest.mark.parametrize("at", [0, 2, 3])
def test_with_the_knowledge_zeroed_tcp_is_coop_with_a_random_context_at_the_injected_layer(at):
    """Zero knowledge features make the TKE's tokens meta_net(0) = linear2(QuickGELU(b1)) + b2: one random
    (n, Dt) context for every class, replacing positions 1 … n at the input of block `insert_layer`. Then TCP is
    CoOp with that context there; at block 0 it *is* CoOp (its own context is overwritten), whose context is that one
    less the positional embedding, since the tokens replace hidden states that already carry it."""
    method = perturbed(insert_layer=at)
    with torch.no_grad():
        method.kg_text.zero_()
        tokens = method.class_tokens()  # (C, n, Dt)
    assert_close_scaled(tokens, tokens[:1].expand_as(tokens), msg="class tokens")  # class-independent (GEMM rounding)
    second = tokens[0]
    b1, b2 = method.meta_net.linear1.bias, method.meta_net.linear2.bias
    quick_gelu = b1 * torch.sigmoid(1.702 * b1)
    assert_close_scaled(second.flatten(), method.meta_net.linear2(quick_gelu), msg="meta_net(0)")
    assert (b2.abs().max() > 0) and second.abs().max() > 0.01  # a real (random) context, not zeros
    with torch.no_grad():
        assert_close_scaled(method.text_features(), coop_with_second_context(method, second, at), msg=f"block {at}")
    if at == 0:  # CoOp itself: the coop plugin with the same prompt text and, as its context, that context less the
        # positional embedding of positions 1 … n: the class tokens replace hidden states *after* the positional
        # embedding is added (clip_text/model.py does it inside the blocks), CoOp's context gets it added
        coop = build_method("coop", n_ctx=4, ctx_init="")
        pos = method.backbone.text.positional_embedding[1 : 1 + method.n_ctx]  # (n, Dt)
        with torch.no_grad():
            coop.ctx.copy_(second - pos)
            assert_close_scaled(method.text_features(), coop.text_features(), msg="coop")
        method.train()
        method.ctx.grad = None
        method.text_features().sum().backward()
        assert method.ctx.grad is None or not method.ctx.grad.any()  # the input context never reaches the output


def test_class_tokens_differ_per_class_and_replace_positions_from_the_layer_on():
    method = perturbed(insert_layer=2)
    tokens = method.class_tokens()
    assert_differs(tokens[0], tokens[1], msg="class tokens of two classes")  # class-aware
    with torch.no_grad():
        got = method.text_features()
        mean_second = tokens.mean(0)
        assert_differs(got, coop_with_second_context(method, mean_second, 2), msg="per-class against mean tokens")


def test_kg_loss_is_eight_times_one_minus_the_mean_cosine(batch):
    method = perturbed().train()
    out = method(batch.images, batch.keys)
    with torch.no_grad():
        text = F.normalize(method.text_features(), dim=-1)
        want = 8.0 * (1 - (text * method.kg_text).sum(-1).mean())
    assert set(out.losses) == {"kg"}
    assert_close_scaled(out.losses["kg"], want, msg="kg")
    assert build_method("tcp", kg_weight=0.0).train()(batch.images).losses == {}


def test_logits_use_detached_frozen_image_features(batch):
    method = perturbed().train()
    feats = shared_tiny_backbone().encode_image(batch.images)
    out = method(None, batch.keys, image_features=feats)
    assert_close_scaled(out.logits, method(batch.images, batch.keys).logits, msg="cached features")
    assert not feats.requires_grad


@pytest.mark.numerics
def test_training_step_fast_equals_naive_with_the_kg_loss(tmp_path):
    fast_bb, naive_bb = load_backbone("tiny"), load_backbone("tiny")
    naive_bb.eot_truncation = naive_bb.fused_attention = naive_bb.prefix_sharing = False
    items = write_items(tmp_path, CLASSNAMES, n=4, seed=5)
    fast = perturbed(backbone=fast_bb)
    naive = build_method("tcp", backbone=naive_bb)
    naive.load_trainable_state(fast.trainable_state())
    assert naive.prompts.tokens.shape[1] == naive_bb.context_length > fast.prompts.tokens.shape[1]
    images, labels = load_images(items, fast_bb), torch.tensor([d.label for d in items])
    grads = []
    for m in (fast, naive):
        m.train()
        out = m(images)
        loss = F.cross_entropy(out.logits, labels) + out.losses["kg"]
        m.zero_grad()
        loss.backward()
        grads.append({k: p.grad.clone() for k, p in m.named_parameters() if p.requires_grad})
    for k, g in grads[1].items():
        assert g.abs().max() > 0, f"{k} gets no gradient"
        assert_close_scaled(grads[0][k], g, GRAD, msg=f"gradient of {k}")


def test_fit_records_the_kg_loss_and_the_group_free_history(tmp_path):
    items = write_items(tmp_path, CLASSNAMES, n=8, seed=6)
    method = build_method("tcp")
    cfg = TrainConfig(epochs=2, lr=0.002, batch_size=4, optimizer="adam", adam_eps=1e-3)
    result = trainer.fit(method, items, cfg, shared_tiny_backbone().test_transform, CPU, "fp32", seed=1)
    assert [sorted(k for k in h if k.startswith("loss")) for h in result.history] == [
        ["loss", "loss_ce", "loss_kg"]
    ] * 2
    assert result.history[1]["loss_kg"] > 0


# --- end to end ----------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_toy_world_runs_every_protocol_with_adam(tmp_path):
    """The toy recipe through `run_sweep` on the quick toy world (2 epochs) for base-to-novel, the source run with its
    cross-dataset and domain-generalization evaluations, and few-shot: Adam with eps 1e-3 recorded in every run."""
    from mugcp_bench import run_sweep

    for protocols, datasets in (
        ("base2novel", "toy_shapes"),
        ("cross_dataset,domain_generalization", "toy_shapes,toy_objects_sketch"),
        ("few_shot", "toy_shapes"),
    ):
        result = run_sweep(
            methods="tcp", protocols=protocols, datasets=datasets, seeds=[1], quick_toy=True, sets={"epochs": 2},
            shots="2" if protocols == "few_shot" else None, results_dir=tmp_path / protocols,
        )  # fmt: skip
        (record,) = result.records()
        assert record["status"] == "complete" and record["key"]["recipe"] == "toy"
        train = record["config"]["train"]
        assert (train["optimizer"], train["adam_eps"], train["adam_beta1"], train["adam_beta2"]) == (
            "adam",
            1e-3,
            0.9,
            0.999,
        )
        assert len(record["history"]) == 2 and all({"loss_ce", "loss_kg"} <= h.keys() for h in record["history"])
        assert record["evaluations"] and all(0 <= e["accuracy"] <= 100 for e in record["evaluations"])


@pytest.mark.slow
def test_ablate_drops_each_component(tmp_path, capsys):
    from tests.cli_harness import cli, records
    from tests.miniature import build_miniature

    data_root = build_miniature(tmp_path / "data", ["eurosat"])
    args = ["ablate", "--method", "tcp", "--drop", "kg", "--drop", "tke", "--datasets", "eurosat", "--seeds", "1"]
    args += ["--data-root", str(data_root), "--backbone", "tiny", "--pretrained", "random", "--recipe", "toy"]
    code, _, err = cli([*args, "--set", "epochs=2", "--results-dir", str(tmp_path / "results")], capsys)
    assert code == 0, err
    by_label = {r["method_label"]: r for r in records(tmp_path / "results")}
    assert set(by_label) == {"tcp", "tcp-no-kg", "tcp-no-tke"}
    assert "loss_kg" in by_label["tcp"]["history"][-1] and "loss_kg" not in by_label["tcp-no-kg"]["history"][-1]
    assert by_label["tcp-no-tke"]["trainable_params"] < by_label["tcp"]["trainable_params"]
