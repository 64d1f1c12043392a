"""MuGCP (reconstructed): SCP features, AMG -> VCP, MPF modes, losses, ablation switches, descriptions and leakage."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from mugcp_bench.describers import MLLMDescriber
from mugcp_bench.describers.cache import DescriptionCache
from mugcp_bench.errors import UserError
from mugcp_bench.methods.base import split_overrides
from mugcp_bench.registry import METHODS
from tests.method_harness import (
    CLASSNAMES,
    build_method,
    make_batch,
    prepare,
    shared_tiny_backbone,
    total_loss,
    vit_b16_backbone,
)
from tests.numerics import FP16, assert_close_scaled, assert_differs
from tests.test_describers import build_tiny_llava

MuGCP = METHODS.get("mugcp")


@pytest.fixture
def batch(tmp_path):
    return make_batch(tmp_path, n=3)


def mugcp(batch=None, seed=0, ablation=None, **overrides):
    if ablation:
        cfg_keys, _ = split_overrides(MuGCP, MuGCP.ablations[ablation])
        overrides = {**cfg_keys, **overrides}
    method = build_method("mugcp", seed=seed, **overrides)
    return prepare(method, batch) if batch is not None else method


def shapes(method):
    return {n: tuple(p.shape) for n, p in method.named_parameters() if p.requires_grad}


def with_prefix(names, *prefixes):
    return {n for n in names if n.startswith(prefixes)}


def write_captions(tmp_path, items, texts):
    path = tmp_path / "captions.jsonl"
    path.write_text("".join(json.dumps({"image": d.impath, "text": t}) + "\n" for d, t in zip(items, texts)))
    return str(path)


# --- identity and recipes -------------------------------------------------------------------------------------------
def test_identity_recipes_and_ablations():
    assert MuGCP.reconstructed and MuGCP.name == "mugcp" and "reconstructed" in (MuGCP.__doc__ or "")
    paper = MuGCP.recipes["paper"]
    assert {k: paper["base2novel"][k] for k in ("epochs", "lr", "batch_size", "depth")} == {
        "epochs": 5,
        "lr": 0.0035,
        "batch_size": 4,
        "depth": 9,
    }
    assert {k: paper["xd"][k] for k in ("epochs", "lr", "batch_size", "accum_steps")} == {
        "epochs": 2,
        "lr": 0.0026,
        "batch_size": 1,
        "accum_steps": 4,
    }
    assert paper["few_shot"]["epochs"] == 50 and all(r["describer"] == "mllm" for r in paper.values())
    # ImageNet trains at batch 1 x accumulation 4 in every paper protocol (docs/methods/mugcp.md, recipes)
    for protocol in ("base2novel", "few_shot", "xd"):
        on_imagenet = MuGCP.recipe("paper", protocol, 16, "imagenet")
        assert (on_imagenet["batch_size"], on_imagenet["accum_steps"]) == (1, 4), protocol
    assert MuGCP.recipe("paper", "base2novel", 16, "dtd")["batch_size"] == 4
    assert "accum_steps" not in MuGCP.recipe("paper", "few_shot", 16, "dtd")
    toy = MuGCP.recipes["toy"]
    assert all(r["depth"] <= 3 for r in toy.values())
    assert (toy["xd"]["batch_size"], toy["xd"]["accum_steps"]) == (1, 4)  # the toy source mirrors the paper regime
    assert set(MuGCP.ablations) == {"scp", "amg", "vcp", "mpf", "align", "mutual"}
    assert MuGCP.ablations["mpf"] == {"mpf": "ctx_only"} and MuGCP.ablations["vcp"] == {"vcp": False}
    cfg = MuGCP.Config()
    assert (cfg.n_ctx, cfg.n_vctx, cfg.depth, cfg.text_depth, cfg.mpf, cfg.align_weight, cfg.align_bank) == (
        4,
        4,
        9,
        9,
        "gated_sum",
        0.5,
        True,
    )
    with pytest.raises(UserError, match="Did you mean 'concat'"):
        build_method("mugcp", mpf="concatt")
    with pytest.raises(UserError, match="Did you mean 'scene'"):
        build_method("mugcp", describer="sene")


def test_trainable_parameters_on_vit_b16_stay_below_11m():
    method = build_method("mugcp", backbone=vit_b16_backbone(), recipe="paper", describer="scene")
    n = sum(p.numel() for p in method.parameters() if p.requires_grad)
    assert 8_000_000 < n <= 11_000_000  # 8,964,968 with the defaults (docs/methods/mugcp.md)
    assert method.depth == 9 and method.text_depth == 9 and method.alpha.shape == (9, 4)


# --- ablation switches change exactly what they say ------------------------------------------------------------------
def test_ablation_parameter_sets(batch):
    full = shapes(mugcp(batch))
    names = set(full)
    mutual = with_prefix(names, "amg.blocks.0.ln_s", "amg.blocks.0.ln_x", "amg.blocks.0.attn_s")
    scp_text = with_prefix(names, "meta_net.", "meta_heads.") | {"alpha"}
    assert mutual and scp_text and with_prefix(names, "amg.w_q.", "amg.w_sv.", "w_vt.") and {"beta"} <= names
    dv, dt = shared_tiny_backbone().vision_width, shared_tiny_backbone().text_width
    assert full["amg.gamma"] == (2, 3, dv) and full["amg.queries"] == (3, 4, dv)  # toy depth 3: AMG at layers 1, 2
    assert full["alpha"] == full["beta"] == (3, 4) and full["text_deep"] == (2, 4, dt)  # gates at text layers 0 … 2
    assert len(with_prefix(names, "meta_heads.")) == 6  # one output layer (weight, bias) per prompted text layer

    no_scp = shapes(mugcp(batch, ablation="scp"))
    assert names - set(no_scp) == with_prefix(names, "amg.w_q.", "amg.w_sv.") | scp_text | mutual
    assert set(no_scp) <= names and no_scp["amg.gamma"] == (2, 2, dv)

    no_amg = shapes(mugcp(batch, ablation="amg"))
    assert names - set(no_amg) == with_prefix(names, "amg.blocks.", "amg.w_sv.", "amg.gamma")
    assert set(no_amg) <= names

    no_vcp = shapes(mugcp(batch, ablation="vcp"))  # only the learned deep vision prompts E_l remain of AMG
    assert names - set(no_vcp) == with_prefix(names, "amg.blocks.", "amg.w_sv.", "amg.gamma", "amg.w_q.") | {"beta"}
    assert "w_vt.weight" in no_vcp  # still maps the visual evidence for L_align

    no_mutual = shapes(mugcp(batch, ablation="mutual"))
    assert names - set(no_mutual) == mutual and set(no_mutual) <= names and no_mutual["amg.gamma"] == (2, 2, dv)

    ctx_only = shapes(mugcp(batch, ablation="mpf"))
    assert names - set(ctx_only) == scp_text | {"beta"} and set(ctx_only) <= names

    assert shapes(mugcp(batch, ablation="align")) == full


def perturbed(method, seed=0):
    """Noise on every trainable tensor, so zero-initialised gates take part (the same noise for every variant)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(method.named_parameters()):
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return method


