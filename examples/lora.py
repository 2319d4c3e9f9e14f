"""LoRA-finetune ML-Mamba with peft and transformers' `Trainer`: low-rank adapters on the language model's Mamba-2
projections, connector and projector trained in full (the setup of `modeling_mlmamba/lora.py`).

Takes the model, data and `TrainingArguments` flags of `examples/finetune.py` (with the same start-up checks and
resume checks) plus the LoRA flags below. The output folder holds the adapter (`adapter_config.json`,
`adapter_model.safetensors`) and the processor; `--merge` also writes a full model with the adapters merged in to
`OUTPUT_DIR/merged`, which loads without peft.

    python examples/lora.py --model_name_or_path ml-mamba-hf --data_file llava_v1_5_mix665k.json \\
        --image_folder llava-images --output_dir runs/lora --lora_rank 16 --lora_alpha 32 --merge \\
        --bf16 --gradient_checkpointing --learning_rate 2e-4 --warmup_steps 0.03 --lr_scheduler_type cosine \\
        --per_device_train_batch_size 16 --gradient_accumulation_steps 8

Load the adapter onto its base model with `PeftModel.from_pretrained(base_model, "runs/lora")`.
"""

from dataclasses import dataclass, field
from pathlib import Path

from peft import get_peft_model
from transformers import HfArgumentParser, Trainer, TrainingArguments

from modeling_mlmamba.lora import lora_config, save_merged_model
from modeling_mlmamba.quantization import QUANTIZATION_FORMATS
from modeling_mlmamba.training_run import DataArguments, ModelArguments, prepare_training, train

# LoRA trains what finetune.py's `finetune` stage trains: connector, projector and (through adapters) the LM.
LORA_STAGE = "finetune"


@dataclass
class LoraArguments:
    lora_rank: int = field(default=16, metadata={"help": "Rank of each adapter."})
    lora_alpha: float = field(default=32, metadata={"help": "Adapter scale: updates are multiplied by alpha / rank."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the adapters' inputs in training."})
    quantization: str | None = field(
        default=None, metadata={"help": "QLoRA: train the adapters on the language model loaded in this format "
                                        "(needs --model_name_or_path); the flag alone means bnb-nf4.",
                                "choices": sorted(QUANTIZATION_FORMATS), "nargs": "?", "const": "bnb-nf4"}
    )
    merge: bool = field(
        default=False, metadata={"help": "Also write the model with the adapters merged in to OUTPUT_DIR/merged."}
    )


def main(argv: list[str] | None = None) -> Trainer:
    parser = HfArgumentParser((ModelArguments, DataArguments, LoraArguments, TrainingArguments))
    model_args, data_args, lora_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    if model_args.stage != LORA_STAGE:
        raise ValueError(
            f"--stage {model_args.stage} does not apply to LoRA, which trains the connector, the projector and "
            "adapters on the language model; drop --stage, or use examples/finetune.py for other stages"
        )
    model, processor, dataset, checkpoint = prepare_training(
        model_args, data_args, training_args, quantization=lora_args.quantization
    )
    model = get_peft_model(model, lora_config(lora_args.lora_rank, lora_args.lora_alpha, lora_args.lora_dropout))

    def add_merged_model(folder: Path) -> None:
        save_merged_model(
            model, processor, folder / "merged", base_model=model_args.model_name_or_path,
            description=f"ML-Mamba with a rank-{lora_args.lora_rank} LoRA trained with `examples/lora.py` on "
                        f"`{Path(data_args.data_file).name}`, merged into the weights.",
        )

    return train(model, processor, dataset, training_args, data_args.max_length, checkpoint,
                 add_merged_model if lora_args.merge else None)


if __name__ == "__main__":
    main()
