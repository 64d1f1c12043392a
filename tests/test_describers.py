"""Describers (mllm on a tiny random transformers model built offline, file, scene, interrogator), the description
cache (hits, corrupted lines, --no-describe) and `mugcp-bench describe`."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from mugcp_bench import describers
from mugcp_bench.datasets.base import Datum, prepare
from mugcp_bench.describers import (
    PHRASE_BANK,
    Describer,
    FileDescriber,
    InterrogatorDescriber,
    MLLMDescriber,
    SceneDescriber,
    build_describer,
    check_tokenizer,
    describe_items,
    ensure_descriptions,
)
from mugcp_bench.describers.cache import DescriptionCache
from mugcp_bench.describers.image_keys import image_sha1
from mugcp_bench.errors import UserError
from mugcp_bench.registry import DESCRIBERS
from tests.method_harness import shared_tiny_backbone

WORDS = (
    "a an the of on in with and photo image picture red blue green yellow purple circle square triangle star heart "
    "small large striped dotted plain grass sky sand object background center left right top bottom describe main "
    "subject this one detailed sentence its parts shape colours textures surroundings do not name specific species "
    "model or category"
).split()
CHAT_TEMPLATE = (
    "{% for m in messages %}USER: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}{% if add_generation_prompt %} ASSISTANT:{% endif %}"
)


def word_tokenizer(words=WORDS, extra=()):
    """A word-level fast tokenizer built locally (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>", "<s>", "</s>", *extra]
    vocab = {w: i for i, w in enumerate(dict.fromkeys([*specials, *words, ",", ".", ":", "USER", "ASSISTANT"]))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    kwargs = {"extra_special_tokens": {"image_token": "<image>"}} if "<image>" in extra else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>", **kwargs
    )


def build_tiny_llava(folder: Path, seed: int = 0) -> Path:
    """A randomly initialised tiny LLaVA (CLIP vision 16 px + 2-layer Llama) with processor and chat template,
    saved with save_pretrained: loads like any hub image-text-to-text model, offline."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tok = word_tokenizer(extra=("<image>",))
    image_processor = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )
    vision = CLIPVisionConfig(
        image_size=16, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2
    )
    text = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def build_tiny_captioner(folder: Path) -> Path:
    """A tiny VisionEncoderDecoder (ViT + GPT-2) captioner: a vision-to-sequence model that takes no prompt."""
    from transformers import (
        GPT2Config,
        VisionEncoderDecoderConfig,
        VisionEncoderDecoderModel,
        ViTConfig,
        ViTImageProcessor,
    )

    tok = word_tokenizer()
    enc = ViTConfig(
        image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    dec = GPT2Config(
        vocab_size=len(tok), n_positions=128, n_embd=32, n_layer=1, n_head=2, add_cross_attention=True, is_decoder=True
    )
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
    config.decoder_start_token_id = tok.bos_token_id
    config.pad_token_id = tok.pad_token_id
    config.eos_token_id = tok.eos_token_id
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = VisionEncoderDecoderModel(config).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory) -> Path:
    return build_tiny_llava(tmp_path_factory.mktemp("llava") / "tiny-llava")


def write_images(folder: Path, n: int, seed: int = 0, dataset: str = "x") -> list[Datum]:
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        rel = f"{dataset}/images/c{i % 2}/img{seed}_{i}.png"
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(path)
        items.append(Datum(str(path), i % 2, ("red circle", "blue square")[i % 2], rel))
    return items


class CountingDescriber(Describer):
    """Counts how many images it is asked to describe."""

    name = "counting"
    default_prompt_id = "count_v1"

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    @property
    def id(self) -> str:
        return "counting-v1"

    def describe(self, items):
        self.calls += len(items)
        return [f"image {image_sha1(d)[:8]}" for d in items]


# --- registry ----------------------------------------------------------------------------------------------------
def test_registry_has_the_four_describers():
    assert {"mllm", "file", "scene", "interrogator"} <= set(DESCRIBERS.names())
    with pytest.raises(UserError, match="Did you mean 'scene'"):
        DESCRIBERS.get("scnee")


# --- mllm ----------------------------------------------------------------------------------------------------------
def test_mllm_tiny_llava_describes_offline_deterministically(tiny_llava, tmp_path):
    items = write_images(tmp_path, 3)
    describer = build_describer("mllm", model=str(tiny_llava), device="cpu")
    assert isinstance(describer, MLLMDescriber) and describer.prompt_id == "describe_v1"
    assert describer.id.startswith("mllm-tiny-llava@") and len(describer.id.split("@")[1]) == 12
    texts = describer.describe(items)
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    assert "Describe the main subject" in describer._prompt_text()  # the chat template carries the prompt
    again = MLLMDescriber(str(tiny_llava), device="cpu", batch_size=2)
    assert again.id == describer.id
    assert again.describe(items) == texts  # greedy: the same text whatever the batch split
    noname = MLLMDescriber(str(tiny_llava), prompt_id="describe_noname_v1", device="cpu")
    noname._load()
    assert "Do not name the specific species" in noname._prompt_text()
    with pytest.raises(UserError, match="describe_noname_v1"):
        MLLMDescriber(str(tiny_llava), prompt_id="describe_v2")


def test_mllm_captioner_without_prompt(tmp_path, caplog):
    folder = build_tiny_captioner(tmp_path / "captioner")
    describer = MLLMDescriber(str(folder), device="cpu")
    with caplog.at_level(logging.WARNING):
        texts = describer.describe(write_images(tmp_path, 2))
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    assert describer._mode == "captioner" and "takes no prompt" in caplog.text


def test_mllm_empty_tokenizer_is_a_user_error(tiny_llava, tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    empty = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()))
    with pytest.raises(UserError, match="empty vocabulary"):
        check_tokenizer(empty, "m")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_llava, broken)
    Tokenizer(models.WordLevel({"<unk>": 0, "<image>": 1}, unk_token="<unk>")).save(str(broken / "tokenizer.json"))
    with pytest.raises(UserError, match="empty vocabulary") as err:
        MLLMDescriber(str(broken), device="cpu").describe(write_images(tmp_path, 1))
    assert "\n" not in str(err.value)


def test_mllm_hub_id_offline_and_bad_paths(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="not in the local Hugging Face cache and HF_HUB_OFFLINE is set") as err:
        MLLMDescriber("mugcp-test-org/no-such-model-xyz")
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="does not exist"):
        MLLMDescriber(str(tmp_path / "missing" / "model"))
    with pytest.raises(UserError, match="needs a model"):
        build_describer("mllm")


# --- file ----------------------------------------------------------------------------------------------------------
def test_file_describer_reads_absolute_and_root_relative_paths(tmp_path):
    items = write_images(tmp_path / "data", 3)
    jsonl = tmp_path / "captions.jsonl"
    lines = [
        {"image": items[0].impath, "text": "a  red circle"},
        {"image": items[1].relpath, "text": "a blue square"},
        {"image": items[2].relpath, "text": "something else"},
    ]
    jsonl.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    describer = build_describer("file", file=str(jsonl))
    assert describer.describe(items) == ["a red circle", "a blue square", "something else"]
    assert describer.id.startswith("file-captions-")
    with_root = FileDescriber(str(jsonl), data_root=str(tmp_path / "data"))
    assert with_root.describe([items[2].impath]) == ["something else"]  # a plain path, found via the data root
    other = write_images(tmp_path / "data", 1, seed=5)
    with pytest.raises(UserError, match="no line for 1 of 1 images"):
        describer.describe(other)
    jsonl.write_text('{"image": "a.png"}\n')
    with pytest.raises(UserError, match="line 1"):
        FileDescriber(str(jsonl))


# --- scene (toy world) ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def toy_root(tmp_path_factory) -> Path:
    from mugcp_bench.toy.suite import DATASETS, SuiteSizes, write_dataset

    root = tmp_path_factory.mktemp("toy") / "data"
    write_dataset(DATASETS["toy_colors"], root, SuiteSizes(train=2, val=1, test=1), seed=0)
    return root


def test_scene_describer_reads_metadata_with_seeded_noise(toy_root, tmp_path):
    from mugcp_bench.toy.suite import load_scene_metadata

    data = prepare("toy_colors", toy_root, None, 1)
    items = data.train[:6]
    meta = load_scene_metadata(toy_root / "toy_colors")
    exact = SceneDescriber(drop=0.0, swap=0.0)
    texts = exact.describe(items)
    for d, text in zip(items, texts):
        record = meta["/".join(d.relpath.split("/")[1:])]
        assert record["color"] in text and record["shape"] in text and text.startswith("a photo of")
        assert d.classname in text  # toy_colors: the colour is the class, named when nothing is dropped
        assert text == record["caption"].replace(",", "")  # the renderer's own sentence (no comma before the place)
    noisy = SceneDescriber()
    assert noisy.id == "scene-v1-drop0.2-swap0.1" and exact.id == "scene-v1-drop0-swap0"
    assert noisy.describe(items) == noisy.describe(items)  # seeded by the image hash
    bare = SceneDescriber(drop=1.0, swap=0.0).describe(items[:1])[0]
    assert bare.startswith("a photo of an object") and meta_colour(meta, items[0]) not in bare
    with pytest.raises(UserError, match="no toy-world scene metadata"):
        noisy.describe(write_images(tmp_path, 1))


def meta_colour(meta, item):
    return meta["/".join(item.relpath.split("/")[1:])]["color"]


# --- interrogator ----------------------------------------------------------------------------------------------------
def test_interrogator_returns_top_k_phrases(tmp_path):
    backbone = shared_tiny_backbone()
    items = write_images(tmp_path, 3)
    describer = InterrogatorDescriber(backbone, top_k=3)
    assert describer.id.startswith(f"interrogator-v1-tiny-{backbone.weights_hash[:12]}-k3")
    texts = describer.describe(items)
    assert texts == describer.describe(items)
    assert 150 <= len(PHRASE_BANK) <= 300 and len(set(PHRASE_BANK)) == len(PHRASE_BANK)
    for t in texts:
        assert t.startswith("an image of ") and t.endswith(".")
        assert sum(p in t for p in PHRASE_BANK) >= 3
    with pytest.raises(UserError, match="needs a backbone"):
        build_describer("interrogator")


# --- cache ----------------------------------------------------------------------------------------------------------
def test_cache_hit_on_second_run_calls_no_describer(tmp_path):
    items = write_images(tmp_path / "data", 4)
    twin = tmp_path / "data" / "x" / "images" / "copy.png"  # the same bytes under another path
    shutil.copy(items[0].impath, twin)
    items.append(Datum(str(twin), 0, "red circle", "x/images/copy.png"))
    cache = DescriptionCache(tmp_path / "cache")
    first = CountingDescriber()
    texts = ensure_descriptions(items, first, cache)
    assert first.calls == 4  # five items, four distinct images
    assert texts["x/images/copy.png"] == texts[items[0].relpath]
    second = CountingDescriber()
    outcome = describe_items(items, second, cache)
    assert second.calls == 0 and outcome.texts == texts
    assert (outcome.n_images, outcome.n_cached, outcome.n_generated) == (4, 4, 0)
    path = cache.path("counting-v1", "count_v1")
    assert path == tmp_path / "cache" / "counting-v1" / "count_v1.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert {"image_sha1", "text", "n_tokens", "wall_s", "checksum"} <= set(records[0])


def test_describe_groups_auto_items_counts_them_and_releases(toy_root, tmp_path):
    """The one entry point of the command and MuGCP: auto = scene for toy images, the other describer for the rest."""
    toy = prepare("toy_colors", toy_root, None, 1).train[:3]
    other = write_images(tmp_path / "data", 2)
    twin = tmp_path / "data" / "x" / "images" / "copy.png"  # the same bytes under another path
    shutil.copy(other[0].impath, twin)
    items = [*toy, *other, Datum(str(twin), 0, "red circle", "x/images/copy.png")]
    built: dict[str, Describer] = {}

    def make(name: str) -> Describer:
        built[name] = SceneDescriber() if name == "scene" else CountingDescriber()
        built[name].release = lambda n=name: built.setdefault(f"released {n}", built[n])
        return built[name]

    seen: list[int] = []
    cache = DescriptionCache(tmp_path / "cache")
    done = describers.describe("auto", items, make, cache, progress=seen.append, release=True)
    assert done.describer == "scene-v1-drop0.2-swap0.1+counting-v1" and set(done.texts) == {d.relpath for d in items}
    assert (done.n_images, done.n_cached, done.n_generated) == (5, 0, 5) and sum(seen) == len(items)
    assert built["interrogator"].calls == 2 and {"released scene", "released interrogator"} <= set(built)
    again = describers.describe("auto", items, make, cache, generate=False)
    assert (again.n_cached, again.n_generated) == (5, 0) and again.texts == done.texts
    assert built["interrogator"].calls == 0  # a fresh one, never called: everything came from the cache


def test_corrupted_cache_lines_are_reported_and_regenerated(tmp_path, caplog):
    items = write_images(tmp_path / "data", 3)
    cache = DescriptionCache(tmp_path / "cache")
    texts = ensure_descriptions(items, CountingDescriber(), cache)
    path = cache.path("counting-v1", "count_v1")
    lines = path.read_text().splitlines(keepends=True)
    tampered = json.loads(lines[1])
    tampered["text"] = "a forged description"  # valid JSON, wrong checksum
    lines[1] = json.dumps(tampered) + "\n"
    lines[2] = lines[2][: len(lines[2]) // 2] + "\n"  # a torn write
    path.write_text("".join(lines))
    fresh = DescriptionCache(tmp_path / "cache")
    counter = CountingDescriber()
    with caplog.at_level(logging.WARNING, logger="mugcp_bench.describers.cache"):
        again = ensure_descriptions(items, counter, fresh)
    assert counter.calls == 2
    assert again == texts and "a forged description" not in again.values()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(path) in w and "line 2" in w and "checksum" in w for w in warnings)
    assert any(str(path) in w and "line 3" in w for w in warnings)
    assert DescriptionCache(tmp_path / "cache").broken_lines("counting-v1", "count_v1") == []  # rewritten clean
    assert len(path.read_text().splitlines()) == 3


def test_no_describe_fails_naming_the_missing_count_and_the_command(tmp_path):
    items = write_images(tmp_path / "data", 3)
    cache = DescriptionCache(tmp_path / "cache")
    ensure_descriptions(items[:1], CountingDescriber(), cache)
    counter = CountingDescriber()
    with pytest.raises(UserError, match=r"2 of 3 images have no cached description .* 'mugcp-bench describe "):
        ensure_descriptions(items, counter, cache, generate=False)
    assert counter.calls == 0


# --- mugcp-bench describe --------------------------------------------------------------------------------------------
def test_describe_command_fills_the_cache_and_resumes(toy_root, tmp_path):
    from mugcp_bench.commands.describe import describe

    runner = CliRunner()
    args = ["--data-root", str(toy_root), "--datasets", "toy_colors", "--describer", "scene", "--shots", "1"]
    args += ["--seeds", "1,2"]
    first = runner.invoke(describe, args)
    assert first.exit_code == 0, first.output
    assert "toy_colors" in first.output and "scene-v1-drop0.2-swap0.1" in first.output
    second = runner.invoke(describe, args)
    assert second.exit_code == 0, second.output
    assert "0 images described now" in second.output
    n_test = len(prepare("toy_colors", toy_root, None, 1).test)
    lines = (DescriptionCache().path("scene-v1-drop0.2-swap0.1", "scene_v1")).read_text().splitlines()
    assert len(lines) >= n_test
    bad = runner.invoke(describe, [*args[:4], "--describer", "mlm"])
    assert isinstance(bad.exception, UserError) and "Did you mean 'mllm'" in str(bad.exception)


def test_a_corrupted_cache_line_is_named_once_and_its_image_described_again_through_the_cli(toy_root, tmp_path, capsys):
    from tests.cli_harness import cli

    cache_root = tmp_path / "cache"
    args = ["describe", "--data-root", str(toy_root), "--datasets", "toy_colors", "--describer", "scene"]
    args += ["--shots", "1", "--seeds", "1"]
    env = {"MUGCP_CACHE": str(cache_root)}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        code, _, _ = cli(args, capsys)
        assert code == 0
        path = DescriptionCache(cache_root / "descriptions").path("scene-v1-drop0.2-swap0.1", "scene_v1")
        lines = path.read_text().splitlines(keepends=True)
        forged = json.loads(lines[3])
        forged["text"] = "a forged description"  # valid JSON, wrong checksum
        lines[3] = json.dumps(forged) + "\n"
        lines[5] = lines[5][:40] + "\n"  # a torn line
        path.write_text("".join(lines))
        code, out, err = cli(args, capsys)
        assert code == 0 and "Traceback" not in err
        warned = [line for line in err.splitlines() if "is corrupted" in line]
        assert len(warned) == 2 and all(str(path) in w and "described again" in w for w in warned)
        assert "line 4 is corrupted (checksum mismatch)" in warned[0] and "line 6 is corrupted" in warned[1]
        assert "2 images described now" in " ".join((out + err).split())
        assert "a forged description" not in path.read_text() and len(path.read_text().splitlines()) == len(lines)
        code, out, err = cli(args, capsys)  # clean again: nothing reported, nothing described
        assert code == 0 and "corrupted" not in err and "0 images described now" in " ".join((out + err).split())


def test_describe_uses_the_describer_of_the_runs_it_prepares(toy_root, tmp_path, capsys, monkeypatch):
    """One rule for `run` and `describe`: without --describer, describe as MuGCP's recipe for that world does."""
    from tests.cli_harness import cli

    monkeypatch.setenv("MUGCP_CACHE", str(tmp_path / "cache"))
    base = ["describe", "--data-root", str(toy_root), "--datasets", "toy_colors", "--shots", "1", "--seeds", "1"]
    code, _, err = cli(base, capsys)  # real data: the paper recipe's MLLM, which is not here offline
    (line,) = [x for x in err.splitlines() if x.startswith("error:")]
    assert code == 2 and "Qwen/Qwen2-VL-7B-Instruct" in line
    assert "describe --model PATH" in line and "run --set mugcp.describer_model=PATH" in line
    code, out, err = cli([*base, "--recipe", "toy", "--show", "2"], capsys)  # the toy recipe: auto -> scene
    assert code == 0, err
    assert "scene-v1" in out and "sample descriptions" in out and out.count("toy_colors/") >= 2
