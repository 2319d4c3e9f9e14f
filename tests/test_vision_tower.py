"""The vision towers end at `vision_feature_layer`: same features as the full towers, fewer blocks, older folders
still load."""

import logging

import pytest
import torch
from conftest import image_prompt, random_pixels, tiny_model
from safetensors.torch import load_file, save_file
from transformers import AutoModel

from modeling_mlmamba import MLMambaConfig, MLMambaForConditionalGeneration
from modeling_mlmamba.modeling_mlmamba import MLMambaVisionTower
from modeling_mlmamba.training import set_training_stage


def full_towers(tower: MLMambaVisionTower, config: MLMambaConfig, seed: int = 3):
    """DINOv2 and SigLIP at the configs' full depth, random, with the truncated `tower` loaded from their weights."""
    torch.manual_seed(seed)
    dino, siglip = AutoModel.from_config(config.dino_config).eval(), AutoModel.from_config(config.siglip_config).eval()
    for built, full in ((tower.dino, dino), (tower.siglip, siglip)):
        unexpected = built.load_state_dict(full.state_dict(), strict=False).unexpected_keys
        assert unexpected and not built.load_state_dict(full.state_dict(), strict=False).missing_keys
    return dino, siglip


def full_tower_features(dino, siglip, pixels, feature_layer: int, prefix_tokens: int) -> torch.Tensor:
    """What the towers computed before they were truncated: every block, then one entry of `hidden_states`."""
    dino_states = dino(pixels[:, 0], output_hidden_states=True).hidden_states[feature_layer]
    siglip_states = siglip(pixels[:, 1], output_hidden_states=True).hidden_states[feature_layer]
    return torch.cat([dino_states[:, prefix_tokens:], siglip_states], dim=-1)


@pytest.mark.parametrize("feature_layer", [-2, -1, -4, 0, 2])
def test_features_equal_the_full_towers_hidden_state(feature_layer):
    config = MLMambaConfig.tiny(vision_feature_layer=feature_layer)
    tower = MLMambaVisionTower(config).eval()
    dino, siglip = full_towers(tower, config)
    pixels = random_pixels(2, config)
    with torch.no_grad():
        expected = full_tower_features(dino, siglip, pixels, feature_layer, tower.dino_prefix_tokens)
        assert torch.equal(tower(pixels).last_hidden_state, expected)


def test_towers_build_only_the_blocks_the_features_need():
    config = MLMambaConfig.tiny()  # 3 blocks per tower, features of the second-to-last (-2)
    tower = MLMambaVisionTower(config)
    assert len(tower.dino.encoder.layer) == len(tower.siglip.encoder.layers) == 2
    assert isinstance(tower.dino.layernorm, torch.nn.Identity)
    assert isinstance(tower.siglip.post_layernorm, torch.nn.Identity)
    assert config.dino_config.num_hidden_layers == config.siglip_config.num_hidden_layers == 3  # pretrained depth
    assert not any("layernorm" in name or ".2." in name for name in tower.state_dict())


@pytest.mark.parametrize("feature_layer", [-5, 4])
def test_feature_layer_outside_the_towers_is_rejected(feature_layer):
    with pytest.raises(ValueError, match=rf"vision_feature_layer {feature_layer} is beyond dino_config"):
        MLMambaConfig.tiny(vision_feature_layer=feature_layer)
    config = MLMambaConfig.tiny()
    config.vision_feature_layer = feature_layer  # set after the config's own checks
    with pytest.raises(ValueError, match=rf"vision_feature_layer {feature_layer} does not index .*dino_config"):
        MLMambaVisionTower(config)


def test_training_every_tower_parameter_gives_each_a_gradient():
    model = tiny_model().train()
    set_training_stage(model, "full")
    config = model.config
    ids = torch.tensor([image_prompt(config, [5, 6])])
    model(input_ids=ids, pixel_values=random_pixels(1, config), labels=ids).loss.backward()
    without = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert without == []
    assert "model.vision_tower.dino.embeddings.mask_token" in model.state_dict()  # kept, as a buffer


def test_folder_saved_with_full_towers_loads_quietly_and_ignores_the_unused_blocks(tmp_path, caplog):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    dino, siglip = full_towers(MLMambaVisionTower(model.config), model.config)
    weights = load_file(tmp_path / "model.safetensors")
    extra = {f"model.vision_tower.dino.{name}": tensor for name, tensor in dino.state_dict().items()
             if name.startswith(("encoder.layer.2.", "layernorm."))}
    extra |= {f"model.vision_tower.siglip.{name}": tensor for name, tensor in siglip.state_dict().items()
              if name.startswith(("encoder.layers.2.", "post_layernorm."))}
    assert len(extra) > 4
    save_file({**weights, **extra}, tmp_path / "model.safetensors", metadata={"format": "pt"})

    with caplog.at_level(logging.WARNING):
        loaded, info = MLMambaForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert info["unexpected_keys"] == set() and info["missing_keys"] == set()
    assert not [record for record in caplog.records if "unexpected" in record.getMessage().lower()]
    pixels = random_pixels(1, model.config)
    with torch.no_grad():
        assert torch.equal(loaded.model.vision_tower(pixels).last_hidden_state, model.model.vision_tower(pixels).last_hidden_state)


def test_unknown_extra_weights_are_still_reported(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    weights["model.vision_tower.dino.encoder.layer.7.mlp.fc1.weight"] = torch.zeros(2, 2)  # not a pretrained block
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    _, info = MLMambaForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert info["unexpected_keys"] == {"model.vision_tower.dino.encoder.layer.7.mlp.fc1.weight"}
