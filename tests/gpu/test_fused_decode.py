"""The fused decode step on a CUDA GPU: against the per-op CUDA step and the CPU float32 reference, per layer and end
to end, float32 and bfloat16, at the released LM's layer shapes; generation with and without it and with and
without CUDA graphs. Skipped without CUDA.

    python -m pytest -q tests/gpu/test_fused_decode.py
"""

import copy
import importlib.util

import pytest
import torch
from conftest import image_prompt, random_pixels, tiny_model

from modeling_mlmamba import decode_kernels, mamba2
from modeling_mlmamba.decode_kernels import FUSED_MAX_BATCH, decode_path, fused_decode_layers

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or decode_kernels.triton is None, reason="needs a CUDA GPU and triton"
)

# The released LM's layer (width 2560, 80 heads of 64, state 128, one group, conv 4); two layers, small vocabulary.
RELEASED_LAYER = dict(hidden_size=2560, num_hidden_layers=2, state_size=128, head_dim=64, num_heads=80, n_groups=1,
                      chunk_size=256, vocab_size=1024)
# Widths that leave every GEMV tile and head block partly masked.
ODD_LAYER = dict(hidden_size=208, num_hidden_layers=2, state_size=48, head_dim=26, num_heads=16, n_groups=1,
                 chunk_size=64, vocab_size=512)


def language_model(text_config: dict, seed: int = 0):
    """A float32 CPU LM with every per-head and norm parameter away from its initial value."""
    lm = tiny_model(seed, text_config=text_config).model.language_model
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lm.layers:
            mixer = layer.mixer
            mixer.dt_bias.copy_(torch.randn(mixer.dt_bias.shape, generator=generator) - 3)
            mixer.D.copy_(torch.randn(mixer.D.shape, generator=generator))
            mixer.A_log.copy_(torch.rand(mixer.A_log.shape, generator=generator) * 3)
            mixer.conv1d.bias.copy_(0.1 * torch.randn(mixer.conv1d.bias.shape, generator=generator))
            for weight in (layer.norm.weight, mixer.norm.weight):
                weight.copy_(1 + 0.2 * torch.randn(weight.shape, generator=generator))
    return lm.requires_grad_(False).eval()


def random_states(lm, batch: int, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    dims = lm.layers[0].mixer.dims
    return [(torch.randn(batch, dims.conv_dim, lm.config.conv_kernel, generator=generator),
             0.5 * torch.randn(batch, dims.num_heads, dims.head_dim, dims.state_size, generator=generator))
            for _ in lm.layers]


def on(states, device, dtype=None):
    return [(conv.to(device, dtype or conv.dtype, copy=True), ssm.to(device, copy=True)) for conv, ssm in states]


def rel_err(ours, reference) -> float:
    ours, reference = ours.double().cpu(), reference.double().cpu()
    return ((ours - reference).norm() / reference.norm()).item()


def reference_layer(block, hidden, conv_state, ssm_state, A):
    out, residual = block.step(hidden, None, conv_state, ssm_state, A)
    return residual + out.to(residual.dtype)


@pytest.fixture(scope="module")
def released():
    return language_model(RELEASED_LAYER)


@pytest.mark.parametrize("shape", ["released", "odd"])
def test_fused_layer_float32_equals_cpu_reference(released, shape):
    """Each kernel's math: in float32 the fused layer (GPU) equals the per-op block step (CPU) to rounding."""
    cpu = released if shape == "released" else language_model(ODD_LAYER)
    gpu = copy.deepcopy(cpu).cuda()
    (conv, ssm), = random_states(cpu, 1)[:1]
    hidden = torch.randn(1, cpu.config.hidden_size, generator=torch.Generator().manual_seed(2))
    A = mamba2.decay_rates(cpu.layers[0].mixer.A_log)
    expected_conv, expected_ssm = conv.clone(), ssm.clone()
    expected = reference_layer(cpu.layers[0], hidden, expected_conv, expected_ssm, A)
    conv, ssm = conv.to("cuda", copy=True), ssm.to("cuda", copy=True)
    ours = fused_decode_layers(gpu.layers[:1], hidden.cuda(), [(conv, ssm)], [A.cuda()], residual_in_fp32=True)
    assert rel_err(ours, expected) < 1e-4
    assert rel_err(ssm, expected_ssm) < 1e-4
    assert torch.equal(conv[..., :-1].cpu(), expected_conv[..., :-1])
    assert rel_err(conv[..., -1], expected_conv[..., -1]) < 1e-4


def test_fused_layer_bfloat16_is_as_close_to_float32_as_the_per_op_cuda_step(released):
    """bf16: the fused layer and the per-op CUDA layer (mamba_ssm / causal-conv1d kernels when installed) round at
    the same points and differ in summation order; both are measured against the CPU float32 computation."""
    gpu = copy.deepcopy(released).to("cuda", torch.bfloat16)
    (conv, ssm), = random_states(released, 1)[:1]
    hidden = torch.randn(1, released.config.hidden_size, generator=torch.Generator().manual_seed(2)).bfloat16()
    A = mamba2.decay_rates(released.layers[0].mixer.A_log)
    truth = reference_layer(released.layers[0], hidden.float(), conv.bfloat16().float(), ssm.clone(), A)
    per_op = reference_layer(gpu.layers[0], hidden.cuda(), conv.to("cuda", torch.bfloat16, copy=True),
                             ssm.to("cuda", copy=True), A.cuda())
    fused = fused_decode_layers(gpu.layers[:1], hidden.cuda(), [(conv.to("cuda", torch.bfloat16, copy=True),
                                                                 ssm.to("cuda", copy=True))],
                                [A.cuda()], residual_in_fp32=True)
    print(f"fused {rel_err(fused, truth):.2e}, per-op {rel_err(per_op, truth):.2e} from float32")
    assert rel_err(fused, truth) <= 2 * rel_err(per_op, truth) + 1e-3
    assert rel_err(fused, truth) < 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 4, 16, 32])
