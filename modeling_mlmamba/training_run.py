"""One `transformers.Trainer` run of ML-Mamba from command-line arguments: what `examples/finetune.py` and
`examples/lora.py` share, so that both scripts only parse arguments and call these functions.

`prepare_training` does every start-up check before heavy work (arguments, output folder, checkpoint to resume
from, config, data) and builds the model, processor and dataset; `train` checks the checkpoint against the model
(a plain or a peft model), runs `Trainer` and writes the final folder all-or-nothing.

Kept apart from `training.py`, which holds the data path and the training stages for any training loop: this module
is the glue around `Trainer` and the command line (argument dataclasses, model construction, checkpoint checks,
the output folder).
"""

import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model_state_dict
from safetensors import safe_open
from transformers import AutoTokenizer, PretrainedConfig, Trainer, TrainingArguments, set_seed
from transformers.trainer_utils import get_last_checkpoint

from . import register_auto_classes
from .configuration_mlmamba import MLMambaConfig
from .lora import qlora_model_and_processor
from .modeling_mlmamba import MLMambaForConditionalGeneration
from .processing_mlmamba import MLMambaProcessor
from .training import TRAINING_STAGES, LlavaConversationDataset, MLMambaDataCollator

logger = logging.getLogger(__name__)

# Config fields that do not change what a model's weights compute: token ids that save/load fills in or drops
# differently across transformers versions, the initialisation, and runtime switches.
NOT_ARCHITECTURE = {
    "pad_token_id", "bos_token_id", "eos_token_id", "initializer_range", "use_cache", "use_cuda_graphs",
}
# The LoRA settings that decide an adapter's weights.
LORA_ARCHITECTURE = ("peft_type", "r", "lora_alpha", "target_modules", "modules_to_save", "use_rslora", "use_dora")
# Weight files that `save_pretrained` names (whole, sharded, index; full model or adapter).
WEIGHT_FILE = re.compile(r"(model|adapter_model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?")
REPORTED_DIFFERENCES = 8


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A saved or converted ML-Mamba folder or Hub id to start from."}
    )
    config_file: str | None = field(
        default=None, metadata={"help": "Instead: an MLMambaConfig JSON for a new, randomly initialised model."}
    )
    config_overrides: str | None = field(
        default=None, metadata={"help": 'With --config_file: a JSON object of config fields merged into the file\'s, '
                                        'e.g. {"connector_type": "mlp"} or {"text_config": {"num_hidden_layers": 4}}.'}
    )
    tokenizer: str | None = field(
        default=None, metadata={"help": "With --config_file: the tokenizer folder or Hub id."}
    )
    stage: str = field(
        default="finetune", metadata={"help": "What trains: align (connector + projector), finetune (+ LM), full "
                                              "(+ vision towers).", "choices": sorted(TRAINING_STAGES)}
    )


@dataclass
class DataArguments:
    data_file: str = field(metadata={"help": "LLaVA-format JSON: a list of {image, conversations}."})
    image_folder: str | None = field(default=None, metadata={"help": "Folder the image paths are relative to "
                                                                      "(default: the JSON's folder)."})
    max_length: int | None = field(default=None, metadata={"help": "Cut longer samples (default: the tokenizer's "
                                                                    "model_max_length)."})
    skip_bad_samples: bool = field(
        default=False, metadata={"help": "Leave out samples that cannot be trained on (bad turns or text, missing, "
                                         "corrupt or oversized images) and log them, instead of stopping."}
    )

    def __post_init__(self):
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(f"--max_length must be a positive number of tokens, got {self.max_length}")


def prepare_training(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments,
                     quantization: str | None = None):
    """Every start-up check, cheapest first, then the model, its processor and the dataset; returns (model,
    processor, dataset, checkpoint to resume from or None). Nothing is written to the output folder.

    `quantization` (a format of `quantization.QUANTIZATION_FORMATS`) loads the pretrained model with its language
    model quantized and prepared for adapter training (QLoRA)."""
    check_output_dir(training_args)
    checkpoint = resume_checkpoint(training_args)
    set_seed(training_args.seed)
    model, processor = build_model_and_processor(model_args, quantization)
    dataset = LlavaConversationDataset(data_args.data_file, data_args.image_folder, data_args.skip_bad_samples)
    return model, processor, dataset, checkpoint


