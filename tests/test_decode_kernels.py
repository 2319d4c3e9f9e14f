"""The fused decode step (`decode_kernels.py`): which step a call takes, and the kernels against the reference
step, run in Triton's interpreter on CPU tensors (the GPU runs of the same checks are in tests/gpu/)."""

import copy
import importlib.util
import os

import pytest
import torch
from conftest import image_prompt, random_pixels, tiny_model
from torch import nn

from modeling_mlmamba import MLMambaConfig, decode_kernels, gemv, mamba2, ssd
from modeling_mlmamba.decode_kernels import (
    FUSED_MAX_BATCH,
    decode_path,
    fused_decode_layers,
    fused_step_refusal,
    selective_state_update,
    state_update_refusal,
)
from modeling_mlmamba.mamba2 import Mamba2LanguageModel

interpreted = pytest.mark.skipif(
    decode_kernels.triton is None or os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs Triton's interpreter (triton installed, TRITON_INTERPRET=1 before import)",
)


def language_model(dtype=torch.float32, seed: int = 0, **text_config):
    """The tiny LM with every per-head and norm parameter away from its initial value, so each one matters."""
    model = tiny_model(seed, text_config=text_config) if text_config else tiny_model(seed)
    lm = model.model.language_model
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lm.layers:
            mixer = layer.mixer
            for parameter in (mixer.dt_bias, mixer.D, mixer.A_log, mixer.conv1d.bias):
                parameter.copy_(torch.randn(parameter.shape, generator=generator))
            for parameter in (layer.norm.weight, mixer.norm.weight):
                parameter.copy_(1 + 0.3 * torch.randn(parameter.shape, generator=generator))
    return lm.to(dtype).requires_grad_(False)


def random_states(lm, batch: int, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    dims, width = lm.layers[0].mixer.dims, lm.config.conv_kernel
    dtype = lm.embeddings.weight.dtype
    return [(torch.randn(batch, dims.conv_dim, width, generator=generator).to(dtype),
             torch.randn(batch, dims.num_heads, dims.head_dim, dims.state_size, generator=generator))
            for _ in lm.layers]


def copies(states):
    return [(conv.clone(), ssm.clone()) for conv, ssm in states]


def rel_err(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours.double() - reference.double()).norm() / reference.double().norm()).item()


@pytest.fixture
def kernels_on_cpu(monkeypatch):
    """Let the decode step pick the kernels for CPU tensors (they then run in the interpreter)."""
    monkeypatch.setattr(Mamba2LanguageModel, "decode_kernel_devices", ("cpu",))


# --- which step a call takes ---------------------------------------------------------------------------------


def embeds(lm, batch):
    return torch.zeros(batch, lm.config.hidden_size, dtype=lm.embeddings.weight.dtype)


def test_cpu_tensors_take_the_reference_step():
    lm = language_model()
    assert decode_path(lm, embeds(lm, 1), random_states(lm, 1), True, Mamba2LanguageModel.decode_kernel_devices) == (
        "unfused"
    )


@pytest.mark.parametrize("batch, path", [(1, "fused"), (FUSED_MAX_BATCH, "fused"),
                                         (FUSED_MAX_BATCH + 1, "streaming"), (32, "streaming")])
def test_small_batches_take_the_fused_step_and_large_ones_the_streaming_state_update(batch, path):
    lm = language_model(torch.bfloat16)
    with torch.no_grad():
        assert decode_path(lm, embeds(lm, batch), random_states(lm, batch), True, ("cpu",)) == path


def test_no_kernel_when_switched_off_without_triton_or_with_autograd(monkeypatch):
    lm = language_model()
    states = random_states(lm, 1)
    with torch.no_grad():
        assert decode_path(lm, embeds(lm, 1), states, False, ("cpu",)) == "unfused"
    lm.requires_grad_(True)
    assert decode_path(lm, embeds(lm, 1), states, True, ("cpu",)) == "unfused"  # kernels have no backward
    with torch.no_grad():
        assert decode_path(lm, embeds(lm, 1), states, True, ("cpu",)) == "fused"
        monkeypatch.setattr(decode_kernels, "triton", None)
        assert decode_path(lm, embeds(lm, 1), states, True, ("cpu",)) == "unfused"


def test_kernels_need_neither_causal_conv1d_nor_mamba_ssm(monkeypatch):
    for module, name in ((mamba2, "causal_conv1d_update"), (mamba2, "fused_add_rms_norm"),
                         (mamba2, "fused_gated_rms_norm"), (ssd, "selective_state_update")):
        monkeypatch.setattr(module, name, None)
    lm = language_model()
    with torch.no_grad():
        assert decode_path(lm, embeds(lm, 1), random_states(lm, 1), True, ("cpu",)) == "fused"
        assert decode_path(lm, embeds(lm, 9), random_states(lm, 9), True, ("cpu",)) == "streaming"


