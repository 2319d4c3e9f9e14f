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
    # fp8 e4m3 -> float32 by bit moves: the byte's sign to bit 31 and its exponent and mantissa bits to bits 20-26
    # make the float32 whose value is the fp8 one times 2^-120 (subnormals included); one multiply corrects it.
    E4M3_BITS_MASK = tl.constexpr(0x87F00000 - 2**32)  # as a signed 32-bit integer
    E4M3_SCALE = tl.constexpr(2.0**120)
    # int8 -> float32 by bit moves: (byte ^ 0x80) in the low mantissa bits of 2^23 is 2^23 + 128 + the int8 value.
    INT8_BITS = tl.constexpr(0x4B000080)
    INT8_OFFSET = tl.constexpr(2.0**23 + 128)

    @triton.jit
    def weight_tile(weight_ptr, cols, col_ok, k0, K, stride_weight, BLOCK_K: tl.constexpr):
        """The (BLOCK_N, BLOCK_K) weight tile at column k0 (masked past K). The GEMV loops load the next tile before
        multiplying the current one, so that a tile's loads are always in flight during the arithmetic."""
        ks = k0 + tl.arange(0, BLOCK_K)
        return tl.load(weight_ptr + cols[:, None] * stride_weight + ks[None, :],
                       mask=col_ok[:, None] & (ks < K)[None, :], other=0.0)

    @triton.jit
    def vector_tile(vector_ptr, k0, K, BLOCK_K: tl.constexpr):
        """The BLOCK_K entries of a row at column k0 (zero past K)."""
        ks = k0 + tl.arange(0, BLOCK_K)
        return tl.load(vector_ptr + ks, mask=ks < K, other=0.0)

    @triton.jit
    def widen(weight):
        """A weight tile in float32. Triton widens float8 (through half precision) and int8 with conversion
        instructions, which issue at a fraction of the arithmetic rate; here both are bit moves plus one float
        multiply or subtraction (the float8 in_proj GEMV went from 15.4 to 13.7 us on an H200 with this and the
        input prefetch). Exact for every finite value; float8's NaN, which quantized weights never hold, reads as
        480."""
        if weight.dtype == tl.float8e4nv:
            bits = (weight.to(tl.int8, bitcast=True).to(tl.int32) << 20) & E4M3_BITS_MASK
            return bits.to(tl.float32, bitcast=True) * E4M3_SCALE
        elif weight.dtype == tl.int8:
            bits = weight.to(tl.uint8, bitcast=True).to(tl.int32) ^ INT8_BITS
            return bits.to(tl.float32, bitcast=True) - INT8_OFFSET
        else:
            return weight.to(tl.float32)

    @triton.jit
    def row_sums(products, scale_ptr, cols, col_ok, HAS_SCALE: tl.constexpr):
        """The outputs of a tile's products, times the weight's per-row scale if it has one. The products of the
        whole (BLOCK_N, BLOCK_K) tile are kept through the loop and summed once here: a sum across lanes in every
        step would stall the loads behind it."""
        outputs = tl.sum(products, axis=1)
        if HAS_SCALE:
            outputs = outputs * tl.load(scale_ptr + cols, mask=col_ok, other=0.0)
        return outputs

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
    def _gemv_kernel(x_ptr, w_ptr, scale_ptr, y_ptr, N, K, stride_wn, HAS_SCALE: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        weight = weight_tile(w_ptr, cols, col_ok, 0, K, stride_wn, BLOCK_K)
        x = vector_tile(x_ptr, 0, K, BLOCK_K)
        products = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            # The next piece of x is loaded with the next weight tile: x comes from L2, and waiting for it in each
            # step would put its latency between the step's weight loads.
            next_weight = weight_tile(w_ptr, cols, col_ok, k0 + BLOCK_K, K, stride_wn, BLOCK_K)
            next_x = vector_tile(x_ptr, k0 + BLOCK_K, K, BLOCK_K)
            products += widen(weight) * x.to(tl.float32)[None, :]
            weight, x = next_weight, next_x
        y = row_sums(products, scale_ptr, cols, col_ok, HAS_SCALE)
        tl.store(y_ptr + cols, y.to(y_ptr.dtype.element_ty), mask=col_ok)


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
        x.contiguous(), values, scale if scale is not None else values, y, out_features, in_features, values.stride(0),
        HAS_SCALE=scale is not None,
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
