"""Check the accelerate configs of `examples/accelerate/` end to end: DDP and FSDP training of a small model follow
the one-GPU run step by step, FSDP checkpoints resume onto the same loss curve, the final folders load on one device
with the trained model's logits, and LoRA trains under both configs.

Every run is `examples/finetune.py` or `examples/lora.py`, launched as a user would (`python` or
`accelerate launch --config_file examples/accelerate/{ddp,fsdp}.yaml`), on shapes-vqa data with the
`examples/configs/shapes-vqa.json` model (randomly initialised; `--config_file` for another), the same global batch
everywhere. Prints each comparison as a table row when it is made and rewrites --json after each, so a run cut short
keeps what it did.

    python benchmarks/check_distributed_training.py --json distributed.json          # needs 2 GPUs
    python benchmarks/check_distributed_training.py --cpu --steps 4 --json cpu.json  # same runs on CPU processes
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoTokenizer

from modeling_mlmamba import MLMambaConfig, MLMambaForConditionalGeneration, MLMambaProcessor
from modeling_mlmamba.shapes_vqa import (
    IMAGE_TOKEN_ID, TOKENIZER_VOCAB_SIZE, build_tokenizer, render, sample_scenes, write_dataset,
)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
GLOBAL_BATCH = 16
# bf16 autocast rounds each matmul input to 8 significant bits; runs that split the batch differently reduce in
# another order, so their losses agree to about this much, not bit for bit.
BF16_TOLERANCE = 1e-2


def launcher(config: str | None, workdir: Path, cpu: bool) -> list[str]:
    """`python` for one process, else `accelerate launch` with one of the shipped configs (on CPU: the same config
    with CPU processes and no mixed precision)."""
    if config is None:
        return [sys.executable]
    path = EXAMPLES / "accelerate" / config
    if cpu:
        text = path.read_text().replace("use_cpu: false", "use_cpu: true").replace("mixed_precision: bf16",
                                                                                   'mixed_precision: "no"')
        path = workdir / f"cpu-{config}"
        path.write_text(text)
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(path)]


def run(script: str, launch: list[str], output_dir: Path, inputs: Path, steps: int, cpu: bool, *extra: str) -> list:
    processes = 1 if len(launch) == 1 else 2
    command = [
        *launch, str(EXAMPLES / script), "--model_name_or_path", str(inputs / "model"),
        "--data_file", str(inputs / "data" / "train.json"), "--output_dir", str(output_dir),
        "--per_device_train_batch_size", str(GLOBAL_BATCH // processes), "--max_steps", str(steps),
        "--learning_rate", "1e-3", "--lr_scheduler_type", "constant", "--logging_steps", "1", "--seed", "0",
        "--report_to", "none", "--disable_tqdm", "true", "--dataloader_num_workers", "2",
        *(["--use_cpu"] if cpu else ["--bf16"]), *extra,
    ]
    environment = {"OMP_NUM_THREADS": "2", **os.environ}
    if processes == 1 and not cpu:  # one process seeing two GPUs would make Trainer use DataParallel
        environment["CUDA_VISIBLE_DEVICES"] = "0"
    result = subprocess.run(command, capture_output=True, text=True, env=environment)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-6000:]}")
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return [entry["loss"] for entry in history if "loss" in entry]


def max_relative_difference(losses: list[float], reference: list[float]) -> float:
    if len(losses) != len(reference):
        raise ValueError(f"loss curves of different lengths cannot be compared: {losses} against {reference}")
    return max(abs(a - b) / abs(b) for a, b in zip(losses, reference))


def relative_difference(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


def logits_of(folder: Path, batch: dict) -> torch.Tensor:
    model, loading = MLMambaForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
    if loading["missing_keys"] or loading["unexpected_keys"]:
        raise RuntimeError(f"{folder}: {loading}")
    with torch.no_grad():
        return model.eval()(**batch).logits.float()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cpu", action="store_true", help="run the same launches as CPU processes (gloo)")
    parser.add_argument("--launches", nargs="+", choices=("ddp", "fsdp"), default=["ddp", "fsdp"],
                        help="the accelerate configs whose runs are compared with one process")
    parser.add_argument("--checks", nargs="*", choices=("resume", "lora"), default=["resume", "lora"],
                        help="besides the launches against one process: FSDP resumed from its checkpoint, LoRA under "
                             "each launch")
    parser.add_argument("--config_file", type=Path, default=EXAMPLES / "configs" / "shapes-vqa.json",
                        help="the MLMambaConfig JSON of the model to train; its image_token_id and vocabulary must fit "
                             "the shapes-vqa tokenizer")
    parser.add_argument("--workdir", type=Path, help="folder for the data, model and runs (default: a new temporary "
                                                     "folder, kept for inspection)")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if args.steps < 2 or args.steps % 2:
        parser.error(f"--steps must be even and at least 2 (FSDP checkpoints half-way and resumes from there), "
                     f"got {args.steps}")
    if "resume" in args.checks and "fsdp" not in args.launches:
        parser.error("--checks resume resumes the FSDP run from its sharded checkpoint: add fsdp to --launches")
    config = MLMambaConfig.from_json_file(args.config_file)
    if config.image_token_id != IMAGE_TOKEN_ID or config.text_config.vocab_size < TOKENIZER_VOCAB_SIZE:
        parser.error(f"--config_file {args.config_file} does not fit the shapes-vqa tokenizer: it needs image_token_id "
                     f"{IMAGE_TOKEN_ID} (got {config.image_token_id}) and a vocab_size of at least "
                     f"{TOKENIZER_VOCAB_SIZE} (got {config.text_config.vocab_size})")

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="distributed-check-"))
    inputs = workdir / "inputs"
    write_dataset(inputs / "data", num_images=GLOBAL_BATCH * args.steps, seed=0, workers=4)
    tokenizer_folder = inputs / "tokenizer"
    build_tokenizer().save_pretrained(tokenizer_folder)
    torch.manual_seed(0)
    MLMambaForConditionalGeneration(config).save_pretrained(inputs / "model")
    MLMambaProcessor.from_model_config(config, AutoTokenizer.from_pretrained(tokenizer_folder)).save_pretrained(
        inputs / "model"
    )

    half = args.steps // 2
    results = {"steps": args.steps, "global_batch": GLOBAL_BATCH, "cpu": args.cpu, "tolerance": BF16_TOLERANCE,
               "losses": {}, "differences": {}}

    def record(name: str, difference: float) -> None:
        """Keep one compared quantity and rewrite the JSON, so a run stopped part-way still leaves its numbers."""
        results["differences"][name] = difference
        results["passed"] = all(value <= BF16_TOLERANCE for value in results["differences"].values())
        print(f"| {name} | {difference:.2e} |", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))

    def train(name: str, script: str, config_name: str | None, *extra: str) -> list[float]:
        losses = run(script, launcher(config_name, workdir, args.cpu), workdir / name, inputs, args.steps, args.cpu,
                     *extra)
        results["losses"][name] = losses
        return losses

    print("| compared (max relative difference) | value |\n|---|---|", flush=True)
    one = train("one", "finetune.py", None, "--stage", "finetune", "--save_strategy", "no")
    for name in args.launches:
        losses = train(name, "finetune.py", f"{name}.yaml", "--stage", "finetune", "--save_strategy", "steps",
                       "--save_steps", str(half))
        record(f"{name.upper()} losses vs 1 GPU, {args.steps} steps", max_relative_difference(losses, one))

    scene = sample_scenes(1, seed=7, split="test")[0]
    processor = MLMambaProcessor.from_pretrained(inputs / "model")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many objects?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    batch = dict(processor(images=[render(scene)], text=prompt, return_tensors="pt"))
    reference = logits_of(workdir / "one", batch)
    results["final_logits_change_from_start"] = relative_difference(reference, logits_of(inputs / "model", batch))
    for name in args.launches:
        record(f"{name.upper()} final folder logits vs 1 GPU", relative_difference(logits_of(workdir / name, batch),
                                                                                   reference))

    if "resume" in args.checks:
        resumed = train("fsdp-resumed", "finetune.py", "fsdp.yaml", "--stage", "finetune", "--save_strategy", "no",
                        "--resume_from_checkpoint", str(workdir / "fsdp" / f"checkpoint-{half}"))
        record(f"FSDP resumed at step {half} vs uninterrupted",
               max_relative_difference(resumed[half:], results["losses"]["fsdp"][half:]))
    if "lora" in args.checks:
        lora = ["--lora_rank", "8", "--lora_dropout", "0", "--save_strategy", "no"]
        lora_one = train("lora-one", "lora.py", None, *lora)
        for name in args.launches:
            record(f"LoRA {name.upper()} losses vs 1 GPU", max_relative_difference(
                train(f"lora-{name}", "lora.py", f"{name}.yaml", *lora), lora_one
            ))
    print(f"passed: {results['passed']} (tolerance {BF16_TOLERANCE}; training moved the logits by "
          f"{results['final_logits_change_from_start']:.2f})")
    return results


if __name__ == "__main__":
    main()
