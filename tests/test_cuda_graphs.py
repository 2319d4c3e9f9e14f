"""The CUDA-graph decode bookkeeping, exercised on CPU where a 'graph' replays the same step eagerly."""

import gc

import pytest
import torch
from conftest import image_prompt, random_pixels, tiny_model
from peft import get_peft_model
from transformers import DynamicCache

from modeling_mlmamba import mamba2, ssd
from modeling_mlmamba import cuda_graphs
from modeling_mlmamba.cuda_graphs import cache_states
from modeling_mlmamba.lora import lora_config
from modeling_mlmamba.quantization import graph_capturable


@pytest.fixture
def graph_model(monkeypatch):
    model = tiny_model()
    monkeypatch.setattr(type(model), "cuda_graph_devices", ("cpu",))
    return model


def generate(model, ids, pixels, use_graphs, **kwargs):
    model.config.use_cuda_graphs = use_graphs
    return model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels, max_new_tokens=6, **kwargs
    )


def prompts(config, batch):
    ids = torch.tensor([image_prompt(config, [5 + i, 6, 7]) for i in range(batch)])
    return ids, random_pixels(batch, config)


def test_greedy_tokens_identical_with_and_without_graphs(graph_model):
    ids, pixels = prompts(graph_model.config, 2)
    eager = generate(graph_model, ids, pixels, use_graphs=False, do_sample=False, eos_token_id=None)
    assert not graph_model.cuda_graphs.decode_graphs
    replayed = generate(graph_model, ids, pixels, use_graphs=True, do_sample=False, eos_token_id=None)
    assert len(graph_model.cuda_graphs.decode_graphs) == 1
    assert torch.equal(replayed, eager)


def test_sampling_and_stopping_criteria_identical_with_and_without_graphs(graph_model):
    ids, pixels = prompts(graph_model.config, 3)
    greedy = generate(graph_model, ids, pixels, use_graphs=False, do_sample=False, eos_token_id=None)
    stop_token = int(greedy[0, ids.shape[1] + 2])  # the first sample stops early, the others carry on
    results = []
    for use_graphs in (False, True):
        torch.manual_seed(0)
        results.append(generate(graph_model, ids, pixels, use_graphs, do_sample=True, top_k=5,
                                eos_token_id=stop_token, pad_token_id=0))
    assert torch.equal(results[0], results[1])


def test_one_graph_per_batch_size_reused_across_calls(graph_model):
    config = graph_model.config
    for batch in (1, 2, 1):
        ids, pixels = prompts(config, batch)
        generate(graph_model, ids, pixels, use_graphs=True, do_sample=False, eos_token_id=None)
    assert sorted(key[0] for key in graph_model.cuda_graphs.decode_graphs) == [1, 2]


def test_cache_is_bound_to_graph_buffers_and_an_older_live_cache_keeps_its_state(graph_model):
    config = graph_model.config
    graphs = graph_model.cuda_graphs

    def prefill(seed):
        ids = torch.tensor([image_prompt(config, [5 + seed, 6])])
        cache = DynamicCache(config=config.text_config)
        with torch.no_grad():
            graph_model(input_ids=ids, pixel_values=random_pixels(1, config, seed=seed), cache=cache, use_cache=True)
        return cache

    first, second = prefill(0), prefill(1)
    first_states = [(conv.clone(), ssm.clone()) for conv, ssm in cache_states(first)]
    token = torch.tensor([[9]])
    with torch.no_grad():
        graph_model(input_ids=token, cache=first)
        advanced = [(conv.clone(), ssm.clone()) for conv, ssm in cache_states(first)]
        graph = next(iter(graphs.decode_graphs.values()))
        assert graph.is_bound_to(first)
        assert any(not torch.equal(a[1], b[1]) for a, b in zip(advanced, first_states))

        graph_model(input_ids=token, cache=second)  # rebinding must not clobber the still-alive first cache
    assert graph.is_bound_to(second) and not graph.is_bound_to(first)
    for (conv, ssm), (conv_ref, ssm_ref) in zip(cache_states(first), advanced):
        assert torch.equal(conv, conv_ref) and torch.equal(ssm, ssm_ref)
    del first
    gc.collect()