@pytest.mark.numerics
@pytest.mark.parametrize("name", sorted(MuGCP.ablations))
def test_every_ablation_is_a_real_switch(name, batch):
    """Same inputs, same weights for every parameter both share: dropping the component changes logits or loss."""
    full = perturbed(mugcp(batch, seed=7))
    variant = mugcp(batch, seed=7, ablation=name)
    shared = dict(variant.named_parameters())
    with torch.no_grad():
        for key, value in full.trainable_state().items():
            if key in shared:  # the overlapping part (AMG's LayerScale has a third branch only with mutual)
                shared[key].copy_(value[tuple(slice(0, n) for n in shared[key].shape)])
    logits, loss = total_loss(full, batch)
    logits_v, loss_v = total_loss(variant, batch)
    if name == "align":  # the loss alone: logits equal, the alignment term gone
        assert torch.equal(logits, logits_v) and "align" not in variant(batch.images, keys=batch.keys).losses
        assert loss > loss_v
        assert_differs(loss, loss_v)
    else:
        assert_differs(logits, logits_v, msg=f"dropping {name} left the logits unchanged")


def test_no_align_drops_only_the_loss(batch):
    full, no_align = mugcp(batch, seed=3), mugcp(batch, seed=3, ablation="align")
    out, out_na = full(batch.images, keys=batch.keys), no_align(batch.images, keys=batch.keys)
    assert torch.equal(out.logits, out_na.logits)
    assert set(out.losses) == {"align"} and out.losses["align"] > 0 and out_na.losses == {}


