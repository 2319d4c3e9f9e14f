"""Training speed and memory of ML-Mamba with transformers' `Trainer`, on one GPU or under `accelerate launch`.

Full `mlmamba+3b` dimensions by default (random weights; DINOv2-L + SigLIP-SO400M frozen, connector, projector and
the 2.7B Mamba-2 LM trainable: the `finetune` stage), bf16, gradient checkpointing, synthetic samples of 729 image
tokens + 1319 text tokens. Times `--steps` optimizer steps after `--warmup` steps and reports samples/s, tokens/s,
peak memory per GPU and model-FLOPs utilisation; it also checks, on every rank, what FSDP must preserve: frozen
parameters get no gradient and no optimizer state, and the LM head stays tied to the embeddings.

    python benchmarks/benchmark_training.py --json one-gpu.json
    accelerate launch --config_file examples/accelerate/ddp.yaml benchmarks/benchmark_training.py --json ddp.json
    accelerate launch --config_file examples/accelerate/fsdp.yaml --fsdp_activation_checkpointing true \\
        benchmarks/benchmark_training.py --json fsdp.json

`--checkpoint_every_n_layers 2` checkpoints every second block only (transformers' `every_n_layers`, which
`TrainingArguments(gradient_checkpointing_kwargs={"every_n_layers": 2})` sets for any Trainer run): memory that full
checkpointing frees and the batch does not need is spent on skipping recomputation.

Under FSDP, activation checkpointing comes from the accelerate config (transformers refuses it together with
`--gradient_checkpointing`), so the script leaves the training argument off there.
"""

import argparse
import json
import os
import platform
import time

import torch
import torch.distributed as dist
import transformers
from torch.utils.data import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments

from modeling_mlmamba import MLMambaConfig, MLMambaForConditionalGeneration
from modeling_mlmamba.training import set_training_stage

H200_BF16_DENSE_TFLOPS = 989.0


class SyntheticSamples(Dataset):
    """Random prompts with one image: `image_seq_length` placeholders first (the released layout), then text, all
    text tokens supervised. The content does not matter for speed, only the shapes do."""

    def __init__(self, config: MLMambaConfig, text_tokens: int, size: int):
        self.config, self.text_tokens, self.size = config, text_tokens, size
        self.image_size = config.dino_config.image_size

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        generator = torch.Generator().manual_seed(index)
        text = torch.randint(1, self.config.image_token_id, (self.text_tokens,), generator=generator)
        image = torch.full((self.config.image_seq_length,), self.config.image_token_id)
        input_ids = torch.cat([image, text])
        labels = torch.cat([torch.full_like(image, -100), text])
        pixels = torch.randn(2, 3, self.image_size, self.image_size, generator=generator)
        return {"input_ids": input_ids, "labels": labels, "attention_mask": torch.ones_like(input_ids),
                "pixel_values": pixels}