def test_changed_weights_rebuild_the_graphs(graph_model):
    ids, pixels = prompts(graph_model.config, 1)
    generate(graph_model, ids, pixels, use_graphs=True, do_sample=False, eos_token_id=None)
    old_graph = next(iter(graph_model.cuda_graphs.decode_graphs.values()))
    graph_model.lm_head = torch.nn.Linear(graph_model.lm_head.in_features, graph_model.lm_head.out_features,
                                          bias=False)
    generate(graph_model, ids, pixels, use_graphs=True, do_sample=False, eos_token_id=None)
    assert next(iter(graph_model.cuda_graphs.decode_graphs.values())) is not old_graph


def test_graphs_are_not_used_outside_plain_decoding(graph_model):
    ids, pixels = prompts(graph_model.config, 1)
    cache = DynamicCache(config=graph_model.config.text_config)
    with torch.no_grad():
        graph_model(input_ids=ids, pixel_values=pixels, cache=cache, use_cache=True)
    token = torch.tensor([[9]])
    graphs = graph_model.cuda_graphs

    def route(input_ids, cache, **other_inputs):
        return graphs.route(graph_model, cache, input_ids=input_ids, **other_inputs)

    assert route(token, cache) is None  # gradients enabled
    with torch.no_grad():
        assert route(token, cache) == "decode"
        assert route(token, cache, use_cache=True, return_dict=True, logits_to_keep=1) == "decode"
        assert route(token, cache, output_hidden_states=True) is None
        assert route(token, cache, pixel_values=random_pixels(1, graph_model.config)) is None
        assert route(token, cache, inputs_embeds=torch.zeros(1, 1, 4)) is None
        assert route(token, cache, labels=token) is None
        assert route(token, cache, use_cache=False) is None
        assert route(token, cache, an_argument_added_later=torch.ones(1)) is None
        assert route(torch.tensor([[9, 10]]), cache) is None
        fresh = DynamicCache(config=graph_model.config.text_config)
        assert route(ids, fresh, logits_to_keep=1) == "prefill"
        assert route(ids, fresh) is None  # all logits asked for
        assert route(ids, fresh, logits_to_keep=torch.tensor([0])) is None
        assert route(ids, None, logits_to_keep=1) is None
        graph_model.train()
        assert route(token, cache) is None
        graph_model.eval()
        graph_model.config.use_cuda_graphs = False
        assert route(token, cache) is None


def test_cpu_tensors_never_reach_gpu_kernels(monkeypatch):
    """With the kernels 'installed' but the tensors on CPU, every dispatch takes the PyTorch path."""

    def gpu_only(*args, **kwargs):
        raise AssertionError("a GPU kernel was called with CPU tensors")

    for module, name in [(ssd, "mamba_chunk_scan_combined"), (ssd, "selective_state_update"),
                         (mamba2, "causal_conv1d_fn"), (mamba2, "causal_conv1d_update"),
                         (mamba2, "mamba_split_conv1d_scan_combined")]:
        monkeypatch.setattr(module, name, gpu_only)
    model = tiny_model()
    ids, pixels = prompts(model.config, 1)
    out = model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 3


def test_prefill_shapes_are_captured_on_second_sight_and_match_eager(graph_model):
    ids, pixels = prompts(graph_model.config, 2)
    eager = generate(graph_model, ids, pixels, use_graphs=False, do_sample=False, eos_token_id=None)
    first = generate(graph_model, ids, pixels, use_graphs=True, do_sample=False, eos_token_id=None)
    assert not graph_model.cuda_graphs.prefill_graphs
    second = generate(graph_model, ids, pixels, use_graphs=True, do_sample=False, eos_token_id=None)
    assert len(graph_model.cuda_graphs.prefill_graphs) == 1
    assert torch.equal(first, eager) and torch.equal(second, eager)