def test_lm_step_fused_equals_per_op_and_cpu_reference(released, dtype, batch):
    """End to end over 8 steps (states carried by the kernels): fused (batch 1) or streaming state update
    (above) vs the per-op CUDA step vs the CPU float32 step."""
    gpu = copy.deepcopy(released).to("cuda", dtype)
    states = random_states(released, batch)
    cpu_states, fused_states, per_op_states = states, on(states, "cuda", dtype), on(states, "cuda", dtype)
    rates = gpu.decay_rates()
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        path = decode_path(gpu, torch.zeros(batch, 1, device="cuda"), fused_states, True, ("cuda",))
        assert path == ("fused" if batch <= FUSED_MAX_BATCH else "streaming")
        for _ in range(8):
            ids = torch.randint(0, released.config.vocab_size, (batch,), generator=generator)
            expected = released.step(ids, cpu_states, fused=False)
            fused = gpu.step(ids.cuda(), fused_states, rates)
            per_op = gpu.step(ids.cuda(), per_op_states, rates, fused=False)
    if dtype == torch.float32:
        assert rel_err(fused, expected) < 1e-4 and rel_err(per_op, expected) < 1e-4
        for (conv, ssm), (expected_conv, expected_ssm) in zip(fused_states, cpu_states):
            assert rel_err(conv, expected_conv) < 1e-4 and rel_err(ssm, expected_ssm) < 1e-4
    else:
        print(f"batch {batch}: fused {rel_err(fused, expected):.2e}, per-op {rel_err(per_op, expected):.2e}")
        assert rel_err(fused, expected) <= 2 * rel_err(per_op, expected) + 1e-3
        for (ssm_fused, ssm_per_op, ssm_cpu) in zip([s for _, s in fused_states], [s for _, s in per_op_states],
                                                    [s for _, s in cpu_states]):
            assert rel_err(ssm_fused, ssm_cpu) <= 2 * rel_err(ssm_per_op, ssm_cpu) + 1e-3


def generation_model(dtype):
    text = dict(hidden_size=256, num_hidden_layers=4, state_size=64, head_dim=32, num_heads=16, chunk_size=64,
                vocab_size=512)
    model = tiny_model(0, text_config=text, image_token_id=511)
    return model.to("cuda", dtype)