def build_model_and_processor(args: ModelArguments, quantization: str | None = None):
    """A pretrained model and its processor, or a new model from a config file (with `--config_overrides`
    merged in) and a tokenizer. The config is checked before any weight is loaded or initialised.

    ML-Mamba is registered with transformers' Auto classes first, as importing this module alone does not do it: a
    saved processor names its parts through them, and the saved outputs carry the model code only when registered."""
    register_auto_classes()
    if (args.model_name_or_path is None) == (args.config_file is None):
        raise ValueError("pass exactly one of --model_name_or_path and --config_file")
    if quantization is not None and args.model_name_or_path is None:
        raise ValueError(f"--quantization {quantization} trains adapters on a pretrained model: pass "
                         "--model_name_or_path instead of --config_file")
    if args.model_name_or_path is not None:
        if args.config_overrides or args.tokenizer:
            raise ValueError("--config_overrides and --tokenizer go with --config_file, not --model_name_or_path")
        if quantization is not None:
            return qlora_model_and_processor(args.model_name_or_path, quantization)
        model = MLMambaForConditionalGeneration.from_pretrained(args.model_name_or_path)
        return model, MLMambaProcessor.from_pretrained(args.model_name_or_path)
    if args.tokenizer is None:
        raise ValueError("--config_file needs --tokenizer: a new model still needs its tokenizer")
    config = MLMambaConfig.from_json_file(args.config_file)
    if args.config_overrides:
        try:
            overrides = json.loads(args.config_overrides)
        except json.JSONDecodeError as error:
            raise ValueError(f"--config_overrides {args.config_overrides!r} is not valid JSON: {error}") from error
        config = apply_config_overrides(config, overrides)
    processor = MLMambaProcessor.from_model_config(config, AutoTokenizer.from_pretrained(args.tokenizer))
    return MLMambaForConditionalGeneration(config), processor


def apply_config_overrides(config: MLMambaConfig, overrides: dict) -> MLMambaConfig:
    """`config` with `overrides` merged in field by field: `{"text_config": {"num_hidden_layers": 4}}` changes that
    one field of the loaded text config and keeps its others (they are not reset to the released defaults). An
    unknown key raises with the valid ones."""
    merged = config.to_dict()
    _merge_overrides(merged, overrides, MLMambaConfig.sub_configs, "")
    return MLMambaConfig.from_dict(merged)


def _merge_overrides(fields: dict, overrides, sub_configs, prefix: str) -> None:
    where = f" of {prefix.rstrip('.')}" if prefix else ""
    if not isinstance(overrides, dict):
        raise ValueError(f"--config_overrides: {prefix.rstrip('.') or 'the overrides'} must be a JSON object of "
                         f"config fields, got {overrides!r}")
    for key, value in overrides.items():
        if key not in fields:
            raise ValueError(f"--config_overrides: unknown key {prefix + key!r}; the valid keys{where} are "
                             f"{sorted(fields)}")
        if key in sub_configs:
            _merge_overrides(fields[key], value, (), f"{prefix}{key}.")
        else:
            fields[key] = value


def check_output_dir(training_args: TrainingArguments) -> None:
    """Refuse an output folder the final save cannot own. `--push_to_hub` would upload the folder from inside
    `Trainer` while it is still being written, and replace its model card."""
    if training_args.push_to_hub:
        raise ValueError(
            "--push_to_hub uploads the output folder before its final contents are in place; drop it and upload the "
            "finished folder with `hf upload REPO_ID OUTPUT_DIR`"
        )
    output = Path(training_args.output_dir)
    if output.exists() and not output.is_dir():
        raise FileExistsError(f"--output_dir {output} is a file; pass a folder path")


def resume_checkpoint(training_args: TrainingArguments) -> str | None:
    """The checkpoint folder to resume from: `--resume_from_checkpoint PATH`, or `True` for the output folder's
    last `checkpoint-*`; None when not resuming. `train` checks it against the model."""
    resume = training_args.resume_from_checkpoint
    if resume in (None, False, "", "False", "false"):
        return None
    if resume in (True, "True", "true"):
        output = Path(training_args.output_dir)
        checkpoint = get_last_checkpoint(output) if output.is_dir() else None
        if checkpoint is None:
            raise FileNotFoundError(f"--resume_from_checkpoint True: no checkpoint-* folder in {output}; pass the "
                                    "--output_dir of the run to resume, or a checkpoint folder")
        return checkpoint
    if not Path(resume).is_dir():
        raise FileNotFoundError(f"--resume_from_checkpoint {resume}: no such folder; pass a checkpoint-* folder of an "
                                "earlier run, or True for the last one in --output_dir")
    return str(resume)