@pytest.mark.parametrize("with_image", [True, False])
def test_prefill_graph_gives_the_eager_logits_and_states(graph_model, with_image):
    config = graph_model.config
    text = list(range(5, 12))
    ids = torch.tensor([image_prompt(config, text) if with_image else text])
    pixels = random_pixels(1, config) if with_image else None
    with torch.no_grad():
        reference_cache = DynamicCache(config=config.text_config)
        graph_model.config.use_cuda_graphs = False
        expected = graph_model(input_ids=ids, pixel_values=pixels, cache=reference_cache, use_cache=True,
                               logits_to_keep=1).logits
        graph_cache = DynamicCache(config=config.text_config)
        assert graph_model.cuda_graphs.prefill(graph_model, graph_cache, ids, None, pixels) is None
        logits = graph_model.cuda_graphs.prefill(graph_model, graph_cache, ids, None, pixels)
    assert torch.equal(logits, expected)
    for (conv, ssm), (conv_ref, ssm_ref) in zip(cache_states(graph_cache), cache_states(reference_cache)):
        assert torch.equal(conv, conv_ref) and torch.equal(ssm, ssm_ref)


def test_prefill_graphs_keep_only_the_most_recent_shapes(graph_model, monkeypatch):
    monkeypatch.setattr(cuda_graphs, "MAX_PREFILL_GRAPHS", 2)
    with torch.no_grad():
        for length in (10, 10, 20, 20, 30, 30, 20):
            cache = DynamicCache(config=graph_model.config.text_config)
            graph_model.cuda_graphs.prefill(graph_model, cache, torch.randint(1, 100, (1, length)), None, None)
    assert [key[0][1] for key in graph_model.cuda_graphs.prefill_graphs] == [30, 20]


def test_prefill_graph_path_still_checks_placeholders(graph_model):
    config = graph_model.config
    ids = torch.tensor([image_prompt(config, [5])[2:]])
    with pytest.raises(ValueError, match="image placeholder tokens"):
        graph_model.generate(input_ids=ids, pixel_values=random_pixels(1, config), max_new_tokens=2)


def test_decode_graphs_keep_only_the_most_recent_batch_sizes(graph_model, monkeypatch):
    monkeypatch.setattr(cuda_graphs, "MAX_DECODE_GRAPHS", 2)
    config = graph_model.config
    for batch in (1, 2, 3, 2):
        ids, pixels = prompts(config, batch)
        generate(graph_model, ids, pixels, use_graphs=True, do_sample=False, eos_token_id=None)
    assert [key[0] for key in graph_model.cuda_graphs.decode_graphs] == [3, 2]


def test_copied_model_starts_without_graphs(graph_model):
    import copy

    ids, pixels = prompts(graph_model.config, 1)
    generate(graph_model, ids, pixels, use_graphs=True, do_sample=False, eos_token_id=None)
    assert graph_model.cuda_graphs.decode_graphs
    clone = copy.deepcopy(graph_model)
    assert not clone.cuda_graphs.decode_graphs and not clone.cuda_graphs.prefill_graphs
    assert torch.equal(generate(clone, ids, pixels, use_graphs=True, do_sample=False, eos_token_id=None),
                       generate(graph_model, ids, pixels, use_graphs=True, do_sample=False, eos_token_id=None))


def lora_wrapped(model):
    """The model with rank-4 adapters whose B matrices are random, so the adapters change every output."""
    peft_model = get_peft_model(model, lora_config(rank=4, alpha=8, dropout=0.0))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    return peft_model


def graph_objects(graphs) -> list:
    return [*graphs.prefill_graphs.values(), *graphs.decode_graphs.values()]


def merge_adapters(model):
    return lora_wrapped(model).merge_and_unload()


def cast_to_float64(model):
    return model.to(torch.float64)


@pytest.mark.parametrize("change_weights", [merge_adapters, cast_to_float64])
def test_graphs_are_rebuilt_after_weights_are_replaced_and_match_eager(graph_model, change_weights):
    """A graph replays raw pointers to the weights: peft's merge_and_unload (new modules) and a cast (new storage)
    must drop every graph captured before, or CUDA would replay kernels on freed memory."""
    ids, pixels = prompts(graph_model.config, 1)
    for _ in range(2):
        generate(graph_model, ids, pixels, use_graphs=True, do_sample=False, eos_token_id=None)
    before = graph_objects(graph_model.cuda_graphs)
    assert len(before) == 2

    changed = change_weights(graph_model)
    assert changed is graph_model
    eager = generate(changed, ids, pixels, use_graphs=False, do_sample=False, eos_token_id=None)
    replayed = generate(changed, ids, pixels, use_graphs=True, do_sample=False, eos_token_id=None)
    assert torch.equal(replayed, eager)
    after = graph_objects(changed.cuda_graphs)
    assert len(after) == 2 and not any(new is old for new in after for old in before)


