"""Memory, batch-1 decode speed and fidelity of quantized ML-Mamba on one CUDA GPU, at the full `mlmamba+3b` size
(`MLMambaConfig()`) with random weights.

A bf16 model is saved to a folder once; each format then loads it through `from_pretrained(folder,
quantization_config=...)`, as a user would. Per format:
  * the peak GPU memory of loading the whole model, and the peak while generating;
  * decode tokens/s at batch 1: one 760-token prompt (729 image placeholders + 31 text tokens), 128 new tokens,
    greedy, plain `generate()`; (128 - 1) / (t(128 tokens) - t(1 token)), medians of 3 after a warm-up;
  * against bf16 on the same prompt: the greedy tokens that agree (positions, and the length of the common
    prefix) and the largest absolute / relative error of the last-position logits.
Prints a table last and writes everything to --json.

    python benchmarks/benchmark_quantization.py --json quantization.json
    python benchmarks/benchmark_quantization.py --formats bf16 torchao-int8 --json quick.json
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

from modeling_mlmamba import MLMambaConfig, MLMambaForConditionalGeneration
from modeling_mlmamba.quantization import QUANTIZATION_FORMATS, graph_capturable, quantization_config

BASELINE = "bf16"
IMAGE_TOKENS = 729
TEXT_TOKENS = 31


def check_formats(formats: list[str]) -> None:
    """Stop before any work when a format is unknown, its library is missing, or the GPU cannot run it."""
    for name in formats:
        if name == BASELINE:
            continue
        try:
            quantization_config(name)
        except (ImportError, ValueError) as error:
            sys.exit(f"--formats {name}: {error}")
        if name == "torchao-float8-dynamic" and torch.cuda.get_device_capability() < (8, 9):
            sys.exit(f"--formats {name}: float8 matmuls need CUDA compute capability >= 8.9, this GPU has "
                     f"{torch.cuda.get_device_capability()}")


def save_random_model(folder: str, config: MLMambaConfig) -> None:
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = MLMambaForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)


def load(folder: str, name: str):
    config = None if name == BASELINE else quantization_config(name)
    model = MLMambaForConditionalGeneration.from_pretrained(
        folder, quantization_config=config, dtype=torch.bfloat16, device_map="cuda"
    )
    model.model.vision_tower.dino.set_attn_implementation("sdpa")
    model.model.vision_tower.siglip.set_attn_implementation("sdpa")
    return model.eval()


def fixed_prompt(config: MLMambaConfig) -> dict:
    generator = torch.Generator().manual_seed(0)
    text = torch.randint(1, config.image_token_id - 1, (1, TEXT_TOKENS), generator=generator)
    ids = torch.cat([torch.full((1, IMAGE_TOKENS), config.image_token_id), text], dim=1).cuda()
    size = config.dino_config.image_size
    pixels = torch.randn(1, 2, 3, size, size, generator=generator).to("cuda", torch.bfloat16)
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


def measure(folder: str, name: str, new_tokens: int, repeats: int) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """One format's numbers, its greedy tokens and its last-position logits on the fixed prompt."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = load(folder, name)
    torch.cuda.synchronize()
    load_peak = torch.cuda.max_memory_allocated()
    prompt = fixed_prompt(model.config)
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
        "stored": "bf16 weights" if name == BASELINE else QUANTIZATION_FORMATS[name].stored,
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
              f"{'vs bf16':>9}{'agree':>8}{'prefix':>8}{'max |dlogit|':>14}{'rel':>9}")
    rows = [header, "-" * len(header)]
    for r in results:
        rows.append(
            f"{r['format']:<24}{r['model_memory_gib']:>10.2f}{r['load_peak_gib']:>10.2f}{r['generate_peak_gib']:>10.2f}"
            f"{'yes' if r['cuda_graphs'] else 'no':>8}{r['decode_tokens_per_s']:>14.1f}{r['decode_speedup']:>8.2f}x"
            f"{r['greedy_agreement']:>8.2f}{r['greedy_common_prefix']:>8d}{r['max_abs_logit_error']:>14.4f}"
            f"{r['relative_logit_error']:>9.4f}"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--formats", nargs="+", default=[BASELINE, *QUANTIZATION_FORMATS],
                        choices=[BASELINE, *QUANTIZATION_FORMATS], help="bf16 is always measured first, as the "
                        "reference.")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", required=True, help="Where to write the results.")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA GPU")
    if args.new_tokens < 2 or args.repeats < 1:
        sys.exit(f"--new-tokens must be >= 2 and --repeats >= 1; got {args.new_tokens} and {args.repeats}")
    formats = [BASELINE, *[name for name in args.formats if name != BASELINE]]
    check_formats(formats)

    with tempfile.TemporaryDirectory() as folder:
        save_random_model(folder, MLMambaConfig())
        results = []
        for name in formats:  # bf16 first: every other format is compared with it
            result, tokens, logits = measure(folder, name, args.new_tokens, args.repeats)
            if name == BASELINE:
                baseline, baseline_tokens, baseline_logits = result, tokens, logits
            compare(result, tokens, logits, baseline_tokens, baseline_logits, baseline["decode_tokens_per_s"])
            results.append(result)
            print(json.dumps(result), flush=True)

    versions = {library: importlib.import_module(library).__version__ for library in ("bitsandbytes", "torchao", "triton")
                if importlib.util.find_spec(library) is not None}
    environment = {"device": torch.cuda.get_device_name(), "python": platform.python_version(),
                   "torch": torch.__version__, "transformers": transformers.__version__, **versions}
    with open(args.json, "w") as file:
        json.dump({"environment": environment, "new_tokens": args.new_tokens, "repeats": args.repeats,
                   "results": results}, file, indent=2)
    print(table(results))
    return results


if __name__ == "__main__":
    main()
