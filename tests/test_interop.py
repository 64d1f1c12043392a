"""Reference checkpoints in and out (`mugcp_bench.interop`): the restricted loader, per-method import of files in
each reference trainer's exact structure (tests/reference_fixtures.py), export back to that structure, round trips,
the output trees, and one line for every file that does not fit."""

from __future__ import annotations

import collections
import csv
import hashlib
import io
import json
import pickle
from pathlib import Path

import pytest
import torch

from mugcp_bench import load_classifier
from mugcp_bench.engine.trainer import evaluate
from mugcp_bench.errors import UserError
from mugcp_bench.interop.formats import formats_of
from mugcp_bench.interop.importing import (
    ImportOptions,
    find_checkpoints,
    parse_dassl_log,
    parse_tree,
    plan_one,
)
from mugcp_bench.interop.reference import read_reference_file, to_reference, write_reference_file
from mugcp_bench.interop.safe_load import Opaque, load_checkpoint_file
from mugcp_bench.model.backbone import load_backbone
from mugcp_bench.registry import METHODS
from tests.cli_harness import cli, records
from tests.method_harness import load_images, shared_tiny_backbone, write_items
from tests.miniature import build_miniature
from tests.numerics import FP16, assert_close_scaled
from tests.reference_fixtures import (
    PA_NAMES,
    TRAINERS,
    cmpa_entries,
    cocoop_entries,
    coop_entries,
    maple_entries,
    write_reference_checkpoint,
    write_trainer_checkpoint,
)

TINY = ImportOptions(backbone="tiny", pretrained="random")
CLASSES = ["banded", "blotchy", "braided"]  # as many as the fixtures' class buffers have rows (3)
# (trainer, learner-folder tree, --method, fixture options); the trees are the reference scripts'
B2N = "output/base2new/train_base/dtd"
# case -> (trainer, the reference scripts' run folder, --method, fixture options; the expected method)
CASES = {
    "CoOp": ("CoOp", f"{B2N}/shots_16/CoOp/vit_b16_ctxv1/seed1", None, {}, "coop"),
    "CoOp-csc": ("CoOp", "output/dtd/CoOp/vit_b16_16shots/nctx4_cscTrue_ctpend/seed2", None,
                 {"ctx_init": False, "csc": True}, "coop"),
    "CoCoOp": ("CoCoOp", f"{B2N}/shots_16/CoCoOp/vit_b16_c4_ep10_batch1_ctxv1/seed1", None, {}, "cocoop"),
    "KgCoOp": ("KgCoOp", f"{B2N}/shots_16_8.0/KgCoOp/vit_b16_ep100_ctxv1/seed1", None, {}, "kgcoop"),
    "TCP": ("TCP", f"{B2N}/shots_16_1.0/TCP/vit_b16_ep100_ctxv1/seed1", None, {}, "tcp"),
    "MaPLe": ("MaPLe", f"{B2N}/shots_16/MaPLe/vit_b16_c2_ep5_batch4_2ctx/seed1", None, {}, "maple"),
    "IVLP": ("IVLP", f"{B2N}/shots_16/IVLP/vit_b16_c2_ep5_batch4_2+2ctx/seed1", None, {}, "ivlp"),
    "IVLP-maple": ("IVLP", f"{B2N}/shots_16/IVLP/vit_b16_c2_ep5_batch4_2+2ctx/seed1", "maple", {}, "maple"),
    "IVLP-language": ("IVLP", f"{B2N}/shots_16/IVLP/vit_b16_c2_ep5_batch4_4ctx_language_only/seed1", None,
                      {"vision": False, "n_ctx": 4}, "language_deep"),
    "VPT": ("VPT", f"{B2N}/shots_16/VPT/vit_b16_c2_ep5_batch4_4/seed1", None, {}, "vpt_deep"),
    "PromptSRC": ("PromptSRC", f"{B2N}/shots_16/PromptSRC/vit_b16_c2_ep20_batch4_4+4ctx/seed1", None, {}, "promptsrc"),
    "CMPA": ("CMPA", "output/dtd/16shots/seed3", None, {}, "dcp"),
    "CMPA-ps-false": ("CMPA", "output/dtd/16shots/seed3", None, {"ps": False}, "dcp"),
    "ProGrad": ("ProGrad", f"{B2N}/shots_16/ProGrad/vit_b16_ep50/seed1", None, {}, "prograd"),
    "MMA": ("MultiModalAdapter", f"{B2N}/shots_16/MultiModalAdapter/seed2", None, {}, "mma"),
    "MMRL": ("MMRL", f"{B2N}/shots_16/MMRL/vit_b16/seed1", None, {}, "mmrl"),
}  # fmt: skip
# reference tensors that play no part at evaluation and that an export does not write
UNUSED = {
    "KgCoOp": lambda k: k in ("bias_vectors", "meta_net.linear1.weight", "meta_net.linear1.bias"),  # never used
    "TCP": lambda k: k.startswith("token_"),  # TCP's prompts are its own (no ClassPrompts): no class buffers written
    "PromptSRC": lambda k: k.startswith("prompt_learner.ZS_image_encoder."),  # the training-only teacher
    "CMPA-ps-false": lambda k: k.startswith("encoder.resblocks.0.prompt_attn."),  # block 0 never injects
    # MMA's and MMRL's class buffers are full token embeddings (and MMA's token ids), not CoOp's prefix/suffix views:
    # an export does not write them (their load_model deletes them)
    "MMA": lambda k: k in ("token_embedding", "tokenized_prompts"),
    "MMRL": lambda k: k == "prompt_embeddings",
}