def generate(model, ids, pixels, fused: bool, graphs: bool):
    model.config.use_fused_decode_step, model.config.use_cuda_graphs = fused, graphs
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels, max_new_tokens=24,
                         min_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0, output_logits=True,
                         return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits, dim=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_generation_with_and_without_fused_step_and_graphs(dtype, batch):
    """With graphs the fused step replays the same kernels as eagerly: bit-identical. Fused vs per-op: identical
    tokens in float32; in bf16 the summation order differs, so the logits are bounded instead (tokens reported)."""
    model = generation_model(dtype)
    config = model.config
    ids = torch.tensor([image_prompt(config, [5 + i, 6, 7, 8]) for i in range(batch)], device="cuda")
    pixels = random_pixels(batch, config).to("cuda", dtype)
    runs = {(fused, graphs): generate(model, ids, pixels, fused, graphs)
            for fused in (True, False) for graphs in (True, False) for _ in range(2)}  # twice: graphs are captured
    assert torch.equal(runs[True, True][0], runs[True, False][0])
    assert torch.equal(runs[True, True][1], runs[True, False][1])
    assert torch.equal(runs[False, True][0], runs[False, False][0])
    fused_tokens, fused_logits = runs[True, True]
    per_op_tokens, per_op_logits = runs[False, True]
    if dtype == torch.float32:
        assert torch.equal(fused_tokens, per_op_tokens)
    else:
        generated = fused_tokens[:, ids.shape[1]:] == per_op_tokens[:, ids.shape[1]:]
        same_history = int(generated.all(0).long().cumprod(0).sum())  # leading steps with identical tokens
        # Step 0 is the prefill; decode steps 1..same_history start from identical tokens in both runs.
        compared = slice(1, max(same_history, 1) + 1)
        difference = rel_err(fused_logits[:, compared], per_op_logits[:, compared])
        print(f"bf16 batch {batch}: {same_history} of {generated.shape[1]} greedy tokens identical; decode-step "
              f"logits over identical histories rel. diff {difference:.2e}")
        assert difference < 2e-2


def test_fused_path_is_taken_inside_generate(monkeypatch):
    calls = []
    monkeypatch.setattr(mamba2, "fused_decode_layers", lambda *args: calls.append(1) or fused_decode_layers(*args))
    model = generation_model(torch.bfloat16)
    ids = torch.tensor([image_prompt(model.config, [5, 6])], device="cuda")
    generate(model, ids, random_pixels(1, model.config).to("cuda", torch.bfloat16), fused=True, graphs=False)
    assert len(calls) == 23


@pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="needs torchao")
@pytest.mark.parametrize("config_name", ["Float8WeightOnlyConfig", "Int8WeightOnlyConfig"])
def test_fused_step_on_torchao_rowwise_weights_equals_torchaos_own_linear(released, config_name):
    """float8 / int8 projections with one scale per row, read directly by the fused GEMVs, against the per-op step
    (torchao's own linear) over 8 steps; the bound is the per-op bf16 step's own distance from float32 (the
    quantized weights are the same in both)."""
    import torchao.quantization

    gpu = copy.deepcopy(released).to("cuda", torch.bfloat16)
    torchao.quantization.quantize_(gpu, getattr(torchao.quantization, config_name)(),
                                   filter_fn=lambda module, name: name.endswith(("in_proj", "out_proj")))
    states = random_states(released, 1)
    fused_states, per_op_states = on(states, "cuda", torch.bfloat16), on(states, "cuda", torch.bfloat16)
    rates = gpu.decay_rates()
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        assert decode_path(gpu, torch.zeros(1, 1, device="cuda"), fused_states, True, ("cuda",)) == "fused"
        for _ in range(8):
            ids = torch.randint(0, released.config.vocab_size, (1,), generator=generator).cuda()
            fused = gpu.step(ids, fused_states, rates)
            per_op = gpu.step(ids, per_op_states, rates, fused=False)
    print(f"{config_name}: fused vs per-op {rel_err(fused, per_op):.2e}")
    assert rel_err(fused, per_op) < 3e-2
    for (_, ssm_fused), (_, ssm_per_op) in zip(fused_states, per_op_states):
        assert rel_err(ssm_fused, ssm_per_op) < 3e-2
