"""The conversion from end to end: read the sources, map them, validate against the model, write a Hub folder.

Validation goes through the model's own loading path (`from_pretrained` with a state dict), so the saved names
that `mapping` produces are checked against what this transformers version really builds, renames included.
The output folder appears only when complete: everything is written to a hidden sibling folder
`.<output>.partial-<id>` first, which an exception or interruption removes; one left by a killed run is removed
when the next conversion to the same output starts.
"""

import logging
import shutil
import uuid
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from tqdm.auto import tqdm
from transformers.utils import logging as hf_logging

from modeling_mlmamba import MLMambaConfig, MLMambaForConditionalGeneration, write_model_card

from .mapping import ConversionError, Converted, map_all
from .sources import (
    build_config,
    build_processor,
    image_token_id_for,
    load_original_checkpoint,
    load_timm_state_dict,
    load_tokenizer,
    read_run_config,
)

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ORIGINAL_REPO = "huangwenjun1994/ML-Mamba"
# Table 2 of the paper (arXiv 2407.19832) for the released model; the card states where they come from.
PAPER_RESULTS = {"VQAv2": 75.26, "GQA": 60.68, "TextVQA": 52.2, "POPE": 88.3, "VizWiz": 45.17, "VSR": 51.5}


class UploadError(Exception):
    """The output folder was written completely, but uploading it to the Hub failed."""


def cast_tensors(converted: Converted, dtype: torch.dtype) -> tuple[dict, list[str]]:
    """Every converted tensor in `dtype` and contiguous (the qkv splits are views). Non-float tensors, NaN or
    infinite values in a source, and values that overflow `dtype` are problems: a model holding them would load
    and answer with garbage."""
    tensors, problems = {}, []
    for name, tensor in tqdm(converted.tensors.items(), desc="Converting tensors", unit="tensor"):
        origin = f"{name} (from {converted.origins[name]})"
        if not tensor.is_floating_point():
            problems.append(f"{origin} has dtype {tensor.dtype}, not a float dtype")
            continue
        tensors[name] = tensor.to(dtype).contiguous()
        if not_finite := int((~torch.isfinite(tensor)).sum()):
            problems.append(f"{origin} holds {not_finite} NaN or infinite value(s): the source is damaged")
        elif overflowing := int((~torch.isfinite(tensors[name])).sum()):
            problems.append(
                f"{origin} has {overflowing} value(s) beyond the range of {dtype} (largest magnitude "
                f"{tensor.abs().max().item():.3g}); choose --dtype float32 or bfloat16"
            )
    return tensors, problems