# the PREC of a case's fixture where it is not fp16: MMRL's stock configs (PREC amp) write fp32 files
PREC = {"MMRL": "fp32"}


def reference_name(case: str, ours: str) -> str | list[str]:
    """The reference's name(s) of our tensor, written out here from the reference code (not from our maps)."""
    if case.startswith(("CoOp", "CoCoOp", "KgCoOp", "TCP", "ProGrad")):
        return ours
    if case == "MMA":  # mmadapter.py _build_adapter: a ModuleList slot per 1-based layer (clip/model.py: index + 1)
        tower, block, rest = ours.split(".", 2)
        return f"{tower}.{int(block) + 1}.{rest}"
    if case == "MMRL":  # mmrl.py CustomCLIP: representation_learner.*, and proj_rep inside clip.visual
        return "image_encoder.proj_rep" if ours == "proj_rep" else "representation_learner." + ours
    if case == "MaPLe":
        return "prompt_learner." + ours
    if case.startswith(("IVLP", "VPT", "PromptSRC")):  # independentVL.py / vpt.py / promptsrc.py: VPT_shallow per block
        fixed = {"ctx": "prompt_learner.ctx", "vision_ctx": "image_encoder.VPT"}
        if ours in fixed:
            return fixed[ours]
        tower, j = ours.rsplit(".", 1)
        enc = "text_encoder" if tower in ("compound_prompts_text", "deep_text") else "image_encoder"
        return f"{enc}.transformer.resblocks.{int(j) + 1}.VPT_shallow"
    fixed = {"ctx_text": "prompt_learner.prompts_text", "ctx_visual": "prompt_learner.prompts_visual"}
    if ours in fixed:
        return fixed[ours]
    ours_to_ref = {  # our CrossModalPromptAttention attribute -> clip/model.py PromptAttention's
        "attn_v": "promt_attention_visual",
        "ln_v1": "ln_pa_1_visual",
        "mlp_v": "mlp_pa_visual",
        "ln_v2": "ln_pa_2_visual",
        "proj_t2v": "proj_t2v",
        "proj_v2t": "proj_v2t",
        "attn_t": "promt_attention_text",
        "ln_t1": "ln_pa_1_text",
        "mlp_t": "mlp_pa_text",
        "ln_t2": "ln_pa_2_text",
    }
    parts = ours.split(".")  # cmpa.<attr>.<rest> (shared) or cmpa.<block>.<attr>.<rest>
    if parts[1].isdigit():
        return f"encoder.resblocks.{parts[1]}.prompt_attn.{ours_to_ref[parts[2]]}.{'.'.join(parts[3:])}"
    return [f"encoder.resblocks.{i}.prompt_attn.{ours_to_ref[parts[1]]}.{'.'.join(parts[2:])}" for i in range(4)]


def write_case(root: Path, case: str, epochs: int = 3, **kw) -> Path:
    trainer, tree, _, options, _ = CASES[case]
    return write_trainer_checkpoint(root / tree, trainer, shared_tiny_backbone(), epochs=epochs, **options, **kw)


def deep_tiny() -> str:
    """The tiny CLIP with 12 text and vision blocks (registered with open_clip once): TCP's reference hard-codes its
    class tokens at text block 8."""
    import json
    import tempfile

    import open_clip

    name = "tiny-12-layers"
    if name not in open_clip.list_models():
        cfg = dict(open_clip.get_model_config("tiny"))
        cfg["vision_cfg"] = {**cfg["vision_cfg"], "layers": 12}
        cfg["text_cfg"] = {**cfg["text_cfg"], "layers": 12}
        path = Path(tempfile.mkdtemp()) / f"{name}.json"
        path.write_text(json.dumps(cfg))
        open_clip.add_model_config(path)
    return name


def options_for(case: str, **flags) -> ImportOptions:
    """The import options of a case: the tiny backbone (12 blocks for TCP, 4 for the others), its --method."""
    backbone = deep_tiny() if case == "TCP" else "tiny"
    sets = {"dcp.depth": "3"} if case.startswith("CMPA") else {}  # no log.txt: CMPA's depth (9) exceeds tiny's blocks
    if case == "MMRL":  # REP_LAYERS is in no file: the fixture's two maps sit before tiny's last two blocks
        sets = {"mmrl.rep_blocks": "2,3"}
    return ImportOptions(**{**TINY.__dict__, "method": CASES[case][2], "backbone": backbone, "sets": sets, **flags})


def plan_case(path: Path, case: str):
    return plan_one(path, options_for(case), {})


