"""Mamba-2 state-space duality (SSD) scan: a sequential reference, a chunked PyTorch path, a kernel dispatch.

Shapes follow mamba_ssm: x (batch, length, heads, head_dim), dt (batch, length, heads), A (heads,),
B and C (batch, length, groups, state), D (heads,), states (batch, heads, head_dim, state).
The recurrence for each head is  h_t = exp(dt_t * A) h_{t-1} + dt_t * x_t B_t^T,  y_t = h_t C_t + D x_t.
"""

import torch
import torch.nn.functional as F

try:
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
except ImportError:
    mamba_chunk_scan_combined = selective_state_update = None


def _heads_from_groups(tensor: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Repeat each group's B or C for the heads that share it: (b, l, g, n) -> (b, l, h, n)."""
    return tensor.repeat_interleave(num_heads // tensor.shape[2], dim=2)


def ssd_sequential(x, dt, A, B, C, D=None, initial_state=None):
    """One time step at a time: slow, obviously right, the reference the tests compare against.

    `dt` is the discretisation step already made positive (after softplus). Returns (y, final_state).
    """
    batch, length, heads, head_dim = x.shape
    B, C = _heads_from_groups(B, heads), _heads_from_groups(C, heads)
    state = x.new_zeros(batch, heads, head_dim, B.shape[-1]) if initial_state is None else initial_state
    outputs = []
    for t in range(length):
        decay = torch.exp(dt[:, t] * A)[:, :, None, None]
        update = (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]
        state = state * decay + update
        outputs.append(torch.einsum("bhpn,bhn->bhp", state, C[:, t]))
    y = torch.stack(outputs, dim=1)
    if D is not None:
        y = y + D[:, None] * x
    return y, state


def _segment_sums(log_decay: torch.Tensor) -> torch.Tensor:
    """(..., T) -> (..., T, T) with entry [i, j] = sum(log_decay[j+1 : i+1]) for j <= i, -inf above the diagonal.

    exp() of it is the decay from step j to step i; built from masked cumulative sums for stability.
    """
    steps = log_decay.shape[-1]
    repeated = log_decay[..., None, :].expand(*log_decay.shape, steps).transpose(-1, -2)
    strictly_lower = torch.ones(steps, steps, dtype=torch.bool, device=log_decay.device).tril(-1)
    sums = repeated.masked_fill(~strictly_lower, 0).cumsum(dim=-2)
    lower = torch.ones(steps, steps, dtype=torch.bool, device=log_decay.device).tril()
    return sums.masked_fill(~lower, float("-inf"))


def ssd_chunked(x, dt, A, B, C, chunk_size, D=None, initial_state=None):
    """The SSD algorithm in plain PyTorch: quadratic attention-like form inside chunks, recurrence across them.

    Same arguments and result as `ssd_sequential`, in O(length * chunk_size) work. Used on CPU and when
    the Triton kernels are not installed.
    """
    batch, length, heads, head_dim = x.shape
    B, C = _heads_from_groups(B, heads), _heads_from_groups(C, heads)
    pad = (-length) % chunk_size
    # Zero-padding dt makes the padded steps keep the state unchanged, so the final state stays exact.
    x_p, B_p, C_p = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, B, C))
    dt_p = F.pad(dt, (0, 0, 0, pad))
    chunks = (length + pad) // chunk_size

    def split(t):
        return t.reshape(batch, chunks, chunk_size, *t.shape[2:])

    x_c, B_c, C_c, dt_c = split(x_p), split(B_p), split(C_p), split(dt_p)
    log_decay = (dt_c * A).permute(0, 3, 1, 2)  # (b, h, chunks, s)
    cumulative = log_decay.cumsum(dim=-1)

    # 1. Outputs from inputs of the same chunk.
    within = torch.exp(_segment_sums(log_decay))  # (b, h, c, s, s)
    y_within = torch.einsum("bclhn,bcshn,bhcls,bcsh,bcshp->bclhp", C_c, B_c, within, dt_c, x_c)

    # 2. Each chunk's contribution to the state at its end.
    to_end = torch.exp(cumulative[..., -1:] - cumulative)
    chunk_states = torch.einsum("bclhn,bhcl,bclh,bclhp->bchpn", B_c, to_end, dt_c, x_c)

    # 3. States at chunk starts, by a recurrence across chunks (with the initial state first).
    if initial_state is None:
        initial_state = x.new_zeros(batch, heads, head_dim, B.shape[-1])
    chunk_states = torch.cat([initial_state[:, None], chunk_states], dim=1)
    across = torch.exp(_segment_sums(F.pad(cumulative[..., -1], (1, 0))))  # (b, h, c+1, c+1)
    states = torch.einsum("bhzc,bchpn->bzhpn", across, chunk_states)
    start_states, final_state = states[:, :-1], states[:, -1]

    # 4. Outputs from the state carried into each chunk.
    y_carried = torch.einsum("bclhn,bchpn,bhcl->bclhp", C_c, start_states, torch.exp(cumulative))

    y = (y_within + y_carried).reshape(batch, chunks * chunk_size, heads, head_dim)[:, :length]
    if D is not None:
        y = y + D[:, None] * x
    return y, final_state