def parameter_count(module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def vit_forward_flops(vision_config, parameters: int) -> float:
    """Dense matmuls (2 per weight per token) and attention scores + weighted sums of one image through a ViT."""
    tokens = (vision_config.image_size // vision_config.patch_size) ** 2 + 1 + getattr(
        vision_config, "num_register_tokens", 0
    )
    return 2 * parameters * tokens + 4 * vision_config.num_hidden_layers * tokens**2 * vision_config.hidden_size


def scan_flops(scan, length: int) -> float:
    """Matmul FLOPs of one chunked SSD scan (an LM mixer's, or one connector scan direction's) over `length`
    positions: per head and position 2 Q (N + P) inside its chunk (C B^T and its product with x, full Q x Q blocks,
    as the kernels compute them) and 4 N P for the chunk states in and out, Q the chunk, N the state and P the head
    size."""
    dims, chunk = scan.dims, min(scan.chunk_size, length)
    per_position = 2 * chunk * (dims.state_size + dims.head_dim) + 4 * dims.state_size * dims.head_dim
    return per_position * dims.num_heads * length


def model_flops_per_sample(model, sequence_length: int) -> float:
    """Model FLOPs of one training sample (recomputation by checkpointing not counted, as MFU is defined): frozen
    towers run forward only, the trainable connector, projector and LM forward and backward (3x forward). Dense
    matmuls count 2 per weight per position (the tied head is the embedding matrix), plus the SSD scans."""
    inner = model.model
    config = model.config
    towers = inner.vision_tower
    # The towers' own configs give the blocks they build (up to the feature layer), not the pretrained depth.
    vision = vit_forward_flops(towers.dino.config, parameter_count(towers.dino)) + vit_forward_flops(
        towers.siglip.config, parameter_count(towers.siglip)
    )
    connector = 2 * (parameter_count(inner.connector) + parameter_count(inner.projector)) * config.image_seq_length
    connector += sum(scan_flops(module, config.image_seq_length) for module in inner.connector.modules()
                     if hasattr(module, "chunk_size"))
    language_model = 2 * parameter_count(inner.language_model) * sequence_length
    language_model += sum(scan_flops(module, sequence_length) for module in inner.language_model.modules()
                          if hasattr(module, "chunk_size"))
    return vision + 3 * (connector + language_model)


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class KernelProfile(TrainerCallback):
    """Profiles optimizer steps `first_step + 1 ... last_step` (run after the timed ones) and keeps the table of
    the GPU kernels that took the most time: what stands between the measured MFU and the peak."""

    def __init__(self, first_step: int, last_step: int):
        self.first_step, self.last_step, self.profiler, self.table = first_step, last_step, None, None

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.first_step and self.profiler is None:
            self.profiler = torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            )
            self.profiler.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.last_step and self.profiler is not None:
            synchronize()
            self.profiler.__exit__(None, None, None)
            self.table = self.profiler.key_averages().table(sort_by="self_device_time_total", row_limit=25)


