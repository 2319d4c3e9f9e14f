"""Our Mamba-2 LM against transformers' own Mamba2Model on the same weights (an independent implementation)."""

import pytest
import torch
from transformers import DynamicCache, Mamba2Config, Mamba2Model

from modeling_mlmamba.mamba2 import Mamba2LanguageModel, kernel_aligned

CONFIG = dict(
    hidden_size=32, num_hidden_layers=2, state_size=8, head_dim=8, num_heads=8, chunk_size=4, vocab_size=50,
    residual_in_fp32=True,
)


def twin_models(n_groups: int = 1):
    config = Mamba2Config(**CONFIG, n_groups=n_groups)
    torch.manual_seed(0)
    reference = Mamba2Model(config).eval()
    with torch.no_grad():
        for param in reference.parameters():
            param.copy_(torch.randn_like(param) * 0.3)
        for layer in reference.layers:
            layer.mixer.A_log.copy_(torch.rand_like(layer.mixer.A_log))
    ours = Mamba2LanguageModel(config).eval()
    missing, unexpected = ours.load_state_dict(reference.state_dict(), strict=True)
    assert not missing and not unexpected
    return ours, reference


def relative_error(actual, expected):
    return ((actual - expected).norm() / expected.norm()).item()


def test_full_sequence_matches_transformers_mamba2():
    ours, reference = twin_models()
    ids = torch.randint(0, 50, (2, 11))
    expected = reference(input_ids=ids).last_hidden_state
    actual, _ = ours(ours.embeddings(ids))
    assert relative_error(actual, expected) <= 1e-5


def test_left_padding_leaves_real_positions_unchanged():
    ours, _ = twin_models()
    ids = torch.randint(1, 50, (1, 7))
    alone, _ = ours(ours.embeddings(ids))
    padded_ids = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 3), torch.ones(1, 7)], dim=1).long()
    padded, _ = ours(ours.embeddings(padded_ids), attention_mask=mask)
    assert relative_error(padded[:, 3:], alone) <= 1e-5


def test_mixers_get_the_mask_only_when_something_is_padded():
    ours, _ = twin_models()
    seen = []
    ours.layers[0].mixer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["attention_mask"]), with_kwargs=True
    )
    embeds = ours.embeddings(torch.randint(1, 50, (2, 6)))
    unmasked, _ = ours(embeds)
    all_ones, _ = ours(embeds, attention_mask=torch.ones(2, 6, dtype=torch.long))
    left_padded = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    ours(embeds, attention_mask=left_padded)
    assert seen[0] is None and seen[1] is None and torch.equal(seen[2], left_padded)
    assert torch.equal(all_ones, unmasked)


@pytest.mark.parametrize("prompt_length", [1, 3, 9])
def test_prefill_then_steps_match_full_sequence(prompt_length):
    ours, _ = twin_models()
    ids = torch.randint(0, 50, (2, prompt_length + 4))
    full, _ = ours(ours.embeddings(ids))
    cache = DynamicCache(config=ours.config)
    prefill, _ = ours(ours.embeddings(ids[:, :prompt_length]), cache=cache)
    outputs = [prefill]
    for position in range(prompt_length, ids.shape[1]):
        step, _ = ours(ours.embeddings(ids[:, position : position + 1]), cache=cache)
        outputs.append(step)
    assert relative_error(torch.cat(outputs, dim=1), full) <= 1e-5


def test_chunked_continuation_matches_full_sequence():
    ours, _ = twin_models(n_groups=2)
    ids = torch.randint(0, 50, (1, 12))
    full, _ = ours(ours.embeddings(ids))
    cache = DynamicCache(config=ours.config)
    first, _ = ours(ours.embeddings(ids[:, :5]), cache=cache)
    second, _ = ours(ours.embeddings(ids[:, 5:]), cache=cache)
    assert relative_error(torch.cat([first, second], dim=1), full) <= 1e-5


def test_step_function_matches_cached_forward():
    ours, _ = twin_models()
    ids = torch.randint(0, 50, (2, 6))
    cache = DynamicCache(config=ours.config)
    ours(ours.embeddings(ids[:, :5]), cache=cache)
    states = [(layer.conv_states[0].clone(), layer.recurrent_states[0].clone()) for layer in cache.layers]
    expected, _ = ours(ours.embeddings(ids[:, 5:]), cache=cache)
    actual = ours.step(ids[:, 5], states)
    torch.testing.assert_close(actual, expected[:, 0])
    for (conv, ssm), layer in zip(states, cache.layers):
        torch.testing.assert_close(conv, layer.conv_states[0])
        torch.testing.assert_close(ssm, layer.recurrent_states[0])


def test_conv_kernel_input_is_realigned_when_in_proj_width_is_not_a_multiple_of_8():
    """causal-conv1d's channel-last kernel rejects strides that are not multiples of 8 (seen on a GPU with a 192-wide
    LM: in_proj width 844); the slice is copied when that aligns it, and left to the torch conv when nothing can."""
    projected = torch.randn(2, 5, 844)
    xbc = projected[..., 384:832]  # 448 channels with the projection's stride of 844
    aligned = kernel_aligned(xbc)
    assert (aligned.stride(0), aligned.stride(1)) == (5 * 448, 448) and torch.equal(aligned, xbc)
    ready = torch.randn(2, 5, 448)
    assert kernel_aligned(ready) is ready  # no copy when the layout already fits
    assert kernel_aligned(torch.randn(2, 5, 844)[..., :450]) is None  # 450 channels: no layout fits the kernel