def check_same_config(checkpoint: str | Path, model) -> None:
    """Refuse to resume from a checkpoint of another model, before any training step.

    Compared is what the weights compute: for a model, the architecture fields of the config and its sub-configs
    (`config_architecture`) and every weight's shape; for a peft model, the LoRA settings and the adapter's weight
    shapes. Not compared: token ids such as `eos_token_id` and `pad_token_id`, which save/load normalises
    differently across transformers versions, initialisation and runtime switches, provenance fields.
    """
    checkpoint = Path(checkpoint)
    if isinstance(model, PeftModel):
        differences = _adapter_differences(checkpoint, model)
    else:
        differences = _model_differences(checkpoint, model.config)
    if differences:
        listed = "; ".join(differences[:REPORTED_DIFFERENCES])
        unlisted = len(differences) - REPORTED_DIFFERENCES
        more = f"; and {unlisted} more" if unlisted > 0 else ""
        raise ValueError(
            f"cannot resume from {checkpoint}: it holds another model ({listed}{more}); start from the same "
            "--model_name_or_path / --config_file (and LoRA flags) as the run that wrote it, or drop "
            "--resume_from_checkpoint"
        )


def config_architecture(config: PretrainedConfig) -> dict:
    """The fields that decide what a model computes, by dotted name: the model type and the declared fields of the
    config and of each sub-config, except `NOT_ARCHITECTURE` and private ones."""
    declared = [name for klass in type(config).__mro__[: type(config).__mro__.index(PretrainedConfig)]
                for name in vars(klass).get("__annotations__", {})]
    fields = {"model_type": config.model_type}
    for name in declared:
        if name.startswith("_") or name in NOT_ARCHITECTURE:
            continue
        if name in config.sub_configs:
            fields |= {f"{name}.{key}": value for key, value in config_architecture(getattr(config, name)).items()}
        else:
            fields[name] = _comparable(getattr(config, name, None))
    return fields


def _comparable(value):
    """JSON round trips turn tuples into lists and peft keeps target modules as sets: compare them as lists."""
    if isinstance(value, (tuple, list)):
        return [_comparable(item) for item in value]
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    return value


def _model_differences(checkpoint: Path, config: MLMambaConfig) -> list[str]:
    if not (checkpoint / "config.json").is_file():
        adapter = (checkpoint / "adapter_config.json").is_file()
        hint = " (it holds a LoRA adapter: resume it with examples/lora.py)" if adapter else ""
        raise FileNotFoundError(f"--resume_from_checkpoint {checkpoint} has no config.json, so it is not a checkpoint "
                                f"of an ML-Mamba model{hint}; pass a checkpoint-* folder of a run of this script")
    saved = MLMambaConfig.from_pretrained(checkpoint)
    differences = _field_differences(config_architecture(saved), config_architecture(config))
    # Equal fields give equal shapes wherever a config declares its fields; the shapes also cover one that does not.
    return differences or _shape_differences(_weight_shapes(saved), _weight_shapes(config))


def _adapter_differences(checkpoint: Path, model: PeftModel) -> list[str]:
    if not (checkpoint / "adapter_config.json").is_file():
        raise FileNotFoundError(f"--resume_from_checkpoint {checkpoint} has no adapter_config.json, so it is not a "
                                "LoRA checkpoint; pass a checkpoint-* folder of a run of examples/lora.py")
    saved, current = LoraConfig.from_pretrained(checkpoint), model.peft_config[model.active_adapter]
    differences = _field_differences(
        {name: _comparable(getattr(saved, name)) for name in LORA_ARCHITECTURE},
        {name: _comparable(getattr(current, name)) for name in LORA_ARCHITECTURE},
    )
    weights = checkpoint / "adapter_model.safetensors"
    if weights.is_file():
        with safe_open(weights, framework="pt") as file:
            saved_shapes = {name: tuple(file.get_slice(name).get_shape()) for name in file.keys()}
        current_shapes = {name: tuple(value.shape) for name, value in get_peft_model_state_dict(model).items()}
        differences += _shape_differences(saved_shapes, current_shapes)
    return differences