def ssd_scan(x, dt, A, B, C, chunk_size, D=None, dt_bias=None, initial_state=None):
    """Selective scan with raw `dt` (softplus(dt + dt_bias) is applied here). Returns (y, final_state).

    CUDA tensors go to mamba_ssm's fused Triton kernel when it is installed; everything else takes the
    chunked PyTorch path. Both compute in at least float32.
    """
    if mamba_chunk_scan_combined is not None and x.is_cuda:
        return mamba_chunk_scan_combined(
            x, dt, A.float(), B, C, chunk_size, D=D, dt_bias=dt_bias, initial_states=initial_state,
            dt_softplus=True, return_final_states=True,
        )
    dtype = x.dtype
    compute = torch.promote_types(dtype, torch.float32)  # at least float32, float64 stays float64
    dt = F.softplus(dt.to(compute) + (0.0 if dt_bias is None else dt_bias.to(compute)))
    y, final_state = ssd_chunked(
        x.to(compute), dt, A.to(compute), B.to(compute), C.to(compute), chunk_size,
        D=None if D is None else D.to(compute),
        initial_state=None if initial_state is None else initial_state.to(compute),
    )
    return y.to(dtype), final_state


def ssd_step_reference(state, x, dt, A, B, C, D=None):
    """One recurrence step in place on `state` (batch, heads, head_dim, state), computed in float32.

    x (batch, heads, head_dim), dt (batch, heads) already positive, B and C (batch, groups, state).
    Returns y (batch, heads, head_dim) in x's dtype.
    """
    heads = x.shape[1]
    compute = torch.promote_types(x.dtype, torch.float32)
    x_c, dt_c = x.to(compute), dt.to(compute)
    B = B.repeat_interleave(heads // B.shape[1], dim=1).to(compute)
    C = C.repeat_interleave(heads // C.shape[1], dim=1).to(compute)
    decay = torch.exp(dt_c * A.to(compute))[..., None, None]
    new_state = state.to(compute) * decay + (dt_c[..., None] * x_c)[..., None] * B[:, :, None, :]
    state.copy_(new_state)
    y = torch.einsum("bhpn,bhn->bhp", new_state, C)
    if D is not None:
        y = y + D.to(compute)[:, None] * x_c
    return y.to(x.dtype)


def ssd_step(state, x, dt, A, B, C, D=None, dt_bias=None):
    """Single-token update with raw `dt` (softplus(dt + dt_bias) applied here), in place on `state`.

    CUDA tensors go to mamba_ssm's `selective_state_update` Triton kernel when installed.
    """
    if selective_state_update is not None and x.is_cuda:
        head_dim, state_size = x.shape[-1], state.shape[-1]
        return selective_state_update(
            state, x, dt[..., None].expand(-1, -1, head_dim),
            A.float()[:, None, None].expand(-1, head_dim, state_size), B, C,
            D=None if D is None else D[:, None].expand(-1, head_dim), z=None,
            dt_bias=None if dt_bias is None else dt_bias[:, None].expand(-1, head_dim), dt_softplus=True,
        )
    compute = torch.promote_types(dt.dtype, torch.float32)
    dt = F.softplus(dt.to(compute) + (0.0 if dt_bias is None else dt_bias.to(compute)))
    return ssd_step_reference(state, x, dt, A, B, C, D)
