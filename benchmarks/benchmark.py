"""Speed and memory of ML-Mamba generation at the full `mlmamba+3b` size (random bf16 weights) on one CUDA GPU,
beside the released code's path and a same-size Transformer VLM, all in one process on the same GPU.

Every row is printed with its ratio to the released code's path: mamba_ssm's `MambaLMHeadModel.generate(cg=True)`
with the Mamba-2 2.7B LM on the same prompt lengths (the language model alone, so its prompt processing leaves out
the vision towers). Rows, through plain `model.generate()` (greedy, every new token generated):
  * the memory-bandwidth bound: the bytes one decode step must read (and write: states) over the bandwidth of a
    device-to-device copy measured in this run;
  * decode tokens/s at batch 1, 8 and 32 (prompt: 729 image + 31 text tokens, 256 new tokens), with the fused decode
    step on and off, and peak memory;
  * time to first token (one image + a 32-token question) and where its time goes: eager per-module times; with
    graphs `generate()`, the forward inside it, the prefill graph's replay alone, and the towers, connector +
    projector and LM prefill each captured in a graph of its own;
  * the paper's metric: 256 tokens from pixels at batch 1;
  * many images in one prompt, 16 (11.7k image tokens) and 64 (46.7k): time to first token, decode tokens/s and
    peak memory, beside a same-size LLaVA-style Transformer (SigLIP + 2.7B Llama-style LM, SDPA), or the prompt at
    which it ran out of memory;
  * greedy tokens with and without CUDA graphs and the fused step: identical with and without graphs is checked
    (the run fails otherwise); fused against per-op is reported, with the logit difference.
Each stage writes --json as it ends (a stopped run keeps its numbers); the table is printed last. `--tiny` runs
every row with tiny models on the CPU (a smoke test: the numbers mean nothing).

    python benchmarks/benchmark.py --json benchmark.json
"""

import argparse
import cProfile
import io
import json
import platform
import pstats
import statistics
import time
from dataclasses import dataclass

import torch
import transformers
from transformers import DynamicCache

from modeling_mlmamba import MLMambaConfig, MLMambaForConditionalGeneration
from modeling_mlmamba.cuda_graphs import GenerationGraphs, GraphedCall, cache_states
from modeling_mlmamba.decode_kernels import FUSED_MAX_BATCH

PROMPT_TEXT_TOKENS = 31  # + 729 image tokens = the paper's 760-token prompt
# The decode steps `use_fused_decode_step` switches between: on, the fused step (batch 1) or the per-op step with the
# package's streaming state update (larger batches); off, the per-op step with mamba_ssm's kernels.
STEP_NAMES = {"fused": "fused step", "streaming": "per-op step + streaming state update", "per_op": "per-op step"}
QUESTION_TOKENS = 32