def load_validated_model(config: MLMambaConfig, converted: Converted, dtype: torch.dtype):
    """The model filled with the converted tensors, or a `ConversionError` listing every problem found.

    transformers reports what it could not place: parameters without a tensor (it would initialise them at
    random), tensors without a parameter, and shape mismatches. They are raised together with the mapping's
    problems, so that no random initialisation survives into an output folder.
    """
    tensors, problems = cast_tensors(converted, dtype)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its loading report would repeat, less precisely, the problems we raise
    try:
        model, info = MLMambaForConditionalGeneration.from_pretrained(
            None, config=config, state_dict=tensors, dtype=dtype, output_loading_info=True,
            ignore_mismatched_sizes=True,
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    problems = converted.problems + problems
    problems += [f"model parameter {name} has no source tensor" for name in sorted(info["missing_keys"])]
    problems += [
        f"{name} (from {converted.origins.get(name, 'the conversion')}) is not a parameter of the model"
        for name in sorted(info["unexpected_keys"])
    ]
    problems += [
        f"{name} (from {converted.origins.get(name, 'the conversion')}) has shape {tuple(source)} but the model "
        f"expects {tuple(target)}"
        for name, source, target in sorted(info["mismatched_keys"])
    ]
    problems += [str(message) for message in info["error_msgs"]]
    problems += [
        f"model tensor {name} is {tensor.dtype} after loading, not {dtype}"
        for name, tensor in model.state_dict().items()
        if tensor.dtype != dtype
    ]
    if problems:
        raise ConversionError(problems)
    return model.eval()


def check_output_free(output: Path) -> None:
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise ConversionError([f"the output {output} already exists and is not an empty folder; remove it or "
                               "choose another --output"])


def check_max_shard_size(max_shard_size: str | int) -> None:
    """Checked before any work, by the parser that transformers' saving uses (huggingface_hub's sharding)."""
    try:
        split_torch_state_dict_into_shards({}, max_shard_size=max_shard_size)
    except ValueError as error:
        raise ConversionError([f"--max-shard-size {max_shard_size!r} is not a size ({error}); write it like 5GB or "
                               "500MB"]) from error
    # That parser reads the number before the two-letter unit.
    number = float(max_shard_size.strip()[:-2]) if isinstance(max_shard_size, str) else max_shard_size
    if number <= 0:
        raise ConversionError([f"--max-shard-size {max_shard_size!r} must be larger than zero, e.g. 5GB"])


def partial_folders(output: Path) -> list[Path]:
    """The hidden folders that conversions to `output` write into (`write_hub_folder`)."""
    return sorted(path for path in output.parent.glob(f".{output.name}.partial-*") if path.is_dir())


def remove_stale_partials(output: Path) -> None:
    """A conversion killed without a chance to clean up (SIGKILL, power loss) leaves its hidden folder behind."""
    for path in partial_folders(output):
        logger.warning(f"removing {path}, the unfinished output of an earlier conversion that was killed")
        shutil.rmtree(path)


def make_partial_folder(output: Path) -> Path:
    """The hidden sibling folder the output is written into; creating it first also proves, before any heavy
    work, that the output's folder can be written."""
    partial = output.parent / f".{output.name}.partial-{uuid.uuid4().hex[:12]}"
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        partial.mkdir()
    except OSError as error:
        raise ConversionError([f"cannot write next to the output {output}: {type(error).__name__}: {error}; choose "
                               "an --output in a folder you can write"]) from error
    return partial


def write_hub_folder(partial: Path, output: Path, model, processor, max_shard_size: str, card: dict) -> Path:
    """Model (sharded safetensors, config, remote code), processor with tokenizer, and model card, written to the
    `partial` folder that is renamed to `output` once complete. `card` holds `write_model_card` arguments."""
    model.save_pretrained(partial, max_shard_size=max_shard_size)
    processor.save_pretrained(partial)
    write_model_card(partial, model.config, model_name=output.name, **card)
    check_output_free(output)
    if output.exists():
        output.rmdir()  # empty, checked just above
    partial.rename(output)
    return output


def card_arguments(run: dict, dtype: str, released: bool, repo_id: str | None, output: Path) -> dict:
    """What the model card says: where the weights come from and, for the released configuration only, the
    paper's results (not re-measured after conversion)."""
    card = dict(
        repo_id=repo_id or output.as_posix(),
        description=(
            f"ML-Mamba `{run.get('model_id', 'mlmamba+3b')}`, converted from the released checkpoint "
            f"[{ORIGINAL_REPO}](https://huggingface.co/{ORIGINAL_REPO}) and timm's DINOv2-with-registers and SigLIP "
            f"weights by this package's `conversion/convert_original_mlmamba.py`; weights saved in {dtype}."
        ),
    )
    if released:
        card.update(
            base_model=ORIGINAL_REPO, eval_results=PAPER_RESULTS,
            eval_source="reported for the released model in the paper (arXiv 2407.19832, Table 2), not re-measured "
            "after conversion",
        )
    return card


def push_folder(folder: Path, repo_id: str) -> None:
    """Upload a finished output folder to the Hub (creating the model repo if needed)."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message="Convert the released ML-Mamba weights")


def convert(
    checkpoint,
    run_config,
    dino: str,
    siglip: str,
    tokenizer: str,
    output,
    dtype: str = "float32",
    dino_config: dict | None = None,
    siglip_config: dict | None = None,
    text_config: dict | None = None,
    connector_config: dict | None = None,
    max_shard_size: str | int = "5GB",
    push_to_hub: str | None = None,
) -> Path:
    """Convert the released checkpoint, its vision towers and tokenizer into a complete Hub folder at `output`.

    The image placeholder `<image>` gets the tokenizer's id for it, or the first free id (50277 when released),
    unless `connector_config` sets `image_token_id`. The output, dtype and shard size are checked before any
    input is read. Raises `ConversionError` (listing every problem; nothing written) or, with `push_to_hub`,
    `UploadError` when the folder was written but the upload failed.
    """
    output = Path(output)
    check_output_free(output)
    if dtype not in DTYPES:
        raise ConversionError([f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}"])
    check_max_shard_size(max_shard_size)
    remove_stale_partials(output)
    partial = make_partial_folder(output)
    try:
        released = not any((dino_config, siglip_config, text_config, connector_config))
        run = read_run_config(run_config)
        text_tokenizer = load_tokenizer(tokenizer)
        connector_config = {"image_token_id": image_token_id_for(text_tokenizer), **(connector_config or {})}
        config = build_config(run, dino_config, siglip_config, text_config, connector_config)
        processor = build_processor(config, text_tokenizer, run.get("llm_max_length"))
        converted = map_all(
            config,
            load_original_checkpoint(checkpoint),
            load_timm_state_dict(dino, "DINOv2"),
            load_timm_state_dict(siglip, "SigLIP"),
        )
        model = load_validated_model(config, converted, DTYPES[dtype])
        card = card_arguments(run, dtype, released, push_to_hub, output)
        write_hub_folder(partial, output, model, processor, max_shard_size, card)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if push_to_hub:
        try:
            push_folder(output, push_to_hub)
        except Exception as error:
            raise UploadError(
                f"wrote {output}, but uploading it to {push_to_hub} failed: {type(error).__name__}: {error}; upload "
                f"the folder again with `hf upload {push_to_hub} {output}`"
            ) from error
    return output