# --- the restricted loader ---------------------------------------------------------------------------------------
def test_reference_files_need_the_restricted_loader_which_keeps_their_scheduler_inert(tmp_path):
    path = write_case(tmp_path, "CoOp")
    with pytest.raises(pickle.UnpicklingError):  # torch's default (weights_only) refuses the pickled scheduler
        torch.load(path)
    ckpt = load_checkpoint_file(path)
    assert list(ckpt) == ["state_dict", "epoch", "optimizer", "scheduler", "val_result"]
    successor = ckpt["scheduler"]["successor"]
    assert isinstance(successor, Opaque) and successor.qualname == "torch.optim.lr_scheduler.CosineAnnealingLR"
    assert not isinstance(successor, torch.optim.lr_scheduler.LRScheduler)  # a stand-in: no code of it ran
    assert successor.state["T_max"] == 3.0 and isinstance(successor.state["optimizer"], Opaque)
    assert ckpt["epoch"] == 3 and ckpt["optimizer"]["param_groups"][0]["initial_lr"] == 0.002


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # would create the marker file if unpickled


def test_a_file_naming_any_other_global_is_refused_before_it_runs(tmp_path, capsys):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pth.tar-5"
    torch.save({"state_dict": {"ctx": torch.zeros(2, 3)}, "epoch": 5, "scheduler": _Payload(str(marker))}, path)
    with pytest.raises(UserError, match=r"pickles builtins\.open|pickles io\.open") as e:
        load_checkpoint_file(path)
    assert "\n" not in str(e.value) and not marker.exists()


def test_gpu_saved_old_dassl_and_best_files_load_on_the_cpu(tmp_path):
    backbone = shared_tiny_backbone()
    gpu = write_reference_checkpoint(tmp_path / "a", "prompt_learner", coop_entries(backbone), 2, 0.002,
                                     val_result="absent", location="cuda:0")  # fmt: skip
    ref = read_reference_file(gpu)
    assert ref.outer_keys == ["state_dict", "epoch", "optimizer", "scheduler"] and ref.val_result is None
    assert ref.state_dict["ctx"].device.type == "cpu"
    best = write_reference_checkpoint(
        tmp_path / "b", "prompt_learner", coop_entries(backbone), 2, 0.002, val_result=71.5
    )
    assert best.name == "model-best.pth.tar" and read_reference_file(best).val_result == 71.5


def test_torch_forced_weights_only_is_named(tmp_path, monkeypatch):
    path = write_case(tmp_path, "CoOp")
    monkeypatch.setenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(UserError, match="TORCH_FORCE_WEIGHTS_ONLY_LOAD"):
        load_checkpoint_file(path)


# --- per method: import, evaluate, export, round trip ---------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_reference_checkpoint_imports_evaluates_and_exports_to_the_same_structure(case, tmp_path):
    path = write_case(tmp_path, case)
    reference = read_reference_file(path).state_dict
    plan = plan_case(path, case)
    assert plan.method == CASES[case][4] and plan.format.trainer == CASES[case][0]
    assert plan.epoch == 3 and plan.seed == int(CASES[case][1][-1]) and plan.dataset == "dtd"
    assert plan.train_protocol == ("base2novel" if "base2new" in CASES[case][1] else "few_shot")
    # every tensor we train holds the file's values under the reference's name for it
    cls = METHODS.get(plan.method)
    method = cls(plan.backbone, CLASSES, plan.method_config, dataset="dtd")
    method.load_trainable_state(plan.state)
    trainable = {n for n, p in method.named_parameters() if p.requires_grad}
    assert trainable and trainable <= set(plan.state)
    for ours, value in method.state_dict().items():
        if ours not in trainable:
            continue
        names = reference_name(case, ours)
        for name in names if isinstance(names, list) else [names]:
            assert torch.equal(value, reference[name].float()), (ours, name)
    # evaluates like any method
    items = write_items(tmp_path / "images", CLASSES, 6)
    result = evaluate(method, items, plan.backbone.test_transform, torch.device("cpu"), "fp32", 4)
    assert result["n"] == 6 and 0 <= result["accuracy"] <= 100
    # export: the file's structure (keys, shapes, dtypes; views share one storage as the reference's buffers do)
    fmt = plan.format
    exported = to_reference(fmt, method, method.state_dict() | {}, CLASSES, PREC.get(case, "fp16"))
    unused = {k for k in reference if UNUSED.get(case, lambda k: False)(k)}
    assert set(reference) - set(exported) == unused and set(exported) <= set(reference)
    for key, tensor in exported.items():
        assert tensor.shape == reference[key].shape and tensor.dtype == reference[key].dtype, key
    buffers = [exported[b] for b in fmt.deleted_buffers[:2] if b in exported]
    if buffers:  # views of one (C, L, D) tensor, as the reference's
        assert len({b.untyped_storage().data_ptr() for b in buffers}) == 1
    # import(export(run)): the same logits, in either precision regime (the fixture's values are fp16 already)
    images = load_images(items, plan.backbone)
    with torch.no_grad():
        method.begin_eval()
        expected = method.predict(images, [d.relpath for d in items])
        method.end_eval()
    for regime in ("fp32", "fp16"):
        out = tmp_path / f"export-{regime}"
        state = {k: v for k, v in method.state_dict().items()}
        file = write_reference_file(out, fmt, to_reference(fmt, method, state, CLASSES, regime), 7)
        assert file == out / fmt.learner / "model.pth.tar-7"
        assert (out / fmt.learner / "checkpoint").read_text() == "model.pth.tar-7\n"
        assert list(torch.load(file)) == ["state_dict", "epoch", "optimizer", "scheduler", "val_result"]  # weights-only
        again = plan_one(file, options_for(case, method=plan.method, dataset="dtd", seed=1, shots=16), {})
        twin = cls(plan.backbone, CLASSES, again.method_config, dataset="dtd")
        twin.load_trainable_state(again.state)
        with torch.no_grad():
            twin.begin_eval()
            got = twin.predict(images, [d.relpath for d in items])
            twin.end_eval()
        if regime == "fp16" and PREC.get(case, "fp16") == "fp32":  # an fp32 run written in fp16: rounded values
            assert_close_scaled(got, expected, FP16, msg=regime)
        else:
            assert torch.equal(got, expected), regime


