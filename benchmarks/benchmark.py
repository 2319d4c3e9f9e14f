"""Speed and memory of ML-Mamba generation on one CUDA GPU, at the full `mlmamba+3b` size with random weights.

Measures, through plain `model.generate()` in bf16:
  * the paper's metric: tokens/s from pixels to a 256-token answer, batch 1 (real generated tokens counted);
  * time to first token with one 384 px image + a 32-token question, and where that time goes;
  * decode tokens/s at batch 1, 8 and 32 (256 new tokens), with and without CUDA graphs, and peak memory;
  * transformers' own `Mamba2ForCausalLM.generate` with the same LM weights;
  * a same-size Transformer VLM (LLaVA: SigLIP tower + ~2.7B Llama-style LM, SDPA) at 1k/4k/16k prompts.
Prints a table last and writes everything to --json.

    python benchmarks/benchmark.py --json benchmark.json
    python benchmarks/benchmark.py --profile --json profile.json   # where prefill and decode-step time goes

`--tiny` runs the same measurements with `MLMambaConfig.tiny()`, a toy LLaVA and a few tokens, on the CPU when
there is no GPU: a check that the script works, not a measurement.
"""

import argparse
import json
import platform
import statistics
import time
from dataclasses import dataclass

import torch
import transformers
from transformers import DynamicCache

from modeling_mlmamba import MLMambaConfig, MLMambaForConditionalGeneration


@dataclass(frozen=True)
class Sizes:
    """Prompt and answer lengths, batch sizes and repeats of one run (the image tokens come from the config)."""

    paper_text_tokens: int  # text after the image in the paper's prompt: 729 + 31 = 760 tokens at full size
    question_tokens: int  # the question of the time-to-first-token prompt
    new_tokens: int  # answer length of the decode rates and the paper metric
    batches: tuple[int, ...]
    long_context: int  # the whole prompt of the long-context decode rate
    memory_new_tokens: tuple[int, ...]  # answer lengths whose peak memory should be the same
    eager_new_tokens: int  # answer length of the decode rate without CUDA graphs
    repeats: int
    ttft_repeats: int
    mamba2_prompt_tokens: int
    mamba2_new_tokens: int
    llava_contexts: tuple[int, ...]
    llava_new_tokens: int
    replays: int  # decode-graph replays timed by --profile


FULL = Sizes(
    paper_text_tokens=31, question_tokens=32, new_tokens=256, batches=(1, 8, 32), long_context=4096,
    memory_new_tokens=(16, 256, 1024), eager_new_tokens=32, repeats=3, ttft_repeats=10, mamba2_prompt_tokens=760,
    mamba2_new_tokens=32, llava_contexts=(1024, 4096, 16384), llava_new_tokens=129, replays=100,
)
TINY = Sizes(
    paper_text_tokens=3, question_tokens=4, new_tokens=4, batches=(1, 2), long_context=40, memory_new_tokens=(2, 4),
    eager_new_tokens=3, repeats=1, ttft_repeats=1, mamba2_prompt_tokens=8, mamba2_new_tokens=3, llava_contexts=(24,),
    llava_new_tokens=3, replays=2,
)


def llava_config(tiny: bool) -> transformers.LlavaConfig:
    """A LLaVA of ML-Mamba's size (SigLIP-SO400M at 384 px + a 2.7B Llama-style LM, 3.23B parameters), or a toy."""
    if tiny:
        vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                 num_attention_heads=2, image_size=56, patch_size=14)
        text = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2, vocab_size=128,
                                        max_position_embeddings=256)
        image_token_id = 127
    else:
        vision = transformers.SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                                                 num_attention_heads=16, image_size=384, patch_size=14)
        text = transformers.LlamaConfig(hidden_size=2560, intermediate_size=6912, num_hidden_layers=32,
                                        num_attention_heads=20, num_key_value_heads=20, vocab_size=50288,
                                        max_position_embeddings=32768)
        image_token_id = 50277
    return transformers.LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=image_token_id,
        image_seq_length=(vision.image_size // vision.patch_size) ** 2, vision_feature_select_strategy="full",
    )


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats=3):
    """Median wall time (s) of fn() with the GPU synchronised around each call, and fn's last result."""
    times, result = [], None
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        result = fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def peak_memory_gib(fn, device):
    """Peak GPU memory allocated while fn() runs; None on the CPU, where torch does not track it."""
    if device.type != "cuda":
        fn()
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