# --- L_align: visual evidence, a bank of descriptions, every batch size ----------------------------------------------
@pytest.mark.parametrize("size", [1, 4])
def test_align_loss_positive_with_gradient_to_amg_at_batch_1_and_4(size, tmp_path):
    data = make_batch(tmp_path, n=4)
    method = mugcp(data, seed=8)  # prepared on the 4 training images: the bank holds their 4 descriptions
    method.train()
    out = method(data.images[:size], keys=data.keys[:size])
    assert out.losses["align"] > 0.05
    out.losses["align"].backward()
    for name in (
        "amg.blocks.0.attn.in_proj_weight",
        "amg.blocks.0.attn.out_proj.weight",
        "amg.queries",
        "amg.w_q.weight",
    ):
        grad = dict(method.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, f"no gradient of L_align reaches {name} at batch {size}"


def test_in_batch_only_alignment_is_zero_at_batch_1(tmp_path):
    """The first reconstruction's in-batch InfoNCE (`align_bank: false`) has nothing to contrast at batch 1."""
    data = make_batch(tmp_path, n=4)
    in_batch = mugcp(data, seed=8, align_bank=False)
    assert in_batch(data.images[:1], keys=data.keys[:1]).losses["align"].abs() < 1e-6
    assert in_batch(data.images, keys=data.keys).losses["align"] > 0.05


def test_align_bank_holds_training_descriptions_only(tmp_path):
    train, test = make_batch(tmp_path / "train", n=4), make_batch(tmp_path / "test", n=3, seed=9)
    method = prepare(mugcp(seed=8), train)
    method.prepare_images(test.items, "test")
    bank, target = method._align_bank([method.description(test.keys[0])], torch.device("cpu"))
    train_texts = list(dict.fromkeys(method.description(k) for k in train.keys))
    assert bank.shape[0] == len(train_texts) + int(method.description(test.keys[0]) not in train_texts)
    assert_close_scaled(bank[: len(train_texts)], torch.stack([method._features[t][0] for t in train_texts]))


@pytest.mark.numerics
def test_alignment_evidence_is_the_image_read_out_without_query_residual(batch):
    method = perturbed(mugcp(batch, seed=9))
    with torch.no_grad():
        out = method.forward_details(batch.images, batch.keys)
        assert len(out.evidence) == 2 and out.evidence[0].shape == (3, shared_tiny_backbone().vision_width)
        method.amg.w_sv.weight.mul_(5.0)  # other semantic tokens S~: the VCPs change, the read-out of X_1 does not
        other = method.forward_details(batch.images, batch.keys)
        assert_differs(other.vcps[1], out.vcps[1])
        assert_close_scaled(other.evidence[0], out.evidence[0])
        attn = method.amg.blocks[0].attn.out_proj
        attn.weight.zero_()
        attn.bias.zero_()  # no attention output: the evidence is zero whatever W_q s is (no residual to copy)
        silent = method.forward_details(batch.images, batch.keys)
        assert all(torch.equal(e, torch.zeros_like(e)) for e in silent.evidence)
        assert not torch.equal(silent.vcps[1], torch.zeros_like(silent.vcps[1]))  # VCP_l = Q_l + MLP(...) remains


# --- AMG, VCP, mutual guidance --------------------------------------------------------------------------------------
@pytest.mark.numerics
def test_amg_attention_and_its_ablation(batch):
    full, no_amg = mugcp(batch, seed=1), mugcp(batch, seed=1, ablation="amg")
    for method, attends in ((full, True), (no_amg, False)):
        with torch.no_grad():
            out = method.forward_details(batch.images, batch.keys)
            assert len(out.vcps) == 3
            for layer, vcp in enumerate(out.vcps):
                query = method.amg.queries[layer] + method.amg.w_q(out.s).unsqueeze(1)  # E_l + W_q s
                if layer == 0 or not attends:
                    assert_close_scaled(vcp, query.expand_as(vcp), msg=f"layer {layer}")
                else:
                    assert_differs(vcp, query.expand_as(vcp), msg=f"layer {layer}")


def test_no_vcp_uses_the_learned_deep_vision_prompts(batch):
    method = perturbed(mugcp(batch, seed=2, ablation="vcp"))
    assert not hasattr(method.amg, "blocks") and method.amg.w_q is None and not hasattr(method, "beta")
    with torch.no_grad():
        out = method.forward_details(batch.images, batch.keys)
    for layer, vcp in enumerate(out.vcps):  # the image's prompts are E_l at every layer: no AMG output anywhere
        assert torch.equal(vcp, method.amg.queries[layer].expand_as(vcp))
    assert method.instance_conditional  # SCP still conditions the text


def test_mutual_refines_the_semantic_tokens(batch):
    for ablation, refined in ((None, True), ("mutual", False)):
        method = mugcp(batch, seed=2, ablation=ablation)
        with torch.no_grad():
            out = method.forward_details(batch.images, batch.keys)
        assert len(out.s_tildes) == 2  # S~ entering AMG layers 1 and 2
        assert torch.equal(out.s_tildes[0], out.s_tildes[1]) is not refined


def test_no_scp_uses_no_descriptions(batch, monkeypatch):
    def fail(*a, **k):
        raise AssertionError("no describer may be built without SCP")

    monkeypatch.setattr("mugcp_bench.describers.build_describer", fail)
    method = mugcp(ablation="scp")
    assert method.prepare_images(batch.items, "train") == {"leakage": None, "n_descriptions": 0, "describer": None}
    out = method(batch.images)  # no keys needed
    assert out.logits.shape == (3, len(CLASSNAMES)) and out.losses == {}
    with torch.no_grad():
        details = method.forward_details(batch.images)
    assert details.s is None and details.s_tildes == []
    for layer, vcp in enumerate(details.vcps):  # purely learnable queries + attention over the patches
        if layer == 0:
            assert torch.equal(vcp, method.amg.queries[0].expand_as(vcp))


# --- MPF at every prompted text layer --------------------------------------------------------------------------------
@pytest.mark.numerics
def test_instance_terms_reach_every_prompted_text_layer(batch):
    method = mugcp(batch, seed=4)
    with torch.no_grad():
        start = method.forward_details(batch.images, batch.keys)
        assert start.text_prompts.shape == (3, 3, 4, shared_tiny_backbone().text_width)  # (L_t, B, M_t, Dt)
        # gates start at 0: every layer's prompt is D_l for every image (IVLP / MaPLe-like start)
        assert all(torch.equal(start.text_prompts[layer, 0], start.text_prompts[layer, 1]) for layer in range(3))
        for layer in range(3):  # a gate at one layer alone: that layer's prompts become per image, the logits move
            for gate in (method.alpha, method.beta):
                gate.zero_()
                gate[layer] = 1.0
                out = method.forward_details(batch.images, batch.keys)
                prompts = out.text_prompts
                assert_differs(prompts[layer, 0], prompts[layer, 1])
                assert all(torch.equal(prompts[o, 0], prompts[o, 1]) for o in range(3) if o != layer)
                assert_differs(out.logits, start.logits)
                gate.zero_()


@pytest.mark.numerics
def test_text_layers_read_the_paired_vision_layer(batch):
    method = mugcp(batch, seed=4, mpf="vcp_only")
    with torch.no_grad():
        method.beta.fill_(1.0)
        out = method.forward_details(batch.images, batch.keys)
        base = torch.cat([method.ctx.unsqueeze(0), method.text_deep])  # (L_t, M_t, Dt)
        for layer in range(3):  # text layer l gets W_v->t pool(VCP_l)
            expected = base[layer] + method.w_vt(out.vcps[layer].mean(dim=1)).unsqueeze(1)  # (B, M_t, Dt)
            assert_close_scaled(out.text_prompts[layer], expected)


def test_mpf_modes(batch):
    dt = shared_tiny_backbone().text_width
    ctx_only = mugcp(batch, ablation="mpf")
    assert ctx_only.instance_conditional is False and mugcp(batch).instance_conditional is True
    with torch.no_grad():
        out = ctx_only.forward_details(batch.images, batch.keys)
    assert out.text_prompts.shape == (3, 1, 4, dt) and out.text_features.shape == (
        len(CLASSNAMES),
        shared_tiny_backbone().embed_dim,
    )

    concat = mugcp(batch, mpf="concat")
    assert concat.n_slots == 12 and not hasattr(concat, "alpha")
    with torch.no_grad():
        prompts = concat.forward_details(batch.images, batch.keys).text_prompts
    assert prompts.shape == (3, 3, 12, dt)
    assert torch.equal(prompts[1, :, :4], concat.text_deep[0].expand(3, -1, -1))  # [D_l ; P_scp,l ; P_vcp,l]
    scp_only, vcp_only = mugcp(batch, mpf="scp_only"), mugcp(batch, mpf="vcp_only")
    assert hasattr(scp_only, "alpha") and not hasattr(scp_only, "beta")
    assert hasattr(vcp_only, "beta") and not hasattr(vcp_only, "alpha") and not hasattr(vcp_only, "meta_net")
    neither = mugcp(batch, scp=False, vcp=False)  # no instance term left: class text computed once
    assert neither.instance_conditional is False


# --- SCP features, losses, batch independence ------------------------------------------------------------------------
@pytest.mark.numerics
def test_scp_features_come_from_the_frozen_text_encoder(batch):
    method = mugcp(batch)
    backbone = shared_tiny_backbone()
    text = method.description(batch.keys[0])
    s, states = method._features[text]
    expected = backbone.text_features([text])[0]
    assert_close_scaled(s, expected)
    tokens = backbone.tokenize([text])
    assert states.shape == (int(backbone.eot_index(tokens)[0]) + 1, backbone.text_width)
    eot_state = states[-1].float() @ backbone.text.text_projection.float()  # final LN'd EOT state, projected
    assert_close_scaled(F.normalize(eot_state, dim=-1), s, FP16)  # the states are stored in fp16
    with pytest.raises(RuntimeError, match="no description for 1 of 3 images"):
        method(batch.images, keys=[*batch.keys[:2], "other/image.png"])


@pytest.mark.numerics
def test_backbone_encode_text_states_matches_the_text_features():
    backbone = shared_tiny_backbone()
    texts = ["a red circle on grass.", "a photo of a very small blue square in the sky."]
    tokens = backbone.tokenize(texts)
    feats, states, eot = backbone.encode_text_states(tokens)
    assert_close_scaled(F.normalize(feats, dim=-1), backbone.text_features(texts))
    assert states.shape == (2, int(eot.max()) + 1, backbone.text_width) and torch.equal(eot, backbone.eot_index(tokens))
    assert not states.requires_grad


@pytest.mark.numerics
def test_logits_do_not_depend_on_the_batch(batch):
    method = mugcp(batch, seed=5)
    with torch.no_grad():
        method.alpha.fill_(0.5)
        method.beta.fill_(0.5)
        together = method.predict(batch.images, batch.keys)
        alone = torch.cat([method.predict(batch.images[i : i + 1], batch.keys[i : i + 1]) for i in range(3)])
    assert_close_scaled(together, alone)


def test_align_loss_and_regularisers(batch):
    method = mugcp(batch, seed=6)
    out = method.forward_details(batch.images, batch.keys)
    loss = method.align_loss(out)
    assert torch.isfinite(loss) and loss > 0
    single = method.forward_details(batch.images[:1], batch.keys[:1])
    assert method.align_loss(single) > 0  # one image still has the other training descriptions to contrast
    for reg, keys in (("promptsrc", {"scl_text", "scl_image", "scl_logits"}), ("kgcoop", {"kgcoop"})):
        m = mugcp(batch, reg=reg)
        losses = m(batch.images, keys=batch.keys).losses
        assert set(losses) == keys | {"align"} and all(torch.isfinite(v) for v in losses.values())
        sum(losses.values()).backward()
        assert m.ctx.grad is not None


# --- descriptions, leakage, mask --------------------------------------------------------------------------------------
def test_prepare_images_reports_leakage_and_masks_class_names(batch, tmp_path):
    texts = ["a photo of a red circle.", "a green object in the sky.", "blue squares on a table."]
    # labels round-robin over CLASSNAMES: red circle, blue square, green_triangle -> items 0 names its class, item 1
    # names no class, item 2 names another class: 1/3; add a 4th image naming its class below for 1/2.
    captions = write_captions(tmp_path, batch.items, texts)
    method = mugcp(describer="file", describer_file=captions)
    info = method.prepare_images(batch.items, "train")
    assert info["leakage"] == pytest.approx(1 / 3) and info["n_descriptions"] == 3
    assert info["describer"].startswith("file-captions-") and info["prompt_id"] == "file"
    four = make_batch(tmp_path / "more", n=4)
    texts4 = ["a red circle.", "a photo of a blue square.", "a plain triangle.", "a sunny day."]
    captions4 = write_captions(tmp_path / "more", four.items, texts4)
    half = mugcp(describer="file", describer_file=captions4)
    assert half.prepare_images(four.items, "test")["leakage"] == 0.5

    masked = mugcp(describer="file", describer_file=captions4, mask_classnames=True)
    info = masked.prepare_images(four.items, "test")
    assert info["leakage"] == 0.0 and info["leakage_unmasked"] == 0.5
    assert masked.description(four.keys[1]) == "a photo of a object."
    assert masked.description(four.keys[3]) == "a sunny day."
    masked.set_classnames(["sunny day", *CLASSNAMES])  # a new class name: stored descriptions are masked again
    assert masked.description(four.keys[3]) == "a object."
    with torch.no_grad():
        assert masked(four.images, keys=four.keys).logits.shape == (4, len(CLASSNAMES) + 1)


def test_mllm_descriptions_flow_through_the_cache_into_scp_and_logits(batch, tmp_path, monkeypatch):
    folder = build_tiny_llava(tmp_path / "tiny-llava")
    method = mugcp(describer="mllm", describer_model=str(folder), prompt_id="describe_noname_v1")
    info = method.prepare_images(batch.items, "train")
    assert info["describer"].startswith("mllm-tiny-llava@") and info["prompt_id"] == "describe_noname_v1"
    assert info["n_generated"] == 3 and info["n_cached"] == 0
    path = DescriptionCache().path(info["describer"], "describe_noname_v1")
    cached = {json.loads(line)["image"]: json.loads(line)["text"] for line in path.read_text().splitlines()}
    assert {k: method.description(k) for k in batch.keys} == {k: cached[k] for k in batch.keys}
    out = method(batch.images, keys=batch.keys)
    assert out.logits.shape == (3, len(CLASSNAMES)) and torch.isfinite(out.logits).all()

    def no_model(self):
        raise AssertionError("a cache hit must not load the model")

    monkeypatch.setattr(MLLMDescriber, "_load", no_model)
    again = mugcp(
        seed=1, describer="mllm", describer_model=str(folder), prompt_id="describe_noname_v1", describe_missing=False
    )
    info = again.prepare_images(batch.items, "test")
    assert (info["n_cached"], info["n_generated"]) == (3, 0)
    assert_close_scaled(
        again._scp_batch(batch.keys, torch.device("cpu"))[0], method._scp_batch(batch.keys, torch.device("cpu"))[0]
    )


def test_no_describe_fails_before_describing(tmp_path):
    fresh = make_batch(tmp_path, n=3, seed=123)  # images no other test has described
    method = mugcp(describe_missing=False)
    with pytest.raises(
        UserError, match=r"3 of 3 images have no cached description .*mugcp-bench describe --datasets x"
    ):
        method.prepare_images(fresh.items, "train")


@pytest.mark.slow
def test_run_at_batch_1_records_a_nonzero_alignment_loss_every_epoch(tmp_path, capsys):
    """The cross-dataset source recipe's regime (batch 1 x accumulation 4) end to end: the run record's per-epoch
    loss parts hold L_align > 0 (the first reconstruction recorded exactly 0 there)."""
    from mugcp_bench.commands.cli import main
    from mugcp_bench.store.records import iter_run_files
    from tests.miniature import build_miniature

    root = build_miniature(tmp_path / "data", ["eurosat"])
    args = ["run", "--methods", "mugcp", "--datasets", "eurosat", "--seeds", "1", "--data-root", str(root)]
    args += ["--backbone", "tiny", "--pretrained", "random", "--recipe", "toy", "--results-dir", str(tmp_path / "r")]
    args += ["--set", "epochs=2", "--set", "batch_size=1", "--set", "accum_steps=4"]
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 0, capsys.readouterr().err
    (path,) = iter_run_files(tmp_path / "r")
    record = json.loads(path.read_text())
    assert (record["config"]["train"]["batch_size"], record["config"]["train"]["accum_steps"]) == (1, 4)
    assert len(record["history"]) == 2 and all(epoch["loss_align"] > 0.01 for epoch in record["history"])


@pytest.mark.numerics
@pytest.mark.parametrize("chunk", [1, 7, 0])
def test_evaluation_reduces_each_text_chunk_to_logits_without_the_full_text_features(chunk, batch, monkeypatch):
    """predict gives the training path's logits without building the (B, C, E) text features (BENCHMARKS.md gap 6)."""
    method = mugcp(batch, text_chunk=chunk).eval()
    with torch.no_grad():  # instance terms on: every image its own prompts
        method.alpha.fill_(0.5)
        method.beta.fill_(0.5)
    with torch.enable_grad():  # the training path: (B, C, E) text features, then cosine logits
        want = method(batch.images, batch.keys).logits.detach()
    built = []
    real = method._text_features
    monkeypatch.setattr(method, "_text_features", lambda prompts: built.append(prompts) or real(prompts))
    method.begin_eval()
    got = method.predict(batch.images, batch.keys)
    method.end_eval()
    assert method.instance_conditional and not built and got.shape == want.shape
    assert_close_scaled(got, want)