def test_shared_prompt_attention_is_written_once_under_every_block(tmp_path):
    plan = plan_case(write_case(tmp_path, "CMPA"), "CMPA")
    method = METHODS.get("dcp")(plan.backbone, CLASSES, plan.method_config, dataset="dtd")
    method.load_trainable_state(plan.state)
    sd = to_reference(plan.format, method, method.state_dict(), CLASSES)
    copies = [sd[f"encoder.resblocks.{i}.prompt_attn.proj_t2v.weight"] for i in range(4)]
    assert len({c.untyped_storage().data_ptr() for c in copies}) == 1
    assert sd["encoder.proj_visual"].dtype == torch.float32  # CMPA renames visual.proj: convert_weights misses it


def test_a_file_whose_shared_copies_differ_is_the_per_block_format(tmp_path):
    """PS false writes twelve independent modules: they must not be read as one shared module."""
    plan = plan_case(write_case(tmp_path, "CMPA-ps-false"), "CMPA-ps-false")
    assert plan.method_config.share is False and set(plan.state) >= {"cmpa.1.attn_v.in_proj_weight"}


# --- files that do not fit: one line naming the tensors ---------------------------------------------------------------
def _rewrite(path: Path, edit) -> Path:
    ckpt = load_checkpoint_file(path)
    sd = collections.OrderedDict(ckpt["state_dict"])
    edit(sd)
    torch.save({**ckpt, "state_dict": sd, "scheduler": None}, path)
    return path


@pytest.mark.parametrize(
    "edit,needle",
    [
        (lambda sd: sd.__setitem__("bias_vectors", torch.zeros(1, 64)), "1 unknown (bias_vectors)"),
        (lambda sd: sd.pop("ctx"), "1 missing (ctx"),
        (lambda sd: sd.__setitem__("ctx", torch.zeros(4, 32)), "ctx [4, 32] vs [4, 64]"),
    ],
    ids=["unknown", "missing", "reshaped"],
)
def test_unknown_missing_or_reshaped_tensors_are_one_line(tmp_path, edit, needle):
    path = _rewrite(write_case(tmp_path, "CoOp"), edit)
    with pytest.raises(UserError) as e:
        plan_case(path, "CoOp")
    assert needle in str(e.value) and "\n" not in str(e.value) and str(path) in str(e.value)


def test_a_whole_model_file_trained_on_another_backbone_is_refused(tmp_path):
    other = load_backbone("tiny", seed=1)  # same architecture, other weights
    path = write_reference_checkpoint(tmp_path / "output/base2new/train_base/dtd/shots_16/MaPLe/c/seed1",
                                      "MultiModalPromptLearner", maple_entries(other), 2, 0.0035)  # fmt: skip
    with pytest.raises(UserError, match="frozen CLIP tensors not those of this backbone") as e:
        plan_case(path, "MaPLe")
    assert "image_encoder." in str(e.value) or "text_encoder." in str(e.value)


# ProGrad's PromptLearner is CoOp's (trainers/prograd.py): the same keys, so only a tree, log.txt or --method tell them
# apart
SAME_KEYS = {"ProGrad": "coop"}


@pytest.mark.parametrize("case", [c for c, spec in CASES.items() if spec[2] is None and c not in SAME_KEYS])
def test_without_tree_or_log_the_keys_identify_the_method(case, tmp_path):
    trainer, _, _, options, method = CASES[case]
    path = write_trainer_checkpoint(tmp_path / "run", trainer, shared_tiny_backbone(), epochs=2, **options)
    plan = plan_one(path, options_for(case, dataset="dtd", seed=1, shots=16), {})
    assert plan.method == method and plan.origin["method"] == "the checkpoint's keys"


