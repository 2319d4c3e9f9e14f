"""CUDA graphs on a GPU survive weight changes and failed captures: generation with graphs gives the tokens of
generation without them after peft's merge_and_unload, load_state_dict, casts and device moves, and a capture that
fails leaves CUDA usable."""

import pytest
import torch
from conftest import image_prompt, random_pixels, tiny_model
from peft import get_peft_model

from modeling_mlmamba import cuda_graphs
from modeling_mlmamba.lora import lora_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")


def prompt(config, batch=1):
    ids = torch.tensor([image_prompt(config, [5 + i, 6, 7]) for i in range(batch)], device="cuda")
    return ids, random_pixels(batch, config).cuda()


def generate(model, ids, pixels, use_graphs):
    model.config.use_cuda_graphs = use_graphs
    return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels, max_new_tokens=6,
                          do_sample=False, eos_token_id=None)


def assert_graphs_match_eager(model, ids, pixels, calls=3):
    """Several calls, so that the prompt shape is captured (second sight) and replayed."""
    eager = generate(model, ids, pixels, use_graphs=False)
    for _ in range(calls):
        assert torch.equal(generate(model, ids, pixels, use_graphs=True), eager)
    graphs = model.cuda_graphs
    assert graphs.prefill_graphs and graphs.decode_graphs
    assert all(call.graph is not None for call in graphs.prefill_graphs.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_then_merge_and_unload_then_generate_matches_graphs_off(dtype):
    model = tiny_model().to("cuda", dtype)
    ids, pixels = prompt(model.config)
    peft_model = get_peft_model(model, lora_config(rank=4, alpha=8, dropout=0.0))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    assert_graphs_match_eager(model, ids, pixels)
    merged = peft_model.merge_and_unload()
    assert_graphs_match_eager(merged, ids, pixels)
    torch.randn(4, device="cuda")  # the RNG is out of capture mode


def test_load_state_dict_casts_and_device_moves_then_generate_matches_graphs_off():
    model = tiny_model().cuda()
    ids, pixels = prompt(model.config, batch=2)
    assert_graphs_match_eager(model, ids, pixels)
    model.load_state_dict(tiny_model(seed=5).state_dict())
    assert_graphs_match_eager(model, ids, pixels)
    model.to(torch.bfloat16)
    assert_graphs_match_eager(model, ids, pixels)
    model.to("cpu").to("cuda")
    assert_graphs_match_eager(model, ids, pixels)


def test_a_capture_that_fails_is_ended_and_cuda_stays_usable():
    def host_sync(x):
        return x * float(x.sum())  # a device-to-host copy: not allowed while capturing

    stream = torch.cuda.current_stream()
    with pytest.raises(cuda_graphs.GraphCaptureError):
        cuda_graphs.capture_graph(host_sync, [torch.ones(4, device="cuda")], torch.cuda.graph_pool_handle())
    assert not torch.cuda.is_current_stream_capturing()
    assert torch.cuda.current_stream() == stream
    torch.randn(4, device="cuda")  # the RNG is out of capture mode

    inputs = [torch.ones(4, device="cuda")]
    graph, outputs = cuda_graphs.capture_graph(lambda x: x * 2, inputs, torch.cuda.graph_pool_handle())
    inputs[0].fill_(3)
    graph.replay()
    assert torch.equal(outputs, torch.full((4,), 6.0, device="cuda"))


def test_a_model_whose_capture_fails_generates_eagerly_with_the_same_tokens():
    model = tiny_model().cuda()
    ids, pixels = prompt(model.config)
    eager = generate(model, ids, pixels, use_graphs=False)

    def sync_while_capturing(module, args, output):
        if torch.cuda.is_current_stream_capturing():
            float(output.sum())

    model.lm_head.register_forward_hook(sync_while_capturing)
    for _ in range(3):
        assert torch.equal(generate(model, ids, pixels, use_graphs=True), eager)
    assert not model.cuda_graphs.prefill_graphs and not model.cuda_graphs.decode_graphs
    assert {kind for kind, _ in model.cuda_graphs.failed_captures} == {"prefill", "decode"}
    torch.randn(4, device="cuda")
