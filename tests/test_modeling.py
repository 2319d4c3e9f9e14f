import json

import pytest
import torch
import torch.nn.functional as F
from conftest import image_prompt, random_pixels, tiny_model
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

from modeling_mlmamba import MLMambaConfig, MLMambaForConditionalGeneration, MLMambaModel


def test_default_config_is_the_released_model():
    config = MLMambaConfig()
    assert config.image_seq_length == 729
    assert config.vision_feature_size == 1024 + 1152
    assert config.connector_hidden_size == 2560
    assert config.text_config.num_hidden_layers == 64
    assert config.text_config.vocab_size == 50288
    assert config.dino_config.num_register_tokens == 4
    assert config.siglip_config.num_hidden_layers == 27
    assert (config.connector_type, config.connector_scan, config.projector_type) == (
        "msc", "bidirectional", "fused-gelu-mlp",
    )


def test_sub_configs_accept_objects_and_dicts():
    text = MLMambaConfig.tiny().text_config
    config = MLMambaConfig.tiny(text_config=text, siglip_config={"num_hidden_layers": 2})
    assert config.text_config is text
    assert config.siglip_config.num_hidden_layers == 2


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"connector_type": "transformer"}, "connector_type"),
        ({"projector_type": "conv"}, "projector_type"),
        ({"siglip_config": {"image_size": 70}}, "same patch grid"),
        ({"image_token_id": 1000}, "outside the LM vocabulary"),
    ],
)
def test_inconsistent_config_is_rejected(overrides, message):
    with pytest.raises(ValueError, match=message):
        MLMambaConfig.tiny(**overrides)


def test_forward_shapes(model):
    config = model.config
    ids = torch.tensor([image_prompt(config, [5, 6, 7]), image_prompt(config, [8, 9, 10])])
    out = model(input_ids=ids, pixel_values=random_pixels(2, config))
    assert out.logits.shape == (2, ids.shape[1], config.text_config.vocab_size)
    assert out.image_hidden_states.shape == (2, config.image_seq_length, config.text_config.hidden_size)
    features = model.get_image_features(random_pixels(3, config)).pooler_output
    assert [image.shape for image in features] == [(config.image_seq_length, config.text_config.hidden_size)] * 3


def test_text_only_forward(model):
    ids = torch.tensor([[3, 4, 5, 6]])
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (1, 4, model.config.text_config.vocab_size)
    assert out.image_hidden_states is None
    assert torch.isfinite(out.loss)


def test_loss_covers_only_answer_tokens(model):
    config = model.config
    prompt, answer = [5, 6, 7], [20, 21, 22]
    ids = torch.tensor([image_prompt(config, prompt + answer)])
    answer_start = ids.shape[1] - len(answer)
    labels = torch.full_like(ids, -100)
    labels[:, answer_start:] = ids[:, answer_start:]
    pixels = random_pixels(1, config)
    out = model(input_ids=ids, pixel_values=pixels, labels=labels)

    # Next-token prediction: the logit at position t predicts the label at t + 1.
    expected = F.cross_entropy(out.logits[0, answer_start - 1 : -1], ids[0, answer_start:])
    torch.testing.assert_close(out.loss, expected)

    # Labels on image positions never count, whatever they say.
    noisy = labels.clone()
    noisy[:, : config.image_seq_length] = 3
    torch.testing.assert_close(model(input_ids=ids, pixel_values=pixels, labels=noisy).loss, expected)


def test_image_features_land_in_placeholder_positions(model):
    config = model.config
    ids = torch.tensor([[9] + image_prompt(config, [5])])
    pixels = random_pixels(1, config)
    features = model.get_image_features(pixels).pooler_output
    embeds = model.get_input_embeddings()(ids)
    embeds[0, 1 : 1 + config.image_seq_length] = features[0]
    via_embeds = model(inputs_embeds=embeds).logits
    torch.testing.assert_close(model(input_ids=ids, pixel_values=pixels).logits, via_embeds)


