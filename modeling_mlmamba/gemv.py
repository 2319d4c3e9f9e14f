"""Matrix-vector product for batch-1 decode steps on CUDA: y = x @ W.T for a single row x.

A batch-1 decode step reads every weight once and does almost no arithmetic, so its speed is the memory
bandwidth its projections reach. cuBLAS reached 2.0-2.5 TB/s on the LM's projections on an H100; this Triton
kernel streams each weight row block in wide, coalesced tiles. It reads three weight layouts, each only in the
exact form it was written for:

- a plain bf16/fp16 `nn.Linear` weight (a dense tensor, no subclass);
- torchao's int8 weight-only `Int8Tensor` with one float32 scale per output row: y = (x @ q.T) * scale, as torchao's
  own linear computes it (which ignores the zero point: the layout is symmetric);
- torchao's float8 (e4m3) weight-only `Float8Tensor` with one float32 scale per output row: y = (x @ q.T) * scale.

For the last two, torchao's own batch-1 linear first converts the whole weight to bf16 (one byte read and two
written per weight, then read again), while the kernel reads each 1-byte weight once. Anything else (bitsandbytes
layers, other torchao layouts, LoRA-wrapped projections, biases, any other tensor subclass) runs the module's own
forward. `reference_gemv` is the same product in plain PyTorch.
"""

import sys

import torch
from torch import nn

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

HALF_PRECISION = (torch.bfloat16, torch.float16)
# The types of a plain weight: no tensor subclass, so its storage is exactly its values.
DENSE_TYPES = (nn.Parameter, torch.Tensor)
# Devices whose tensors the Triton kernel takes.
KERNEL_DEVICES = ("cuda",)

if triton is not None:

    @triton.autotune(
        configs=[
            triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bn, bk, w, s in [
                (4, 1024, 4, 2), (8, 512, 4, 3), (8, 1024, 8, 2), (16, 256, 4, 3), (16, 512, 8, 3),
                (16, 1024, 8, 2), (32, 256, 8, 3),
                (8, 2048, 8, 1), (16, 2048, 8, 1),  # 2 KB per row of 1-byte (int8, float8) weights per step
            ]
        ],
        key=["N", "K"],
    )
    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, scale_ptr, y_ptr, N, K, stride_wn, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        # Every product of the tile is kept and summed once after the loop: a sum across lanes in every step would
        # stall the loads behind it.
        products = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            w = tl.load(w_ptr + cols[:, None] * stride_wn + ks[None, :], mask=(cols[:, None] < N) & (ks[None, :] < K),
                        other=0.0)
            x = tl.load(x_ptr + ks, mask=ks < K, other=0.0)
            products += w.to(tl.float32) * x[None, :].to(tl.float32)
        acc = tl.sum(products, axis=1)
        if scale_ptr is not None:
            acc *= tl.load(scale_ptr + cols, mask=cols < N, other=0.0)
        tl.store(y_ptr + cols, acc.to(y_ptr.dtype.element_ty), mask=cols < N)


def is_dense_weight(weight) -> bool:
    """Whether `weight` is a plain floating-point tensor or `nn.Parameter`: no tensor subclass (torchao's quantized
    tensors, bitsandbytes' `Params4bit` / `Int8Params`, DTensor), so its storage is exactly its values."""
    return type(weight) in DENSE_TYPES and weight.is_floating_point()


def torchao_tensor_type(name: str) -> type | None:
    """torchao's quantized tensor class `name`, or None when torchao has not been imported.

    Looked up rather than imported: a model holds torchao tensors only after transformers imported torchao for a
    quantized load, and importing it costs seconds (and logs warnings) for every other user."""
    return getattr(sys.modules.get("torchao.quantization"), name, None)


def rowwise_quantized(weight) -> bool:
    """Whether `weight` is a torchao int8 or float8 (e4m3) weight-only tensor of the layout the kernel reads:
    contiguous (out, in) values and one float32 scale per output row."""
    if type(weight) is torchao_tensor_type("Int8Tensor"):
        if weight.act_quant_kwargs is not None or weight.act_pre_scale is not None or weight.qdata.dtype != torch.int8:
            return False
    elif type(weight) is torchao_tensor_type("Float8Tensor"):
        if weight.act_quant_kwargs is not None or weight.qdata.dtype != torch.float8_e4m3fn:
            return False
    else:
        return False
    out_features, in_features = weight.qdata.shape
    return (
        list(weight.block_size) == [1, in_features]
        and weight.qdata.is_contiguous()
        and weight.scale.dtype == torch.float32
        and weight.scale.shape == (out_features, 1)
        and weight.scale.is_contiguous()
    )


def gemv_operands(module: nn.Module, x: torch.Tensor):
    """(values, per-row scale or None) that the kernel computes `module(x)` from, or None when the module's own
    forward must run: the kernel needs one bf16/fp16 row on CUDA and a bias-free `nn.Linear` whose weight is
    plain and of the row's dtype, or a torchao layout that `rowwise_quantized` accepts and whose dtype is the row's;
    the weight must be on the row's device (an offloaded weight is loaded only by calling the module)."""
    if (
        triton is None
        or x.device.type not in KERNEL_DEVICES
        or x.ndim != 2
        or x.shape[0] != 1
        or x.dtype not in HALF_PRECISION
        or type(module) is not nn.Linear
        or module.bias is not None
        or module.weight.dtype != x.dtype
        or module.weight.device != x.device
    ):
        return None
    return weight_operands(module.weight)


def weight_operands(weight) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(values, per-row scale or None) that a kernel reads `weight` from: a plain contiguous dense tensor as it is,
    or a torchao layout that `rowwise_quantized` accepts; None for anything else."""
    if is_dense_weight(weight):
        return (weight, None) if weight.is_contiguous() else None
    if rowwise_quantized(weight):
        return weight.qdata, weight.scale
    return None


def gemv(x: torch.Tensor, values: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """x (1, in) @ values (out, in).T, times `scale` (out, 1) per output when given, in x's dtype; the Triton kernel."""
    out_features, in_features = values.shape
    y = torch.empty(1, out_features, device=x.device, dtype=x.dtype)
    _gemv_kernel[lambda meta: (triton.cdiv(out_features, meta["BLOCK_N"]),)](
        x.contiguous(), values, scale, y, out_features, in_features, values.stride(0)
    )
    return y


def reference_gemv(x: torch.Tensor, values: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """What `gemv` computes, in plain PyTorch: float32 products and sums, one rounding to x's dtype at the end."""
    y = x.float() @ values.float().t()
    if scale is not None:
        y = y * scale.float().view(1, -1)
    return y.to(x.dtype)


def decode_linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`module(x)` for x of shape (rows, in_features): the Triton kernel when `gemv_operands` finds its inputs."""
    operands = gemv_operands(module, x)
    if operands is None:
        return module(x)
    return gemv(x, *operands)
