"""Speed and memory of ML-Mamba generation on one CUDA GPU, at the full `mlmamba+3b` size with random weights.

Measures, through plain `model.generate()` in bf16:
  * the paper's metric: tokens/s from pixels to a 256-token answer, batch 1 (real generated tokens counted);
  * time to first token with one 384 px image + a 32-token question, and where that time goes;
  * decode tokens/s at batch 1, 8 and 32 (256 new tokens), with and without CUDA graphs, and peak memory;
  * transformers' own `Mamba2ForCausalLM.generate` with the same LM weights;
  * a same-size Transformer VLM (LLaVA: SigLIP tower + ~2.7B Llama-style LM, SDPA) at 1k/4k/16k prompts.
Prints a table last and writes everything to --json.

    python examples/benchmark.py --json benchmark.json
"""

import argparse
import json
import platform
import statistics
import time

import torch
import transformers

from modeling_mlmamba import MLMambaConfig, MLMambaForConditionalGeneration

IMAGE_TOKENS = 729


def timed(fn, repeats=3):
    """Median wall time (s) of fn() with the GPU synchronised around each call, and fn's last result."""
    times, result = [], None
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def peak_memory_gib(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def random_prompt(batch, text_tokens, vocab, image_token_id, with_image=True, seed=0):
    generator = torch.Generator().manual_seed(seed)
    text = torch.randint(1, image_token_id - 1, (batch, text_tokens), generator=generator)
    if not with_image:
        return text.cuda()
    image = torch.full((batch, IMAGE_TOKENS), image_token_id)
    return torch.cat([image, text], dim=1).cuda()


def build_mlmamba():
    config = MLMambaConfig()
    with torch.device("cuda"):
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
    first, _ = timed(generate_fn(model, ids, pixels, 1), repeats)
    total, out = timed(generate_fn(model, ids, pixels, new_tokens), repeats)
    generated = out.shape[1] - ids.shape[1]
    return ids.shape[0] * (generated - 1) / (total - first), generated, total


def prefill_breakdown(model, ids, pixels):
    """CUDA-event times (ms) of the vision towers, connector + projector and LM prefill inside one forward."""
    inner = model.model
    events = {name: (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for name in ("vision towers", "LM prefill")}

    def timed_forward(module, name):
        original = module.forward

        def wrapper(*args, **kwargs):
            events[name][0].record()
            result = original(*args, **kwargs)
            events[name][1].record()
            return result
        module.forward = wrapper
        return original

    originals = [(inner.vision_tower, timed_forward(inner.vision_tower, "vision towers")),
                 (inner.language_model, timed_forward(inner.language_model, "LM prefill"))]
    start_conn, end_proj = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
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
        torch.cuda.synchronize()
        times = {name: s.elapsed_time(e) for name, (s, e) in events.items()}
        times["connector+projector"] = start_conn.elapsed_time(end_proj)
    finally:
        for module, original in originals:
            module.forward = original
        inner.connector.forward, inner.projector.forward = conn_forward, proj_forward
    return times


def bench_mlmamba(results):
    model = build_mlmamba()
    config = model.config
    pixels1 = torch.randn(1, 2, 3, 384, 384, device="cuda", dtype=torch.bfloat16)
    paper_ids = random_prompt(1, 31, config.text_config.vocab_size, config.image_token_id)
    question_ids = random_prompt(1, 32, config.text_config.vocab_size, config.image_token_id)
    warm_up(model, paper_ids, pixels1)
    warm_up(model, question_ids, pixels1)
    ttft, _ = timed(generate_fn(model, question_ids, pixels1, 1), repeats=10)
    results["ttft_ms"] = ttft * 1e3
    results["prefill_breakdown_ms"] = prefill_breakdown(model, question_ids, pixels1)

    total, out = timed(generate_fn(model, paper_ids, pixels1, 256), repeats=5)
    generated = out.shape[1] - paper_ids.shape[1]
    results["paper_metric"] = {"generated_tokens": generated, "seconds": total, "tokens_per_s": generated / total}

    results["decode"] = {}
    for batch in (1, 8, 32):
        ids = paper_ids.expand(batch, -1).contiguous()
        pixels = pixels1.expand(batch, -1, -1, -1, -1).contiguous()
        rate, generated, _ = decode_rate(model, ids, pixels, 256, repeats=3)
        memory = peak_memory_gib(generate_fn(model, ids, pixels, 256))
        results["decode"][f"batch{batch}"] = {"tokens_per_s": rate, "generated_per_sequence": generated,
                                              "peak_memory_gib": memory}

    memory_by_length = {n: peak_memory_gib(generate_fn(model, paper_ids, pixels1, n)) for n in (16, 256, 1024)}
    results["peak_memory_gib_by_new_tokens_batch1"] = memory_by_length

    long_ids = random_prompt(1, 4096 - IMAGE_TOKENS, config.text_config.vocab_size, config.image_token_id)
    rate, _, _ = decode_rate(model, long_ids, pixels1, 256, repeats=2)
    results["decode_4k_context_batch1_tokens_per_s"] = rate

    model.config.use_cuda_graphs = False
    rate, _, _ = decode_rate(model, paper_ids, pixels1, 32, repeats=1)
    results["decode_eager_batch1_tokens_per_s"] = rate
    model.config.use_cuda_graphs = True
    return model


def bench_transformers_mamba2(model, results):
    lm_state = {("backbone." + k): v for k, v in model.model.language_model.state_dict().items()}
    config = model.config.text_config
    del model
    torch.cuda.empty_cache()
    with torch.device("cuda"):
        reference = transformers.Mamba2ForCausalLM._from_config(config, dtype=torch.bfloat16).eval()
    reference.load_state_dict(lm_state, strict=False)
    ids = random_prompt(1, 760, config.vocab_size, 50277, with_image=False)

    def run(n):
        def call():
            with torch.no_grad():
                return reference.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                          min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
        return call
    run(2)()
    first, _ = timed(run(1), 1)
    total, out = timed(run(32), 1)
    results["transformers_mamba2_decode_batch1_tokens_per_s"] = (out.shape[1] - ids.shape[1] - 1) / (total - first)
    del reference
    torch.cuda.empty_cache()


def bench_llava(results):
    vision = transformers.SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                                             num_attention_heads=16, image_size=384, patch_size=14)
    text = transformers.LlamaConfig(hidden_size=2560, intermediate_size=6912, num_hidden_layers=32,
                                    num_attention_heads=20, num_key_value_heads=20, vocab_size=50288,
                                    max_position_embeddings=32768)
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_id=50277,
                                      image_seq_length=IMAGE_TOKENS, vision_feature_select_strategy="full")
    with torch.device("cuda"):
        llava = transformers.LlavaForConditionalGeneration._from_config(
            config, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    params = sum(p.numel() for p in llava.parameters()) / 1e9
    pixels = torch.randn(1, 3, 384, 384, device="cuda", dtype=torch.bfloat16)
    results["llava"] = {"parameters_billion": params}
    for context in (1024, 4096, 16384):
        ids = random_prompt(1, context - IMAGE_TOKENS, text.vocab_size, 50277)

        def run(n):
            def call():
                with torch.no_grad():
                    return llava.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                                          max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                                          pad_token_id=0)
            return call
        run(2)()
        first, _ = timed(run(1), 2)
        total, out = timed(run(129), 2)
        memory = peak_memory_gib(run(129))
        results["llava"][f"context{context}"] = {
            "decode_tokens_per_s": (out.shape[1] - ids.shape[1] - 1) / (total - first),
            "ttft_ms": first * 1e3, "peak_memory_gib": memory,
        }


