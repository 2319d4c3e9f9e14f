import pytest
import torch

from modeling_mlmamba import MLMambaConfig, MLMambaForConditionalGeneration


def tiny_model(seed: int = 0, **config_overrides) -> MLMambaForConditionalGeneration:
    """A randomly initialised few-layer ML-Mamba in eval mode, deterministic for a given seed."""
    torch.manual_seed(seed)
    return MLMambaForConditionalGeneration(MLMambaConfig.tiny(**config_overrides)).eval()


def random_pixels(num_images: int, config: MLMambaConfig, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    size = config.dino_config.image_size
    return torch.randn(num_images, 2, 3, size, size, generator=generator)


def image_prompt(config: MLMambaConfig, text_ids: list[int]) -> list[int]:
    """The released layout: the image's placeholder positions first, then the prompt tokens."""
    return [config.image_token_id] * config.image_seq_length + text_ids


@pytest.fixture
def model():
    return tiny_model()
