"""Memory, batch-1 decode speed and fidelity of quantized ML-Mamba on one CUDA GPU, at the full `mlmamba+3b` size
(`MLMambaConfig()`) with random weights.

A bf16 model is saved to a folder once; each format then loads it through `from_pretrained(folder,
quantization_config=...)`, as a user would. Per format:
  * the peak GPU memory of loading the whole model, and the peak while generating;
  * decode tokens/s at batch 1: one 760-token prompt (729 image placeholders + 31 text tokens), 128 new tokens,
    greedy, plain `generate()`; (128 - 1) / (t(128 tokens) - t(1 token)), medians of 3 after a warm-up;
  * against bf16 on the same prompt: the greedy tokens that agree (positions, and the length of the common
    prefix) and the largest absolute / relative error of the last-position logits.
Every model loads in bf16. Prints a table last and writes everything to --json.

With --shapes-vqa it measures quality instead, on any device (a CPU too): per question type, the exact match of the
embedded default model (`modeling_mlmamba.DEFAULT_MODEL`, saved in float32; loaded in --dtype) on every question
of the held-out shapes-vqa scenes, unquantized and in each format.

    python benchmarks/benchmark_quantization.py --json quantization.json
    python benchmarks/benchmark_quantization.py --formats torchao-int8 torchao-float8 --json quick.json
    python benchmarks/benchmark_quantization.py --shapes-vqa --device cpu --formats torchao-int8 --json quality.json
    python benchmarks/benchmark_quantization.py --shapes-vqa --dtype bfloat16 --formats torchao-int4 --json q.json
"""

import argparse
import gc
import importlib
import importlib.util
import json
import platform
import statistics
import sys
import tempfile
import time

import torch
import transformers

from modeling_mlmamba import DEFAULT_MODEL, MLMambaConfig, MLMambaForConditionalGeneration, MLMambaProcessor
from modeling_mlmamba.quantization import (
    QUANTIZATION_FORMATS,
    check_gpu_only_format,
    graph_capturable,
    quantization_config,
)
from modeling_mlmamba.shapes_vqa import EVAL_IMAGES, EVAL_SEED, evaluate

BASELINE = "unquantized"
IMAGE_TOKENS = 729
TEXT_TOKENS = 31


def check_formats(formats: list[str], device: torch.device, dtype: torch.dtype) -> None:
    """Stop before any work when a format's library is missing or the load would refuse it on `device` in
    `dtype` (the model's own check, `check_gpu_only_format`)."""
    for name in formats:
        if name == BASELINE:
            continue
        try:
            check_gpu_only_format(quantization_config(name), device_map=device, dtype=lambda: dtype)
        except (ImportError, ValueError) as error:
            sys.exit(f"--formats {name}: {error}")


def save_random_model(folder: str, config: MLMambaConfig, device: torch.device) -> None:
    torch.manual_seed(0)
    with device:
        model = MLMambaForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)


def load(folder: str, name: str, device: torch.device):
    config = None if name == BASELINE else quantization_config(name)
    model = MLMambaForConditionalGeneration.from_pretrained(
        folder, quantization_config=config, dtype=torch.bfloat16, device_map=device
    )
    model.model.vision_tower.dino.set_attn_implementation("sdpa")
    model.model.vision_tower.siglip.set_attn_implementation("sdpa")
    return model.eval()


def fixed_prompt(config: MLMambaConfig, device: torch.device) -> dict:
    generator = torch.Generator().manual_seed(0)
    text = torch.randint(1, config.image_token_id - 1, (1, TEXT_TOKENS), generator=generator)
    ids = torch.cat([torch.full((1, IMAGE_TOKENS), config.image_token_id), text], dim=1).to(device)
    size = config.dino_config.image_size
    pixels = torch.randn(1, 2, 3, size, size, generator=generator).to(device, torch.bfloat16)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}