@pytest.mark.parametrize("case", list(SAME_KEYS))
def test_a_file_with_another_methods_keys_needs_its_tree_log_or_method(case, tmp_path):
    trainer, _, _, options, method = CASES[case]
    path = write_trainer_checkpoint(tmp_path / "run", trainer, shared_tiny_backbone(), epochs=2, **options)
    bare = plan_one(path, options_for(case, dataset="dtd", seed=1, shots=16), {})
    assert bare.method == SAME_KEYS[case] and bare.origin["method"] == "the checkpoint's keys"
    named = plan_one(path, options_for(case, method=method, dataset="dtd", seed=1, shots=16), {})
    assert named.method == method
    assert torch.equal(named.state["ctx"], read_reference_file(path).state_dict["ctx"])


def test_a_file_of_an_unmapped_trainer_says_which_methods_read_files(tmp_path):
    path = write_trainer_checkpoint(tmp_path / "output/base2new/train_base/dtd/shots_16/ZeroshotCLIP/c/seed1", "CoOp",
                                    shared_tiny_backbone(), epochs=2)  # fmt: skip
    with pytest.raises(UserError, match=r"no installed method reads ZeroshotCLIP checkpoints .*coop \(CoOp\)"):
        plan_case(path, "CoOp")


# --- trees, log.txt, flags -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "tree,expected",
    [
        ("output/base2new/train_base/oxford_pets/shots_16/CoOp/vit_b16_ctxv1/seed2",
         dict(trainer="CoOp", cfg_name="vit_b16_ctxv1", dataset="oxford_pets", shots=16, seed=2, base2novel=True)),
        ("output/imagenet/CoCoOp/vit_b16_c4_ep10_batch1_ctxv1_16shots/seed1",
         dict(trainer="CoCoOp", cfg_name="vit_b16_c4_ep10_batch1_ctxv1", dataset="imagenet", shots=16, seed=1)),
        ("output/eurosat/CoOp/vit_b16_ep50_4shots/nctx16_cscTrue_ctpmiddle/seed3",
         dict(trainer="CoOp", dataset="eurosat", shots=4, seed=3,
              options={"TRAINER.COOP.N_CTX": "16", "TRAINER.COOP.CSC": "True",
                       "TRAINER.COOP.CLASS_TOKEN_POSITION": "middle"})),
        ("output/base2new/train_base/stanford_cars/shots_16_8.0/KgCoOp/vit_b16_ep100_ctxv1/seed1",
         dict(trainer="KgCoOp", dataset="stanford_cars", shots=16, seed=1, base2novel=True)),
        ("output/fgvc_aircraft/8shots/seed2", dict(dataset="fgvc_aircraft", shots=8, seed=2, trainer=None)),
        ("weights/food101/base/seed3", dict(dataset="food101", seed=3, base2novel=True, shots=None)),
        ("output/imagenet/MaPLe/vit_b16_c2_ep5_batch4_2ctx_cross_datasets_16shots/seed1",
         dict(trainer="MaPLe", cfg_name="vit_b16_c2_ep5_batch4_2ctx_cross_datasets", dataset="imagenet", shots=16)),
    ],
)  # fmt: skip
def test_the_reference_scripts_trees_are_read(tree, expected):
    info = parse_tree(Path(tree) / "learner" / "model.pth.tar-5", ["CoOp", "CoCoOp", "MaPLe", "CMPA"])
    for field, value in expected.items():
        assert getattr(info, field) == value, field


LOG = """Setting fixed seed: 2
***************
** Arguments **
***************
backbone:
config_file: configs/trainers/CoOp/vit_b16_ep50.yaml
dataset_config_file: configs/datasets/eurosat.yaml
opts: ['TRAINER.COOP.N_CTX', '16', 'TRAINER.COOP.CSC', 'False', 'DATASET.NUM_SHOTS', '2']
seed: 2
trainer: CoOp
************
** Config **
************
DATASET:
  NAME: EuroSAT
  NUM_SHOTS: 2
  SUBSAMPLE_CLASSES: all
MODEL:
  BACKBONE:
    NAME: ViT-B/16
SEED: 2
TRAINER:
  COOP:
    CLASS_TOKEN_POSITION: front
    CSC: False
    CTX_INIT:<SP>
    N_CTX: 16
  NAME:<SP>
Collecting env info ...
Loading trainer: CoOp
""".replace("<SP>", " ")  # yacs prints an empty value as "KEY: " (a trailing space)