def lora_in_proj(lm):
    from peft import LoraConfig, inject_adapter_in_model

    inject_adapter_in_model(LoraConfig(r=2, target_modules=["in_proj"]), lm)


class Int8Weight(torch.Tensor):
    """Stands for a quantized weight: any tensor subclass."""


def subclass_weight(lm):
    weight = lm.layers[0].mixer.out_proj.weight
    lm.layers[0].mixer.out_proj.weight = nn.Parameter(weight.data.as_subclass(Int8Weight), requires_grad=False)


@pytest.mark.parametrize("change, reason", [
    (lora_in_proj, "layer 0's in_proj is a peft.tuners.lora.layer.Linear, not a plain torch.nn.Linear"),
    (lambda lm: lm.layers[0].mixer.out_proj.register_forward_hook(lambda *args: None), "out_proj has forward hooks"),
    (lambda lm: lm.layers[1].norm.register_forward_pre_hook(lambda *args: None), "layer 1's norm has forward hooks"),
    (lambda lm: setattr(lm.layers[0].mixer.out_proj, "_hf_hook", object()), "out_proj has forward hooks"),
    (subclass_weight, "out_proj weight is neither a plain contiguous torch.float32 tensor nor torchao's int8"),
    (lambda lm: setattr(lm.layers[0].mixer, "out_proj", nn.Linear(128, 64, bias=True)), "has a bias"),
    (lambda lm: lm.to(torch.float64), "the weights are torch.float64"),
    (lambda lm: lm.layers[1].norm.to(torch.float16), "weights are not all plain contiguous torch.float32"),
], ids=["lora", "forward-hook", "pre-hook", "accelerate-hook", "tensor-subclass", "bias", "float64", "mixed-dtype"])
def test_weights_the_fused_step_cannot_read_directly_are_refused(change, reason):
    lm = language_model()
    change(lm)
    states = random_states(lm, 1)
    assert reason in fused_step_refusal(lm, 1, states, torch.device("cpu"))
    with torch.no_grad():
        assert decode_path(lm, embeds(lm, 1), states, True, ("cpu",)) == "streaming"


@pytest.mark.parametrize("text_config, reason", [
    (dict(n_groups=2), "n_groups is 2"),
    (dict(hidden_size=66, num_heads=11, head_dim=12), "hidden_size 66 is not a multiple of 4"),
])
def test_shapes_the_fused_kernels_are_not_written_for_are_refused(text_config, reason):
    lm = Mamba2LanguageModel(MLMambaConfig.tiny(text_config=text_config, connector_hidden_size=64).text_config)
    assert reason in fused_step_refusal(lm, 1, random_states(lm, 1), torch.device("cpu"))


def test_fused_layers_refuse_more_than_one_row_before_launching():
    lm = language_model()
    states = random_states(lm, 2)
    with pytest.raises(ValueError, match=r"runs one sequence; got hidden_states of shape \(2, 64\): run larger"):
        fused_decode_layers(lm.layers, embeds(lm, 2), states, lm.decay_rates(), residual_in_fp32=True)


def test_states_of_the_wrong_shape_or_layout_are_refused():
    lm = language_model()
    states = random_states(lm, 2)
    assert "conv state is not a (1, 160, 4) tensor" in fused_step_refusal(lm, 1, states, torch.device("cpu"))
    states[1] = (states[1][0], states[1][1].transpose(-1, -2).contiguous().transpose(-1, -2))
    assert "layer 1's SSM state is not a float tensor" in state_update_refusal(lm, states, torch.device("cpu"))
    big = language_model(state_size=512)
    assert "state_size 512 is above 256" in state_update_refusal(big, random_states(big, 1), torch.device("cpu"))


def test_tiles_are_whole_norm_partials_and_chosen_by_bytes_per_weight():
    for tiles in (decode_kernels.IN_PROJ_TILES, decode_kernels.OUT_PROJ_TILES):
        assert all(block_n % decode_kernels.NORM_PARTIAL_WIDTH == 0 for block_n, _, _ in tiles.values())
    launched = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched.append((grid, kwargs["BLOCK_N"], kwargs["BLOCK_K"]))

    tiles = {2: (4, 512, 8), 1: (2, 1024, 4)}
    for dtype, expected in ((torch.float32, ((3,), 4, 512)), (torch.bfloat16, ((3,), 4, 512)),
                            (torch.float8_e4m3fn, ((5,), 2, 1024)), (torch.int8, ((5,), 2, 1024))):
        decode_kernels._launch_gemv(Kernel(), tiles, None, torch.zeros(10, 64, dtype=dtype), torch.device("cpu"))
        assert launched.pop() == expected
    decode_kernels._launch_gemv(Kernel(), tiles, (8, 64, 4), torch.zeros(10, 64), torch.device("cpu"))
    assert launched.pop() == ((2,), 8, 64)