class Mark:
    """A point in a forward's time line: a CUDA event on the GPU (read after synchronising), the wall clock on CPU."""

    def __init__(self, device: torch.device):
        self.event = torch.cuda.Event(enable_timing=True) if device.type == "cuda" else None
        self.time = None

    def record(self) -> None:
        if self.event is not None:
            self.event.record()
        else:
            self.time = time.perf_counter()

    def ms_until(self, later: "Mark") -> float:
        if self.event is not None:
            return self.event.elapsed_time(later.event)
        return (later.time - self.time) * 1e3


def random_prompt(batch, text_tokens, image_token_id, image_tokens, device, with_image=True, seed=0):
    """`image_tokens` placeholders (the released layout: image first), then random text ids below the image id."""
    generator = torch.Generator().manual_seed(seed)
    text = torch.randint(1, image_token_id - 1, (batch, text_tokens), generator=generator)
    if not with_image:
        return text.to(device)
    image = torch.full((batch, image_tokens), image_token_id)
    return torch.cat([image, text], dim=1).to(device)


def build_mlmamba(config, device):
    with device:
        model = MLMambaForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    model.model.vision_tower.dino.set_attn_implementation("sdpa")
    model.model.vision_tower.siglip.set_attn_implementation("sdpa")
    return model.eval()


def generate_fn(model, ids, pixels, new_tokens):
    def run():
        with torch.no_grad():
            return model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                pad_token_id=0,
            )
    return run


def warm_up(model, ids, pixels):
    """Two prompts of this shape: the second captures its prefill graph; a decode graph for the batch size."""
    for _ in range(2):
        generate_fn(model, ids, pixels, 2)()


def decode_rate(model, ids, pixels, new_tokens, repeats=3):
    """(tokens/s of the decode phase, real tokens generated, time of the whole call)."""
    warm_up(model, ids, pixels)
    first, _ = timed(generate_fn(model, ids, pixels, 1), ids.device, repeats)
    total, out = timed(generate_fn(model, ids, pixels, new_tokens), ids.device, repeats)
    generated = out.shape[1] - ids.shape[1]
    return ids.shape[0] * (generated - 1) / (total - first), generated, total


def prefill_breakdown(model, ids, pixels):
    """Times (ms) of the vision towers, connector + projector and LM prefill inside one eager forward."""
    inner = model.model
    marks = {name: (Mark(ids.device), Mark(ids.device)) for name in ("vision towers", "LM prefill")}

    def timed_forward(module, name):
        original = module.forward

        def wrapper(*args, **kwargs):
            marks[name][0].record()
            result = original(*args, **kwargs)
            marks[name][1].record()
            return result
        module.forward = wrapper
        return original

    originals = [(inner.vision_tower, timed_forward(inner.vision_tower, "vision towers")),
                 (inner.language_model, timed_forward(inner.language_model, "LM prefill"))]
    start_conn, end_proj = Mark(ids.device), Mark(ids.device)
    conn_forward = inner.connector.forward
    proj_forward = inner.projector.forward

    def conn(*a, **k):
        start_conn.record()
        return conn_forward(*a, **k)

    def proj(*a, **k):
        out = proj_forward(*a, **k)
        end_proj.record()
        return out
    inner.connector.forward, inner.projector.forward = conn, proj
    try:
        with torch.no_grad():
            for _ in range(3):
                model(input_ids=ids, pixel_values=pixels, use_cache=True, logits_to_keep=1)
        synchronize(ids.device)
        times = {name: start.ms_until(end) for name, (start, end) in marks.items()}
        times["connector+projector"] = start_conn.ms_until(end_proj)
    finally:
        for module, original in originals:
            module.forward = original
        inner.connector.forward, inner.projector.forward = conn_forward, proj_forward
    return times