def test_log_txt_settings_win_over_defaults_and_flags_over_both(tmp_path):
    args, cfg = parse_dassl_log(LOG)
    assert args["trainer"] == "CoOp" and cfg["TRAINER.COOP.CTX_INIT"] == "" and cfg["TRAINER.NAME"] == ""
    assert cfg["MODEL.BACKBONE.NAME"] == "ViT-B/16" and cfg["TRAINER.COOP.CLASS_TOKEN_POSITION"] == "front"
    run = tmp_path / "somewhere" / "run"  # no tree: everything from log.txt
    path = write_reference_checkpoint(run, "prompt_learner", coop_entries(shared_tiny_backbone(), n_ctx=16,
                                      ctx_init=False), 2, 0.002)  # fmt: skip
    (run / "log.txt").write_text(LOG)
    plan = plan_one(path, TINY, {})  # --backbone tiny overrides the log's ViT-B/16
    assert (plan.method, plan.dataset, plan.shots, plan.seed, plan.train_protocol) == (
        "coop",
        "eurosat",
        2,
        2,
        "few_shot",
    )
    assert plan.method_config.class_token_position == "front" and plan.method_config.n_ctx == 16
    assert plan.origin["dataset"] == "log.txt" and plan.origin["seed"] == "log.txt"
    flagged = plan_one(path, ImportOptions(**{**TINY.__dict__, "seed": 5, "sets": {"class_token_position": "end"}}), {})
    assert flagged.seed == 5 and flagged.method_config.class_token_position == "end"
    with pytest.raises(UserError, match="contradicts the checkpoint"):
        plan_one(path, ImportOptions(**{**TINY.__dict__, "sets": {"n_ctx": "8"}}), {})


def test_a_tree_picks_each_runs_last_epoch_and_counts_the_rest(tmp_path):
    backbone = shared_tiny_backbone()
    run = tmp_path / "output/base2new/train_base/dtd/shots_16/CoOp/vit_b16_ctxv1/seed1"
    for e in (2, 4):
        write_reference_checkpoint(run, "prompt_learner", coop_entries(backbone), e, 0.002)
    (run / "log.txt").write_text("no config here\n")
    (run / "tensorboard").mkdir()
    (run / "tensorboard" / "events.out.tfevents.1").write_bytes(b"x")
    write_case(tmp_path, "CoCoOp")
    found = find_checkpoints([tmp_path / "output"])
    assert sorted(p.name for p in found.files) == ["model.pth.tar-3", "model.pth.tar-4"]
    assert found.other_epochs == 1 and found.not_checkpoints == 2  # log.txt and the event file
    assert [p.name for p in find_checkpoints([run], epoch=2).files] == ["model.pth.tar-2"]


def test_every_method_with_reference_code_declares_a_format():
    """The methods whose reference trainer this file knows declare where their tensors go (the rest: listed in
    docs/interop.md)."""
    declared = {n for n in METHODS.names() if "reference_checkpoint" in METHODS.get(n).__dict__}
    tested = {case[4] for case in CASES.values()}
    assert tested <= declared and declared <= tested, "every declared map has a fixture case here"
    for name in declared:
        for fmt in formats_of(METHODS.get(name)):
            assert fmt.trainer in TRAINERS, fmt.trainer
            assert fmt.learner == TRAINERS[fmt.trainer][0]


def test_pa_names_cover_every_prompt_attention_parameter():
    """The fixture's PromptAttention list has our module's 28 tensors (so the CMPA fixtures test every one)."""
    from mugcp_bench.methods.dcp import CrossModalPromptAttention

    ours = CrossModalPromptAttention(96, 1, 64, 1).state_dict()
    assert len(PA_NAMES) == len(ours) == 28


def test_cmpa_entries_share_one_module_like_ps_true():
    by_key = {k: t for k, t, _ in cmpa_entries(shared_tiny_backbone())}
    first, last = (by_key[f"encoder.resblocks.{i}.prompt_attn.proj_t2v.weight"] for i in (0, 3))
    assert first is last


# --- `mugcp-bench import` through the real entry point ---------------------------------------------------------------
@pytest.fixture(scope="module")
def dtd(tmp_path_factory) -> Path:
    return build_miniature(tmp_path_factory.mktemp("data"), ["dtd"])


IMPORT = ["--backbone", "tiny", "--pretrained", "random", "--device", "cpu"]


def _tree(root: Path) -> dict[str, Path]:
    """The reference scripts' output tree for four trainers (miniature DTD's base half has 2 classes), with log.txt,
    TensorBoard files and an earlier epoch beside the last."""
    backbone, out = shared_tiny_backbone(), {}
    layouts = {
        "CoOp": "output/base2new/train_base/dtd/shots_16/CoOp/vit_b16_ctxv1/seed1",
        "CoCoOp": "output/base2new/train_base/dtd/shots_16/CoCoOp/vit_b16_c4_ep10_batch1_ctxv1/seed2",
        "MaPLe": "output/base2new/train_base/dtd/shots_16/MaPLe/vit_b16_c2_ep5_batch4_2ctx/seed1",
        "CMPA": "output/dtd/4shots/seed3",
    }
    for trainer, tree in layouts.items():
        out[trainer] = write_trainer_checkpoint(root / tree, trainer, backbone, epochs=3, n_cls=2)
        (root / tree / "tensorboard").mkdir()
        (root / tree / "tensorboard" / "events.out.tfevents.0").write_bytes(b"\0")
        (root / tree / "log.txt").write_text("no config dump in this one\n")
    write_trainer_checkpoint(root / layouts["CoOp"], "CoOp", backbone, epochs=2, n_cls=2)  # an earlier epoch
    (root / layouts["CoOp"] / "prompt_learner" / "checkpoint").write_text("model.pth.tar-3\n")
    return out


