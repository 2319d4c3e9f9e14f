import pytest
import torch
import torch.nn.functional as F

from modeling_mlmamba.ssd import ssd_chunked, ssd_scan, ssd_sequential


def random_inputs(batch, length, heads, head_dim, groups, state, seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=dtype)

    return dict(
        x=randn(batch, length, heads, head_dim),
        dt=F.softplus(randn(batch, length, heads)),
        A=-torch.rand(heads, generator=generator, dtype=dtype) * 2,
        B=randn(batch, length, groups, state),
        C=randn(batch, length, groups, state),
    )


def relative_error(actual, expected):
    return ((actual - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("length", [1, 7, 16, 29])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("with_d", [False, True])
@pytest.mark.parametrize("with_initial_state", [False, True])
def test_chunked_scan_matches_sequential_recurrence(length, groups, with_d, with_initial_state):
    heads, head_dim, state, chunk = 4, 3, 5, 8
    inputs = random_inputs(2, length, heads, head_dim, groups, state)
    generator = torch.Generator().manual_seed(1)
    D = torch.randn(heads, generator=generator, dtype=torch.float64) if with_d else None
    initial = torch.randn(2, heads, head_dim, state, generator=generator, dtype=torch.float64)
    initial = initial if with_initial_state else None

    y_ref, state_ref = ssd_sequential(**inputs, D=D, initial_state=initial)
    y, final_state = ssd_chunked(**inputs, chunk_size=chunk, D=D, initial_state=initial)

    assert relative_error(y, y_ref) <= 1e-10
    assert relative_error(final_state, state_ref) <= 1e-10


def test_chunked_scan_gradients_match_sequential_recurrence():
    inputs = random_inputs(2, 13, 4, 3, 2, 5)
    D = torch.randn(4, dtype=torch.float64)
    initial = torch.randn(2, 4, 3, 5, dtype=torch.float64)
    leaves = {**inputs, "D": D, "initial_state": initial}

    def gradients(scan, **extra):
        params = {k: v.clone().requires_grad_(True) for k, v in leaves.items()}
        y, final_state = scan(**params, **extra)
        weights = torch.linspace(-1, 1, y.numel(), dtype=torch.float64).view_as(y)
        ((y * weights).sum() + final_state.pow(2).sum()).backward()
        return {k: p.grad for k, p in params.items()}

    reference = gradients(ssd_sequential)
    chunked = gradients(ssd_chunked, chunk_size=4)
    for name in leaves:
        assert relative_error(chunked[name], reference[name]) <= 1e-10, name


def test_dispatch_applies_softplus_and_bias_on_cpu():
    inputs = random_inputs(1, 11, 2, 4, 1, 3, dtype=torch.float32)
    raw_dt = torch.randn(1, 11, 2)
    dt_bias = torch.randn(2)
    D = torch.randn(2)
    y, final_state = ssd_scan(inputs["x"], raw_dt, inputs["A"], inputs["B"], inputs["C"], 4, D=D, dt_bias=dt_bias)
    y_ref, state_ref = ssd_sequential(
        inputs["x"].double(), F.softplus(raw_dt + dt_bias).double(), inputs["A"].double(),
        inputs["B"].double(), inputs["C"].double(), D=D.double(),
    )
    assert y.dtype == torch.float32
    assert relative_error(y.double(), y_ref) <= 1e-5
    assert relative_error(final_state.double(), state_ref) <= 1e-5
