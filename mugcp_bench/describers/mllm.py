"""The ``mllm`` describer: any transformers image-text-to-text / vision-to-sequence model (hub id or local folder),
batched greedy decoding, 60 new tokens, versioned prompts ``describe_v1`` / ``describe_noname_v1``."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mugcp_bench.describers.base import Describer, DescriberOptions, open_rgb
from mugcp_bench.errors import UserError
from mugcp_bench.registry import DESCRIBERS

log = logging.getLogger(__name__)

# Versioned captioning prompts (docs/methods/mugcp.md §7.3 (A)). Change the text -> new id.
PROMPTS: dict[str, str] = {
    "describe_v1": (
        "Describe the main subject of this image in one detailed sentence: its parts, shape, colours, textures "
        "and surroundings."
    ),
    "describe_noname_v1": (
        "Describe the main subject of this image in one detailed sentence: its parts, shape, colours, textures "
        "and surroundings. Do not name the specific species, model or category."
    ),
}
MAX_NEW_TOKENS = 60


def _is_offline() -> bool:
    return any(
        os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def local_model_revision(folder: Path) -> str:
    """Content hash of a model folder: every small file in full, weight files by name, size, first and last MiB."""
    h = hashlib.sha1()
    for p in sorted(folder.rglob("*")):
        if not p.is_file() or p.name.startswith("."):
            continue
        rel = p.relative_to(folder).as_posix()
        size = p.stat().st_size
        h.update(f"{rel}\t{size}\n".encode())
        with open(p, "rb") as f:
            if size <= 16 << 20:
                h.update(f.read())
            else:
                h.update(f.read(1 << 20))
                f.seek(size - (1 << 20))
                h.update(f.read())
    return h.hexdigest()[:12]


def check_tokenizer(tokenizer: Any, model: str) -> None:
    """UserError when a tokenizer loaded empty (transformers can do so offline without raising)."""
    fix = "its tokenizer files are missing or unreadable; re-download the model or pass a complete local folder"
    try:
        size = int(getattr(tokenizer, "vocab_size", 0) or 0)
        ids = tokenizer("a photo of a dog", add_special_tokens=False)["input_ids"]
    except Exception as e:  # noqa: BLE001 - any failure here means an unusable tokenizer
        raise UserError(f"the tokenizer of mllm model '{model}' does not work ({type(e).__name__}): {fix}") from None
    unk = getattr(tokenizer, "unk_token_id", None)
    if size <= 0 or not ids or all(i == unk for i in ids):
        raise UserError(
            f"the tokenizer of mllm model '{model}' loaded with an empty vocabulary ({size} entries; plain English "
            f"encodes to nothing or unknown tokens): {fix}"
        )


@DESCRIBERS.register("mllm")
class MLLMDescriber(Describer):
    """Any transformers image-text-to-text / vision-to-sequence model (hub id or local folder), greedy decoding."""

    name = "mllm"
    default_prompt_id = "describe_v1"
    prompt_ids = tuple(PROMPTS)
    batch_size = 8

    def __init__(
        self,
        model: str,
        prompt_id: str | None = None,
        device: str | None = None,
        batch_size: int | None = None,
        revision: str | None = None,
        max_new_tokens: int = MAX_NEW_TOKENS,
    ) -> None:
        super().__init__(prompt_id, batch_size)
        if not model:
            raise UserError(
                "the 'mllm' describer needs a model: describe --model HUB_ID|PATH, or run --set "
                "mugcp.describer_model=..."
            )
        self.model_name = model
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.max_new_tokens = int(max_new_tokens)
        self._local = Path(os.path.expanduser(model))
        if self._local.is_dir():
            self.revision = local_model_revision(self._local)
            self._source = str(self._local)
        elif model.startswith((".", "~", "/")) or model.count("/") > 1 or (os.sep != "/" and os.sep in model):
            raise UserError(
                f"mllm model folder '{model}' does not exist; give a folder or a hub id (describe --model PATH, or run "
                "--set mugcp.describer_model=PATH)"
            )
        else:
            self.revision = self._hub_revision(model, revision)
            self._source = model
        self._hub_ref = revision
        self._model: Any = None
        self._processor: Any = None
        self._tokenizer: Any = None
        self._mode = ""

    @classmethod
    def from_options(cls, opts: DescriberOptions) -> MLLMDescriber:
        return cls(opts.model or "", opts.prompt_id, opts.device, opts.batch_size, opts.revision)

    @staticmethod
    def _hub_revision(repo_id: str, revision: str | None) -> str:
        """The commit hash of a hub model (its config.json's snapshot folder); offline: from the local cache."""
        from huggingface_hub import hf_hub_download, try_to_load_from_cache

        if _is_offline():
            path = try_to_load_from_cache(repo_id, "config.json", revision=revision)
            if not isinstance(path, str):
                raise UserError(
                    f"mllm model '{repo_id}' is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: "
                    "give a local folder (describe --model PATH, run --set mugcp.describer_model=PATH), or go online "
                    "once to download it"
                )
        else:
            try:
                path = hf_hub_download(repo_id, "config.json", revision=revision)
            except Exception as e:  # noqa: BLE001
                raise UserError(
                    f"cannot fetch mllm model '{repo_id}' ({type(e).__name__}); check the hub id, the network, "
                    "or give a local folder (describe --model PATH, run --set mugcp.describer_model=PATH)"
                ) from None
        return Path(path).parent.name[:12]

    @property
    def id(self) -> str:
        base = Path(self._source).name if self._local.is_dir() else self.model_name.replace("/", "--")
        return f"mllm-{base}@{self.revision}"

    # loading ----------------------------------------------------------------------------------------------------
    def _load(self) -> None:
        if self._model is not None:
            return
        import transformers

        kwargs: dict[str, Any] = {} if self._local.is_dir() else {"revision": self._hub_ref}
        try:
            processor = transformers.AutoProcessor.from_pretrained(self._source, **kwargs)
        except Exception as e:  # noqa: BLE001 - any failure is the user's model folder or id
            raise UserError(
                f"cannot load the processor of mllm model '{self.model_name}' ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}); pass a complete model folder or hub id"
            ) from None
        tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is None and callable(getattr(processor, "batch_decode", None)):
            tokenizer = processor  # the processor is the tokenizer itself
        if tokenizer is None or not hasattr(processor, "image_processor"):
            try:  # a folder with separate image processor and tokenizer files (e.g. VisionEncoderDecoder)
                tokenizer = tokenizer or transformers.AutoTokenizer.from_pretrained(self._source, **kwargs)
                image_processor = transformers.AutoImageProcessor.from_pretrained(self._source, **kwargs)
            except Exception as e:  # noqa: BLE001
                raise UserError(
                    f"mllm model '{self.model_name}' has no usable tokenizer / image processor ({type(e).__name__}); "
                    "pass a complete model folder or hub id"
                ) from None
            processor = _PairProcessor(image_processor, tokenizer)
        check_tokenizer(tokenizer, self.model_name)
        dtype = torch.float32
        if str(self.device).startswith("cuda"):
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        model = None
        errors = []
        for auto in ("AutoModelForImageTextToText", "AutoModelForVision2Seq"):
            cls = getattr(transformers, auto, None)
            if cls is None:
                continue
            try:
                model = cls.from_pretrained(self._source, dtype=dtype, **kwargs)
                break
            except (ValueError, KeyError) as e:  # not mapped to this auto class
                errors.append(f"{auto}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
            except Exception as e:  # noqa: BLE001
                raise UserError(
                    f"cannot load mllm model '{self.model_name}' ({type(e).__name__}: "
                    f"{str(e).splitlines()[0] if str(e) else ''})"
                ) from None
        if model is None:
            raise UserError(
                f"'{self.model_name}' is not an image-text-to-text / vision-to-sequence model ({'; '.join(errors)})"
            )
        model.to(self.device).eval()
        if getattr(tokenizer, "padding_side", None) is not None and not model.config.is_encoder_decoder:
            tokenizer.padding_side = "left"  # batched generation of decoder-only models pads on the left
        if getattr(tokenizer, "pad_token_id", None) is None and getattr(tokenizer, "eos_token", None) is not None:
            tokenizer.pad_token = tokenizer.eos_token
        self._processor, self._tokenizer, self._model = processor, tokenizer, model
        if model.config.model_type == "vision-encoder-decoder":
            self._mode = "captioner"  # takes no text prompt
            log.warning(
                "mllm model '%s' is a pure captioner: it takes no prompt, so prompt '%s' is not applied",
                self.model_name,
                self.prompt_id,
            )
        elif getattr(processor, "chat_template", None) or getattr(tokenizer, "chat_template", None):
            self._mode = "chat"
        else:
            self._mode = "prompted"
        log.info("loaded mllm describer %s (%s mode) on %s", self.id, self._mode, self.device)

    def _prompt_text(self) -> str:
        prompt = PROMPTS[self.prompt_id]
        if self._mode == "chat":
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
            templ = self._processor if hasattr(self._processor, "apply_chat_template") else self._tokenizer
            return templ.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        token = getattr(self._processor, "image_token", None)
        return f"{token}\n{prompt}" if token and token not in prompt else prompt

    @torch.no_grad()
    def describe(self, items: Sequence[Any]) -> list[str]:
        if not items:
            return []
        self._load()
        images = [open_rgb(item) for item in items]
        if self._mode == "captioner":
            inputs = self._processor(images=images, return_tensors="pt")
            inputs = {"pixel_values": inputs["pixel_values"]}
        else:
            text = self._prompt_text()
            inputs = self._processor(images=images, text=[text] * len(images), return_tensors="pt", padding=True)
        inputs = {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in dict(inputs).items()}
        if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
            inputs["pixel_values"] = inputs["pixel_values"].to(self._model.dtype)
        out = self._model.generate(
            **inputs,
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=self._tokenizer.pad_token_id,
        )
        if not self._model.config.is_encoder_decoder and "input_ids" in inputs:
            out = out[:, inputs["input_ids"].shape[1] :]  # decoder-only: drop the prompt
        texts = self._tokenizer.batch_decode(out, skip_special_tokens=True)
        return [" ".join(t.split()) for t in texts]

    def count_tokens(self, text: str) -> int:
        if self._tokenizer is None:
            return super().count_tokens(text)
        return len(self._tokenizer(text, add_special_tokens=False)["input_ids"])

    def cli_args(self) -> str:
        return f"--describer mllm --model {self.model_name} --prompt-id {self.prompt_id}"

    def release(self) -> None:
        if self._model is None:
            return
        self._model = self._processor = self._tokenizer = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class _PairProcessor:
    """An image processor and a tokenizer used together like a transformers processor."""

    def __init__(self, image_processor: Any, tokenizer: Any) -> None:
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.chat_template = getattr(tokenizer, "chat_template", None)

    def __call__(self, images=None, text=None, return_tensors="pt", padding=True):
        out = dict(self.image_processor(images=images, return_tensors=return_tensors))
        if text is not None:
            out.update(self.tokenizer(text, return_tensors=return_tensors, padding=padding))
        return out