def test_graph_key_and_step_follow_the_config_switch(monkeypatch):
    model = tiny_model()
    monkeypatch.setattr(type(model), "cuda_graph_devices", ("cpu",))
    calls = []
    monkeypatch.setattr(mamba2, "decode_path", lambda lm, h, s, allow, devices: calls.append(allow) or "unfused")
    ids = torch.tensor([image_prompt(model.config, [5, 6])])
    for fused in (True, False):
        model.config.use_fused_decode_step = fused
        model.generate(input_ids=ids, pixel_values=random_pixels(1, model.config), max_new_tokens=3, do_sample=False)
    assert calls[0] is True and calls[-1] is False
    assert {key[-1] for key in model.cuda_graphs.decode_graphs} == {True, False}


# --- the kernels, in Triton's interpreter ---------------------------------------------------------------------


if decode_kernels.triton is not None:
    import triton
    import triton.language as tl

    @triton.jit
    def _widen_kernel(values_ptr, out_ptr, BLOCK: tl.constexpr):
        offsets = tl.arange(0, BLOCK)
        tl.store(out_ptr + offsets, gemv.widen(tl.load(values_ptr + offsets)))


@interpreted
@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn, torch.bfloat16])
def test_widening_reads_every_weight_value_as_torch_does(dtype):
    """The GEMVs' bit-move widening of 1-byte weights gives torch's own conversion for every byte (float8's NaN
    aside: quantized weights never hold it), subnormal float8 values included."""
    if dtype.itemsize == 1:
        values = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype)
    else:
        values = torch.randn(256).to(dtype)
    widened = torch.empty(256)
    _widen_kernel[(1,)](values, widened, BLOCK=256)
    expected = values.float()
    finite = ~expected.isnan()
    assert finite.sum() >= 254
    assert torch.equal(widened[finite], expected[finite])


@interpreted
@pytest.mark.parametrize("groups", [1, 2])
def test_streaming_state_update_equals_the_reference_step(groups):
    generator = torch.Generator().manual_seed(0)
    batch, heads, head_dim, size = 3, 4, 24, 16  # head_dim over one program's 16 rows: two blocks, one masked

    def rand(*shape):
        return torch.randn(*shape, generator=generator)

    state, x, dt, A, B, C = rand(batch, heads, head_dim, size), rand(batch, heads, head_dim), rand(batch, heads), \
        -rand(heads).exp(), rand(batch, groups, size), rand(batch, groups, size)
    for D, dt_bias in ((rand(heads), rand(heads)), (None, None)):
        expected_state = state.clone()
        expected = ssd.ssd_step(expected_state, x, dt, A, B, C, D=D, dt_bias=dt_bias)
        ours_state = state.clone()
        ours = selective_state_update(ours_state, x, dt, A, B, C, D=D, dt_bias=dt_bias)
        torch.testing.assert_close(ours_state, expected_state, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)


def reference_layer(block, hidden, conv_state, ssm_state, A):
    """The per-op block step as the fused one is written: embeddings in, residual stream out."""
    out, residual = block.step(hidden, None, conv_state, ssm_state, A)
    return residual + out.to(residual.dtype)


@interpreted
@pytest.mark.parametrize("residual_in_fp32", [True, False])
def test_one_fused_layer_equals_the_reference_block_step_in_float32(residual_in_fp32):
    batch = 1
    lm = language_model(residual_in_fp32=residual_in_fp32)
    block, (conv, ssm) = lm.layers[0], random_states(lm, batch)[0]
    hidden = torch.randn(batch, lm.config.hidden_size, generator=torch.Generator().manual_seed(2))
    A = mamba2.decay_rates(block.mixer.A_log)
    expected_conv, expected_ssm = conv.clone(), ssm.clone()
    expected = reference_layer(block, hidden, expected_conv, expected_ssm, A)
    ours = fused_decode_layers(lm.layers[:1], hidden, [(conv, ssm)], [A], residual_in_fp32)
    assert rel_err(ours, expected) < 1e-5
    assert rel_err(ssm, expected_ssm) < 1e-5
    assert torch.equal(conv[..., :-1], expected_conv[..., :-1])  # the kept inputs moved one tap left
    assert rel_err(conv[..., -1], expected_conv[..., -1]) < 1e-5  # the new in_proj output