def test_load_state_dict_copies_into_the_captured_weights_and_graphs_follow(graph_model):
    ids, pixels = prompts(graph_model.config, 1)
    for _ in range(2):
        generate(graph_model, ids, pixels, use_graphs=True, do_sample=False, eos_token_id=None)
    before = graph_objects(graph_model.cuda_graphs)
    graph_model.load_state_dict(tiny_model(seed=5).state_dict())
    eager = generate(graph_model, ids, pixels, use_graphs=False, do_sample=False, eos_token_id=None)
    assert torch.equal(generate(graph_model, ids, pixels, use_graphs=True, do_sample=False, eos_token_id=None), eager)
    after = graph_objects(graph_model.cuda_graphs)  # same storage: the graphs read the new values
    assert len(after) == 2 and all(new is old for new, old in zip(after, before))


@pytest.fixture
def capture_attempts(graph_model, monkeypatch):
    """Captures 'on CPU': each attempt records its memory pool; the pools are numbered in the order handed out."""
    attempts = []
    pools = iter(range(100))
    monkeypatch.setattr(cuda_graphs, "CAPTURE_DEVICE_TYPES", ("cpu",))
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: next(pools))
    return attempts


def test_a_failed_capture_runs_eagerly_and_that_shape_is_not_captured_again(graph_model, capture_attempts, monkeypatch,
                                                                           caplog):
    def failing_capture(fn, inputs, pool):
        capture_attempts.append(pool)
        raise cuda_graphs.GraphCaptureError("CUDA graph capture failed: operation not permitted when stream is capturing")

    monkeypatch.setattr(cuda_graphs, "capture_graph", failing_capture)
    ids, pixels = prompts(graph_model.config, 1)
    eager = generate(graph_model, ids, pixels, use_graphs=False, do_sample=False, eos_token_id=None)
    for _ in range(3):
        assert torch.equal(generate(graph_model, ids, pixels, use_graphs=True, do_sample=False, eos_token_id=None), eager)
    assert len(capture_attempts) == 2  # the decode step at the first call, the prompt at its second sight
    assert not graph_model.cuda_graphs.prefill_graphs and not graph_model.cuda_graphs.decode_graphs
    assert sum("run eagerly from now on" in record.message for record in caplog.records) == 2

    graph_model.lm_head = torch.nn.Linear(graph_model.lm_head.in_features, graph_model.lm_head.out_features,
                                          bias=False)
    generate(graph_model, ids, pixels, use_graphs=True, do_sample=False, eos_token_id=None)
    assert len(capture_attempts) == 4  # new weights: both shapes are tried once more


def test_graphs_after_a_weights_change_capture_into_a_fresh_memory_pool(graph_model, capture_attempts, monkeypatch):
    """PyTorch releases a graph memory pool with its last graph; capturing into a released pool fails (an internal
    assert in the caching allocator, seen after merge_and_unload)."""
    def recording_capture(fn, inputs, pool):
        capture_attempts.append(pool)
        return None, None  # no graph: calls run fn eagerly

    monkeypatch.setattr(cuda_graphs, "capture_graph", recording_capture)
    ids, pixels = prompts(graph_model.config, 1)
    for _ in range(2):
        generate(graph_model, ids, pixels, use_graphs=True, do_sample=False, eos_token_id=None)
    graph_model.to(torch.float64)
    generate(graph_model, ids, pixels, use_graphs=True, do_sample=False, eos_token_id=None)
    assert capture_attempts == [0, 0, 1, 1]  # decode, prefill; then both again, into a new pool


def prefill_graph_masks(graphs) -> dict:
    """Each captured prefill graph's mask input, by whether its key records a mask dtype."""
    return {key[2]: call.inputs[1] for key, call in graphs.prefill_graphs.items()}