def test_import_records_a_whole_tree_marked_imported_and_evaluates_it(dtd, tmp_path, capsys):
    files = _tree(tmp_path)
    results = tmp_path / "results"
    argv = [
        "import",
        str(tmp_path / "output"),
        *IMPORT,
        "--set",
        "dcp.depth=3",
        "--data-root",
        str(dtd),
        "--results-dir",
        str(results),
    ]
    code, out, err = cli([*argv, "--json"], capsys)
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["skipped_not_checkpoints"] == 8 and summary["skipped_other_epochs"] == 1
    assert "skipped 8 files that are not checkpoints" in err
    recs = {r["key"]["method"]: r for r in records(results)}
    assert set(recs) == {"coop", "cocoop", "maple", "dcp"}
    for trainer, method in (("CoOp", "coop"), ("CoCoOp", "cocoop"), ("MaPLe", "maple"), ("CMPA", "dcp")):
        r = recs[method]
        assert r["status"] == "complete" and r["key"]["origin"] == "imported"
        block = r["imported"]
        assert block["path"] == str(files[trainer].resolve()) and block["trainer"] == trainer and block["epoch"] == 3
        assert block["sha256"] == hashlib.sha256(files[trainer].read_bytes()).hexdigest()
        assert r["config"]["train"]["epochs"] == 3
        got = sorted((e["protocol"], e["classes"]) for e in r["evaluations"])
        expected = [("few_shot", "all")] if method == "dcp" else [("base2novel", "base"), ("base2novel", "novel")]
        assert got == expected and all(0 <= e["accuracy"] <= 100 for e in r["evaluations"])
    assert (recs["cocoop"]["key"]["seed"], recs["dcp"]["key"]["shots"]) == (2, 4)
    # the model a run holds is the file's: the run's model.pt equals the mapped tensors
    state = torch.load(next(results.glob(f"runs/**/*-{recs['coop']['id']}")) / "model.pt")
    assert torch.equal(state["ctx"], read_reference_file(files["CoOp"]).state_dict["ctx"].float())
    # importing the same files again evaluates nothing
    code, out, err = cli([*argv, "--json"], capsys)
    assert code == 0, err
    assert {r["action"] for r in json.loads(out.strip().splitlines()[-1])["runs"]} == {"skip"}


