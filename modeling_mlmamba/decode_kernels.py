"""The language model's one-token decode step at batch 1 fused into three Triton kernels per layer, for CUDA.

At batch 1 a decode step reads every weight once (5.4 GB at full size), so its bound is the memory bandwidth;
the per-op step adds ~6 small kernels per layer (add + RMSNorm, conv update, state update, gated RMSNorm) whose
launches and tails cost ~0.8 ms per token. Here each layer runs:

1. `norm_in_proj_conv`: the in_proj GEMV normalises its input row as it loads it (RMSNorm of the residual stream,
   whose sum of squares the previous kernel left in 4-column partial sums), and the programs that own conv
   channels apply the depthwise conv update + SiLU to their outputs;
2. `state_update`: dt softplus, the selective state update (float32 state, one read and one write per element),
   the D skip and the SiLU gate, leaving partial sums of squares for the gated norm;
3. `gated_norm_out_proj`: the out_proj GEMV applies the gated RMSNorm as it loads its input, then adds the
   result to the residual stream and leaves the partial sums of squares for the next layer's norm.

The GEMVs read bf16 weights at ~3.5 TB/s on an H200 (each program keeps the products of its whole tile, and loads
the next weight tile and the next piece of its input row before multiplying the current ones), plain bf16/fp16/fp32
weights or torchao's int8 / float8 ones with a scale per row (half the bytes, widened to float32 by bit moves). On
Hopper each kernel is a programmatic dependent launch: it starts loading its weights (the state update: its state)
while the previous kernel finishes. The unfused path's rounding points are kept (in_proj, conv, state update and
out_proj outputs are rounded to the model dtype), so the two differ only in summation order.

From two rows on the per-op step runs (its projections are GEMMs), with `selective_state_update` below in place of
mamba_ssm's kernel: at large batches the step is bound by the state traffic (2.6 MB of float32 state per layer and
sequence, read and written), which that kernel streams at ~3.8 TB/s.

`decode_path` decides which step a call takes; `Mamba2LanguageModel.decode` is the only caller.
"""

import torch
from torch import nn

from .gemv import row_sums, vector_tile, weight_operands, weight_tile, widen

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None
try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:
    gdc_launch_dependents = gdc_wait = None

# The fused step is written for one row. From two rows on, the per-op step's GEMMs (cuBLAS) are faster on an H200
# than GEMV tiles that hold several rows (2.8 against 3.2 ms per step at batch 2, 3.6 against 3.8 at batch 8).
FUSED_MAX_BATCH = 1
# GEMV tiles (outputs, inputs per step, warps) by bytes per weight: the fastest of those measured on an H200 at the
# full LM's shapes (`benchmarks/decode_step_kernels.py`): bf16 in_proj 10576 x 2560 in 15.4 us (cuBLAS 15.4-16.0),
# out_proj 2560 x 5120 in 9.2 us (cuBLAS 11.6); float8 in_proj 13.7 us, out_proj 6.8 us; int8 13.4 and 6.3 us.
# 4-byte weights take the 2-byte tiles.
IN_PROJ_TILES = {2: (32, 256, 4), 1: (8, 512, 4)}
OUT_PROJ_TILES = {2: (4, 1024, 4), 1: (4, 1024, 4)}
# The residual stream's sum of squares is handed between kernels in partial sums of this many columns: the
# narrowest GEMV tile's outputs, so that even the out_proj (2560 outputs at full size) can be split into 640 programs.
NORM_PARTIAL_WIDTH = 4
# Largest SSM state size whose (rows x state) tile the state-update kernel holds in registers.
MAX_STATE_SIZE = 256
WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def dependent_launch(device: torch.device) -> bool:
    """Whether the kernels on `device` are launched as programmatic dependents (Hopper and later): each may start
    while the kernel before it finishes, loading its first weights, and waits (`gdc_wait`) before it reads anything
    that kernel wrote. A decode step is a chain of ~200 short kernels, so each launch gap saved counts."""
    return gdc_wait is not None and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def _launch_options(device: torch.device) -> dict:
    pdl = dependent_launch(device)
    return {"USE_PDL": pdl, "launch_pdl": pdl} if device.type == "cuda" else {"USE_PDL": False}