def profile(results):
    """Where prefill and decode time goes: profiler top ops of one LM prefill, graph replay vs a generate step."""
    model = build_mlmamba()
    config = model.config
    pixels = torch.randn(1, 2, 3, 384, 384, device="cuda", dtype=torch.bfloat16)
    ids = random_prompt(1, 31, config.text_config.vocab_size, config.image_token_id)
    generate_fn(model, ids, pixels, 8)()
    lm = model.model.language_model
    embeds = torch.randn(1, ids.shape[1], 2560, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        for _ in range(3):
            lm(embeds)
        prefill_s, _ = timed(lambda: lm(embeds), 5)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            lm(embeds)
            torch.cuda.synchronize()
    results["profile_lm_prefill_760_ms"] = prefill_s * 1e3
    results["profile_lm_prefill_top_ops"] = prof.key_averages().table(sort_by="cuda_time_total", row_limit=15)
    results["profile_lm_prefill_top_cpu_ops"] = prof.key_averages().table(sort_by="self_cpu_time_total",
                                                                          row_limit=12)
    graph = next(iter(model.decode_graphs.graphs.values()))
    token = ids[:, -1:]
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        model.decode_step(token[:, 0], graph.states)
        torch.cuda.synchronize()
    results["profile_decode_step_kernels"] = prof.key_averages().table(sort_by="cuda_time_total", row_limit=12)
    print(results["profile_decode_step_kernels"])
    replay_s, _ = timed(lambda: [graph.step(token) for _ in range(100)], 3)
    results["profile_graph_replay_ms"] = replay_s * 10
    rate, _, _ = decode_rate(model, ids, pixels, 256, repeats=3)
    results["profile_generate_step_ms"] = 1e3 / rate
    print(results["profile_lm_prefill_top_ops"])
    print(results["profile_lm_prefill_top_cpu_ops"])
    print(f"LM prefill (760 tokens): {prefill_s * 1e3:.1f} ms; graph replay {replay_s * 10:.2f} ms/token; "
          f"generate() decode step {1e3 / rate:.2f} ms/token")


def table(results):
    rows = [("time to first token (image + 32-token question)", f"{results['ttft_ms']:.1f} ms"),
            ("  eager (no graph) prefill: " + ", ".join(f"{k} {v:.1f} ms" for k, v in results["prefill_breakdown_ms"].items()),
             ""),
            ("paper metric: 256 tokens from pixels, batch 1",
             f"{results['paper_metric']['tokens_per_s']:.0f} tok/s "
             f"({results['paper_metric']['generated_tokens']} tokens in {results['paper_metric']['seconds']:.2f} s)")]
    for name, entry in results["decode"].items():
        rows.append((f"decode {name}, CUDA graphs", f"{entry['tokens_per_s']:.0f} tok/s, "
                                                    f"peak {entry['peak_memory_gib']:.1f} GiB"))
    rows.append(("decode batch1 at 4k context", f"{results['decode_4k_context_batch1_tokens_per_s']:.0f} tok/s"))
    rows.append(("decode batch1, eager (use_cuda_graphs=False)",
                 f"{results['decode_eager_batch1_tokens_per_s']:.1f} tok/s"))
    rows.append(("peak memory for 16/256/1024 new tokens",
                 " / ".join(f"{v:.2f}" for v in results["peak_memory_gib_by_new_tokens_batch1"].values()) + " GiB"))
    if "transformers_mamba2_decode_batch1_tokens_per_s" in results:
        rows.append(("transformers Mamba2ForCausalLM.generate, batch1",
                     f"{results['transformers_mamba2_decode_batch1_tokens_per_s']:.1f} tok/s"))
    for name, entry in results.get("llava", {}).items():
        if name.startswith("context"):
            rows.append((f"LLaVA ({results['llava']['parameters_billion']:.2f}B) {name}",
                         f"{entry['decode_tokens_per_s']:.0f} tok/s, ttft {entry['ttft_ms']:.0f} ms, "
                         f"peak {entry['peak_memory_gib']:.1f} GiB"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default="benchmark.json", help="where to write all measurements")
    parser.add_argument("--skip", nargs="*", default=[], choices=["transformers-mamba2", "llava"],
                        help="comparisons to leave out")
    parser.add_argument("--profile", action="store_true",
                        help="only profile the LM prefill and the decode step, then stop")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("examples/benchmark.py needs a CUDA GPU")
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "transformers": transformers.__version__, "python": platform.python_version()}
    for package in ("mamba_ssm", "causal_conv1d", "triton"):
        try:
            results[package] = __import__(package).__version__
        except ImportError:
            results[package] = None
    if args.profile:
        profile(results)
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)
        return
    model = bench_mlmamba(results)
    if "transformers-mamba2" not in args.skip:
        bench_transformers_mamba2(model, results)
    else:
        del model
    torch.cuda.empty_cache()
    if "llava" not in args.skip:
        bench_llava(results)
    with open(args.json, "w") as handle:
        json.dump(results, handle, indent=2)
    print(table(results))


if __name__ == "__main__":
    main()