def test_import_of_a_file_that_does_not_fit_records_nothing(dtd, tmp_path, capsys):
    path = _rewrite(write_case(tmp_path, "CoOp"), lambda sd: sd.__setitem__("ctx", torch.zeros(4, 32)))
    results = tmp_path / "results"
    code, out, err = cli(["import", str(path), *IMPORT, "--data-root", str(dtd), "--results-dir", str(results)], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "ctx [4, 32] vs [4, 64]" in lines[0], err
    assert not records(results)


def test_imported_runs_stay_apart_from_trained_runs_of_the_same_key(dtd, tmp_path, capsys):
    """Train coop; export it; import the export under the same recipe: the two runs differ only in their origin,
    give equal logits, and the report lists them as two entries (with --vs paper too), never one averaged."""
    results = tmp_path / "results"
    common = ["--data-root", str(dtd), "--results-dir", str(results)]
    code, out, err = cli(["run", "--methods", "coop", "--datasets", "dtd", "--seeds", "1", "--recipe", "toy",
                          "--set", "epochs=1", *IMPORT, *common], capsys)  # fmt: skip
    assert code == 0, err
    (trained,) = records(results)
    model_dir = tmp_path / "exported"
    argv = ["export", trained["id"], str(model_dir), "--format", "reference", "--reference-precision", "fp32"]
    code, out, err = cli([*argv, "--results-dir", str(results)], capsys)
    assert code == 0, err
    code, out, err = cli(["import", str(model_dir), "--dataset", "dtd", "--protocol", "base2novel", "--seed", "1",
                          "--recipe", "toy", *IMPORT, *common], capsys)  # fmt: skip
    assert code == 0, err
    recs = {r["key"]["origin"]: r for r in records(results)}
    assert set(recs) == {"trained", "imported"} and recs["trained"]["id"] != recs["imported"]["id"]
    same = {k: v for k, v in recs["trained"]["key"].items() if k != "origin"}
    assert same == {k: v for k, v in recs["imported"]["key"].items() if k != "origin"}
    items = sorted((dtd / "dtd" / "images").rglob("*.jpg"))[:6]
    names = ["banded", "blotchy", "sea or lake"]
    a = load_classifier(recs["trained"]["id"], results).predict(items, names)
    b = load_classifier(recs["imported"]["id"], results).predict(items, names)
    assert torch.equal(a.logits, b.logits)  # import(export(run)) gives the run's logits
    for extra in ([], ["--vs", "paper"], ["--ci", "--ci-replicates", "100"]):
        code, out, err = cli(["report", "--results-dir", str(results), "--format", "csv", *extra], capsys)
        assert code == 0, err
        rows = [r for r in csv.DictReader(io.StringIO(out)) if r["dataset"] == "dtd" and r["metric"] == "base"]
        entries = {r["entry"]: r for r in rows}
        assert len(entries) == 2 and sum("imported" in e for e in entries) == 1, sorted(entries)
        assert all(int(r["n"]) == 1 for r in rows)  # one seed each: never averaged together


@pytest.mark.slow
def test_an_imagenet_trained_file_is_evaluated_on_the_cross_dataset_and_dg_targets(tmp_path, capsys):
    data = build_miniature(tmp_path / "data")
    run = tmp_path / "output/imagenet/CoOp/vit_b16_ep50_ctxv1_16shots/seed1"
    write_trainer_checkpoint(run, "CoOp", shared_tiny_backbone(), epochs=2, n_cls=5)  # miniature ImageNet: 5 classes
    results = tmp_path / "results"
    code, out, err = cli(["import", str(tmp_path / "output"), *IMPORT, "--data-root", str(data), "--results-dir",
                          str(results)], capsys)  # fmt: skip
    assert code == 0, err
    (rec,) = records(results)
    assert rec["key"]["train_protocol"] == "xd" and rec["imported"]["read_from"]["protocol"] == "imagenet is the source"
    tags = {(e["protocol"], e["dataset"]) for e in rec["evaluations"]}
    assert ("source", "imagenet") in tags and ("cross_dataset", "dtd") in tags
    assert {d for p, d in tags if p == "domain_generalization"} == {"imagenet_v2", "imagenet_sketch", "imagenet_a",
                                                                    "imagenet_r"}  # fmt: skip


@pytest.mark.parametrize(
    "args,needle",
    [
        (["MISSING"], "does not exist"),
        (["EMPTY"], "no checkpoint (model.pth.tar-N or model-best.pth.tar) under"),
        (["NOTDASSL"], "is not a reference trainer's checkpoint"),
        (["GARBAGE"], "cannot read checkpoint"),
        (["COOP", "--method", "zsclip"], "zsclip has no reference checkpoint format"),
        (["COOP", "--method", "dcp-paper"], "dcp-paper has no reference checkpoint format"),
        (["COOP", "--dataset", "dtdd"], "Did you mean 'dtd'"),
        (["COOP", "--protocol", "base2novl"], "Did you mean 'base2novel'"),
        (["COOP", "--set", "n_ctx=8"], "contradicts the checkpoint"),
        (["LONE"], "which dataset was it trained on?"),
    ],
    ids=["missing", "empty-folder", "not-dassl", "garbage", "zsclip", "dcp-paper", "dataset", "protocol", "set",
         "no-dataset"],
)  # fmt: skip
def test_bad_import_input_is_one_line_and_exit_2(args, needle, dtd, tmp_path, capsys):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "log.txt").write_text("x")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "model.pth.tar-1")
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "model.pth.tar-3").write_bytes(b"PK\x03\x04 truncated")
    lone = write_reference_checkpoint(
        tmp_path / "lone", "prompt_learner", coop_entries(shared_tiny_backbone()), 2, 0.002
    )
    subst = {"MISSING": str(tmp_path / "nope"), "EMPTY": str(tmp_path / "empty"), "GARBAGE": str(tmp_path / "garbage"),
             "NOTDASSL": str(tmp_path / "model.pth.tar-1"), "COOP": str(write_case(tmp_path, "CoOp")),
             "LONE": str(lone)}  # fmt: skip
    results = tmp_path / "results"
    argv = ["import", *[subst.get(a, a) for a in args], *IMPORT, "--data-root", str(dtd), "--results-dir", str(results)]
    code, out, err = cli(argv, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert needle in lines[0], lines[0]
    assert not records(results)


def test_vit_b16_shaped_coop_and_cocoop_files_map_with_their_real_shapes(tmp_path):
    """The one place the reference's real widths are used: ViT-B/16's 512-wide text tower, 77 tokens, E = 512."""
    vit = load_backbone("ViT-B-16")  # random weights: shapes only
    opts = ImportOptions(backbone="ViT-B-16", pretrained="random", dataset="oxford_pets", seed=1, shots=16)
    coop = write_reference_checkpoint(tmp_path / "coop", "prompt_learner", coop_entries(vit), 200, 0.002)
    plan = plan_one(coop, opts, backbones := {("ViT-B-16", "random"): vit})
    assert plan.method == "coop" and plan.state["ctx"].shape == (4, 512)
    assert read_reference_file(coop).shapes["token_suffix"] == (3, 72, 512)  # 77 − 1 − n_ctx
    cocoop = write_reference_checkpoint(tmp_path / "cocoop", "prompt_learner", cocoop_entries(vit), 10, 0.002)
    plan = plan_one(cocoop, opts, backbones)
    shapes = {k: tuple(v.shape) for k, v in plan.state.items()}
    assert plan.method == "cocoop" and shapes == {
        "ctx": (4, 512),
        "meta_net.linear1.weight": (32, 512),
        "meta_net.linear1.bias": (32,),
        "meta_net.linear2.weight": (512, 32),
        "meta_net.linear2.bias": (512,),
    }