class StepTimer(TrainerCallback):
    """Times the optimizer steps after the warm-up ones (GPU synchronised) and records peak memory and the checks."""

    def __init__(self, warmup: int, steps: int, model):
        self.warmup, self.last_step, self.model = warmup, warmup + steps, model
        self.start, self.elapsed, self.checks = None, None, {}

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.warmup and self.start is None:
            synchronize()
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            self.start = time.perf_counter()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if state.global_step == 0:
            frozen = [p for p in self.model.parameters() if not p.requires_grad]
            self.checks["frozen_parameters_without_grad"] = all(p.grad is None for p in frozen)

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        if state.global_step == 1:
            in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
            state_of = {id(p) for p in optimizer.state}
            frozen = {id(p) for p in self.model.parameters() if not p.requires_grad}
            self.checks["frozen_parameters_without_optimizer_state"] = not (frozen & (in_optimizer | state_of))
            self.checks["lm_head_tied_to_embeddings"] = (
                self.model.lm_head.weight is self.model.get_input_embeddings().weight
            )
        if state.global_step == self.last_step:
            synchronize()
            self.elapsed = time.perf_counter() - self.start


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config_file", help="an MLMambaConfig JSON (default: the mlmamba+3b dimensions)")
    parser.add_argument("--text_tokens", type=int, default=1319)
    parser.add_argument("--per_device_batch_size", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--stage", default="finetune")
    parser.add_argument("--no_gradient_checkpointing", action="store_true")
    parser.add_argument("--checkpoint_every_n_layers", type=int, default=1,
                        help="transformers' every_n_layers: checkpoint every n-th block, keep the rest's activations")
    parser.add_argument("--peak_tflops", type=float, default=H200_BF16_DENSE_TFLOPS, help="bf16 dense, per GPU")
    parser.add_argument("--profile_steps", type=int, default=0, help="profile this many steps after the timed ones")
    parser.add_argument("--json", help="write the results here (rank 0)")
    args = parser.parse_args(argv)

    config = MLMambaConfig.from_json_file(args.config_file) if args.config_file else MLMambaConfig()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.manual_seed(0)
    with device:  # random init on the GPU: seconds instead of minutes on the CPU
        model = MLMambaForConditionalGeneration(config)
    set_training_stage(model, args.stage)

    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    fsdp_checkpointing = os.environ.get("FSDP_ACTIVATION_CHECKPOINTING", "false").lower() == "true"
    if args.checkpoint_every_n_layers != 1 and (args.no_gradient_checkpointing or fsdp):
        parser.error("--checkpoint_every_n_layers selects layers for --gradient_checkpointing, which is off here "
                     "(--no_gradient_checkpointing, or FSDP, whose checkpointing comes from the accelerate config)")
    sequence_length = config.image_seq_length + args.text_tokens
    training_args = TrainingArguments(
        output_dir="/tmp/benchmark-training", per_device_train_batch_size=args.per_device_batch_size,
        max_steps=args.warmup + args.steps + args.profile_steps, learning_rate=1e-5, bf16=cuda, use_cpu=not cuda, save_strategy="no", report_to="none",
        logging_steps=1, disable_tqdm=True, dataloader_num_workers=4, remove_unused_columns=False,
        gradient_checkpointing=not (args.no_gradient_checkpointing or fsdp),
        gradient_checkpointing_kwargs={"use_reentrant": False, "every_n_layers": args.checkpoint_every_n_layers},
        ddp_backend="gloo" if not cuda and "WORLD_SIZE" in os.environ else None,
    )
    world_size = training_args.world_size
    dataset = SyntheticSamples(config, args.text_tokens,
                               size=training_args.max_steps * args.per_device_batch_size * world_size)
    timer = StepTimer(args.warmup, args.steps, model)
    profile = KernelProfile(timer.last_step, training_args.max_steps)
    callbacks = [timer, profile] if args.profile_steps else [timer]
    trainer = Trainer(model=model, args=training_args, train_dataset=dataset, callbacks=callbacks)
    trainer.train()

    peak = torch.tensor([torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0], device=device)
    checks = torch.tensor([all(timer.checks.values()) and len(timer.checks) == 3], device=device, dtype=torch.int)
    if dist.is_initialized():
        peaks = [torch.zeros_like(peak) for _ in range(world_size)]
        dist.all_gather(peaks, peak)
        dist.all_reduce(checks, op=dist.ReduceOp.MIN)
    else:
        peaks = [peak]
    samples_per_second = args.steps * args.per_device_batch_size * world_size / timer.elapsed
    flops = model_flops_per_sample(model, sequence_length)
    mode = "FSDP" if fsdp else ("DDP" if world_size > 1 else ("1 GPU" if cuda else "1 process"))
    results = {
        "mode": mode, "gpus": world_size, "per_device_batch_size": args.per_device_batch_size,
        "sequence_length": sequence_length, "image_tokens": config.image_seq_length, "stage": args.stage,
        "gradient_checkpointing": training_args.gradient_checkpointing or fsdp_checkpointing,
        "checkpointed_lm_layers": None if fsdp else sum(
            bool(layer.gradient_checkpointing) for layer in model.model.language_model.layers
        ),
        "lm_layers": config.text_config.num_hidden_layers,
        "timed_steps": args.steps, "seconds": timer.elapsed, "samples_per_second": samples_per_second,
        "tokens_per_second": samples_per_second * sequence_length,
        "peak_memory_gib_per_gpu": [round(p.item(), 2) for p in peaks],
        "model_tflops_per_sample": flops / 1e12,
        "mfu": samples_per_second * flops / (world_size * args.peak_tflops * 1e12),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "checks": {**timer.checks, "all_ranks_passed": bool(checks.item())},
        "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        "profile": profile.table,
        "device": torch.cuda.get_device_name() if cuda else platform.processor(), "torch": torch.__version__,
        "transformers": transformers.__version__, "python": platform.python_version(),
    }
    if trainer.is_world_process_zero():
        print(json.dumps(results, indent=1))
        if args.json:
            with open(args.json, "w") as file:
                json.dump(results, file, indent=1)
    return results


if __name__ == "__main__":
    main()