def _launch_gemv(kernel, tiles: dict, tile, values: torch.Tensor, device: torch.device, *args, **constexprs):
    """One of the GEMV kernels over the rows of `values`, with `tile` = (outputs, inputs per step, warps) when
    given, else the one `tiles` holds for the weights' bytes per element."""
    block_n, block_k, warps = tile or tiles[1 if values.element_size() == 1 else 2]
    options = _launch_options(device) | ({"num_warps": warps} if device.type == "cuda" else {})
    kernel[(triton.cdiv(values.shape[0], block_n),)](*args, **constexprs, **options, BLOCK_N=block_n,
                                                      BLOCK_K=block_k)


if triton is not None:

    @triton.jit
    def _wait_for_previous_kernel(USE_PDL: tl.constexpr):
        """Under programmatic dependent launch: wait until the previous kernel's writes are visible, then let the
        next kernel start. Before this a kernel may read only what the kernel before it does not write: weights, which
        no kernel of the step writes, and its own layer's states, which only it writes. A dependent launch starts
        only after the kernel two launches back completed, and the step's first GEMV comes after the embedding
        lookup and `residual_squares`' kernels."""
        if USE_PDL:
            gdc_wait()
            gdc_launch_dependents()

    @triton.jit
    def _norm_in_proj_conv_kernel(
        residual_ptr, residual_sq_ptr, norm_weight_ptr, weight_ptr, weight_scale_ptr, projected_ptr,
        conv_state_ptr, conv_weight_ptr, conv_bias_ptr, conv_out_ptr,
        N, K, num_sq_parts, conv_start, conv_dim, eps, stride_weight, stride_state_c, stride_state_k,
        HAS_CONV_BIAS: tl.constexpr, CONV_WIDTH: tl.constexpr, BLOCK_WIDTH: tl.constexpr,
        BLOCK_PARTS: tl.constexpr, HAS_SCALE: tl.constexpr, USE_PDL: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        weight = weight_tile(weight_ptr, cols, col_ok, 0, K, stride_weight, BLOCK_K)
        scale = vector_tile(norm_weight_ptr, 0, K, BLOCK_K)
        _wait_for_previous_kernel(USE_PDL)
        parts = tl.arange(0, BLOCK_PARTS)
        squares = tl.load(residual_sq_ptr + parts, mask=parts < num_sq_parts, other=0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(squares, axis=0) / K + eps)
        residual = vector_tile(residual_ptr, 0, K, BLOCK_K)

        products = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            next_weight = weight_tile(weight_ptr, cols, col_ok, k0 + BLOCK_K, K, stride_weight, BLOCK_K)
            next_residual = vector_tile(residual_ptr, k0 + BLOCK_K, K, BLOCK_K)
            next_scale = vector_tile(norm_weight_ptr, k0 + BLOCK_K, K, BLOCK_K)
            x = (residual.to(tl.float32) * rstd * scale.to(tl.float32)).to(projected_ptr.dtype.element_ty)
            products += widen(weight) * x.to(tl.float32)[None, :]
            weight, residual, scale = next_weight, next_residual, next_scale

        projected = row_sums(products, weight_scale_ptr, cols, col_ok, HAS_SCALE).to(projected_ptr.dtype.element_ty)
        tl.store(projected_ptr + cols, projected, mask=col_ok)

        # Conv channels: window = the last CONV_WIDTH - 1 stored inputs, then the new one.
        channels = cols - conv_start
        is_conv = (channels >= 0) & (channels < conv_dim)
        taps = tl.arange(0, BLOCK_WIDTH)[None, :]
        state_ptrs = conv_state_ptr + channels[:, None] * stride_state_c
        kept = tl.load(state_ptrs + (taps + 1) * stride_state_k, mask=is_conv[:, None] & (taps < CONV_WIDTH - 1),
                       other=0.0)
        newest = projected.to(conv_state_ptr.dtype.element_ty)[:, None]
        window = tl.where(taps == CONV_WIDTH - 1, newest, kept)
        conv_weight = tl.load(conv_weight_ptr + channels[:, None] * CONV_WIDTH + taps,
                              mask=is_conv[:, None] & (taps < CONV_WIDTH), other=0.0)
        conv = tl.sum(window.to(tl.float32) * conv_weight.to(tl.float32), axis=1)
        if HAS_CONV_BIAS:
            conv += tl.load(conv_bias_ptr + channels, mask=is_conv, other=0.0).to(tl.float32)
        conv = conv * tl.sigmoid(conv)
        tl.store(conv_out_ptr + channels, conv.to(conv_out_ptr.dtype.element_ty), mask=is_conv)
        # Each stored input moves one tap left: all of this program's reads must be done before its writes.
        tl.debug_barrier()
        tl.store(state_ptrs + taps * stride_state_k, window, mask=is_conv[:, None] & (taps < CONV_WIDTH))

    @triton.jit
    def _state_update_kernel(
        state_ptr, x_ptr, B_ptr, C_ptr, dt_ptr, dt_bias_ptr, A_ptr, D_ptr, z_ptr, out_ptr, out_sq_ptr,
        head_dim, state_size, heads_per_group, p_blocks,
        stride_state_b, stride_state_h, stride_state_p, stride_x_b, stride_x_h, stride_bc_b, stride_bc_g,
        stride_dt_b, stride_z_b, stride_z_h, stride_out_b, stride_out_h,
        HAS_DT_BIAS: tl.constexpr, HAS_D: tl.constexpr, GATED: tl.constexpr, USE_PDL: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr,
    ):
        block = tl.program_id(0)  # head * p_blocks + block of head_dim rows
        row = tl.program_id(1)
        head = block // p_blocks
        group = head // heads_per_group
        p = (block % p_blocks) * BLOCK_P + tl.arange(0, BLOCK_P)
        n = tl.arange(0, BLOCK_S)
        p_ok = p < head_dim
        n_ok = n < state_size
        # The state is read before the wait: under dependent launch (the fused step) the kernel before this one is
        # the in_proj, which does not write it.
        state_ptrs = state_ptr + row * stride_state_b + head * stride_state_h + p[:, None] * stride_state_p + n[None, :]
        state_ok = p_ok[:, None] & n_ok[None, :]
        state = tl.load(state_ptrs, mask=state_ok, other=0.0).to(tl.float32)
        A = tl.load(A_ptr + head).to(tl.float32)
        _wait_for_previous_kernel(USE_PDL)

        x = tl.load(x_ptr + row * stride_x_b + head * stride_x_h + p, mask=p_ok, other=0.0).to(tl.float32)
        dt = tl.load(dt_ptr + row * stride_dt_b + head).to(tl.float32)
        if HAS_DT_BIAS:
            dt += tl.load(dt_bias_ptr + head).to(tl.float32)
        dt = tl.where(dt <= 20.0, tl.log(tl.exp(dt) + 1.0), dt)  # softplus, as torch's (threshold 20)
        decay = tl.exp(A * dt)
        B = tl.load(B_ptr + row * stride_bc_b + group * stride_bc_g + n, mask=n_ok, other=0.0).to(tl.float32)
        C = tl.load(C_ptr + row * stride_bc_b + group * stride_bc_g + n, mask=n_ok, other=0.0).to(tl.float32)
        state = state * decay + (B * dt)[None, :] * x[:, None]
        tl.store(state_ptrs, state.to(state_ptr.dtype.element_ty), mask=state_ok)

        y = tl.sum(state * C[None, :], axis=1)
        if HAS_D:
            y += x * tl.load(D_ptr + head).to(tl.float32)
        y = y.to(x_ptr.dtype.element_ty)
        out_ptrs = out_ptr + row * stride_out_b + head * stride_out_h + p
        if GATED:
            z = tl.load(z_ptr + row * stride_z_b + head * stride_z_h + p, mask=p_ok, other=0.0).to(tl.float32)
            gated = y.to(tl.float32) * z * tl.sigmoid(z)
            tl.store(out_ptrs, gated, mask=p_ok)
            tl.store(out_sq_ptr + row * tl.num_programs(0) + block, tl.sum(tl.where(p_ok, gated * gated, 0.0), axis=0))
        else:
            tl.store(out_ptrs, y, mask=p_ok)

    @triton.jit
    def _gated_norm_out_proj_kernel(
        gated_ptr, gated_sq_ptr, norm_weight_ptr, weight_ptr, weight_scale_ptr, residual_ptr, new_residual_ptr,
        new_residual_sq_ptr, N, K, num_gated_parts, eps, stride_weight,
        SQ_WIDTH: tl.constexpr, BLOCK_PARTS: tl.constexpr, HAS_SCALE: tl.constexpr, USE_PDL: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        weight = weight_tile(weight_ptr, cols, col_ok, 0, K, stride_weight, BLOCK_K)
        scale = vector_tile(norm_weight_ptr, 0, K, BLOCK_K)
        _wait_for_previous_kernel(USE_PDL)
        parts = tl.arange(0, BLOCK_PARTS)
        squares = tl.load(gated_sq_ptr + parts, mask=parts < num_gated_parts, other=0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(squares, axis=0) / K + eps)
        gated = vector_tile(gated_ptr, 0, K, BLOCK_K)

        products = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            next_weight = weight_tile(weight_ptr, cols, col_ok, k0 + BLOCK_K, K, stride_weight, BLOCK_K)
            next_gated = vector_tile(gated_ptr, k0 + BLOCK_K, K, BLOCK_K)
            next_scale = vector_tile(norm_weight_ptr, k0 + BLOCK_K, K, BLOCK_K)
            x = (gated * rstd * scale.to(tl.float32)).to(norm_weight_ptr.dtype.element_ty)
            products += widen(weight) * x.to(tl.float32)[None, :]
            weight, gated, scale = next_weight, next_gated, next_scale

        mixed = row_sums(products, weight_scale_ptr, cols, col_ok, HAS_SCALE)
        mixed = mixed.to(norm_weight_ptr.dtype.element_ty).to(tl.float32)
        residual = tl.load(residual_ptr + cols, mask=col_ok, other=0.0)
        new_residual = (residual.to(tl.float32) + mixed).to(new_residual_ptr.dtype.element_ty)
        tl.store(new_residual_ptr + cols, new_residual, mask=col_ok)
        stored = tl.where(col_ok, new_residual.to(tl.float32), 0.0)
        sums = tl.sum(tl.reshape(stored * stored, (BLOCK_N // SQ_WIDTH, SQ_WIDTH)), axis=1)
        part = tl.program_id(0) * (BLOCK_N // SQ_WIDTH) + tl.arange(0, BLOCK_N // SQ_WIDTH)
        tl.store(new_residual_sq_ptr + part, sums, mask=part < N // SQ_WIDTH)


def residual_squares(residual: torch.Tensor) -> torch.Tensor:
    """Sums of squares of each `NORM_PARTIAL_WIDTH` columns of the residual stream, in float32:
    (rows, width / NORM_PARTIAL_WIDTH)."""
    return residual.float().square().unflatten(-1, (-1, NORM_PARTIAL_WIDTH)).sum(-1)


def norm_in_proj_conv(residual, residual_sq, norm, in_proj, conv1d, conv_state, conv_start, projected, conv_out,
                      tile=None):
    """For one row: projected = in_proj(RMSNorm(residual)); conv_out = SiLU(conv update) of its conv channels,
    `conv_state` shifted in place. `tile` replaces the one from `IN_PROJ_TILES` (benchmarks compare tiles)."""
    values, row_scale = weight_operands(in_proj.weight)
    conv_dim, _, conv_width = conv1d.weight.shape
    bias = conv1d.bias
    _launch_gemv(
        _norm_in_proj_conv_kernel, IN_PROJ_TILES, tile, values, residual.device,
        residual, residual_sq, norm.weight, values, row_scale, projected,
        conv_state, conv1d.weight, bias if bias is not None else conv1d.weight, conv_out,
        values.shape[0], values.shape[1], residual_sq.shape[1], conv_start, conv_dim, norm.eps, values.stride(0),
        conv_state.stride(1), conv_state.stride(2),
        HAS_CONV_BIAS=bias is not None, CONV_WIDTH=conv_width, BLOCK_WIDTH=triton.next_power_of_2(conv_width),
        BLOCK_PARTS=triton.next_power_of_2(residual_sq.shape[1]), HAS_SCALE=row_scale is not None,
    )


def _state_rows_per_program(head_dim: int) -> int:
    """Rows of a head's state per program: 16 x 128 float32 (8 KB read and written) keeps enough programs in
    flight at batch 1 (320 at full size) and streams in full cache lines at batch 32."""
    return min(triton.next_power_of_2(head_dim), 16)


def _launch_state_update(state, x, dt, A, B, C, D, dt_bias, out, gate=None, out_sq=None, dependent=False):
    """The state-update kernel; `dependent` (the fused step) launches it as a programmatic dependent of the in_proj
    kernel before it, which it overlaps by reading the state early."""
    batch, heads, head_dim = x.shape
    rows_per_program = _state_rows_per_program(head_dim)
    p_blocks = triton.cdiv(head_dim, rows_per_program)
    gate_strides = gate.stride()[:2] if gate is not None else (0, 0)
    _state_update_kernel[(heads * p_blocks, batch)](
        state, x, B, C, dt, dt_bias if dt_bias is not None else A, A, D if D is not None else A,
        gate if gate is not None else x, out, out_sq if out_sq is not None else A,
        head_dim, state.shape[-1], heads // B.shape[1], p_blocks,
        *state.stride()[:3], *x.stride()[:2], *B.stride()[:2], dt.stride(0), *gate_strides, *out.stride()[:2],
        HAS_DT_BIAS=dt_bias is not None, HAS_D=D is not None, GATED=gate is not None,
        BLOCK_P=rows_per_program, BLOCK_S=triton.next_power_of_2(state.shape[-1]),
        **(_launch_options(state.device) if dependent else {"USE_PDL": False}),
    )


def selective_state_update(state, x, dt, A, B, C, D=None, dt_bias=None):
    """`ssd.ssd_step` as one streaming kernel: softplus(dt + dt_bias), the state update in place (computed in
    float32, one read and one write of each state element) and y = state C + D x, in x's dtype.

    state (batch, heads, head_dim, state), x (batch, heads, head_dim), dt (batch, heads), A (heads,) in float32,
    B and C (batch, groups, state); every last dimension contiguous."""
    y = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    _launch_state_update(state, x, dt, A, B, C, D, dt_bias, y)
    return y


def gated_norm_out_proj(gated, gated_sq, norm, out_proj, residual, new_residual, new_residual_sq, tile=None):
    """For one row: new_residual = residual + out_proj(gated RMSNorm of `gated`); its partial sums of squares go to
    `new_residual_sq` for the next layer's norm. `tile` replaces the one from `OUT_PROJ_TILES`."""
    values, row_scale = weight_operands(out_proj.weight)
    _launch_gemv(
        _gated_norm_out_proj_kernel, OUT_PROJ_TILES, tile, values, gated.device,
        gated, gated_sq, norm.weight, values, row_scale, residual, new_residual, new_residual_sq,
        values.shape[0], values.shape[1], gated_sq.shape[1], norm.eps, values.stride(0),
        SQ_WIDTH=NORM_PARTIAL_WIDTH, BLOCK_PARTS=triton.next_power_of_2(gated_sq.shape[1]),
        HAS_SCALE=row_scale is not None,
    )


def fused_decode_layers(layers, hidden_states, states, rates, residual_in_fp32: bool) -> torch.Tensor:
    """Every LM block on one token of one sequence: (1, hidden) embeddings -> the residual stream after the last
    block (float32 if `residual_in_fp32`), each layer's (conv_state, ssm_state) updated in place. The final norm is
    the caller's, as in the unfused step."""
    dims = layers[0].mixer.dims
    batch = hidden_states.shape[0]
    if batch != 1:
        raise ValueError(f"fused_decode_layers runs one sequence; got hidden_states of shape "
                         f"{tuple(hidden_states.shape)}: run larger batches through the per-op step")
    residual = hidden_states.to(torch.float32 if residual_in_fp32 else hidden_states.dtype)
    residual_sq = residual_squares(residual)
    spare = torch.empty_like(residual)
    projected = hidden_states.new_empty(batch, dims.projection_size)
    conv_out = hidden_states.new_empty(batch, dims.conv_dim)
    p_blocks = triton.cdiv(dims.head_dim, _state_rows_per_program(dims.head_dim))
    gated = torch.empty(batch, dims.inner_size, device=residual.device, dtype=torch.float32)
    gated_sq = torch.empty(batch, dims.num_heads * p_blocks, device=residual.device, dtype=torch.float32)
    gate, _, dt = dims.split_projection(projected)
    x, B, C = dims.split_conv_output(conv_out)
    for layer, (conv_state, ssm_state), A in zip(layers, states, rates):
        mixer = layer.mixer
        norm_in_proj_conv(residual, residual_sq, layer.norm, mixer.in_proj, mixer.conv1d, conv_state,
                          dims.inner_size, projected, conv_out)
        _launch_state_update(ssm_state, x, dt, A, B, C, mixer.D, mixer.dt_bias, gated.view(x.shape),
                             gate=gate.view(x.shape), out_sq=gated_sq, dependent=True)
        gated_norm_out_proj(gated, gated_sq, mixer.norm, mixer.out_proj, residual, spare, residual_sq)
        residual, spare = spare, residual
    return residual


# --- which step a decode call takes -------------------------------------------------------------------------


def _has_hooks(module: nn.Module) -> bool:
    """Forward hooks, pre-hooks or an accelerate hook (which replaces `forward`): the fused kernels would skip them."""
    return bool(module._forward_hooks or module._forward_pre_hooks or hasattr(module, "_hf_hook")
                or "forward" in module.__dict__)


def _plain_tensor(tensor: torch.Tensor | None, device: torch.device) -> bool:
    """A dense tensor on `device` (not a quantized or other tensor subclass, not offloaded)."""
    return tensor is None or (type(tensor.data) is torch.Tensor and tensor.device == device)


def _readable_projection(weight, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the fused GEMVs read `weight` directly: what `weight_operands` gives the launchers (plain and
    contiguous, or row-scaled int8 / float8), of the model's dtype and on `device`."""
    operands = weight_operands(weight)
    return operands is not None and weight.dtype == dtype and operands[0].device == device


def state_update_refusal(language_model, states, device: torch.device) -> str | None:
    """Why `selective_state_update` cannot run this step (None when it can)."""
    if triton is None:
        return "triton is not installed"
    dims = language_model.layers[0].mixer.dims
    if dims.state_size > MAX_STATE_SIZE:
        return f"state_size {dims.state_size} is above {MAX_STATE_SIZE}"
    for layer, (_, ssm_state) in zip(language_model.layers, states):
        mixer = layer.mixer
        if not all(_plain_tensor(p, device) for p in (mixer.A_log, mixer.D, mixer.dt_bias)):
            return f"layer {mixer.layer_idx}'s A_log, D or dt_bias is not a plain tensor on {device}"
        if ssm_state.device != device or ssm_state.stride(-1) != 1 or not ssm_state.is_floating_point():
            return f"layer {mixer.layer_idx}'s SSM state is not a float tensor on {device} with a contiguous last dim"
    return None


def fused_step_refusal(language_model, batch: int, states, device: torch.device) -> str | None:
    """Why the fused step cannot run (None when it can): it reads the weights directly, so they must be plain dense
    float tensors of unwrapped modules without hooks, in the shapes its kernels are written for."""
    from .mamba2 import CausalConv1d  # mamba2 imports this module

    config, dims = language_model.config, language_model.layers[0].mixer.dims
    if batch > FUSED_MAX_BATCH:
        return f"batch {batch} is above {FUSED_MAX_BATCH} (larger batches run the per-op step's GEMMs)"
    if dims.n_groups != 1:
        return f"n_groups is {dims.n_groups}; the fused gated norm normalises one group"
    if config.hidden_size % NORM_PARTIAL_WIDTH:
        return f"hidden_size {config.hidden_size} is not a multiple of {NORM_PARTIAL_WIDTH}"
    if torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks:
        return "global module forward hooks are registered"
    dtype = language_model.layers[0].mixer.in_proj.weight.dtype
    if dtype not in WEIGHT_DTYPES:
        return f"the weights are {dtype}, not one of {WEIGHT_DTYPES}"
    for layer, (conv_state, _) in zip(language_model.layers, states):
        mixer = layer.mixer
        modules = {"block": layer, "norm": layer.norm, "mixer": mixer, "in_proj": mixer.in_proj,
                   "conv1d": mixer.conv1d, "gated norm": mixer.norm, "out_proj": mixer.out_proj}
        for name, module in modules.items():
            if _has_hooks(module):
                return f"layer {mixer.layer_idx}'s {name} has forward hooks"
        expected = {"in_proj": (nn.Linear, "torch.nn.Linear"), "conv1d": (CausalConv1d, "CausalConv1d"),
                    "out_proj": (nn.Linear, "torch.nn.Linear")}
        for name, (cls, cls_name) in expected.items():
            kind = type(modules[name])
            if kind is not cls:
                return f"layer {mixer.layer_idx}'s {name} is a {kind.__module__}.{kind.__qualname__}, not a plain " \
                       f"{cls_name}"
        if mixer.in_proj.bias is not None or mixer.out_proj.bias is not None:
            return f"layer {mixer.layer_idx}'s in_proj or out_proj has a bias"
        weights = [layer.norm.weight, mixer.conv1d.weight, mixer.conv1d.bias, mixer.norm.weight]
        if not all(_plain_tensor(w, device) and (w is None or (w.dtype == dtype and w.is_contiguous()))
                   for w in weights):
            return f"layer {mixer.layer_idx}'s weights are not all plain contiguous {dtype} tensors on {device}"
        for name in ("in_proj", "out_proj"):
            if not _readable_projection(modules[name].weight, dtype, device):
                return f"layer {mixer.layer_idx}'s {name} weight is neither a plain contiguous {dtype} tensor nor " \
                       f"torchao's int8 / float8 weight with one scale per row, on {device}"
        if conv_state.device != device or conv_state.shape != (batch, dims.conv_dim, mixer.conv_kernel):
            return f"layer {mixer.layer_idx}'s conv state is not a ({batch}, {dims.conv_dim}, {mixer.conv_kernel}) " \
                   f"tensor on {device}"
    return None


def decode_path(language_model, hidden_states: torch.Tensor, states, allow_fused: bool, devices) -> str:
    """"fused" (the three-kernel step), "streaming" (the per-op step with `selective_state_update`) or "unfused"
    (the per-op step with mamba_ssm's kernels on CUDA, the PyTorch reference elsewhere).

    Kernels run only on `devices`, without autograd (they have no backward), and only when `allow_fused`."""
    device = hidden_states.device
    trainable = torch.is_grad_enabled() and any(p.requires_grad for p in language_model.parameters())
    if not allow_fused or device.type not in devices or trainable:
        return "unfused"
    if state_update_refusal(language_model, states, device) is not None:
        return "unfused"
    batch = hidden_states.shape[0]
    return "fused" if fused_step_refusal(language_model, batch, states, device) is None else "streaming"