def left_padded_batch(config):
    """Two prompts of different lengths with one image each, the shorter padded on the left."""
    long, short = image_prompt(config, [5, 6, 7, 8, 9]), image_prompt(config, [10, 11])
    pad = len(long) - len(short)
    ids = torch.tensor([long, [0] * pad + short])
    mask = torch.tensor([[1] * len(long), [0] * pad + [1] * len(short)])
    return ids, mask, random_pixels(2, config)


def tokens_and_logits(model, ids, mask, pixels, use_graphs):
    model.config.use_cuda_graphs = use_graphs
    output = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=4,
                            do_sample=False, eos_token_id=None, pad_token_id=0, return_dict_in_generate=True,
                            output_logits=True)
    return output.sequences[:, ids.shape[1]:], torch.stack(output.logits, dim=1)


def test_unpadded_prompt_replays_a_prefill_graph_captured_without_the_mask(graph_model):
    """A graph keeps whatever mask it was captured with (it is replayed with other masks), so an unpadded prompt
    gets a graph of its own, captured with no mask and so without the mask's products in every layer."""
    ids, pixels = prompts(graph_model.config, 2)
    for _ in range(2):
        generate(graph_model, ids, pixels, use_graphs=True, do_sample=False, eos_token_id=None)
    assert prefill_graph_masks(graph_model.cuda_graphs) == {None: None}


def test_padded_batch_after_an_unpadded_prompt_gets_a_masked_graph_and_the_prompts_own_answers(graph_model):
    config = graph_model.config
    ids, mask, pixels = left_padded_batch(config)
    unpadded = ids[:1].expand(2, -1)
    for _ in range(2):
        tokens_and_logits(graph_model, unpadded, torch.ones_like(unpadded), pixels, use_graphs=True)
    graphed = [tokens_and_logits(graph_model, ids, mask, pixels, use_graphs=True) for _ in range(2)]
    masks = prefill_graph_masks(graph_model.cuda_graphs)
    assert masks.keys() == {None, torch.long} and torch.equal(masks[torch.long], mask)

    eager_tokens, eager_logits = tokens_and_logits(graph_model, ids, mask, pixels, use_graphs=False)
    for tokens, logits in graphed:  # captured at the second sight: eager, then the replayed graph
        assert torch.equal(tokens, eager_tokens) and torch.equal(logits, eager_logits)
    for row in range(2):
        alone = ids[row : row + 1, mask[row].bool()]
        alone_tokens, alone_logits = tokens_and_logits(graph_model, alone, torch.ones_like(alone), pixels[row : row + 1],
                                                       use_graphs=False)
        assert torch.equal(eager_tokens[row], alone_tokens[0])
        torch.testing.assert_close(eager_logits[row], alone_logits[0], rtol=1e-4, atol=1e-5)


class OpaqueTensor(torch.Tensor):
    """A tensor subclass: its storage need not be its values, so no captured kernel may read it."""


def subclass_weight(model):
    projection = model.model.language_model.layers[-1].mixer.out_proj
    projection.weight = torch.nn.Parameter(projection.weight.detach().as_subclass(OpaqueTensor), requires_grad=False)


def integer_weight(model):
    norm = model.model.vision_tower.siglip.encoder.layers[0].layer_norm1
    norm.weight = torch.nn.Parameter(norm.weight.detach().long(), requires_grad=False)


def accelerate_hook(model):
    model.model.connector.layers[0].mixer.directions[0].conv1d._hf_hook = object()


@pytest.mark.parametrize("change", [None, subclass_weight, integer_weight, accelerate_hook])
def test_the_weights_walk_declines_what_graph_capturable_or_a_hook_declines(graph_model, change):
    """The walk asks `layer_capturable` only about modules that are not plainly capturable: it must decline exactly
    when `graph_capturable` does or some module is run by accelerate's hooks, wherever in the tree that module is."""
    if change is not None:
        change(graph_model)
    expected = graph_capturable(graph_model) and not any(hasattr(m, "_hf_hook") for m in graph_model.modules())
    assert cuda_graphs.weights_state(graph_model)[1] is expected is (change is None)
