"""Host (Python) time that `generate()` spends around the captured graphs, measured on the CPU with the graphs'
own work made free, so that only the host work remains.

The model has the full `mlmamba+3b` module tree (24 DINOv2, 27 SigLIP and 64 Mamba-2 layers) at the tiny config's
widths: host work scales with the number of modules and calls, not with their widths. The graph seam runs as on a
GPU (`cuda_graph_devices` includes the CPU, where a "graph" calls its function eagerly); the prefill graph's call
then returns its stored outputs and each decode step a fixed logits tensor. Reported, medians of --repeats:
  * a graphed prefill's forward (input checks, the once-per-generate weight walk, cache copies);
  * `generate(max_new_tokens=1)` around it, and the part of it before the prefill graph is called: on a GPU the
    work after the replay is launched overlaps the graph's own, so time to first token pays only this part in full;
  * per decoded token, from `generate()` of 1 and of 257 new tokens.

    python benchmarks/host_overhead.py --json host_overhead.json
"""

import argparse
import json
import platform
import statistics
import time

import torch
import transformers
from transformers import DynamicCache

from modeling_mlmamba import MLMambaConfig, MLMambaForConditionalGeneration, cuda_graphs

DECODE_TOKENS = 256


def full_depth_tiny_model() -> MLMambaForConditionalGeneration:
    config = MLMambaConfig.tiny(dino_config=dict(num_hidden_layers=24), siglip_config=dict(num_hidden_layers=27),
                                text_config=dict(num_hidden_layers=64))
    torch.manual_seed(0)
    model = MLMambaForConditionalGeneration(config).eval()
    model.cuda_graph_devices = ("cpu",)
    return model


def prompt(config: MLMambaConfig) -> dict:
    ids = torch.tensor([[config.image_token_id] * config.image_seq_length + [5, 6, 7]])
    size = config.dino_config.image_size
    pixels = torch.randn(1, 2, 3, size, size, generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="where to write the measurements")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        raise SystemExit(f"--repeats must be >= 1, got {args.repeats}")
    torch.set_num_threads(1)
    model = full_depth_tiny_model()
    inputs = prompt(model.config)

    def forward():
        with torch.no_grad():
            return model(**inputs, cache=DynamicCache(config=model.config.text_config), use_cache=True,
                         logits_to_keep=1)

    def generate(new_tokens: int):
        with torch.no_grad():
            return model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)

    for _ in range(2):  # a prompt shape is captured the second time it is seen
        generate(2)
    prefill = next(iter(model.cuda_graphs.prefill_graphs.values()))
    stored = prefill.fn(*prefill.inputs)
    prefill_calls = []
    prefill.fn = lambda *graph_inputs: prefill_calls.append(time.perf_counter()) or stored

    def until_prefill():
        start = time.perf_counter()
        generate(1)
        return (prefill_calls[-1] - start) * 1e3
    free_logits = torch.zeros(1, model.config.text_config.vocab_size)
    original_step = cuda_graphs.DecodeGraph.step
    cuda_graphs.DecodeGraph.step = lambda graph, input_ids: free_logits
    try:
        results = {
            "prefill_forward_host_ms": median_ms(forward, args.repeats),
            "generate_1_token_host_ms": median_ms(lambda: generate(1), args.repeats),
            "generate_host_ms_before_prefill": statistics.median(until_prefill() for _ in range(args.repeats)),
        }
        first = median_ms(lambda: generate(1), args.repeats)
        total = median_ms(lambda: generate(DECODE_TOKENS + 1), args.repeats)
        results["decode_host_ms_per_token"] = (total - first) / DECODE_TOKENS
    finally:
        cuda_graphs.DecodeGraph.step = original_step
    results |= {"modules": sum(1 for _ in model.modules()), "python": platform.python_version(),
                "torch": torch.__version__, "transformers": transformers.__version__,
                "processor": platform.processor() or platform.machine()}
    for name, value in results.items():
        print(f"{name:32s} {value:.3f}" if isinstance(value, float) else f"{name:32s} {value}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)
    return results


if __name__ == "__main__":
    main()
