"""Train ML-Mamba with transformers' `Trainer` on LLaVA-format conversations, in any of the paper's stages.

Every `TrainingArguments` flag works (`--bf16`, `--gradient_checkpointing`, `--resume_from_checkpoint`, ...), and
so does `accelerate launch`. The output folder is a Hub-ready model (safetensors, processor, model card).

Finetune a converted checkpoint on LLaVA-v1.5 instructions (the released recipe's second stage):

    python examples/finetune.py --model_name_or_path ml-mamba-hf --stage finetune \\
        --data_file llava_v1_5_mix665k.json --image_folder llava-images --output_dir runs/finetune \\
        --bf16 --gradient_checkpointing --learning_rate 2e-5 --weight_decay 0.1 --warmup_steps 0.03 \\
        --lr_scheduler_type cosine --per_device_train_batch_size 16 --gradient_accumulation_steps 8

Train a new model from a config file and a tokenizer (how the embedded default model was made, see README):

    python examples/finetune.py --config_file examples/configs/shapes-vqa.json \\
        --tokenizer data/shapes/tokenizer --data_file data/shapes/train.json --stage full --output_dir runs/shapes
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

from transformers import AutoProcessor, AutoTokenizer, HfArgumentParser, Trainer, TrainingArguments, set_seed
from transformers.trainer_utils import get_last_checkpoint

from modeling_mlmamba import MLMambaConfig, MLMambaForConditionalGeneration, MLMambaProcessor, write_model_card
from modeling_mlmamba.training import TRAINING_STAGES, LlavaConversationDataset, MLMambaDataCollator, set_training_stage

# Config fields that may differ between a checkpoint and the model resuming from it.
RESUMABLE_DIFFERENCES = {
    "_name_or_path", "transformers_version", "architectures", "auto_map", "dtype", "torch_dtype", "use_cuda_graphs",
}


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A saved or converted ML-Mamba folder or Hub id to start from."}
    )
    config_file: str | None = field(
        default=None, metadata={"help": "Instead: an MLMambaConfig JSON for a new, randomly initialised model."}
    )
    config_overrides: str | None = field(
        default=None, metadata={"help": 'With --config_file: a JSON object of config fields, e.g. {"connector_type": "mlp"}.'}
    )
    tokenizer: str | None = field(default=None, metadata={"help": "With --config_file: the tokenizer folder or Hub id."})
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


def build_model_and_processor(args: ModelArguments):
    """A pretrained model and its processor, or a new model from a config file and a tokenizer."""
    if (args.model_name_or_path is None) == (args.config_file is None):
        raise ValueError("pass exactly one of --model_name_or_path and --config_file")
    if args.model_name_or_path is not None:
        if args.config_overrides or args.tokenizer:
            raise ValueError("--config_overrides and --tokenizer go with --config_file, not --model_name_or_path")
        model = MLMambaForConditionalGeneration.from_pretrained(args.model_name_or_path)
        return model, AutoProcessor.from_pretrained(args.model_name_or_path)
    if args.tokenizer is None:
        raise ValueError("--config_file needs --tokenizer: a new model still needs its tokenizer")
    config = MLMambaConfig.from_json_file(args.config_file)
    if args.config_overrides:
        config = MLMambaConfig.from_dict({**config.to_dict(), **json.loads(args.config_overrides)})
    processor = MLMambaProcessor.from_model_config(config, AutoTokenizer.from_pretrained(args.tokenizer))
    return MLMambaForConditionalGeneration(config), processor


def resume_checkpoint(training_args: TrainingArguments) -> str | None:
    """The checkpoint to resume from (`--resume_from_checkpoint PATH`, or `True` for the output folder's last)."""
    resume = training_args.resume_from_checkpoint
    if resume in (None, False, "False", "false"):
        return None
    if resume in (True, "True", "true"):
        checkpoint = get_last_checkpoint(training_args.output_dir) if Path(training_args.output_dir).is_dir() else None
        if checkpoint is None:
            raise FileNotFoundError(f"--resume_from_checkpoint: no checkpoint-* folder in {training_args.output_dir}")
        return checkpoint
    if not (Path(resume) / "config.json").is_file():
        raise FileNotFoundError(f"--resume_from_checkpoint: {resume} is not a checkpoint folder (no config.json)")
    return resume


def check_same_config(checkpoint: str, config: MLMambaConfig) -> None:
    """Refuse to resume from a checkpoint of another model, before any training step."""
    saved, current = MLMambaConfig.from_pretrained(checkpoint).to_dict(), config.to_dict()
    differing = sorted(
        key for key in (set(saved) | set(current)) - RESUMABLE_DIFFERENCES if saved.get(key) != current.get(key)
    )
    if differing:
        raise ValueError(
            f"cannot resume from {checkpoint}: it was trained with another config (fields {differing} differ); "
            "start from the same --model_name_or_path / --config_file, or drop --resume_from_checkpoint"
        )


def train(model, processor, dataset, training_args: TrainingArguments, max_length: int | None, checkpoint=None):
    """Run `Trainer` and write the final model (one full state dict, also under FSDP), its processor, the metrics
    and the trainer state to `training_args.output_dir`; returns the trainer."""
    # Samples are raw conversations and images that the collator turns into tensors: keep every field.
    training_args.remove_unused_columns = False
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        data_collator=MLMambaDataCollator(processor, max_length),
        processing_class=processor,
    )
    result = trainer.train(resume_from_checkpoint=checkpoint)
    if trainer.is_fsdp_enabled:
        # Checkpoints stay sharded while training; the final folder gets one full, Hub-ready state dict.
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model()
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    trainer.save_state()
    if trainer.is_world_process_zero():
        processor.save_pretrained(training_args.output_dir)
    return trainer


def main(argv: list[str] | None = None) -> Trainer:
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    set_seed(training_args.seed)

    dataset = LlavaConversationDataset(data_args.data_file, data_args.image_folder)
    model, processor = build_model_and_processor(model_args)
    checkpoint = resume_checkpoint(training_args)
    if checkpoint is not None:
        check_same_config(checkpoint, model.config)
    set_training_stage(model, model_args.stage)

    trainer = train(model, processor, dataset, training_args, data_args.max_length, checkpoint)
    if trainer.is_world_process_zero():
        write_model_card(
            training_args.output_dir, model.config, base_model=model_args.model_name_or_path,
            description=f"ML-Mamba trained with `examples/finetune.py` (stage `{model_args.stage}`) on "
                        f"`{Path(data_args.data_file).name}`.",
        )
    return trainer


if __name__ == "__main__":
    main()
