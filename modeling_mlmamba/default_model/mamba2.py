"""Mamba-2 building blocks shared by the connector and the language model, and the causal Mamba-2 LM itself.

The LM keeps transformers' `Mamba2Model` parameter names and config (`Mamba2Config`), so its checkpoints load
unchanged, but runs its own mixer: kernels are chosen per call by device (transformers picks them at import,
sending CPU tensors to Triton when mamba-ssm is installed), `in_proj`/`out_proj` are always called as modules
(transformers' fused training path reads `out_proj.weight` directly and so ignores a LoRA on it), and the same
code runs on every supported transformers release.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from .decode_kernels import decode_path, fused_decode_layers
from .decode_kernels import selective_state_update as streaming_state_update
from .gemv import decode_linear
from .ssd import ssd_scan, ssd_step

try:
    from causal_conv1d import causal_conv1d_fn, causal_conv1d_update
except ImportError:
    causal_conv1d_fn = causal_conv1d_update = None
try:
    from mamba_ssm.ops.triton.layer_norm import rms_norm_fn as fused_add_rms_norm
    from mamba_ssm.ops.triton.layernorm_gated import rmsnorm_fn as fused_gated_rms_norm
    from mamba_ssm.ops.triton.ssd_combined import mamba_split_conv1d_scan_combined
except ImportError:
    fused_add_rms_norm = fused_gated_rms_norm = mamba_split_conv1d_scan_combined = None


def weights_on(device: torch.device, *modules: nn.Module) -> bool:
    """Whether the modules' own weights are on `device`, so a kernel may read them without calling the modules.

    accelerate's offloading (`device_map` with "cpu" or "disk") leaves weights on the meta device and loads them
    only when the module that owns them is called; a kernel that takes `module.weight` directly must then step
    aside for the module call."""
    return all(param.device == device for module in modules for param in module.parameters(recurse=False))


def hooked_by_accelerate(module: nn.Module) -> bool:
    """Whether accelerate's hooks run any part of `module` (an offloaded or split `device_map`): they load weights
    only around each module's own `forward`, which a step reading the weights of its submodules would bypass."""
    return any(hasattr(submodule, "_hf_hook") for submodule in module.modules())


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, cast back to the input dtype before the weight (as Mamba2RMSNorm)."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = hidden_states.dtype
        compute = hidden_states.to(torch.promote_types(dtype, torch.float32))
        normed = compute * torch.rsqrt(compute.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(dtype)


def add_rms_norm(hidden_states, residual, norm: RMSNorm, residual_in_fp32: bool):
    """The pre-norm residual step: residual += hidden_states, then (norm(residual), residual).

    On CUDA with mamba-ssm this is one fused Triton kernel (as in the released model's `fused_add_norm`),
    which normalises the float32 sum directly; elsewhere (and while offloading keeps the norm's weight off the
    device) the sum is cast to the weight dtype first and `norm` is called, as in transformers' Mamba2.
    """
    if fused_add_rms_norm is not None and hidden_states.is_cuda and weights_on(hidden_states.device, norm):
        return fused_add_rms_norm(
            hidden_states, norm.weight, None, residual=residual, eps=norm.eps, prenorm=True,
            residual_in_fp32=residual_in_fp32,
        )
    summed = hidden_states if residual is None else residual + hidden_states
    if residual_in_fp32:
        summed = summed.float()
    return norm(summed.to(norm.weight.dtype)), summed


class GatedRMSNorm(nn.Module):
    """RMSNorm(x * SiLU(z)) * weight per group, in at least float32: mamba_ssm's `RMSNormGated(norm_before_gate=False)`."""

    def __init__(self, hidden_size: int, group_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.group_size = group_size
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        if fused_gated_rms_norm is not None and hidden_states.is_cuda:
            return fused_gated_rms_norm(hidden_states, self.weight, None, z=gate, eps=self.eps,
                                        group_size=self.group_size, norm_before_gate=False)
        dtype = hidden_states.dtype
        compute = torch.promote_types(dtype, torch.float32)
        gated = hidden_states.to(compute) * F.silu(gate.to(compute))
        grouped = gated.unflatten(-1, (-1, self.group_size))
        normed = grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * normed.flatten(-2)).to(dtype)


def kernel_aligned(xbc: torch.Tensor) -> torch.Tensor | None:
    """`xbc` (batch, length, channels) laid out as causal-conv1d's channel-last kernel needs it (batch and position
    strides multiples of 8), copied if that fixes it; None if the channel count itself is not a multiple of 8.
    The LM's `xbc` is a slice of the in_proj output, whose width is 8-aligned at released sizes but not at all."""
    if xbc.stride(0) % 8 or xbc.stride(1) % 8:
        xbc = xbc.contiguous()
    return xbc if xbc.stride(0) % 8 == 0 and xbc.stride(1) % 8 == 0 else None


class CausalConv1d(nn.Conv1d):
    """Depthwise causal conv + SiLU over channel-last sequences, and its one-position decode step.

    Both read the weights inside this module's `forward`, so accelerate's offloading hooks (which load a module's
    weights when the module is called) cover every use. The parameters are `nn.Conv1d`'s (`weight`, `bias`).
    """

    def __init__(self, channels: int, kernel: int, bias: bool = True):
        super().__init__(channels, channels, kernel, groups=channels, padding=kernel - 1, bias=bias)

    def forward(self, xbc: torch.Tensor, conv_state: torch.Tensor | None = None) -> torch.Tensor:
        """xbc (batch, length, channels) -> (batch, length, channels); causal-conv1d's kernel on CUDA when installed.

        With `conv_state` (batch, channels, kernel), holding the last `kernel` inputs: one new position
        (batch, channels) -> (batch, channels), and the state is shifted in place.
        """
        if conv_state is not None:
            return self._step(xbc, conv_state)
        aligned = kernel_aligned(xbc) if causal_conv1d_fn is not None and xbc.is_cuda else None
        if aligned is not None:
            weight = self.weight.squeeze(1)
            return causal_conv1d_fn(aligned.transpose(1, 2), weight, self.bias, activation="silu").transpose(1, 2)
        length = xbc.shape[1]
        conv = super().forward(xbc.transpose(1, 2).to(self.weight.dtype))
        return F.silu(conv[..., :length].transpose(1, 2)).to(xbc.dtype)

    def _step(self, xbc: torch.Tensor, conv_state: torch.Tensor) -> torch.Tensor:
        weight = self.weight.squeeze(1)
        if causal_conv1d_update is not None and xbc.is_cuda:
            return causal_conv1d_update(xbc, conv_state, weight, self.bias, activation="silu")
        conv_state.copy_(torch.cat([conv_state[:, :, 1:], xbc[:, :, None].to(conv_state.dtype)], dim=-1))
        out = (conv_state.to(weight.dtype) * weight).sum(-1)
        if self.bias is not None:
            out = out + self.bias
        return F.silu(out).to(xbc.dtype)


class SSMDimensions:
    """The widths a Mamba-2 mixer splits its projections into, from (hidden, expand, head_dim, groups, state)."""

    def __init__(self, hidden_size: int, expand: int, head_dim: int, n_groups: int, state_size: int):
        self.inner_size = expand * hidden_size
        self.head_dim = head_dim
        self.num_heads = self.inner_size // head_dim
        self.n_groups = n_groups
        self.state_size = state_size
        self.conv_dim = self.inner_size + 2 * n_groups * state_size
        self.projection_size = self.inner_size + self.conv_dim + self.num_heads

    def split_projection(self, projected: torch.Tensor):
        """in_proj output -> (gate z, conv input xBC, raw dt)."""
        return projected.split([self.inner_size, self.conv_dim, self.num_heads], dim=-1)

    def split_conv_output(self, xbc: torch.Tensor):
        """Conv output (..., conv_dim) -> x (..., heads, head_dim), B and C (..., groups, state)."""
        width = self.n_groups * self.state_size
        x, B, C = xbc.split([self.inner_size, width, width], dim=-1)
        groups = (self.n_groups, self.state_size)
        return x.unflatten(-1, (self.num_heads, self.head_dim)), B.unflatten(-1, groups), C.unflatten(-1, groups)


def decay_rates(A_log: torch.Tensor) -> torch.Tensor:
    """A = -exp(A_log) in at least float32 (bf16/fp16 parameters are upcast, float64 stays): the one definition
    that the chunked scan, the fused kernels and the decode step share, so prefill and decode use the same A."""
    return -torch.exp(A_log.to(torch.promote_types(A_log.dtype, torch.float32)))


def selective_scan(dims: SSMDimensions, ssm: nn.Module, conv_out, dt, chunk_size, initial_state=None):
    """The SSD scan (+ D skip) of one direction over its conv output. `ssm` owns dt_bias, A_log and D.

    Returns y (batch, length, inner) and the final state (batch, heads, head_dim, state).
    """
    x, B, C = dims.split_conv_output(conv_out)
    y, final_state = ssd_scan(
        x, dt, decay_rates(ssm.A_log), B, C, chunk_size, D=ssm.D, dt_bias=ssm.dt_bias, initial_state=initial_state,
    )
    return y.flatten(-2), final_state


class CausalMamba2Mixer(nn.Module):
    """transformers' `Mamba2Mixer` parameters and math, with a recurrent cache for generation."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.dims = SSMDimensions(
            config.hidden_size, config.expand, config.head_dim, config.n_groups, config.state_size
        )
        if self.dims.num_heads != config.num_heads:
            raise ValueError(f"text_config.num_heads is {config.num_heads} but hidden_size * expand / head_dim is "
                             f"{self.dims.num_heads}")
        self.chunk_size = config.chunk_size
        self.conv_kernel = config.conv_kernel
        self.in_proj = nn.Linear(config.hidden_size, self.dims.projection_size, bias=config.use_bias)
        self.conv1d = CausalConv1d(self.dims.conv_dim, config.conv_kernel, bias=config.use_conv_bias)
        self.dt_bias = nn.Parameter(torch.zeros(self.dims.num_heads))
        self.A_log = nn.Parameter(torch.zeros(self.dims.num_heads))
        self.D = nn.Parameter(torch.ones(self.dims.num_heads))
        inner = self.dims.inner_size
        self.norm = GatedRMSNorm(inner, inner // config.n_groups, config.layer_norm_epsilon)
        self.out_proj = nn.Linear(inner, config.hidden_size, bias=config.use_bias)

    def forward(self, hidden_states, cache=None, attention_mask=None):
        """A whole sequence (training, prefill, or a continuation of `cache`); updates `cache` when given.

        `attention_mask` (batch, length) zeroes padded positions before the projection and after the conv, so
        left padding leaves the recurrent state exactly as if the padding were absent.
        """
        length = hidden_states.shape[1]
        continuing = cache is not None and cache.has_previous_state(self.layer_idx)
        if continuing and length == 1:
            layer = cache.layers[self.layer_idx]
            return self.step(hidden_states[:, 0], layer.conv_states[0], layer.recurrent_states[0])[:, None]
        if cache is None and attention_mask is None and self.fused_kernel_applies(hidden_states):
            return self.out_proj(self.fused_conv_scan_norm(self.in_proj(hidden_states)))
        if attention_mask is not None:
            hidden_states = hidden_states * attention_mask[..., None].to(hidden_states.dtype)
        gate, xbc, dt = self.dims.split_projection(self.in_proj(hidden_states))
        initial_state = cache.layers[self.layer_idx].recurrent_states[0] if continuing else None
        if cache is not None:
            # The cache hands back the new inputs preceded by the cached ones (or zero-padded to the kernel).
            xbc = cache.update_conv_state(xbc.transpose(1, 2), self.layer_idx, conv_kernel_size=self.conv_kernel)
            xbc = xbc.transpose(1, 2)
        conv_out = self.conv1d(xbc)[:, -length:]
        if attention_mask is not None:
            conv_out = conv_out * attention_mask[..., None].to(conv_out.dtype)
        y, final_state = selective_scan(self.dims, self, conv_out, dt, self.chunk_size, initial_state)
        if cache is not None:
            cache.update_recurrent_state(final_state, self.layer_idx)
        return self.out_proj(self.norm(y, gate))

    def fused_kernel_applies(self, hidden_states: torch.Tensor) -> bool:
        """Whether mamba_ssm's single autograd call for conv + scan + gated norm (its own training path) can run:
        CUDA, mamba-ssm and causal-conv1d (which it calls) installed, a conv width that kernel accepts, and the conv
        and norm weights (which it reads directly) on the device rather than offloaded. The caller also requires no
        cache and no padding, which that call has no input for."""
        kernels = mamba_split_conv1d_scan_combined is not None and causal_conv1d_fn is not None
        return (
            kernels and hidden_states.is_cuda and self.dims.conv_dim % 8 == 0
            and weights_on(hidden_states.device, self.conv1d, self.norm)
        )

    def fused_conv_scan_norm(self, projected: torch.Tensor) -> torch.Tensor:
        """in_proj output -> gated-norm output, as the unfused path computes it, in one autograd node.

        Its backward writes the gradient of the whole projection at once (no concatenation of the split's
        gradients) and recomputes the conv instead of saving it. `out_proj` stays outside so that a LoRA on it
        is applied."""
        return mamba_split_conv1d_scan_combined(
            projected, self.conv1d.weight.squeeze(1), self.conv1d.bias, self.dt_bias, decay_rates(self.A_log), self.D,
            self.chunk_size, rmsnorm_weight=self.norm.weight, rmsnorm_eps=self.norm.eps,
            headdim=self.dims.head_dim, ngroups=self.dims.n_groups, norm_before_gate=False,
        )

    def step(self, hidden_states, conv_state, ssm_state, A=None, state_update=ssd_step):
        """One token (batch, hidden) -> (batch, hidden), updating both states in place (CUDA-graph friendly).
        `state_update` is `ssd.ssd_step` or a kernel with its arguments (`Mamba2LanguageModel.step` chooses)."""
        gate, xbc, dt = self.dims.split_projection(decode_linear(self.in_proj, hidden_states))
        x, B, C = self.dims.split_conv_output(self.conv1d(xbc, conv_state))
        A = decay_rates(self.A_log) if A is None else A
        y = state_update(ssm_state, x, dt, A, B, C, D=self.D, dt_bias=self.dt_bias)
        return decode_linear(self.out_proj, self.norm(y.flatten(-2), gate))


class Mamba2LMBlock(GradientCheckpointingLayer):
    """Pre-norm residual block, written as (mixer output, residual stream) -> (mixer output, residual stream)
    so that the residual add and the next norm fuse into one kernel on CUDA."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.mixer = CausalMamba2Mixer(config, layer_idx)

    def forward(self, hidden_states, residual=None, cache=None, attention_mask=None):
        normed, residual = add_rms_norm(hidden_states, residual, self.norm, self.residual_in_fp32)
        return self.mixer(normed, cache=cache, attention_mask=attention_mask), residual

    def step(self, hidden_states, residual, conv_state, ssm_state, A=None, state_update=ssd_step):
        normed, residual = add_rms_norm(hidden_states, residual, self.norm, self.residual_in_fp32)
        return self.mixer.step(normed, conv_state, ssm_state, A, state_update), residual


def padding_mask(attention_mask: torch.Tensor | None, length: int) -> torch.Tensor | None:
    """The last `length` columns of `attention_mask`, or None when they are all ones.

    Each mixer multiplies its input and its conv output by the mask (two full-width products per layer, again in
    the recomputed forward and in backward: ~7 % of a full-size training step's GPU time), which an unpadded
    batch does not need; one host check per forward is cheaper. Inside a CUDA graph capture the mask is kept,
    since the graph is replayed with other masks.
    """
    if attention_mask is None:
        return None
    mask = attention_mask[:, -length:]
    if attention_mask.is_cuda and torch.cuda.is_current_stream_capturing():
        return mask
    return None if bool(mask.all()) else mask


class Mamba2LanguageModel(nn.Module):
    """The Mamba-2 backbone (embeddings, blocks, final norm) with transformers' `Mamba2Model` parameter names."""

    # Devices on which decode steps may run the Triton kernels of `decode_kernels.py` (`decode_path` decides when).
    decode_kernel_devices = ("cuda",)

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Mamba2LMBlock(config, idx) for idx in range(config.num_hidden_layers))
        self.norm_f = RMSNorm(config.hidden_size, config.layer_norm_epsilon)

    def get_input_embeddings(self):
        return self.embeddings

    def set_input_embeddings(self, value):
        self.embeddings = value

    def forward(self, inputs_embeds, cache=None, attention_mask=None, output_hidden_states=False,
                fused_decode_step=True):
        """Returns (final normed hidden states, the residual stream after each layer and the final output, or None).

        One new token continuing `cache` runs the decode step, as a captured decode graph does, so eager and graph
        decoding compute the same thing; under accelerate's hooks it goes through each layer's `forward` instead."""
        length = inputs_embeds.shape[1]
        continuing = cache is not None and cache.has_previous_state(0)
        if length == 1 and continuing and not output_hidden_states and not hooked_by_accelerate(self):
            states = [(layer.conv_states[0], layer.recurrent_states[0]) for layer in cache.layers]
            return self.decode(inputs_embeds[:, 0], states, fused=fused_decode_step)[:, None], None
        mask = None if length == 1 else padding_mask(attention_mask, length)
        hidden_states, residual = inputs_embeds, None
        all_hidden_states = () if output_hidden_states else None
        for layer in self.layers:
            hidden_states, residual = layer(hidden_states, residual, cache=cache, attention_mask=mask)
            if output_hidden_states:
                all_hidden_states += (residual + hidden_states,)
        normed, _ = add_rms_norm(hidden_states, residual, self.norm_f, self.config.residual_in_fp32)
        if output_hidden_states:
            all_hidden_states += (normed,)
        return normed, all_hidden_states

    def decay_rates(self) -> list[torch.Tensor]:
        """Each layer's A: fixed for given weights, so a decode graph computes them once per `generate()` call."""
        return [decay_rates(layer.mixer.A_log) for layer in self.layers]

    def step(self, input_ids, states, rates=None, fused=True):
        """One token per sequence (batch,) -> final normed hidden (batch, hidden); `states` holds each layer's
        (conv_state, ssm_state), updated in place; `rates` optionally each layer's precomputed A; `fused=False`
        keeps the per-op step."""
        return self.decode(self.embeddings(input_ids), states, rates, fused)

    def decode(self, inputs_embeds, states, rates=None, fused=True):
        """`step` from embeddings (batch, hidden). The one place that picks the step's kernels
        (`decode_kernels.decode_path`): the fused three-kernel step, the per-op step with the streaming state
        update, or the per-op step with mamba_ssm's kernels (CUDA) or PyTorch (elsewhere)."""
        rates = rates or self.decay_rates()
        path = decode_path(self, inputs_embeds, states, fused, self.decode_kernel_devices)
        if path == "fused":
            residual = fused_decode_layers(self.layers, inputs_embeds, states, rates, self.config.residual_in_fp32)
            normed, _ = add_rms_norm(residual, None, self.norm_f, self.config.residual_in_fp32)
            return normed.to(inputs_embeds.dtype)
        state_update = streaming_state_update if path == "streaming" else ssd_step
        hidden_states, residual = inputs_embeds, None
        for layer, (conv_state, ssm_state), A in zip(self.layers, states, rates):
            hidden_states, residual = layer.step(hidden_states, residual, conv_state, ssm_state, A, state_update)
        normed, _ = add_rms_norm(hidden_states, residual, self.norm_f, self.config.residual_in_fp32)
        return normed
