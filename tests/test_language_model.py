"""Our Mamba-2 LM against transformers' own Mamba2Model on the same weights (an independent implementation)."""

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache, Mamba2Config, Mamba2Model

from modeling_mlmamba import mamba2
from modeling_mlmamba.mamba2 import CausalMamba2Mixer, Mamba2LanguageModel, kernel_aligned
from modeling_mlmamba.ssd import ssd_sequential

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


def split_conv_scan_norm_contract(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size, *, rmsnorm_weight,
                                  rmsnorm_eps, headdim, ngroups, norm_before_gate):
    """mamba_ssm's `mamba_split_conv1d_scan_combined` as its docstring and reference define it, written out with
    the sequential recurrence: the CPU stand-in for the CUDA-only kernel."""
    nheads, kernel = D.shape[0], conv1d_weight.shape[-1]
    dim = nheads * headdim
    state = (conv1d_weight.shape[0] - dim) // ngroups // 2
    z, xbc, dt = zxbcdt.split([dim, dim + 2 * ngroups * state, nheads], dim=-1)
    conv = F.conv1d(xbc.transpose(1, 2), conv1d_weight[:, None], conv1d_bias, padding=kernel - 1, groups=xbc.shape[-1])
    x, B, C = F.silu(conv[..., : xbc.shape[1]]).transpose(1, 2).split([dim, ngroups * state, ngroups * state], -1)
    y, _ = ssd_sequential(x.unflatten(-1, (nheads, headdim)), F.softplus(dt + dt_bias), A,
                          B.unflatten(-1, (ngroups, state)), C.unflatten(-1, (ngroups, state)), D)
    y = y.flatten(-2)
    gated = (y if norm_before_gate else y * F.silu(z)).unflatten(-1, (ngroups, -1))
    normed = (gated * torch.rsqrt(gated.pow(2).mean(-1, keepdim=True) + rmsnorm_eps)).flatten(-2) * rmsnorm_weight
    return normed * F.silu(z) if norm_before_gate else normed


def test_fused_training_path_computes_the_unfused_forward_and_gradients(monkeypatch):
    """The mixer's one-call kernel path (CUDA-only) hands mamba_ssm's function the arguments that reproduce the
    unfused path, checked on CPU against that function's contract; it is not taken with a cache or padding."""
    ours, _ = twin_models(n_groups=2)
    ours.train()
    ids = torch.randint(1, 50, (2, 9))

    def loss_and_grads():
        ours.zero_grad()
        hidden, _ = ours(ours.embeddings(ids))
        hidden.square().mean().backward()
        return hidden.detach(), {name: param.grad.clone() for name, param in ours.named_parameters()}

    unfused, unfused_grads = loss_and_grads()
    calls = []

    def fused(*args, **kwargs):
        calls.append(args[0].shape)
        return split_conv_scan_norm_contract(*args, **kwargs)

    monkeypatch.setattr(mamba2, "mamba_split_conv1d_scan_combined", fused)
    monkeypatch.setattr(CausalMamba2Mixer, "fused_kernel_applies", lambda self, hidden_states: True)
    fused_out, fused_grads = loss_and_grads()
    assert len(calls) == len(ours.layers)
    assert relative_error(fused_out, unfused) <= 1e-5
    for name, grad in unfused_grads.items():
        assert relative_error(fused_grads[name], grad) <= 1e-4, name

    calls.clear()
    with torch.no_grad():
        ours(ours.embeddings(ids), attention_mask=torch.tensor([[0] * 2 + [1] * 7, [1] * 9]))
        ours(ours.embeddings(ids), cache=DynamicCache(config=ours.config))
    assert not calls


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


def test_prefill_and_decode_of_bf16_weights_use_the_same_float32_decay_rates(monkeypatch):
    ours, _ = twin_models()
    ours = ours.to(torch.bfloat16)
    rates = {"scan": [], "step": []}
    scan, step = mamba2.ssd_scan, mamba2.ssd_step

    def recording_scan(x, dt, A, *args, **kwargs):
        rates["scan"].append(A)
        return scan(x, dt, A, *args, **kwargs)

    def recording_step(state, x, dt, A, *args, **kwargs):
        rates["step"].append(A)
        return step(state, x, dt, A, *args, **kwargs)

    monkeypatch.setattr(mamba2, "ssd_scan", recording_scan)
    monkeypatch.setattr(mamba2, "ssd_step", recording_step)
    ids = torch.randint(0, 50, (1, 6))
    cache = DynamicCache(config=ours.config)
    ours(ours.embeddings(ids[:, :5]), cache=cache)
    ours(ours.embeddings(ids[:, 5:]), cache=cache)
    assert len(rates["scan"]) == len(rates["step"]) == len(ours.layers)
    for layer, scan_rate, step_rate in zip(ours.layers, rates["scan"], rates["step"]):
        assert scan_rate.dtype == step_rate.dtype == torch.float32
        assert torch.equal(scan_rate, step_rate)
        assert torch.equal(scan_rate, -torch.exp(layer.mixer.A_log.float()))