def generate(model, prompt: dict, new_tokens: int) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(**prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              eos_token_id=None, pad_token_id=0)


def median_time(fn, repeats: int) -> tuple[float, torch.Tensor]:
    times, result = [], None
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def measure(folder: str, name: str, device: torch.device, new_tokens: int, repeats: int):
    """One format's numbers, its greedy tokens and its last-position logits on the fixed prompt."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = load(folder, name, device)
    torch.cuda.synchronize()
    load_peak = torch.cuda.max_memory_allocated()
    prompt = fixed_prompt(model.config, device)
    for _ in range(2):  # the second call of a prompt shape captures its prefill graph
        generate(model, prompt, 2)
    torch.cuda.reset_peak_memory_stats()
    first, _ = median_time(lambda: generate(model, prompt, 1), repeats)
    total, tokens = median_time(lambda: generate(model, prompt, new_tokens), repeats)
    generate_peak = torch.cuda.max_memory_allocated()
    with torch.no_grad():
        logits = model(**prompt, logits_to_keep=1).logits[0, -1].float()
    result = {
        "format": name,
        "stored": "bf16" if name == BASELINE else QUANTIZATION_FORMATS[name].stored,
        "model_memory_gib": model.get_memory_footprint() / 2**30,
        "load_peak_gib": load_peak / 2**30,
        "generate_peak_gib": generate_peak / 2**30,
        "cuda_graphs": graph_capturable(model),
        "decode_tokens_per_s": (new_tokens - 1) / (total - first),
        "time_all_new_tokens_s": total,
        "time_first_token_s": first,
    }
    return result, tokens[0, prompt["input_ids"].shape[1]:].cpu(), logits.cpu()


def compare(result: dict, tokens, logits, baseline_tokens, baseline_logits, baseline_rate: float) -> None:
    same = tokens == baseline_tokens
    differing = (~same).nonzero()
    result["greedy_agreement"] = same.float().mean().item()
    result["greedy_common_prefix"] = int(differing[0]) if len(differing) else len(tokens)
    result["max_abs_logit_error"] = (logits - baseline_logits).abs().max().item()
    result["relative_logit_error"] = ((logits - baseline_logits).norm() / baseline_logits.norm()).item()
    result["decode_speedup"] = result["decode_tokens_per_s"] / baseline_rate


def table(results: list[dict]) -> str:
    header = (f"{'format':<24}{'model GiB':>10}{'load peak':>10}{'gen peak':>10}{'graphs':>8}{'decode tok/s':>14}"
              f"{'speedup':>9}{'agree':>8}{'prefix':>8}{'max |dlogit|':>14}{'rel':>9}")
    rows = [header, "-" * len(header)]
    for r in results:
        if "error" in r:
            rows.append(f"{r['format']:<24}  {r['error']}")
            continue
        rows.append(
            f"{r['format']:<24}{r['model_memory_gib']:>10.2f}{r['load_peak_gib']:>10.2f}{r['generate_peak_gib']:>10.2f}"
            f"{'yes' if r['cuda_graphs'] else 'no':>8}{r['decode_tokens_per_s']:>14.1f}{r['decode_speedup']:>8.2f}x"
            f"{r['greedy_agreement']:>8.2f}{r['greedy_common_prefix']:>8d}{r['max_abs_logit_error']:>14.4f}"
            f"{r['relative_logit_error']:>9.4f}"
        )
    return "\n".join(rows)


def shapes_vqa_scores(name: str, device: torch.device, dtype: torch.dtype) -> dict:
    """Exact match (%) per question type of the embedded default model in format `name`, loaded in `dtype`."""
    config = None if name == BASELINE else quantization_config(name, compute_dtype=dtype)
    model = MLMambaForConditionalGeneration.from_pretrained(
        DEFAULT_MODEL, quantization_config=config, dtype=dtype, device_map=device
    ).eval()
    scores = evaluate(model, MLMambaProcessor.from_pretrained(DEFAULT_MODEL), num_images=EVAL_IMAGES, seed=EVAL_SEED)
    return {"format": name, **{kind: 100 * score for kind, score in scores.items()}}


def scores_table(results: list[dict]) -> str:
    kinds = [key for key in results[0] if key != "format"]
    rows = [f"{'format':<24}" + "".join(f"{kind:>9}" for kind in kinds)]
    for r in results:
        cells = f"  {r['error']}" if "error" in r else "".join(f"{r[kind]:>9.1f}" for kind in kinds)
        rows.append(f"{r['format']:<24}{cells}")
    return "\n".join(rows)


def environment(device: torch.device) -> dict:
    versions = {library: importlib.import_module(library).__version__ for library in ("bitsandbytes", "torchao", "triton")
                if importlib.util.find_spec(library) is not None}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return {"device": name, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, **versions}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--formats", nargs="+", default=list(QUANTIZATION_FORMATS), choices=list(QUANTIZATION_FORMATS),
                        help="The unquantized model is always measured first, as the reference.")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shapes-vqa", action="store_true", help="Measure the default model's exact match instead.")
    parser.add_argument("--device", default="cuda", help="A torch device; only --shapes-vqa runs on a CPU.")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="What --shapes-vqa loads the default model in (the speed benchmark is always bf16).")
    parser.add_argument("--json", required=True, help="Where to write the results.")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"--device {args.device}: no CUDA GPU is available")
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
        torch.cuda.set_device(device)  # memory statistics and synchronisation below are of this GPU
    if not args.shapes_vqa and device.type != "cuda":
        sys.exit(f"--device {args.device}: the speed benchmark needs a CUDA GPU (only --shapes-vqa runs elsewhere)")
    if args.new_tokens < 2 or args.repeats < 1:
        sys.exit(f"--new-tokens must be >= 2 and --repeats >= 1; got {args.new_tokens} and {args.repeats}")
    formats = [BASELINE, *args.formats]
    dtype = getattr(torch, args.dtype) if args.shapes_vqa else torch.bfloat16
    check_formats(formats, device, dtype)

    if args.shapes_vqa:
        results = []
        for name in formats:
            try:
                results.append(shapes_vqa_scores(name, device, dtype))
            except Exception as error:  # recorded in the table and the JSON; the other formats still run
                results.append({"format": name, "error": f"{type(error).__name__}: {error}"})
            print(json.dumps(results[-1]), flush=True)
        with open(args.json, "w") as file:
            json.dump({"environment": environment(device), "dtype": args.dtype, "images": EVAL_IMAGES,
                       "seed": EVAL_SEED, "results": results}, file, indent=2)
        print(scores_table(results))
        return results

    with tempfile.TemporaryDirectory() as folder:
        save_random_model(folder, MLMambaConfig(), device)
        results = []
        baseline, baseline_tokens, baseline_logits = measure(folder, BASELINE, device, args.new_tokens, args.repeats)
        compare(baseline, baseline_tokens, baseline_logits, baseline_tokens, baseline_logits,
                baseline["decode_tokens_per_s"])
        results = [baseline]
        print(json.dumps(baseline), flush=True)
        for name in formats[1:]:
            try:
                result, tokens, logits = measure(folder, name, device, args.new_tokens, args.repeats)
                compare(result, tokens, logits, baseline_tokens, baseline_logits, baseline["decode_tokens_per_s"])
            except Exception as error:  # recorded in the table and the JSON; the other formats still run
                result = {"format": name, "error": f"{type(error).__name__}: {error}"}
            results.append(result)
            print(json.dumps(result), flush=True)

    with open(args.json, "w") as file:
        json.dump({"environment": environment(device), "new_tokens": args.new_tokens, "repeats": args.repeats,
                   "results": results}, file, indent=2)
    print(table(results))
    return results


if __name__ == "__main__":
    main()