def _weight_shapes(config: MLMambaConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's and buffer's shape, from a model built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        model = MLMambaForConditionalGeneration(config)
    return {name: tuple(value.shape) for name, value in model.state_dict().items()}


def _field_differences(saved: dict, current: dict) -> list[str]:
    return [f"{name}: {saved.get(name)!r} in the checkpoint, {current.get(name)!r} now"
            for name in sorted(saved.keys() | current.keys()) if saved.get(name) != current.get(name)]


def _shape_differences(saved: dict, current: dict) -> list[str]:
    differences = []
    for name in sorted(saved.keys() | current.keys()):
        if name not in saved:
            differences.append(f"weight {name}: not in the checkpoint")
        elif name not in current:
            differences.append(f"weight {name}: only in the checkpoint")
        elif saved[name] != current[name]:
            differences.append(f"weight {name}: shape {saved[name]} in the checkpoint, {current[name]} now")
    return differences


def train(
    model, processor, dataset, training_args: TrainingArguments, max_length: int | None = None,
    checkpoint: str | None = None, add_files: Callable[[Path], None] | None = None,
) -> Trainer:
    """Check `checkpoint` against `model`, run `Trainer`, and write the final folder: the model (one full state
    dict, also under FSDP), its processor, the metrics, the trainer state and whatever `add_files(folder)` adds
    (called on the main process: a model card, a merged model). Returns the trainer.

    All or nothing: the final folder is written into a sibling `OUTPUT_DIR.incomplete` and moved into
    `training_args.output_dir` only once complete. If anything fails, an output folder that did not exist before
    and holds no checkpoint is removed again; one that existed keeps its earlier contents.
    """
    check_output_dir(training_args)
    if checkpoint is not None:
        check_same_config(checkpoint, model)
    collator = MLMambaDataCollator(processor, max_length)
    # Samples are raw conversations and images that the collator turns into tensors: keep every field.
    training_args.remove_unused_columns = False
    output = Path(os.path.abspath(training_args.output_dir))
    output_existed = output.exists()
    try:
        trainer = Trainer(
            model=model, args=training_args, train_dataset=dataset, data_collator=collator, processing_class=processor,
        )
        result = trainer.train(resume_from_checkpoint=checkpoint)
        save_final_output(trainer, result.metrics, add_files)
    except BaseException:
        if not output_existed and training_args.should_save and output.is_dir() and get_last_checkpoint(output) is None:
            shutil.rmtree(output)
        raise
    return trainer


def save_final_output(trainer: Trainer, metrics: dict, add_files: Callable[[Path], None] | None = None) -> Path:
    """Write the trained model, processor, metrics and trainer state (and `add_files(folder)`'s files) into
    `OUTPUT_DIR.incomplete`, then move them into `trainer.args.output_dir`; returns the output folder. The
    incomplete folder is removed if anything fails, so the output folder never holds a partial final save."""
    output = Path(os.path.abspath(trainer.args.output_dir))
    staging = output.with_name(f"{output.name}.incomplete")
    main_process = trainer.is_world_process_zero()
    if main_process and staging.exists():
        shutil.rmtree(staging)  # left by a final save that was killed
    trainer.accelerator.wait_for_everyone()
    try:
        if trainer.is_fsdp_enabled:
            # Checkpoints stay sharded while training; the final folder gets one full, Hub-ready state dict.
            trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
        trainer.save_model(str(staging))  # also the processor (the trainer's processing_class)
        if main_process:
            trainer.log_metrics("train", metrics)
            for name in ("train_results.json", "all_results.json"):  # what `Trainer.save_metrics` writes
                (staging / name).write_text(json.dumps(metrics, indent=4, sort_keys=True))
            trainer.state.save_to_json(str(staging / "trainer_state.json"))
            if add_files is not None:
                add_files(staging)
            _move_into_place(staging, output)
    except BaseException:
        if main_process:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    trainer.accelerator.wait_for_everyone()
    return output


def _move_into_place(staging: Path, output: Path) -> None:
    """One rename when `output` does not exist yet. Otherwise entry by entry, so the run's checkpoint folders stay,
    after removing the weight files of an earlier final save that this one does not overwrite (another shard count,
    or a full model where an adapter now goes): a folder never holds the weights of two models."""
    if not output.exists():
        os.replace(staging, output)
        return
    written = {entry.name for entry in staging.iterdir()}
    for stale in output.iterdir():
        if stale.name not in written and stale.is_file() and WEIGHT_FILE.fullmatch(stale.name):
            stale.unlink()
    for entry in staging.iterdir():
        target = output / entry.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(entry, target)
    staging.rmdir()


__all__ = [
    "DataArguments", "ModelArguments", "apply_config_overrides", "build_model_and_processor", "check_output_dir",
    "check_same_config", "config_architecture", "prepare_training", "resume_checkpoint", "save_final_output",
    "train",
]
