"""Reading the conversion's inputs: the original checkpoint, timm checkpoints, the run config and the tokenizer.

Every reader turns a failure into a `ConversionError` that names the file and what is wrong with it. Readers of
third-party formats catch `Exception`: torch, safetensors and the Hub raise many unrelated types for a truncated,
foreign or unreachable file, and the user needs the file name more than the exception class.
"""

import json
import zipfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from modeling_mlmamba import MLMambaConfig, MLMambaProcessor
from modeling_mlmamba.processing_mlmamba import IMAGE_TOKEN

from .mapping import ORIGINAL_PARTS, ConversionError

# What the released run config (`config.json` beside `latest-checkpoint.pt`) must say: the only vision backbone
# and image transform that were released. Its `llm_backbone_id` is not checked: the released loader replaces it
# by "mamba2-2.7b" whatever it says, and the LM tensors' shapes are checked against the text config instead.
RELEASED_RUN = {
    "vision_backbone_id": "dinosiglip-vit-so-384px",
    "image_resize_strategy": "resize-naive",
}
SUB_CONFIGS = ("dino_config", "siglip_config", "text_config")
TIMM_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def load_original_checkpoint(path) -> dict:
    """The `"model"` dict of a released `latest-checkpoint.pt`, read without unpickling code and memory-mapped."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError([f"checkpoint {path} does not exist"])
    if not zipfile.is_zipfile(path):
        raise ConversionError([f"checkpoint {path} is not a torch.save file (no zip archive inside): truncated or "
                               "the wrong file?"])
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:
        raise ConversionError([f"cannot read checkpoint {path}: {type(error).__name__}: {error}"]) from error
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model"), dict):
        found = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ConversionError([f"checkpoint {path} is not an ML-Mamba training checkpoint: expected a dict whose "
                               f"'model' entry holds the sub-state-dicts {ORIGINAL_PARTS}, found {found}"])
    return checkpoint["model"]


def _read_state_dict(path: Path, what: str) -> dict:
    try:
        if path.suffix == ".safetensors":
            state_dict = load_file(path)
        else:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ConversionError([f"cannot read the {what} checkpoint {path}: {type(error).__name__}: {error}"]) from error
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ConversionError([f"the {what} checkpoint {path} is not a flat state dict of tensors (timm's format)"])
    return state_dict


def _download_timm_weights(repo_id: str, what: str) -> Path:
    from huggingface_hub import hf_hub_download

    failures = []
    for filename in TIMM_WEIGHT_FILES:
        try:
            return Path(hf_hub_download(repo_id, filename))
        except Exception as error:
            failures.append(f"{filename}: {type(error).__name__}: {error}")
    raise ConversionError([f"the {what} checkpoint {repo_id!r} is neither a local file nor a downloadable Hub repo "
                           f"({'; '.join(failures)})"])


def load_timm_state_dict(source: str, what: str) -> dict:
    """A timm checkpoint from a local `model.safetensors` / `.bin` file, a folder holding one, or a Hub repo id."""
    path = Path(source)
    if path.is_dir():
        files = [path / name for name in TIMM_WEIGHT_FILES if (path / name).is_file()]
        if not files:
            raise ConversionError([f"the {what} folder {path} holds none of {TIMM_WEIGHT_FILES}"])
        path = files[0]
    elif not path.is_file():
        path = _download_timm_weights(source, what)
    return _read_state_dict(path, what)


def read_run_config(path) -> dict:
    """The `"model"` entry of the original run's `config.json`."""
    path = Path(path)
    try:
        run = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ConversionError([f"cannot read the run config {path}: {error}"]) from error
    if not isinstance(run, dict) or not isinstance(run.get("model"), dict):
        raise ConversionError([f"the run config {path} has no 'model' entry: is it the config.json of the run?"])
    return run["model"]


def projector_type(arch_specifier) -> str:
    """The original's `arch_specifier` -> our `projector_type`, parsed the way the released code does."""
    if arch_specifier == "linear":
        return "linear"
    for name in ("fused-gelu-mlp", "gelu-mlp"):
        if isinstance(arch_specifier, str) and arch_specifier.endswith(name):
            return name
    raise ConversionError([f"run config arch_specifier {arch_specifier!r} names no projector this package has "
                           "(linear, gelu-mlp, fused-gelu-mlp)"])


def parse_overrides(text: str | None, flag: str) -> dict:
    """A JSON object given inline or as the path of a .json file (for the --*-config flags)."""
    if text is None:
        return {}
    try:
        value = json.loads(Path(text).read_text() if text.endswith(".json") else text)
    except (OSError, ValueError) as error:
        raise ConversionError([f"{flag} must be a JSON object or a .json file: {error}"]) from error
    if not isinstance(value, dict):
        raise ConversionError([f"{flag} must be a JSON object, got {type(value).__name__}"])
    return value


def build_config(run: dict, dino=None, siglip=None, text=None, connector=None) -> MLMambaConfig:
    """Our config for the released run, with optional overrides of each sub-config and of the top-level fields.

    The defaults of `MLMambaConfig` are the released model; the overrides exist so that small or synthetic
    checkpoints convert too. `connector` may set any top-level `MLMambaConfig` field (connector, projector,
    image placeholder), not the three sub-configs.
    """
    problems = [
        f"run config {field!r} is {run.get(field)!r}, but only {expected!r} (the released ML-Mamba) is supported"
        for field, expected in RELEASED_RUN.items()
        if run.get(field) != expected
    ]
    connector = dict(connector or {})
    top_level = set(MLMambaConfig.__annotations__) - set(SUB_CONFIGS)
    unknown = sorted(set(connector) - top_level)
    if unknown:
        problems.append(f"--connector-config has unknown fields {unknown}; allowed: {sorted(top_level)}")
    try:
        connector.setdefault("projector_type", projector_type(run.get("arch_specifier")))
    except ConversionError as error:
        problems.extend(error.problems)
    if problems:
        raise ConversionError(problems)
    try:
        return MLMambaConfig(dino_config=dino, siglip_config=siglip, text_config=text, **connector)
    except (TypeError, ValueError) as error:
        raise ConversionError([f"the config overrides do not make a valid MLMambaConfig: {error}"]) from error


def load_tokenizer(source: str):
    """The LM's tokenizer (GPT-NeoX for the released model), from a local folder or a Hub id."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source)
    except Exception as error:
        raise ConversionError([f"cannot load the tokenizer {source!r}: {type(error).__name__}: {error}"]) from error


def image_token_id_for(tokenizer) -> int:
    """The id of the image placeholder: the tokenizer's own `<image>`, or the first free id, where the processor
    adds it (50277 for the released GPT-NeoX tokenizer: the first of the LM's padding embeddings)."""
    if IMAGE_TOKEN in tokenizer.get_vocab():
        return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    return len(tokenizer)


def build_processor(config: MLMambaConfig, tokenizer, max_length=None) -> MLMambaProcessor:
    """The processor of the converted model (adds `<image>` to the tokenizer), checked against the LM's vocabulary."""
    try:
        processor = MLMambaProcessor.from_model_config(config, tokenizer)
    except ValueError as error:
        raise ConversionError([f"the tokenizer does not fit the model: {error}"]) from error
    if len(tokenizer) > config.text_config.vocab_size:
        raise ConversionError([f"the tokenizer has {len(tokenizer)} tokens (with {IMAGE_TOKEN}) but the language "
                               f"model only {config.text_config.vocab_size} embeddings: wrong tokenizer or text "
                               "config?"])
    if max_length is not None:
        tokenizer.model_max_length = max_length
    return processor