@interpreted
def test_fused_bfloat16_layer_is_as_close_to_float32_as_the_reference_step():
    """bf16 rounding differs (the fused step normalises and convolves in float32, as mamba_ssm's kernels do; the
    PyTorch reference rounds more often), so both are measured against the float32 computation."""
    exact = language_model()
    lm = copy.deepcopy(exact).to(torch.bfloat16)
    block, (conv, ssm) = lm.layers[0], random_states(lm, 1)[0]
    hidden = torch.randn(1, lm.config.hidden_size, generator=torch.Generator().manual_seed(2)).bfloat16()
    A = mamba2.decay_rates(block.mixer.A_log)
    truth = reference_layer(exact.layers[0], hidden.float(), conv.float(), ssm.clone(), A)
    reference = reference_layer(block, hidden, conv.clone(), ssm.clone(), A)
    ours = fused_decode_layers(lm.layers[:1], hidden, [(conv, ssm)], [A], residual_in_fp32=True)
    assert ours.dtype == torch.float32
    assert rel_err(ours, truth) <= max(rel_err(reference, truth), 2e-3)


@interpreted
@pytest.mark.parametrize("dtype, steps", [(torch.float32, 2), (torch.bfloat16, 1)])
@pytest.mark.parametrize("batch, path", [(1, "fused"), (3, "streaming")])
def test_lm_step_with_kernels_equals_the_per_op_step(kernels_on_cpu, dtype, steps, batch, path):
    bound = 1e-5 if dtype == torch.float32 else 3e-2
    lm = language_model(dtype)
    ids = torch.randint(0, lm.config.vocab_size, (batch,), generator=torch.Generator().manual_seed(3))
    states = random_states(lm, batch)
    expected_states = copies(states)
    with torch.no_grad():
        assert decode_path(lm, lm.embeddings(ids), states, True, ("cpu",)) == path
        for _ in range(steps):  # a second step starts from states the kernels wrote
            expected = lm.step(ids, expected_states, fused=False)
            ours = lm.step(ids, states)
    assert ours.dtype == expected.dtype == dtype
    assert rel_err(ours, expected) < bound
    for (conv, ssm), (expected_conv, expected_ssm) in zip(states, expected_states):
        assert rel_err(conv, expected_conv) < bound and rel_err(ssm, expected_ssm) < bound


@interpreted
@pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="needs torchao")
@pytest.mark.parametrize("config_name", ["Int8WeightOnlyConfig", "Float8WeightOnlyConfig"])
def test_fused_step_reads_torchao_rowwise_weights_as_torchaos_own_linear_does(kernels_on_cpu, config_name):
    batch = 1
    """int8 / float8 projections with one scale per row: the fused GEMVs read the 1-byte values and scales
    directly; the per-op step runs torchao's own linear, the independent reference."""
    import torchao.quantization

    lm = language_model(torch.bfloat16)
    torchao.quantization.quantize_(lm, getattr(torchao.quantization, config_name)(),
                                   filter_fn=lambda module, name: name.endswith(("in_proj", "out_proj")))
    assert gemv.rowwise_quantized(lm.layers[0].mixer.in_proj.weight)
    ids = torch.randint(0, lm.config.vocab_size, (batch,), generator=torch.Generator().manual_seed(3))
    states = random_states(lm, batch)
    expected_states = copies(states)
    with torch.no_grad():
        assert decode_path(lm, lm.embeddings(ids), states, True, ("cpu",)) == "fused"
        expected = lm.step(ids, expected_states, fused=False)
        ours = lm.step(ids, states)
    assert rel_err(ours, expected) < 3e-2
    for (conv, ssm), (expected_conv, expected_ssm) in zip(states, expected_states):
        assert rel_err(conv, expected_conv) < 3e-2 and rel_err(ssm, expected_ssm) < 3e-2


@interpreted
def test_greedy_generation_is_the_same_with_and_without_the_fused_step(kernels_on_cpu, monkeypatch):
    model = tiny_model()
    monkeypatch.setattr(type(model), "cuda_graph_devices", ("cpu",))
    fused_calls = []
    monkeypatch.setattr(mamba2, "fused_decode_layers", lambda *a: fused_calls.append(1) or fused_decode_layers(*a))
    ids = torch.tensor([image_prompt(model.config, [5, 6, 7])])
    pixels = random_pixels(1, model.config)
    outputs = {}
    for fused, graphs in ((False, False), (True, False), (True, True)):
        model.config.use_fused_decode_step, model.config.use_cuda_graphs = fused, graphs
        outputs[fused, graphs] = model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=3,
                                                do_sample=False, eos_token_id=None)
    assert torch.equal(outputs[True, False], outputs[False, False])
    assert torch.equal(outputs[True, True], outputs[False, False])
    assert len(fused_calls) == 2 * 2  # two decode steps eagerly, and two through the decode graph
