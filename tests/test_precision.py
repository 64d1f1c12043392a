"""`--precision reference-fp16`: the reference code's fp16 regime, checked on the CPU wherever it can be.

The regime (docs/protocol.md §4.5; KaiyangZhou/CoOp clip/model.py convert_weights and LayerNorm, trainers/coop.py):
CLIP's Conv / Linear / attention weights and the two projections in fp16, LayerNorm in fp32 computing in fp32,
learnable prompts in fp16 updated by plain SGD (no master weights, no loss scaling), the parameters the reference
keeps in fp32 in fp32. CUDA only for runs; every piece below runs on the CPU (torch has fp16 CPU kernels).
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image
from torch import nn

from mugcp_bench.commands.cli import main
from mugcp_bench.commands.report import report
from mugcp_bench.engine import trainer
from mugcp_bench.errors import UserError
from mugcp_bench.methods.base import Fp32LayerNorm, Method, TrainConfig
from mugcp_bench.model.backbone import REFERENCE_FP16, load_backbone
from mugcp_bench.registry import METHODS
from mugcp_bench.report import comparison
from mugcp_bench.store.records import RunKey
from tests.method_harness import CLASSNAMES, build_method, make_batch, prepare, total_loss, write_items

CPU = torch.device("cpu")
CUDA = torch.device("cuda")
FIXTURE_RESULTS = Path(__file__).parent / "fixtures" / "results"


@pytest.fixture(scope="module")
def fp16_backbone():
    return load_backbone("tiny", precision=REFERENCE_FP16)


def reference_method(name: str, backbone, **overrides) -> Method:
    method = build_method(name, backbone=backbone, **overrides)
    return trainer.prepare_method(method, CPU, REFERENCE_FP16)


# --- resolution and the command line ----------------------------------------------------------------------------
def test_reference_fp16_is_cuda_only_and_unknown_precisions_are_named():
    with pytest.raises(UserError, match="reference-fp16 runs on CUDA only.*--device cuda"):
        trainer.resolve_precision(REFERENCE_FP16, CPU)
    with pytest.raises(UserError, match="unknown precision 'referense-fp16'. Did you mean 'reference-fp16'"):
        trainer.resolve_precision("referense-fp16", CPU)
    assert trainer.resolve_precision("auto", CPU) == "fp32"


@pytest.mark.parametrize("where", [[], ["--backbone", "ViT-B-16", "--pretrained", "openai", "--data-root", "."]])
def test_cli_reference_fp16_on_cpu_exits_2_in_one_line_before_any_work(where, tmp_path, capsys, monkeypatch):
    """Toy world (nothing rendered) or real weights (nothing loaded: offline they would fail with another line)."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("MUGCP_CACHE", str(cache))
    args = ["run", "--methods", "coop", "--device", "cpu", "--precision", REFERENCE_FP16, *where]
    with pytest.raises(SystemExit) as exc:
        main([*args, "--results-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2
    assert len(err) == 1 and "reference-fp16 runs on CUDA only" in err[0], err
    assert not cache.exists() or not any(cache.iterdir())  # no toy world, no features, nothing
    assert not list((tmp_path / "r").glob("runs/**/run.json"))


# --- the backbone's weights -------------------------------------------------------------------------------------
def _reference_fp16_names(model: nn.Module) -> set[str]:
    """Parameter names CLIP's convert_weights turns to fp16: Conv / Linear weights and biases, the attention's
    in-projections (its out-projection is a Linear), and the `proj` / `text_projection` matrices."""
    out = set()
    for mname, module in model.named_modules():
        prefix = f"{mname}." if mname else ""
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            out |= {prefix + n for n, _ in module.named_parameters(recurse=False)}
        if isinstance(module, nn.MultiheadAttention):
            out |= {prefix + n for n, _ in module.named_parameters(recurse=False) if n.startswith("in_proj")}
        for attr in ("proj", "text_projection"):
            if isinstance(getattr(module, attr, None), nn.Parameter):
                out.add(prefix + attr)
    return out


def test_backbone_converts_exactly_what_clips_builder_converts(fp16_backbone, tiny_backbone):
    half = _reference_fp16_names(tiny_backbone.model)
    assert {"visual.proj", "text_projection", "visual.conv1.weight"} <= half
    fp32 = dict(tiny_backbone.model.named_parameters())
    for name, p in fp16_backbone.model.named_parameters():
        if name in half:
            assert p.dtype == torch.float16, name
            assert torch.equal(p, fp32[name].half()), name  # the same weights, rounded
        else:  # LayerNorm, embeddings, class / positional embedding, logit_scale
            assert p.dtype == torch.float32, name
            assert torch.equal(p, fp32[name]), name
    assert fp16_backbone.dtype == torch.float16 and fp16_backbone.activation == tiny_backbone.activation


def test_layer_norms_compute_in_fp32_and_the_stream_stays_fp16(fp16_backbone, monkeypatch, tmp_path):
    seen = []
    layer_norm = F.layer_norm

    def recording(x, shape, weight=None, bias=None, eps=1e-5):
        seen.append((x.dtype, None if weight is None else weight.dtype))
        return layer_norm(x, shape, weight, bias, eps)

    monkeypatch.setattr(F, "layer_norm", recording)
    bb = fp16_backbone
    tokens = bb.tokenize(["a photo of a red circle."])
    with torch.no_grad():
        image_f = bb.encode_image(torch.randn(2, 3, 32, 32))
        text_f = bb.encode_text(bb.embed_tokens(tokens), tokens)
    n_backbone = len(seen)
    assert n_backbone == 2 * bb.vision_layers + 2 * bb.text_layers + 3  # ln_pre, ln_post, ln_final
    assert image_f.dtype == text_f.dtype == torch.float16
    dcp = reference_method("dcp", bb)  # CMPA's LayerNorms, replaced by fp32-computing ones
    assert all(type(m) is Fp32LayerNorm for m in dcp.modules() if isinstance(m, nn.LayerNorm))
    with torch.no_grad():
        dcp(make_batch(tmp_path, bb, n=2).images)
    assert len(seen) > n_backbone
    assert set(seen) == {(torch.float32, torch.float32)}


# --- the methods' parameters ----------------------------------------------------------------------------------
# What the reference code holds in fp32 under PREC "fp16" (a name's prefix covers what is under it): MaPLe's deep
# prompts and their projections (trainers/maple.py creates them without a dtype), every LayerNorm (convert_weights
# never converts one), MuGCP by our choice (no reference). Everything else trainable is fp16.
EXPECTED_FP32 = {
    "coop": set(),
    "cocoop": set(),
    "maple": {"compound_prompts_text", "compound_prompt_projections"},
    "dcp": {"cmpa.ln_v1", "cmpa.ln_v2", "cmpa.ln_t1", "cmpa.ln_t2"},
    "mugcp": {""},
}
EXPECTED_FP16 = {  # named spot checks from the reference files
    "coop": {"ctx"},
    "cocoop": {"ctx", "meta_net.linear1.weight", "meta_net.linear2.bias"},
    "maple": {"ctx", "proj.weight", "proj.bias"},
    "dcp": {"ctx_text", "ctx_visual", "cmpa.proj_t2v.weight", "cmpa.attn_v.in_proj_weight", "cmpa.mlp_v.c_fc.weight"},
}


def _covered(name: str, prefixes: set[str]) -> bool:
    return any(p == "" or name == p or name.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize("name", sorted(EXPECTED_FP32))
def test_parameter_dtypes_follow_the_reference(name, fp16_backbone):
    method = reference_method(name, fp16_backbone)
    dtypes = {n: p.dtype for n, p in method.named_parameters()}
    for n, dtype in dtypes.items():
        assert dtype == (torch.float32 if _covered(n, EXPECTED_FP32[name]) else torch.float16), n
    assert EXPECTED_FP16.get(name, set()) <= {n for n, d in dtypes.items() if d == torch.float16}


def test_maple_without_coupling_keeps_its_free_vision_prompts_fp32(fp16_backbone):
    method = reference_method("maple", fp16_backbone, coupling=False)  # IVLP: VPT prompts live in CLIP, fp32
    dtypes = {n: p.dtype for n, p in method.named_parameters()}
    assert dtypes["ctx"] == torch.float16
    assert dtypes["vision_ctx"] == torch.float32
    assert {dtypes[n] for n in dtypes if n.startswith(("compound_prompts_vision.", "compound_prompts_text."))} == {
        torch.float32
    }


@pytest.mark.parametrize("name", METHODS.names())
def test_every_method_trains_a_step_in_reference_fp16(name, fp16_backbone, tmp_path):
    """Forward, backward and an SGD step with fp16 CLIP weights: no dtype mismatch anywhere in the method."""
    batch = make_batch(tmp_path, fp16_backbone, n=3)
    method = prepare(reference_method(name, fp16_backbone), batch, "train").train()
    logits, loss = total_loss(method, batch)
    assert logits.shape == (3, len(CLASSNAMES)) and torch.isfinite(loss)
    if method.n_trainable():
        loss.backward()
        for n, p in method.named_parameters():
            if p.requires_grad:
                assert p.grad is not None and p.grad.dtype == p.dtype, n
        torch.optim.SGD(method.trainable_parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4).step()
    method.eval()
    method.begin_eval()
    fast = method.predict(batch.images, batch.keys)
    method.end_eval()
    assert fast.shape == logits.shape and torch.isfinite(fast.float()).all()


def test_prepare_method_refuses_a_backbone_of_the_other_precision(fp16_backbone, tiny_backbone):
    with pytest.raises(UserError, match="load_backbone\\(..., precision='reference-fp16'\\)"):
        trainer.prepare_method(build_method("coop", backbone=tiny_backbone), CPU, REFERENCE_FP16)
    with pytest.raises(UserError, match="precision='fp32'"):
        trainer.prepare_method(build_method("coop", backbone=fp16_backbone), CPU, "fp32")


# --- the optimiser: plain SGD on fp16 parameters --------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:torch.cuda.amp.GradScaler is enabled, but CUDA is not available")
def test_no_autocast_and_no_scaler_in_reference_fp16():
    assert isinstance(trainer.autocast(CUDA, REFERENCE_FP16), contextlib.nullcontext)
    assert trainer.make_scaler(REFERENCE_FP16, CUDA) is None
    assert trainer.make_scaler("fp16", CUDA) is not None  # the autocast fp16 mode does scale its loss
    assert trainer.make_scaler("bf16", CUDA) is None


def test_fit_updates_fp16_parameters_by_plain_sgd(fp16_backbone, tmp_path):
    """One step of `trainer.fit` equals p − lr·(g + wd·p) computed in fp16 from the unscaled fp16 gradient; the
    optimiser holds the fp16 parameters themselves (no fp32 master copy) and an fp16 momentum buffer."""
    items = write_items(tmp_path, CLASSNAMES, 1)
    cfg = TrainConfig(epochs=1, lr=0.5, batch_size=1, warmup_epochs=0)
    transform = fp16_backbone.test_transform  # deterministic: the hand computation sees the same batch
    twin = reference_method("coop", fp16_backbone).train()
    image = transform(Image.open(items[0].impath).convert("RGB"))[None]
    logits = twin(image).logits
    assert logits.dtype == torch.float16
    F.cross_entropy(logits, torch.tensor([items[0].label])).backward()  # fp16 logits as the reference
    p0, g = twin.ctx.detach().clone(), twin.ctx.grad.clone()
    assert g.dtype == torch.float16 and g.abs().max() > 0
    expected = p0.add(g.add(p0, alpha=cfg.weight_decay), alpha=-cfg.lr)

    method = reference_method("coop", fp16_backbone)
    assert torch.equal(method.ctx, p0)
    ckpt = tmp_path / "ckpt.pt"
    trainer.fit(method, items, cfg, transform, CPU, REFERENCE_FP16, seed=0, checkpoint=ckpt)
    assert method.ctx.dtype == torch.float16
    assert torch.equal(method.ctx.detach(), expected)
    assert not torch.equal(expected, p0)
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert state["model"]["ctx"].dtype == torch.float16
    (buf,) = [s["momentum_buffer"] for s in state["optimizer"]["state"].values()]
    assert buf.dtype == torch.float16 and torch.equal(buf, g.add(p0, alpha=cfg.weight_decay))


def test_make_optimizer_holds_the_parameters_themselves(fp16_backbone):
    method = reference_method("maple", fp16_backbone)
    opt, _ = trainer.make_optimizer(method, TrainConfig())
    (group,) = opt.param_groups
    assert [id(p) for p in group["params"]] == [id(p) for p in method.trainable_parameters()]
    assert {p.dtype for p in group["params"]} == {torch.float16, torch.float32}


# --- evaluation: the class-text pass under the same autocast ------------------------------------------------------
def test_begin_eval_runs_under_the_evaluation_autocast(monkeypatch, tmp_path, tiny_backbone):
    state = {"inside": 0, "seen": []}

    @contextlib.contextmanager
    def recording(device, precision):
        state["inside"] += 1
        yield
        state["inside"] -= 1

    monkeypatch.setattr(trainer, "autocast", recording)
    method = build_method("coop", backbone=tiny_backbone)
    original = method.begin_eval
    monkeypatch.setattr(method, "begin_eval", lambda: (state["seen"].append(state["inside"]), original())[1])
    items = write_items(tmp_path, CLASSNAMES, 2)
    trainer.evaluate(method, items, tiny_backbone.test_transform, CPU, "bf16", batch_size=2)
    assert state["seen"] == [1]


# --- the run key and the report ------------------------------------------------------------------------------
def test_run_key_records_the_activation_and_gelu_runs_keep_their_ids():
    fields = dict(
        train_protocol="base2novel",
        method="coop",
        variant="",
        recipe="paper",
        backbone="ViT-B-16",
        pretrained="openai",
        weights="0123456789ab",
        train_dataset="caltech101",
        classes="base",
        shots=16,
        seed=1,
        precision="bf16",
        config_hash="abcdef012345",
    )
    assert RunKey(**fields).id == "6a6abe54"  # the id this key had before the activation joined the key
    assert RunKey(**fields, activation="gelu").id == "6a6abe54"
    assert RunKey(**fields, activation="quickgelu").id != "6a6abe54"  # ViT-B-16 + openai built right: a new run


def test_report_vs_paper_stops_flagging_reference_fp16_runs(tmp_path):
    assert comparison.REFERENCE_PRECISION == REFERENCE_FP16
    results = tmp_path / "results"
    shutil.copytree(FIXTURE_RESULTS, results)
    args = ["--results-dir", str(results), "--format", "md", "--protocol", "base2novel", "--vs", "paper"]
    before = CliRunner().invoke(report, args, catch_exceptions=False).stdout
    assert "coop ran bf16-autocast" in before
    for path in results.glob("runs/**/run.json"):
        record = json.loads(path.read_text())
        record["key"]["precision"] = REFERENCE_FP16
        path.write_text(json.dumps(record))
    after = CliRunner().invoke(report, args, catch_exceptions=False)
    assert after.exit_code == 0, after.output
    assert "Precision differs" not in after.stdout and "(±x.xx M)" in after.stdout  # Δ shown, not flagged


def test_planned_runs_record_the_backbone_activation(tmp_path):
    from mugcp_bench.protocols import REAL_SUITE, get_protocol
    from mugcp_bench.runs.options import RunSettings
    from mugcp_bench.runs.plan import plan

    opts = RunSettings(results_dir=tmp_path, data_root=tmp_path, cache_dir=tmp_path, recipe="toy")
    keys = {}
    for name in ("tiny", "tiny-quickgelu"):
        bb = load_backbone(name)
        (run,) = plan(opts, bb, ["coop"], [get_protocol("base2novel")], REAL_SUITE, ("dtd",), None, [1])
        run.record.start({}, 0, 1, {})
        keys[name] = json.loads(run.record.path.read_text())["key"]
    assert keys["tiny"]["activation"] == "gelu" and keys["tiny-quickgelu"]["activation"] == "quickgelu"
