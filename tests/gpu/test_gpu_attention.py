"""The vision towers' fused attention backends on a GPU give the logits of sdpa."""

import importlib.util

import pytest
import torch
from conftest import image_prompt, random_pixels, tiny_model

from modeling_mlmamba import MLMambaForConditionalGeneration

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="fused attention kernels need a CUDA GPU")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    tiny_model().save_pretrained(path)
    return path


def logits(folder, implementation):
    model = MLMambaForConditionalGeneration.from_pretrained(
        folder, attn_implementation=implementation, dtype=torch.bfloat16
    ).to("cuda").eval()
    towers = model.model.vision_tower
    assert towers.dino.config._attn_implementation == towers.siglip.config._attn_implementation == implementation
    config = model.config
    ids = torch.tensor([image_prompt(config, [5, 6, 7])] * 2, device="cuda")
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=random_pixels(2, config).cuda()).logits


@pytest.mark.parametrize("implementation", [
    pytest.param("flash_attention_2", marks=pytest.mark.skipif(
        importlib.util.find_spec("flash_attn") is None, reason="flash-attn is not installed")),
    "flex_attention",
])
def test_fused_attention_in_both_towers_matches_sdpa(folder, implementation):
    torch.testing.assert_close(logits(folder, implementation), logits(folder, "sdpa"), rtol=2e-2, atol=2e-2)
