"""Train ML-Mamba with transformers' `Trainer` on LLaVA-format conversations, in any of the paper's stages.

Every `TrainingArguments` flag works (`--bf16`, `--gradient_checkpointing`, `--resume_from_checkpoint`, ...), and
so does `accelerate launch`. Every sample is checked at start-up (`--skip_bad_samples` leaves bad ones out instead
of stopping). The output folder is a Hub-ready model (safetensors, processor, model card), written all-or-nothing;
the logic lives in `modeling_mlmamba.training_run`.

Finetune a converted checkpoint on LLaVA-v1.5 instructions (the released recipe's second stage):

    python examples/finetune.py --model_name_or_path ml-mamba-hf --stage finetune \\
        --data_file llava_v1_5_mix665k.json --image_folder llava-images --output_dir runs/finetune \\
        --bf16 --gradient_checkpointing --learning_rate 2e-5 --weight_decay 0.1 --warmup_steps 0.03 \\
        --lr_scheduler_type cosine --per_device_train_batch_size 16 --gradient_accumulation_steps 8

Train a new model from a config file and a tokenizer (how the embedded default model was made, see README):

    python examples/finetune.py --config_file examples/configs/shapes-vqa.json \\
        --tokenizer data/shapes/tokenizer --data_file data/shapes/train.json --stage full --output_dir runs/shapes
"""

from pathlib import Path

from transformers import HfArgumentParser, Trainer, TrainingArguments

from modeling_mlmamba import write_model_card
from modeling_mlmamba.training import set_training_stage
from modeling_mlmamba.training_run import DataArguments, ModelArguments, prepare_training, train


def main(argv: list[str] | None = None) -> Trainer:
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    model, processor, dataset, checkpoint = prepare_training(model_args, data_args, training_args)
    set_training_stage(model, model_args.stage)

    def add_model_card(folder: Path) -> None:
        write_model_card(
            folder, model.config, base_model=model_args.model_name_or_path,
            description=f"ML-Mamba trained with `examples/finetune.py` (stage `{model_args.stage}`) on "
                        f"`{Path(data_args.data_file).name}`.",
        )

    return train(model, processor, dataset, training_args, data_args.max_length, checkpoint, add_model_card)


if __name__ == "__main__":
    main()