def bench_mlmamba(config, sizes, device, results):
    model = build_mlmamba(config, device)
    image_size, image_tokens = config.dino_config.image_size, config.image_seq_length
    pixels1 = torch.randn(1, 2, 3, image_size, image_size, device=device, dtype=torch.bfloat16)
    paper_ids = random_prompt(1, sizes.paper_text_tokens, config.image_token_id, image_tokens, device)
    question_ids = random_prompt(1, sizes.question_tokens, config.image_token_id, image_tokens, device)
    warm_up(model, paper_ids, pixels1)
    warm_up(model, question_ids, pixels1)
    ttft, _ = timed(generate_fn(model, question_ids, pixels1, 1), device, repeats=sizes.ttft_repeats)
    results["ttft_ms"] = ttft * 1e3
    results["prefill_breakdown_ms"] = prefill_breakdown(model, question_ids, pixels1)

    total, out = timed(generate_fn(model, paper_ids, pixels1, sizes.new_tokens), device, repeats=sizes.repeats + 2)
    generated = out.shape[1] - paper_ids.shape[1]
    results["paper_metric"] = {"generated_tokens": generated, "seconds": total, "tokens_per_s": generated / total}

    results["decode"] = {}
    for batch in sizes.batches:
        ids = paper_ids.expand(batch, -1).contiguous()
        pixels = pixels1.expand(batch, -1, -1, -1, -1).contiguous()
        rate, generated, _ = decode_rate(model, ids, pixels, sizes.new_tokens, repeats=sizes.repeats)
        memory = peak_memory_gib(generate_fn(model, ids, pixels, sizes.new_tokens), device)
        results["decode"][f"batch{batch}"] = {"tokens_per_s": rate, "generated_per_sequence": generated,
                                              "peak_memory_gib": memory}

    results["peak_memory_gib_by_new_tokens_batch1"] = {
        n: peak_memory_gib(generate_fn(model, paper_ids, pixels1, n), device) for n in sizes.memory_new_tokens
    }

    long_ids = random_prompt(1, sizes.long_context - image_tokens, config.image_token_id, image_tokens, device)
    rate, _, _ = decode_rate(model, long_ids, pixels1, sizes.new_tokens, repeats=max(sizes.repeats - 1, 1))
    results["decode_long_context"] = {"prompt_tokens": sizes.long_context, "batch1_tokens_per_s": rate}

    model.config.use_cuda_graphs = False
    rate, _, _ = decode_rate(model, paper_ids, pixels1, sizes.eager_new_tokens, repeats=1)
    results["decode_eager_batch1_tokens_per_s"] = rate
    model.config.use_cuda_graphs = True
    return model