def test_greedy_generate_with_cache_equals_full_recompute(model):
    config = model.config
    ids = torch.tensor([image_prompt(config, [5, 6, 7]), image_prompt(config, [8, 9, 10])])
    pixels = random_pixels(2, config)
    new_tokens = 8
    generated = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
        max_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
    )

    sequence = ids
    with torch.no_grad():
        for _ in range(new_tokens):
            logits = model(input_ids=sequence, pixel_values=pixels, use_cache=False).logits[:, -1]
            sequence = torch.cat([sequence, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, sequence)


def test_generate_text_only(model):
    out = model.generate(input_ids=torch.tensor([[3, 4, 5]]), max_new_tokens=4, do_sample=False, eos_token_id=None)
    assert out.shape == (1, 7)


def test_save_and_load_roundtrip_is_bit_exact(model, tmp_path):
    config = model.config
    ids = torch.tensor([image_prompt(config, [5, 6, 7])])
    pixels = random_pixels(1, config)
    expected = model(input_ids=ids, pixel_values=pixels).logits
    model.save_pretrained(tmp_path)

    files = sorted(p.name for p in tmp_path.iterdir())
    assert "model.safetensors" in files
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in files)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "mlmamba"
    assert saved["auto_map"]["AutoModelForImageTextToText"].endswith("MLMambaForConditionalGeneration")

    for loader in (MLMambaForConditionalGeneration, AutoModelForImageTextToText):
        loaded = loader.from_pretrained(tmp_path).eval()
        assert isinstance(loaded, MLMambaForConditionalGeneration)
        assert torch.equal(loaded(input_ids=ids, pixel_values=pixels).logits, expected)
        assert loaded.lm_head.weight.data_ptr() == loaded.get_input_embeddings().weight.data_ptr()

    assert isinstance(AutoConfig.from_pretrained(tmp_path), MLMambaConfig)
    base = AutoModel.from_pretrained(tmp_path)
    assert isinstance(base, MLMambaModel)
    torch.testing.assert_close(
        base.get_image_features(pixels).pooler_output, model.get_image_features(pixels).pooler_output, rtol=0, atol=0
    )


def test_lm_head_is_tied_to_embeddings(model):
    assert model.lm_head.weight is model.get_input_embeddings().weight


def test_placeholder_count_mismatch_names_both_counts(model):
    config = model.config
    ids = torch.tensor([image_prompt(config, [5])[: config.image_seq_length - 2] + [5]])
    with pytest.raises(ValueError, match=rf"{config.image_seq_length - 2} image placeholder tokens.*"
                                         rf"{config.image_seq_length} image features"):
        model(input_ids=ids, pixel_values=random_pixels(1, config))
    with pytest.raises(ValueError, match="no pixel_values"):
        model(input_ids=ids)


@pytest.mark.parametrize(
    "shape, message",
    [((1, 3, 56, 56), r"\(images, 2, 3, height, width\)"), ((1, 2, 1, 56, 56), r"\(images, 2, 3"),
     ((1, 2, 3, 42, 56), "expect 56x56")],
)
def test_wrong_pixel_shapes_are_rejected(model, shape, message):
    ids = torch.tensor([image_prompt(model.config, [5])])
    with pytest.raises(ValueError, match=message):
        model(input_ids=ids, pixel_values=torch.randn(*shape))


@pytest.mark.parametrize("every_n_layers", [1, 2])
def test_gradient_checkpointing_gives_the_same_gradients(every_n_layers):
    """Full checkpointing and transformers' `every_n_layers` (checkpoint some blocks, keep the others' activations):
    the same gradients as no checkpointing, and exactly the chosen LM blocks run their forward again in backward."""
    def gradients(checkpointing: bool):
        model = tiny_model(text_config=dict(num_hidden_layers=4))
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}, every_n_layers=every_n_layers
            )
            if every_n_layers == 1:
                assert model.model.connector.layers[0].gradient_checkpointing
        blocks = model.model.language_model.layers
        mixer_calls = []
        for block in blocks:
            block.mixer.register_forward_pre_hook(lambda mixer, _: mixer_calls.append(mixer.layer_idx))
        config = model.config
        ids = torch.tensor([image_prompt(config, [5, 6, 7, 8])])
        model(input_ids=ids, pixel_values=random_pixels(1, config), labels=ids).loss.backward()
        checkpointed = [bool(block.gradient_checkpointing) for block in blocks]
        assert [mixer_calls.count(block.mixer.layer_idx) for block in blocks] == [1 + flag for flag in checkpointed]
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, checkpointed

    (plain, none), (checkpointed, chosen) = gradients(False), gradients(True)
    assert not any(none)
    positions = [index for index, flag in enumerate(chosen) if flag]
    assert len(positions) == 4 // every_n_layers
    assert all(later - earlier == every_n_layers for earlier, later in zip(positions, positions[1:]))
    assert plain.keys() == checkpointed.keys()
    assert any(name.startswith("model.connector.layers") for name in plain)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7)


def test_frozen_vision_towers_get_no_gradients(model):
    model.train()
    model.model.vision_tower.requires_grad_(False)
    config = model.config
    ids = torch.tensor([image_prompt(config, [5, 6])])
    model(input_ids=ids, pixel_values=random_pixels(1, config), labels=ids).loss.backward()
    assert all(p.grad is None for p in model.model.vision_tower.parameters())
    assert model.model.connector.input_proj.weight.grad is not None
