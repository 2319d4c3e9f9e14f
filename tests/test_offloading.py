"""accelerate's offloaded loading: with weights on disk, brought in by hooks only when their module is called,
the model gives the logits and greedy tokens of the model loaded whole, and the graph seam stays out of the way."""

import copy

import pytest
import torch
from accelerate import cpu_offload
from conftest import image_prompt, random_pixels, tiny_model
from transformers import DynamicCache

from modeling_mlmamba import MLMambaForConditionalGeneration


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = tiny_model()
    folder = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(folder)
    return model, folder


def inputs(config, batch=2):
    ids = torch.tensor([image_prompt(config, [5 + i, 6, 7]) for i in range(batch)])
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=random_pixels(batch, config))


def logits_and_greedy_tokens(model, config):
    batch = inputs(config)
    with torch.no_grad():
        logits = model(**batch).logits
    return logits, model.generate(**batch, max_new_tokens=5, do_sample=False, eos_token_id=None)


def disk_offloaded(folder, offload_folder):
    """Half the weights' bytes of CPU budget: the rest (the connector and the language model among them) go to disk."""
    whole = sum(parameter.numel() * parameter.element_size()
                for parameter in MLMambaForConditionalGeneration.from_pretrained(folder).parameters())
    return MLMambaForConditionalGeneration.from_pretrained(
        folder, device_map="auto", max_memory={"cpu": whole // 2}, offload_folder=offload_folder
    ).eval()


def test_disk_offloaded_model_gives_the_unsplit_logits_and_greedy_tokens(saved, tmp_path):
    model, folder = saved
    offloaded = disk_offloaded(folder, tmp_path)
    on_disk = {name for name, device in offloaded.hf_device_map.items() if device == "disk"}
    assert {"model.connector", "model.language_model"} <= on_disk
    assert offloaded.model.connector.layers[0].mixer.directions[0].A_log.device.type == "meta"

    expected_logits, expected_tokens = logits_and_greedy_tokens(model, model.config)
    logits, tokens = logits_and_greedy_tokens(offloaded, model.config)
    assert torch.equal(logits, expected_logits)
    assert torch.equal(tokens, expected_tokens)


def test_every_weight_is_read_through_its_own_modules_forward(saved):
    """accelerate's `cpu_offload` leaves every weight on the meta device until its module is called: a weight read
    any other way (a parent reading a child's parameter, a method other than `forward`) fails here."""
    model, _ = saved
    offloaded = cpu_offload(copy.deepcopy(model), execution_device=torch.device("cpu"))
    assert all(parameter.device.type == "meta" for parameter in offloaded.parameters())
    expected_logits, expected_tokens = logits_and_greedy_tokens(model, model.config)
    logits, tokens = logits_and_greedy_tokens(offloaded, model.config)
    assert torch.equal(logits, expected_logits)
    assert torch.equal(tokens, expected_tokens)


def test_graph_seam_declines_a_model_with_one_offloaded_part(monkeypatch):
    """`cpu_offload` of the language model alone hooks its modules, not the model's top: graphs must still decline,
    since a replay would read the LM's weights past the hooks that bring them in."""
    model = tiny_model().eval()
    monkeypatch.setattr(MLMambaForConditionalGeneration, "cuda_graph_devices", ("cpu",))
    batch = inputs(model.config, batch=1)
    _, expected_tokens = logits_and_greedy_tokens(model, model.config)
    cpu_offload(model.model.language_model, execution_device=torch.device("cpu"))
    assert not hasattr(model, "_hf_hook")
    cache = DynamicCache(config=model.config.text_config)
    with torch.no_grad():
        model(**batch, cache=cache)
        assert model.cuda_graphs.route(model, cache, input_ids=torch.tensor([[9]])) is None
    _, tokens = logits_and_greedy_tokens(model, model.config)
    assert torch.equal(tokens, expected_tokens)


def test_graph_seam_declines_an_offloaded_model(saved, tmp_path, monkeypatch):
    """Replayed graphs would call each layer's `step` directly, past the hooks that load the weights."""
    model, folder = saved
    offloaded = disk_offloaded(folder, tmp_path)
    monkeypatch.setattr(MLMambaForConditionalGeneration, "cuda_graph_devices", ("cpu",))
    batch = inputs(model.config, batch=1)
    cache = DynamicCache(config=model.config.text_config)
    with torch.no_grad():
        offloaded(**batch, cache=cache)
        assert offloaded.cuda_graphs.route(offloaded, cache, input_ids=torch.tensor([[9]])) is None
        assert model.cuda_graphs.route(model, cache, input_ids=torch.tensor([[9]])) == "decode"
    _, expected_tokens = logits_and_greedy_tokens(model, model.config)
    for _ in range(2):  # a prompt shape is captured the second time it is seen
        _, tokens = logits_and_greedy_tokens(offloaded, model.config)
        assert torch.equal(tokens, expected_tokens)
    assert not offloaded.cuda_graphs.prefill_graphs and not offloaded.cuda_graphs.decode_graphs
