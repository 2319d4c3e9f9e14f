"""Matrix-vector product for batch-1 decode steps on CUDA: y = x @ W.T for a single row x.

A batch-1 decode step reads every weight once and does almost no arithmetic, so its speed is the memory
bandwidth its projections reach. cuBLAS reached 2.0-2.5 TB/s on the LM's projections on an H100; this Triton
kernel streams each weight row block in wide, coalesced tiles. It is used only for plain `nn.Linear` modules
without bias (a LoRA-wrapped projection keeps its own forward) and `F.linear` handles everything else.
"""

import torch
from torch import nn

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

if triton is not None:

    @triton.autotune(
        configs=[
            triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bn, bk, w, s in [
                (16, 512, 4, 3), (16, 1024, 8, 3), (32, 256, 4, 4), (32, 512, 8, 3),
                (64, 128, 4, 4), (64, 256, 8, 3), (8, 1024, 4, 3), (8, 512, 4, 4),
            ]
        ],
        key=["N", "K"],
    )
    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, y_ptr, N, K, stride_wn, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            w = tl.load(w_ptr + cols[:, None] * stride_wn + ks[None, :], mask=(cols[:, None] < N) & (ks[None, :] < K),
                        other=0.0)
            x = tl.load(x_ptr + ks, mask=ks < K, other=0.0)
            acc += tl.sum(w.to(tl.float32) * x[None, :].to(tl.float32), axis=1)
        tl.store(y_ptr + cols, acc.to(y_ptr.dtype.element_ty), mask=cols < N)


def decode_linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`module(x)` for x of shape (rows, in_features); the Triton kernel when it applies (one row, CUDA, a plain
    bias-free bf16/fp16 Linear)."""
    weight = getattr(module, "weight", None)
    if (
        triton is None
        or not x.is_cuda
        or x.shape[0] != 1
        or type(module) is not nn.Linear
        or module.bias is not None
        or weight.dtype not in (torch.bfloat16, torch.float16)
        or x.dtype != weight.dtype
        or not weight.is_contiguous()
    ):
        return module(x)
    out_features, in_features = weight.shape
    y = torch.empty(1, out_features, device=x.device, dtype=x.dtype)
    x = x.contiguous()
    _gemv_kernel[lambda meta: (triton.cdiv(out_features, meta["BLOCK_N"]),)](
        x, weight, y, out_features, in_features, weight.stride(0)
    )
    return y