@dataclass
class Plan:
    """What one run measures: the full-size GPU run, or `--tiny` on the CPU."""

    device: torch.device
    dtype: torch.dtype
    config: MLMambaConfig
    new_tokens: int = 256
    batches: tuple = (1, 8, 32)
    image_counts: tuple = (16, 64)
    # As many as the 1-image row: t(new) - t(1) then holds a long decode against two prefills of up to 0.9 s.
    many_image_new_tokens: int = 256
    llava_new_tokens: int = 32
    check_tokens: int = 32
    memory_new_tokens: tuple = (16, 256, 1024)
    repeats: int = 3

    @classmethod
    def full(cls):
        return cls(torch.device("cuda"), torch.bfloat16, MLMambaConfig())

    @classmethod
    def tiny(cls):
        return cls(torch.device("cpu"), torch.float32, MLMambaConfig.tiny(), new_tokens=4, batches=(1, 2, 3),
                   image_counts=(2, 3), many_image_new_tokens=3, llava_new_tokens=3, check_tokens=4,
                   memory_new_tokens=(2, 4), repeats=1)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats=3):
    """Median wall time (s) of fn() with the device synchronised around each call, and fn's last result."""
    times, result = [], None
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        result = fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def peak_memory_gib(fn, device):
    """Peak GPU memory allocated during fn() (None on the CPU)."""
    if device.type != "cuda":
        fn()
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def copy_bandwidth(device) -> float:
    """Bytes per second moved by a device-to-device copy (each byte read and written counts), median of 10."""
    size = 2**30 if device.type == "cuda" else 2**26
    source = torch.empty(size, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    seconds, _ = timed(lambda: target.copy_(source), device, repeats=10)
    return 2 * size / seconds


def decode_bytes(model, batch: int) -> int:
    """What one decode step must move: every LM weight (the tied head once) read, every state read and written."""
    lm = model.model.language_model
    weights = sum(p.nbytes for p in {*lm.parameters(), model.lm_head.weight})
    dims, config = lm.layers[0].mixer.dims, lm.config
    states = dims.conv_dim * config.conv_kernel * lm.embeddings.weight.element_size() + dims.num_heads * (
        dims.head_dim * dims.state_size * 4
    )
    return weights + 2 * batch * states * config.num_hidden_layers


def random_prompt(plan: Plan, batch: int, text_tokens: int, images: int = 1, seed: int = 0) -> torch.Tensor:
    """`images` x image_seq_length placeholders first (the released layout), then random text tokens."""
    config = plan.config
    generator = torch.Generator().manual_seed(seed)
    text = torch.randint(1, config.image_token_id - 1, (batch, text_tokens), generator=generator)
    image = torch.full((batch, images * config.image_seq_length), config.image_token_id)
    return torch.cat([image, text], dim=1).to(plan.device)


def random_pixels(plan: Plan, images: int) -> torch.Tensor:
    size = plan.config.dino_config.image_size
    return torch.randn(images, 2, 3, size, size, device=plan.device, dtype=plan.dtype)


def build_mlmamba(plan: Plan):
    with plan.device:
        model = MLMambaForConditionalGeneration._from_config(plan.config, dtype=plan.dtype)
    model.model.vision_tower.dino.set_attn_implementation("sdpa")
    model.model.vision_tower.siglip.set_attn_implementation("sdpa")
    return model.eval()


def generate_fn(model, ids, pixels, new_tokens, **kwargs):
    def run():
        with torch.no_grad():
            return model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                pad_token_id=0, **kwargs,
            )
    return run


def warm_up(model, ids, pixels):
    """Two prompts of this shape: the second captures its prefill graph; a decode graph for the batch size."""
    for _ in range(2):
        generate_fn(model, ids, pixels, 2)()


def decode_rate(plan, model, ids, pixels, new_tokens, repeats):
    """(tokens/s of the decode phase, time to first token in s): batch x (new - 1) / (t(new) - t(1))."""
    warm_up(model, ids, pixels)
    first, _ = timed(generate_fn(model, ids, pixels, 1), plan.device, repeats)
    total, out = timed(generate_fn(model, ids, pixels, new_tokens), plan.device, repeats)
    generated = out.shape[1] - ids.shape[1]
    if generated != new_tokens:
        raise RuntimeError(f"generate() returned {generated} new tokens, not {new_tokens}")
    return ids.shape[0] * (generated - 1) / (total - first), first


def rel_err(ours: torch.Tensor, reference: torch.Tensor) -> float:
    ours, reference = ours.double(), reference.double()
    return ((ours - reference).norm() / reference.norm()).item()


def greedy_checks(plan, model, batch: int):
    """Greedy tokens for fused step on/off x CUDA graphs on/off. With and without graphs must be identical (the
    graphs replay the eager kernels); fused against per-op differ only in summation order, so how many leading
    tokens agree and the logit difference over steps with identical histories are reported."""
    ids = random_prompt(plan, batch, PROMPT_TEXT_TOKENS, seed=7)
    pixels = random_pixels(plan, batch)
    runs = {}
    for fused in (True, False):
        for graphs in (False, True, True):  # graphs twice: the second call replays captured graphs
            model.config.use_fused_decode_step, model.config.use_cuda_graphs = fused, graphs
            out = generate_fn(model, ids, pixels, plan.check_tokens, output_logits=True, return_dict_in_generate=True)()
            runs[fused, graphs] = out.sequences, torch.stack(out.logits, dim=1).float()
    model.config.use_fused_decode_step = model.config.use_cuda_graphs = True
    prompt = ids.shape[1]
    agree = (runs[True, True][0][:, prompt:] == runs[False, True][0][:, prompt:]).all(0)
    same_history = int(agree.long().cumprod(0).sum())
    compared = slice(1, max(same_history, 1) + 1)  # step 0 is the prefill, identical in both
    return {
        "batch": batch,
        "new_tokens": plan.check_tokens,
        "fused_identical_with_and_without_graphs": torch.equal(runs[True, True][0], runs[True, False][0]),
        "per_op_identical_with_and_without_graphs": torch.equal(runs[False, True][0], runs[False, False][0]),
        "fused_vs_per_op_identical_tokens": bool(agree.all()),
        "fused_vs_per_op_leading_identical_tokens": same_history,
        "fused_vs_per_op_decode_logits_rel_diff": rel_err(runs[True, True][1][:, compared],
                                                          runs[False, True][1][:, compared]),
    }


