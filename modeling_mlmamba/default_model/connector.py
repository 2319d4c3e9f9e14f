"""The Mamba-2 Scan Connector (MSC): selective scans over the image patch grid, then SwiGLU.

The scan orders (which way each direction walks the patches) and their inverses live in `scan_orders`
and `inverse_orders`; the mixer, the tests and anything else that needs them call these two functions.
"""

from typing import get_args

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from .configuration_mlmamba import ConnectorScan, MLMambaConfig
from .mamba2 import CausalConv1d, GatedRMSNorm, SSMDimensions, selective_scan


def scan_orders(scan: str, rows: int, cols: int, device=None) -> torch.Tensor:
    """Patch indices (row-major numbering) in the order each scan direction visits them: (directions, rows*cols).

    `bidirectional`: row-major forward, then reversed (the released model).
    `cross`: row-major forward and reversed, column-major forward and reversed (the paper's CSM).
    """
    row_major = torch.arange(rows * cols, device=device)
    if scan == "bidirectional":
        return torch.stack([row_major, row_major.flip(0)])
    if scan == "cross":
        column_major = row_major.view(rows, cols).t().reshape(-1)
        return torch.stack([row_major, row_major.flip(0), column_major, column_major.flip(0)])
    raise ValueError(f"unknown scan {scan!r}; expected one of {get_args(ConnectorScan)}")


def inverse_orders(orders: torch.Tensor) -> torch.Tensor:
    """For each direction, the positions that put its outputs back in row-major order."""
    return orders.argsort(dim=-1)


class ScanDirection(nn.Module):
    """One scan direction: its causal conv, time-step bias, decay rates A and skip D, run over the projected
    sequence in this direction's order.

    Its parameters are read only inside its own `forward` (and its conv's), so accelerate's offloading hooks, which
    load a module's weights when that module is called, load them.
    """

    def __init__(self, dims: SSMDimensions, conv_kernel: int, chunk_size: int):
        super().__init__()
        self.dims = dims
        self.chunk_size = chunk_size
        self.conv1d = CausalConv1d(dims.conv_dim, conv_kernel)
        self.dt_bias = nn.Parameter(torch.zeros(dims.num_heads))
        self.A_log = nn.Parameter(torch.zeros(dims.num_heads))
        self.D = nn.Parameter(torch.ones(dims.num_heads))

    def forward(self, xbc: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
        """xbc (batch, length, conv_dim) and raw dt (batch, length, heads), both in this direction's scan order ->
        y (batch, length, inner) in that same order."""
        y, _ = selective_scan(self.dims, self, self.conv1d(xbc), dt, self.chunk_size)
        return y


class MultiScanMamba2Mixer(nn.Module):
    """A Mamba-2 mixer run once per scan direction over the patch sequence, outputs averaged.

    The directions share `in_proj`, the gated RMSNorm and `out_proj`; each has its own `ScanDirection`.
    Each direction sees the projected sequence in its own order and its output is put back in row-major
    order before the gated norm (which is per position, so its gate needs no reordering).
    """

    def __init__(self, config: MLMambaConfig):
        super().__init__()
        hidden = config.connector_hidden_size
        self.dims = SSMDimensions(
            hidden, config.connector_expand, config.connector_head_dim, config.connector_n_groups,
            config.connector_state_size,
        )
        self.scan = config.connector_scan
        self.grid = config.image_grid

        self.in_proj = nn.Linear(hidden, self.dims.projection_size, bias=False)
        num_directions = scan_orders(self.scan, *self.grid).shape[0]
        self.directions = nn.ModuleList(
            ScanDirection(self.dims, config.connector_conv_kernel, config.connector_chunk_size)
            for _ in range(num_directions)
        )
        inner = self.dims.inner_size
        self.norm = GatedRMSNorm(inner, inner // self.dims.n_groups, config.connector_norm_eps)
        self.out_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        length = hidden_states.shape[1]
        if length != self.grid[0] * self.grid[1]:
            raise ValueError(f"the connector expects {self.grid[0] * self.grid[1]} patches per image, got {length}")
        gate, xbc, dt = self.dims.split_projection(self.in_proj(hidden_states))
        orders = scan_orders(self.scan, *self.grid, device=hidden_states.device)
        merged = 0
        for direction, order, inverse in zip(self.directions, orders, inverse_orders(orders)):
            y = direction(xbc[:, order], dt[:, order])
            merged = merged + self.norm(y[:, inverse], gate)
        return self.out_proj(merged / len(self.directions))


class SwiGLU(nn.Module):
    """W3(SiLU(W1 x) * W2 x), with biases, as in the released connector."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.w1 = nn.Linear(hidden_size, hidden_size)
        self.w2 = nn.Linear(hidden_size, hidden_size)
        self.w3 = nn.Linear(hidden_size, hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.w3(F.silu(self.w1(hidden_states)) * self.w2(hidden_states))


class MLMambaConnectorBlock(GradientCheckpointingLayer):
    """x + Mixer(x) (no norm before the mixer, as released), then x + SwiGLU(LayerNorm(x)) when enabled."""

    def __init__(self, config: MLMambaConfig):
        super().__init__()
        self.mixer = MultiScanMamba2Mixer(config)
        if config.connector_use_swiglu:
            self.norm = nn.LayerNorm(config.connector_hidden_size, eps=config.connector_norm_eps)
            self.mlp = SwiGLU(config.connector_hidden_size)
        else:
            self.norm = self.mlp = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.mixer(hidden_states)
        if self.mlp is not None:
            hidden_states = hidden_states + self.mlp(self.norm(hidden_states))
        return hidden_states


def num_scan_blocks(config: MLMambaConfig) -> int:
    """The connector variants, by `connector_type`: the Mamba-2 Scan Connector (`msc`) runs `connector_num_layers`
    scan blocks after `Linear + GELU`, the paper's `mlp` baseline none. Everything that depends on the variant
    (the modules built, what a model card says) asks this function."""
    blocks_per_type = {"msc": config.connector_num_layers, "mlp": 0}
    return blocks_per_type[config.connector_type]


class MLMambaConnector(nn.Module):
    """Vision features (B, patches, dino+siglip channels) -> (B, patches, connector_hidden_size).

    `Linear + GELU` first (in the released code, not the paper); for `msc`, then the scan blocks and a
    final LayerNorm. The `mlp` baseline stops after the first step.
    """

    def __init__(self, config: MLMambaConfig):
        super().__init__()
        self.input_proj = nn.Linear(config.vision_feature_size, config.connector_hidden_size)
        num_layers = num_scan_blocks(config)
        self.layers = nn.ModuleList(MLMambaConnectorBlock(config) for _ in range(num_layers))
        self.norm_f = nn.LayerNorm(config.connector_hidden_size, eps=config.connector_norm_eps) if num_layers else None

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        hidden_states = F.gelu(self.input_proj(features))
        for layer in self.layers:
            hidden_states = layer(hidden_states)
        if self.norm_f is not None:
            hidden_states = self.norm_f(hidden_states)
        return hidden_states
