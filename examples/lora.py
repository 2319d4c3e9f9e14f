"""LoRA-finetune ML-Mamba with peft and transformers' `Trainer`: low-rank adapters on the language model's Mamba-2
projections, connector and projector trained in full (the setup of `modeling_mlmamba/lora.py`).

Takes the model, data and `TrainingArguments` flags of `examples/finetune.py` plus the LoRA flags below. The output
folder holds the adapter (`adapter_config.json`, `adapter_model.safetensors`) and the processor; `--merge` also
writes a full model with the adapters merged in to `OUTPUT_DIR/merged`, which loads without peft.

    python examples/lora.py --model_name_or_path ml-mamba-hf --data_file llava_v1_5_mix665k.json \\
        --image_folder llava-images --output_dir runs/lora --lora_rank 16 --lora_alpha 32 --merge \\
        --bf16 --gradient_checkpointing --learning_rate 2e-4 --warmup_steps 0.03 --lr_scheduler_type cosine \\
        --per_device_train_batch_size 16 --gradient_accumulation_steps 8

Load the adapter onto its base model with `PeftModel.from_pretrained(base_model, "runs/lora")`.
"""

from dataclasses import dataclass, field
from pathlib import Path

from peft import get_peft_model
from transformers import HfArgumentParser, Trainer, TrainingArguments, set_seed

from modeling_mlmamba import write_model_card
from modeling_mlmamba.lora import lora_config, qlora_model_and_processor
from modeling_mlmamba.quantization import QUANTIZATION_FORMATS
from modeling_mlmamba.training import LlavaConversationDataset

# examples/ is not a package: run as a script (python, accelerate launch, torchrun), this folder is on sys.path.
from finetune import DataArguments, ModelArguments, build_model_and_processor, train

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


def save_merged(peft_model, processor, folder: Path, base_model: str | None, description: str):
    """Fold the adapters into the projections and save a plain ML-Mamba folder (loads without peft); returns the
    merged model. `peft_model` is left without adapters."""
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(folder)
    processor.save_pretrained(folder)
    write_model_card(folder, merged.config, base_model=base_model, description=description)
    return merged


def main(argv: list[str] | None = None) -> Trainer:
    parser = HfArgumentParser((ModelArguments, DataArguments, LoraArguments, TrainingArguments))
    model_args, data_args, lora_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    if model_args.stage != LORA_STAGE:
        raise ValueError(
            f"--stage {model_args.stage} does not apply to LoRA, which trains the connector, the projector and "
            "adapters on the language model; drop --stage, or use examples/finetune.py for other stages"
        )
    set_seed(training_args.seed)

    dataset = LlavaConversationDataset(data_args.data_file, data_args.image_folder)
    if lora_args.quantization is None:
        model, processor = build_model_and_processor(model_args)
    else:
        model, processor = qlora_model_and_processor(model_args.model_name_or_path, lora_args.quantization)
    model = get_peft_model(model, lora_config(lora_args.lora_rank, lora_args.lora_alpha, lora_args.lora_dropout))
    trainer = train(model, processor, dataset, training_args, data_args.max_length,
                    checkpoint=training_args.resume_from_checkpoint)
    if trainer.is_world_process_zero() and lora_args.merge:
        save_merged(
            model, processor, Path(training_args.output_dir) / "merged", base_model=model_args.model_name_or_path,
            description=f"ML-Mamba with a rank-{lora_args.lora_rank} LoRA trained with `examples/lora.py` on "
                        f"`{Path(data_args.data_file).name}`, merged into the weights.",
        )
    return trainer


if __name__ == "__main__":
    main()