class Clock:
    """Time marks on the GPU's stream (CUDA events) or on the host clock (CPU)."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def ms(self, start, end) -> float:
        return start.elapsed_time(end) if self.cuda else (end - start) * 1e3


def prefill_breakdown(plan, model, ids, pixels):
    """Times (ms) of the vision towers, connector + projector and the LM prefill inside one eager forward."""
    inner, clock, marks = model.model, Clock(plan.device), {}

    def timed_forward(module, start, end):
        original = module.forward

        def wrapper(*args, **kwargs):
            if start:
                marks[start] = clock.mark()
            result = original(*args, **kwargs)
            if end:
                marks[end] = clock.mark()
            return result
        module.forward = wrapper

    modules = {"vision_tower": ("towers", "towers end"), "connector": ("connector", None),
               "projector": (None, "projector end"), "language_model": ("lm", "lm end")}
    for name, (start, end) in modules.items():
        timed_forward(getattr(inner, name), start, end)
    try:
        with torch.no_grad():
            for _ in range(3):
                model(input_ids=ids, pixel_values=pixels, use_cache=True, logits_to_keep=1)
        synchronize(plan.device)
    finally:
        for name in modules:
            del getattr(inner, name).forward
    return {"vision towers": clock.ms(marks["towers"], marks["towers end"]),
            "connector+projector": clock.ms(marks["connector"], marks["projector end"]),
            "LM prefill": clock.ms(marks["lm"], marks["lm end"])}


def replay_ms(device, replay, repeats=10) -> float:
    """Median time (ms) between CUDA events around `replay()` after a synchronisation: with nothing queued before
    it, this is the device time of what `replay` launches (on the CPU: its wall time)."""
    clock, times = Clock(device), []
    for _ in range(repeats):
        synchronize(device)
        start = clock.mark()
        replay()
        end = clock.mark()
        synchronize(device)
        times.append(clock.ms(start, end))
    return statistics.median(times)


def prefill_split(plan, model, ids, pixels):
    """Where time to first token goes with graphs on (ms): `generate(max_new_tokens=1)`; the model's forward alone
    (host checks, prefill graph replay, cache copies); the replay of the captured prefill graph alone; and each piece
    of the data path captured in a graph of its own (towers, connector + projector, LM prefill), whose sum is the
    device time the whole prefill could take."""
    inner, text = model.model, model.config.text_config

    def forward():
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                         cache=DynamicCache(config=text), use_cache=True, logits_to_keep=1)
    forward()
    host, _ = timed(forward, plan.device, repeats=10)
    generate, _ = timed(generate_fn(model, ids, pixels, 1), plan.device, repeats=10)
    split = {"generate_1_token": generate * 1e3, "forward": host * 1e3}
    graphed = [call for key, call in model.cuda_graphs.prefill_graphs.items() if key[0] == tuple(ids.shape)]
    if graphed and graphed[0].graph is not None:
        split["prefill_graph_replay"] = replay_ms(plan.device, graphed[0].graph.replay)
    with torch.no_grad():
        features = inner.vision_tower(pixels).last_hidden_state
        embeds = inner.get_input_embeddings()(ids)
        pieces = {
            "towers": (lambda p: inner.vision_tower(p).last_hidden_state, pixels),
            "connector+projector": (lambda f: inner.projector(inner.connector(f)), features),
            "LM prefill": (lambda e: inner.language_model(e, cache=DynamicCache(config=text))[0], embeds),
        }
        for name, (piece, example) in pieces.items():
            call = GraphedCall(piece, [example])
            split[f"graphed {name}"] = replay_ms(plan.device, lambda: call(example))
    return split


def bench_mlmamba(plan: Plan, results: dict, many_images: bool, checkpoint):
    model = build_mlmamba(plan)
    bandwidth = copy_bandwidth(plan.device)
    results["bandwidth"] = {
        "copy_bytes_per_s": bandwidth,
        "bound_tokens_per_s": {f"batch{b}": b * bandwidth / decode_bytes(model, b) for b in plan.batches},
        "decode_bytes_batch1": decode_bytes(model, 1),
    }
    results["greedy_checks"] = [greedy_checks(plan, model, batch) for batch in (1, 2)]
    checkpoint("greedy checks")

    pixels1 = random_pixels(plan, 1)
    paper_ids = random_prompt(plan, 1, PROMPT_TEXT_TOKENS)
    question_ids = random_prompt(plan, 1, QUESTION_TOKENS, seed=1)
    warm_up(model, question_ids, pixels1)
    ttft, _ = timed(generate_fn(model, question_ids, pixels1, 1), plan.device, repeats=10)
    results["ttft_ms"] = ttft * 1e3
    results["prefill_breakdown_ms"] = prefill_breakdown(plan, model, question_ids, pixels1)
    results["ttft_split_ms"] = prefill_split(plan, model, question_ids, pixels1)
    checkpoint("time to first token")

    warm_up(model, paper_ids, pixels1)
    total, out = timed(generate_fn(model, paper_ids, pixels1, plan.new_tokens), plan.device, repeats=plan.repeats)
    generated = out.shape[1] - paper_ids.shape[1]
    results["paper_metric"] = {"generated_tokens": generated, "seconds": total, "tokens_per_s": generated / total}

    results["decode"] = {}
    for batch in plan.batches:
        ids = paper_ids.expand(batch, -1).contiguous()
        pixels = pixels1.expand(batch, -1, -1, -1, -1).contiguous()
        for fused in (True, False):
            model.config.use_fused_decode_step = fused
            rate, _ = decode_rate(plan, model, ids, pixels, plan.new_tokens, plan.repeats)
            memory = peak_memory_gib(generate_fn(model, ids, pixels, plan.new_tokens), plan.device)
            step = ("fused" if batch <= FUSED_MAX_BATCH else "streaming") if fused else "per_op"
            results["decode"][f"batch{batch}_{step}"] = {"tokens_per_s": rate, "peak_memory_gib": memory}
            checkpoint(f"decode batch {batch}, {STEP_NAMES[step]}")
    model.config.use_fused_decode_step = True

    results["peak_memory_gib_by_new_tokens_batch1"] = {
        n: peak_memory_gib(generate_fn(model, paper_ids, pixels1, n), plan.device) for n in plan.memory_new_tokens
    }
    model.config.use_cuda_graphs = False
    rate, _ = decode_rate(plan, model, paper_ids, pixels1, plan.check_tokens, repeats=1)
    results["decode_eager_batch1_tokens_per_s"] = rate
    model.config.use_cuda_graphs = True
    checkpoint("memory and eager decode")

    if many_images:
        results["many_images"] = {}
        for images in plan.image_counts:
            model.cuda_graphs = GenerationGraphs()  # drop the graphs (and memory) of earlier prompt shapes
            _empty_cache(plan.device)
            ids = random_prompt(plan, 1, PROMPT_TEXT_TOKENS, images=images)
            pixels = random_pixels(plan, images)
            rate, first = decode_rate(plan, model, ids, pixels, plan.many_image_new_tokens, plan.repeats)
            memory = peak_memory_gib(generate_fn(model, ids, pixels, plan.many_image_new_tokens), plan.device)
            results["many_images"][f"images{images}"] = {
                "prompt_tokens": ids.shape[1], "ttft_ms": first * 1e3, "decode_tokens_per_s": rate,
                "peak_memory_gib": memory}
            checkpoint(f"{images} images")
    return model


def _empty_cache(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bench_released(plan: Plan, results: dict, prompt_lengths: dict):
    """The released code's path: mamba_ssm's MambaLMHeadModel (Mamba-2 2.7B dims, random weights) through its own
    `generate(cg=True)`: eager prompt processing, a captured CUDA graph per decode step."""
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    text = plan.config.text_config
    config = MambaConfig(d_model=text.hidden_size, n_layer=text.num_hidden_layers, vocab_size=text.vocab_size,
                         ssm_cfg={"layer": "Mamba2"}, rms_norm=True, residual_in_fp32=True, fused_add_norm=True,
                         pad_vocab_size_multiple=16)
    model = MambaLMHeadModel(config, device=plan.device, dtype=plan.dtype).eval()

    def run(ids, new_tokens):
        def call():
            with torch.no_grad():
                return model.generate(ids, max_length=ids.shape[1] + new_tokens, cg=True)
        return call

    def rate(ids, new_tokens, repeats):
        run(ids, new_tokens)()  # captures the decode graph for this batch and length
        first, _ = timed(run(ids, 1), plan.device, repeats)
        total, out = timed(run(ids, new_tokens), plan.device, repeats)
        generated = out.shape[1] - ids.shape[1]
        return ids.shape[0] * (generated - 1) / (total - first), first, total

    def fresh_decoding_cache():
        """mamba_ssm keeps one decoding cache sized for the largest batch so far and feeds its states to any smaller
        batch, which its conv kernel refuses: start each batch size and prompt length from none."""
        if hasattr(model, "_decoding_cache"):
            del model._decoding_cache
        _empty_cache(plan.device)

    released = {"decode": {}}
    for batch in plan.batches:
        fresh_decoding_cache()
        ids = torch.randint(1, 50000, (batch, prompt_lengths["paper"]), device=plan.device)
        decode, first, total = rate(ids, plan.new_tokens, repeats=2)
        memory = peak_memory_gib(run(ids, plan.new_tokens), plan.device)
        released["decode"][f"batch{batch}"] = {"tokens_per_s": decode, "peak_memory_gib": memory}
        if batch == 1:
            released["paper_metric_tokens_per_s"] = plan.new_tokens / total
    fresh_decoding_cache()
    ids = torch.randint(1, 50000, (1, prompt_lengths["question"]), device=plan.device)
    run(ids, 1)()
    released["ttft_ms"] = timed(run(ids, 1), plan.device, repeats=5)[0] * 1e3
    released["many_images"] = {}
    for name, length in prompt_lengths.items():
        if name.startswith("images"):
            fresh_decoding_cache()
            ids = torch.randint(1, 50000, (1, length), device=plan.device)
            decode, first, _ = rate(ids, plan.many_image_new_tokens, repeats=1)
            memory = peak_memory_gib(run(ids, plan.many_image_new_tokens), plan.device)
            released["many_images"][name] = {"prompt_tokens": length, "ttft_ms": first * 1e3,
                                             "decode_tokens_per_s": decode, "peak_memory_gib": memory}
    results["released"] = released


def bench_transformers_mamba2(plan: Plan, model, results):
    lm_state = {("backbone." + k): v for k, v in model.model.language_model.state_dict().items()}
    config = model.config.text_config
    with plan.device:
        reference = transformers.Mamba2ForCausalLM._from_config(config, dtype=plan.dtype).eval()
    reference.load_state_dict(lm_state, strict=False)
    ids = random_prompt(plan, 1, PROMPT_TEXT_TOKENS)
    ids = torch.where(ids == plan.config.image_token_id, 1, ids)

    def run(n):
        def call():
            with torch.no_grad():
                return reference.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                          min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
        return call
    run(2)()
    first, _ = timed(run(1), plan.device, 1)
    total, out = timed(run(plan.check_tokens), plan.device, 1)
    results["transformers_mamba2_decode_batch1_tokens_per_s"] = (out.shape[1] - ids.shape[1] - 1) / (total - first)


def build_llava(plan: Plan):
    """A LLaVA-style VLM of ML-Mamba's size: SigLIP tower + Llama-style LM of the Mamba-2 LM's width and ~params."""
    config = plan.config
    siglip = config.siglip_config
    vision = transformers.SiglipVisionConfig(
        hidden_size=siglip.hidden_size, intermediate_size=siglip.intermediate_size,
        num_hidden_layers=siglip.num_hidden_layers, num_attention_heads=siglip.num_attention_heads,
        image_size=siglip.image_size, patch_size=siglip.patch_size)
    width = config.text_config.hidden_size
    text = transformers.LlamaConfig(
        hidden_size=width, intermediate_size=int(2.7 * width),
        num_hidden_layers=config.text_config.num_hidden_layers // 2,
        num_attention_heads=max(width // 128, 2), num_key_value_heads=max(width // 128, 2),
        vocab_size=config.text_config.vocab_size, max_position_embeddings=65536)
    llava_config = transformers.LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=config.image_token_id,
        image_seq_length=config.image_seq_length, vision_feature_select_strategy="full")
    with plan.device:
        llava = transformers.LlavaForConditionalGeneration._from_config(
            llava_config, dtype=plan.dtype, attn_implementation="sdpa").eval()
    return llava


def bench_llava(plan: Plan, results: dict, image_counts):
    llava = build_llava(plan)
    size = plan.config.siglip_config.image_size
    results["llava"] = {"parameters_billion": sum(p.numel() for p in llava.parameters()) / 1e9}
    for images in image_counts:
        ids = random_prompt(plan, 1, PROMPT_TEXT_TOKENS, images=images)
        pixels = torch.randn(images, 3, size, size, device=plan.device, dtype=plan.dtype)

        def run(n):
            def call():
                with torch.no_grad():
                    return llava.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                                          max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                                          pad_token_id=0)
            return call
        try:
            run(2)()
            first, _ = timed(run(1), plan.device, 1)
            total, out = timed(run(plan.llava_new_tokens + 1), plan.device, 1)
            memory = peak_memory_gib(run(plan.llava_new_tokens + 1), plan.device)
        except torch.OutOfMemoryError:
            _empty_cache(plan.device)
            results["llava"][f"images{images}"] = {"prompt_tokens": ids.shape[1], "out_of_memory": True}
            continue
        results["llava"][f"images{images}"] = {
            "prompt_tokens": ids.shape[1], "ttft_ms": first * 1e3, "peak_memory_gib": memory,
            "decode_tokens_per_s": (out.shape[1] - ids.shape[1] - 1) / (total - first)}


def ratio(value, reference):
    return None if value is None or not reference else value / reference


def rows(results) -> list[tuple[str, str, float | None]]:
    """(measurement, value, value / the released path's value) for the table."""
    released = results.get("released", {})
    released_decode = released.get("decode", {})
    table = []
    for name, bound in results["bandwidth"]["bound_tokens_per_s"].items():
        reference = released_decode.get(name, {}).get("tokens_per_s")
        table.append((f"bandwidth bound, decode {name} ({results['bandwidth']['copy_bytes_per_s'] / 1e12:.2f} TB/s "
                      "copy)", f"{bound:.0f} tok/s", ratio(bound, reference)))
    for name, entry in results["decode"].items():
        batch, kind = name.split("_", 1)
        reference = released_decode.get(batch, {})
        memory = entry["peak_memory_gib"]
        table.append((f"decode {batch}, {STEP_NAMES[kind]}, CUDA graphs",
                      f"{entry['tokens_per_s']:.0f} tok/s" + (f", peak {memory:.1f} GiB" if memory else ""),
                      ratio(entry["tokens_per_s"], reference.get("tokens_per_s"))))
    breakdown = ", ".join(f"{k} {v:.1f}" for k, v in results["prefill_breakdown_ms"].items())
    table.append(("time to first token, image + 32-token question", f"{results['ttft_ms']:.1f} ms",
                  ratio(results["ttft_ms"], released.get("ttft_ms"))))
    table.append((f"  eager prefill (ms): {breakdown}", "", None))
    split = results["ttft_split_ms"]
    table.append((f"  with graphs (ms): generate(1 token) {split['generate_1_token']:.1f}, forward "
                  f"{split['forward']:.1f}, prefill graph replay {split.get('prefill_graph_replay', float('nan')):.1f}",
                  "", None))
    pieces = ", ".join(f"{k[len('graphed '):]} {v:.1f}" for k, v in split.items() if k.startswith("graphed "))
    table.append((f"  each piece in a graph of its own (ms): {pieces}", "", None))
    paper = results["paper_metric"]
    table.append((f"paper metric: {paper['generated_tokens']} tokens from pixels, batch 1",
                  f"{paper['tokens_per_s']:.0f} tok/s", ratio(paper["tokens_per_s"],
                                                              released.get("paper_metric_tokens_per_s"))))
    llava = results.get("llava", {}).get("images1")
    if llava and not llava.get("out_of_memory"):
        table.append((f"  LLaVA ({results['llava']['parameters_billion']:.2f}B), one image ({llava['prompt_tokens']} "
                      "tokens)", f"ttft {llava['ttft_ms']:.0f} ms, {llava['decode_tokens_per_s']:.1f} tok/s",
                      ratio(llava["decode_tokens_per_s"], released_decode.get("batch1", {}).get("tokens_per_s"))))
    table.append(("decode batch1, eager (use_cuda_graphs=False)", f"{results['decode_eager_batch1_tokens_per_s']:.1f} "
                  "tok/s", ratio(results["decode_eager_batch1_tokens_per_s"],
                                 released_decode.get("batch1", {}).get("tokens_per_s"))))
    memory = results["peak_memory_gib_by_new_tokens_batch1"]
    if all(v is not None for v in memory.values()):
        table.append((f"peak memory for {'/'.join(map(str, memory))} new tokens, batch 1",
                      " / ".join(f"{v:.2f}" for v in memory.values()) + " GiB", None))
    for name, entry in results.get("many_images", {}).items():
        reference = released.get("many_images", {}).get(name, {})
        label = f"{name[6:]} images ({entry['prompt_tokens']} tokens)"
        table.append((f"{label}: time to first token", f"{entry['ttft_ms']:.0f} ms",
                      ratio(entry["ttft_ms"], reference.get("ttft_ms"))))
        table.append((f"{label}: decode batch 1", f"{entry['decode_tokens_per_s']:.0f} tok/s",
                      ratio(entry["decode_tokens_per_s"], reference.get("decode_tokens_per_s"))))
        if entry["peak_memory_gib"] is not None:
            table.append((f"{label}: peak memory", f"{entry['peak_memory_gib']:.1f} GiB",
                          ratio(entry["peak_memory_gib"], reference.get("peak_memory_gib"))))
        llava = results.get("llava", {}).get(name)
        if llava and llava.get("out_of_memory"):
            table.append((f"  LLaVA ({results['llava']['parameters_billion']:.2f}B), same prompt", "out of memory",
                          None))
        elif llava:
            table.append((f"  LLaVA ({results['llava']['parameters_billion']:.2f}B), same prompt",
                          f"ttft {llava['ttft_ms']:.0f} ms, {llava['decode_tokens_per_s']:.1f} tok/s"
                          + (f", peak {llava['peak_memory_gib']:.1f} GiB" if llava["peak_memory_gib"] else ""),
                          ratio(llava["decode_tokens_per_s"], reference.get("decode_tokens_per_s"))))
    if "transformers_mamba2_decode_batch1_tokens_per_s" in results:
        value = results["transformers_mamba2_decode_batch1_tokens_per_s"]
        table.append(("transformers Mamba2ForCausalLM.generate, batch 1", f"{value:.1f} tok/s",
                      ratio(value, released_decode.get("batch1", {}).get("tokens_per_s"))))
    for check in results["greedy_checks"]:
        table.append((f"greedy tokens batch {check['batch']}: with == without graphs (fused / per-op)",
                      f"{check['fused_identical_with_and_without_graphs']} / "
                      f"{check['per_op_identical_with_and_without_graphs']}", None))
        table.append((f"greedy tokens batch {check['batch']}: fused vs per-op",
                      f"{check['fused_vs_per_op_leading_identical_tokens']}/{check['new_tokens']} leading tokens "
                      f"identical, logits rel. diff {check['fused_vs_per_op_decode_logits_rel_diff']:.1e}", None))
    return table


def table(results) -> str:
    lines = rows(results)
    width = max(len(name) for name, _, _ in lines)
    value_width = max(len(value) for _, value, _ in lines)
    header = (f"{'measurement':<{width}}  {'value':<{value_width}}  ratio to the released path (value / "
              "MambaLMHeadModel.generate(cg=True), same GPU)")
    body = [f"{name:<{width}}  {value:<{value_width}}  {'' if r is None else f'{r:.2f}x'}" for name, value, r in lines]
    return "\n".join([header, *body])


def host_profile(fn, rows: int = 30) -> str:
    """The host's Python functions during fn(), by cumulative time (cProfile). On a GPU, time the host spends
    waiting for the device shows in the calls that synchronize."""
    profiler = cProfile.Profile()
    profiler.runcall(fn)
    stream = io.StringIO()
    pstats.Stats(profiler, stream=stream).sort_stats("cumulative").print_stats(rows)
    return stream.getvalue()


def profile(plan, results):
    """Where prefill and decode time go: top kernels of one LM prefill, of one whole eager prefill (towers,
    connector, projector, LM) and of one decode step (fused and per-op); and the host's side of time to first token
    (`generate(max_new_tokens=1)` with its graphs captured: Python functions, and operators by host time) and of
    eager decoding (`use_cuda_graphs=False`, 8 new tokens)."""
    model = build_mlmamba(plan)
    pixels = random_pixels(plan, 1)
    ids = random_prompt(plan, 1, PROMPT_TEXT_TOKENS)
    generate_fn(model, ids, pixels, 8)()
    question = random_prompt(plan, 1, QUESTION_TOKENS)
    first_token = generate_fn(model, question, pixels, 1)
    warm_up(model, question, pixels)
    results["profile_first_token_host_functions"] = host_profile(first_token)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if plan.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        first_token()
        synchronize(plan.device)
    results["profile_first_token_host_ops"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    model.config.use_cuda_graphs = False
    eager_decode = generate_fn(model, ids, pixels, 8)
    eager_decode()
    results["profile_eager_decode_host_functions"] = host_profile(eager_decode)
    model.config.use_cuda_graphs = True
    lm = model.model.language_model
    embeds = torch.randn(1, ids.shape[1], lm.config.hidden_size, device=plan.device, dtype=plan.dtype)
    by_time = "cuda_time_total" if plan.device.type == "cuda" else "cpu_time_total"
    with torch.no_grad():
        for _ in range(3):
            lm(embeds)
        with torch.profiler.profile(activities=activities) as prof:
            lm(embeds)
            synchronize(plan.device)
        results["profile_lm_prefill_top_ops"] = prof.key_averages().table(sort_by=by_time, row_limit=15)
        with torch.profiler.profile(activities=activities) as prof:
            model(input_ids=ids, pixel_values=pixels, logits_to_keep=1)
            synchronize(plan.device)
        results["profile_eager_prefill_top_ops"] = prof.key_averages().table(sort_by=by_time, row_limit=30)
        cache = DynamicCache(config=model.config.text_config)
        model(input_ids=ids, pixel_values=pixels, cache=cache, logits_to_keep=1)
        states = [(conv.clone(), ssm.clone()) for conv, ssm in cache_states(cache)]
        token = ids[:, -1]
        for fused in (True, False):
            lm.step(token, states, fused=fused)
            with torch.profiler.profile(activities=activities) as prof:
                lm.step(token, states, fused=fused)
                synchronize(plan.device)
            name = f"profile_decode_step_{'fused' if fused else 'per_op'}_kernels"
            results[name] = prof.key_averages().table(sort_by=by_time, row_limit=12)
            print(results[name])
    for name in ("profile_lm_prefill_top_ops", "profile_eager_prefill_top_ops", "profile_first_token_host_functions",
                 "profile_first_token_host_ops", "profile_eager_decode_host_functions"):
        print(results[name])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default="benchmark.json", help="where to write all measurements")
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=["released", "transformers-mamba2", "llava", "many-images"],
                        help="rows to leave out")
    parser.add_argument("--tiny", action="store_true", help="tiny models on the CPU: a smoke test of every row")
    parser.add_argument("--profile", action="store_true",
                        help="only profile (prefill and decode kernels, host work of the first token and of eager "
                             "decoding), then stop")
    args = parser.parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("benchmarks/benchmark.py needs a CUDA GPU (or --tiny for the CPU smoke test)")
    plan = Plan.tiny() if args.tiny else Plan.full()
    results = {"device": torch.cuda.get_device_name() if plan.device.type == "cuda" else platform.processor(),
               "torch": torch.__version__, "transformers": transformers.__version__,
               "python": platform.python_version(), "tiny": args.tiny}
    for package in ("mamba_ssm", "causal_conv1d", "triton"):
        try:
            results[package] = __import__(package).__version__
        except ImportError:
            results[package] = None
    if args.profile:
        profile(plan, results)
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)
        return results

    started = time.perf_counter()

    def checkpoint(stage: str) -> None:
        """Write what is measured so far, so a run stopped part-way still leaves its numbers."""
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)
        print(f"[{time.perf_counter() - started:5.0f} s] {stage}", flush=True)

    many_images = "many-images" not in args.skip
    model = bench_mlmamba(plan, results, many_images, checkpoint)
    if "transformers-mamba2" not in args.skip:
        bench_transformers_mamba2(plan, model, results)
        _empty_cache(plan.device)
        checkpoint("transformers Mamba2ForCausalLM")
    seq = plan.config.image_seq_length
    prompt_lengths = {"paper": seq + PROMPT_TEXT_TOKENS, "question": seq + QUESTION_TOKENS}
    if many_images:
        prompt_lengths |= {f"images{n}": n * seq + PROMPT_TEXT_TOKENS for n in plan.image_counts}
    del model
    _empty_cache(plan.device)
    if "released" in args.skip:
        results["released"] = {"skipped": "--skip released"}
    elif plan.device.type != "cuda" or results["mamba_ssm"] is None:
        results["released"] = {"skipped": "needs a CUDA GPU and mamba_ssm"}
    else:
        bench_released(plan, results, prompt_lengths)
        _empty_cache(plan.device)
        checkpoint("released path")
    if "llava" not in args.skip:
        bench_llava(plan, results, (1, *plan.image_counts) if many_images else (1,))
    checkpoint("done")
    print(table(results))
    broken = [check for check in results["greedy_checks"] if not (
        check["fused_identical_with_and_without_graphs"] and check["per_op_identical_with_and_without_graphs"])]
    if broken:
        raise RuntimeError(f"greedy tokens differ with and without CUDA graphs: {broken}")
    return results


if __name__ == "__main__":
    main()