def bench_transformers_mamba2(model, sizes, results):
    """transformers' `Mamba2ForCausalLM.generate` on the same LM weights (text only)."""
    device = model.device
    lm_state = {"backbone." + key: value for key, value in model.model.language_model.state_dict().items()}
    image_token_id = model.config.image_token_id
    config = model.config.text_config
    with device:
        reference = transformers.Mamba2ForCausalLM._from_config(config, dtype=torch.bfloat16).eval()
    missing, unexpected = reference.load_state_dict(lm_state, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:  # the head is tied to the embeddings
        raise RuntimeError(f"the LM's weights do not fit Mamba2ForCausalLM: missing {missing}, unexpected {unexpected}")
    ids = random_prompt(1, sizes.mamba2_prompt_tokens, image_token_id, 0, device, with_image=False)

    def run(n):
        def call():
            with torch.no_grad():
                return reference.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                          min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
        return call
    run(2)()
    first, _ = timed(run(1), device, 1)
    total, out = timed(run(sizes.mamba2_new_tokens), device, 1)
    results["transformers_mamba2_decode_batch1_tokens_per_s"] = (out.shape[1] - ids.shape[1] - 1) / (total - first)
    del reference
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bench_llava(sizes, tiny, device, results):
    config = llava_config(tiny)
    with device:
        llava = transformers.LlavaForConditionalGeneration._from_config(
            config, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    params = sum(p.numel() for p in llava.parameters()) / 1e9
    image_size = config.vision_config.image_size
    pixels = torch.randn(1, 3, image_size, image_size, device=device, dtype=torch.bfloat16)
    results["llava"] = {"parameters_billion": params}
    for context in sizes.llava_contexts:
        ids = random_prompt(1, context - config.image_seq_length, config.image_token_id, config.image_seq_length,
                            device)

        def run(n):
            def call():
                with torch.no_grad():
                    return llava.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                                          max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                                          pad_token_id=0)
            return call
        run(2)()
        first, _ = timed(run(1), device, 2)
        total, out = timed(run(sizes.llava_new_tokens), device, 2)
        memory = peak_memory_gib(run(sizes.llava_new_tokens), device)
        results["llava"][f"context{context}"] = {
            "decode_tokens_per_s": (out.shape[1] - ids.shape[1] - 1) / (total - first),
            "ttft_ms": first * 1e3, "peak_memory_gib": memory,
        }


def decode_graph(model, ids, pixels):
    """The decode graph `generate()` uses for this batch size, bound to a cache that holds the prompt (captured on
    CUDA; elsewhere the same step runs eagerly), taken from the model's `GenerationGraphs`."""
    cache = DynamicCache(config=model.config.text_config)
    with torch.no_grad():
        model(input_ids=ids, pixel_values=pixels, cache=cache, use_cache=True, logits_to_keep=1)
        model.cuda_graphs.decode(model, ids[:, -1:], cache)
    return next(graph for key, graph in model.cuda_graphs.decode_graphs.items() if key[0] == ids.shape[0])


def profile(config, sizes, device, results):
    """Where prefill and decode time goes: profiler top ops of one LM prefill, graph replay vs a generate step."""
    model = build_mlmamba(config, device)
    image_size = config.dino_config.image_size
    pixels = torch.randn(1, 2, 3, image_size, image_size, device=device, dtype=torch.bfloat16)
    ids = random_prompt(1, sizes.paper_text_tokens, config.image_token_id, config.image_seq_length, device)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    by_device_time = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    generate_fn(model, ids, pixels, 8)()
    lm = model.model.language_model
    embeds = torch.randn(1, ids.shape[1], config.text_config.hidden_size, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        for _ in range(3):
            lm(embeds)
        prefill_s, _ = timed(lambda: lm(embeds), device, 5)
        with torch.profiler.profile(activities=activities) as prof:
            lm(embeds)
            synchronize(device)
    results["profile_prompt_tokens"] = ids.shape[1]
    results["profile_lm_prefill_ms"] = prefill_s * 1e3
    results["profile_lm_prefill_top_ops"] = prof.key_averages().table(sort_by=by_device_time, row_limit=15)
    results["profile_lm_prefill_top_cpu_ops"] = prof.key_averages().table(sort_by="self_cpu_time_total",
                                                                          row_limit=12)
    graph = decode_graph(model, ids, pixels)
    token = ids[:, -1:]
    with torch.no_grad():
        with torch.profiler.profile(activities=activities[-1:]) as prof:
            graph.call.fn(token[:, 0])  # the captured step, run op by op
            synchronize(device)
        results["profile_decode_step_kernels"] = prof.key_averages().table(sort_by=by_device_time, row_limit=12)
        replay_s, _ = timed(lambda: [graph.step(token) for _ in range(sizes.replays)], device, 3)
    results["profile_graph_replay_ms"] = replay_s * 1e3 / sizes.replays
    rate, _, _ = decode_rate(model, ids, pixels, sizes.new_tokens, repeats=sizes.repeats)
    results["profile_generate_step_ms"] = 1e3 / rate
    print(results["profile_decode_step_kernels"])
    print(results["profile_lm_prefill_top_ops"])
    print(results["profile_lm_prefill_top_cpu_ops"])
    print(f"LM prefill ({ids.shape[1]} tokens): {prefill_s * 1e3:.1f} ms; graph replay "
          f"{results['profile_graph_replay_ms']:.2f} ms/token; generate() decode step {1e3 / rate:.2f} ms/token")


def gib(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def table(results):
    rows = [("time to first token (image + question)", f"{results['ttft_ms']:.1f} ms"),
            ("  eager (no graph) prefill: " + ", ".join(f"{k} {v:.1f} ms" for k, v in results["prefill_breakdown_ms"].items()),
             ""),
            ("paper metric: tokens from pixels, batch 1",
             f"{results['paper_metric']['tokens_per_s']:.0f} tok/s "
             f"({results['paper_metric']['generated_tokens']} tokens in {results['paper_metric']['seconds']:.2f} s)")]
    for name, entry in results["decode"].items():
        rows.append((f"decode {name}", f"{entry['tokens_per_s']:.0f} tok/s, peak {gib(entry['peak_memory_gib'])} GiB"))
    long_context = results["decode_long_context"]
    rows.append((f"decode batch1 at {long_context['prompt_tokens']}-token context",
                 f"{long_context['batch1_tokens_per_s']:.0f} tok/s"))
    rows.append(("decode batch1, eager (use_cuda_graphs=False)",
                 f"{results['decode_eager_batch1_tokens_per_s']:.1f} tok/s"))
    memory = results["peak_memory_gib_by_new_tokens_batch1"]
    rows.append((f"peak memory for {'/'.join(str(n) for n in memory)} new tokens",
                 " / ".join(gib(value) for value in memory.values()) + " GiB"))
    if "transformers_mamba2_decode_batch1_tokens_per_s" in results:
        rows.append(("transformers Mamba2ForCausalLM.generate, batch1",
                     f"{results['transformers_mamba2_decode_batch1_tokens_per_s']:.1f} tok/s"))
    for name, entry in results.get("llava", {}).items():
        if name.startswith("context"):
            rows.append((f"LLaVA ({results['llava']['parameters_billion']:.2f}B) {name}",
                         f"{entry['decode_tokens_per_s']:.0f} tok/s, ttft {entry['ttft_ms']:.0f} ms, "
                         f"peak {gib(entry['peak_memory_gib'])} GiB"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default="benchmark.json", help="where to write all measurements")
    parser.add_argument("--skip", nargs="*", default=[], choices=["transformers-mamba2", "llava"],
                        help="comparisons to leave out")
    parser.add_argument("--profile", action="store_true",
                        help="only profile the LM prefill and the decode step, then stop")
    parser.add_argument("--tiny", action="store_true",
                        help="toy sizes, a few tokens, on the CPU when there is no GPU: checks the script, measures "
                             "nothing")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        parser.error("the full-size benchmark needs a CUDA GPU; --tiny runs every measurement at toy size on the CPU")
    device = torch.device("cuda" if cuda else "cpu")
    config, sizes = (MLMambaConfig.tiny(), TINY) if args.tiny else (MLMambaConfig(), FULL)
    results = {"device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu", "tiny": args.tiny,
               "torch": torch.__version__, "transformers": transformers.__version__,
               "python": platform.python_version()}
    for package in ("mamba_ssm", "causal_conv1d", "triton"):
        try:
            results[package] = __import__(package).__version__
        except ImportError:
            results[package] = None
    if args.profile:
        profile(config, sizes, device, results)
    else:
        model = bench_mlmamba(config, sizes, device, results)
        if "transformers-mamba2" not in args.skip:
            bench_transformers_mamba2(model, sizes, results)
        del model
        if cuda:
            torch.cuda.empty_cache()
        if "llava" not in args.skip:
            bench_llava(sizes, args.tiny, device, results)
        print(table(results))
    with open(args.json, "w") as handle:
        json.dump(results, handle, indent=2)
    return results


if __name__ == "__main__":
    main()
