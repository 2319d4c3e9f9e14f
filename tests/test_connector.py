from typing import get_args

import pytest
import torch
import torch.nn.functional as F

from modeling_mlmamba import MLMambaConfig
from modeling_mlmamba.configuration_mlmamba import ConnectorScan, ConnectorType, ProjectorType
from modeling_mlmamba.connector import (
    MLMambaConnector,
    MultiScanMamba2Mixer,
    inverse_orders,
    num_scan_blocks,
    scan_orders,
)
from modeling_mlmamba.modeling_mlmamba import PROJECTOR_LAYERS, MLMambaProjector
from modeling_mlmamba.ssd import ssd_sequential

ROWS, COLS = 3, 4  # a non-square grid catches row/column mix-ups


def grid_config(scan: str, **overrides) -> MLMambaConfig:
    size = [14 * ROWS, 14 * COLS]
    return MLMambaConfig.tiny(
        dino_config=dict(image_size=size), siglip_config=dict(image_size=size), connector_scan=scan, **overrides
    )


def randomise(module: torch.nn.Module, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * 0.5)


def explicit_causal_conv(direction, sequence):
    """Depthwise causal conv + SiLU, one output step at a time."""
    weight, bias = direction.conv1d.weight[:, 0], direction.conv1d.bias  # (channels, kernel)
    kernel = weight.shape[1]
    padded = F.pad(sequence, (0, 0, kernel - 1, 0))
    steps = [(padded[:, t : t + kernel] * weight.t()).sum(1) + bias for t in range(sequence.shape[1])]
    return F.silu(torch.stack(steps, dim=1))


def explicit_direction(mixer, direction, xbc, dt):
    """One direction over a sequence already in its scan order; output in that same order."""
    batch, length, _ = xbc.shape
    conv = explicit_causal_conv(direction, xbc)
    dims = mixer.dims
    width = dims.n_groups * dims.state_size
    x, B, C = conv.split([dims.inner_size, width, width], dim=-1)
    y, _ = ssd_sequential(
        x.view(batch, length, dims.num_heads, dims.head_dim),
        F.softplus(dt + direction.dt_bias),
        -torch.exp(direction.A_log),
        B.view(batch, length, dims.n_groups, dims.state_size),
        C.view(batch, length, dims.n_groups, dims.state_size),
        D=direction.D,
    )
    return y.reshape(batch, length, -1)


def explicit_mixer(mixer, hidden, scan):
    """The MSC mixer written out per direction: flips for reverse scans, grid transposes for column-major."""
    batch, length, _ = hidden.shape
    dims = mixer.dims
    gate, xbc, dt = mixer.in_proj(hidden).split([dims.inner_size, dims.conv_dim, dims.num_heads], dim=-1)

    def to_columns(t):
        return t.view(batch, ROWS, COLS, -1).transpose(1, 2).reshape(batch, length, -1)

    def from_columns(t):
        return t.view(batch, COLS, ROWS, -1).transpose(1, 2).reshape(batch, length, -1)

    d = mixer.directions
    outputs = [
        explicit_direction(mixer, d[0], xbc, dt),
        explicit_direction(mixer, d[1], xbc.flip(1), dt.flip(1)).flip(1),
    ]
    if scan == "cross":
        outputs += [
            from_columns(explicit_direction(mixer, d[2], to_columns(xbc), to_columns(dt))),
            from_columns(explicit_direction(mixer, d[3], to_columns(xbc).flip(1), to_columns(dt).flip(1)).flip(1)),
        ]

    def gated_norm(y):
        gated = y * F.silu(gate)
        return gated / torch.sqrt(gated.pow(2).mean(-1, keepdim=True) + mixer.norm.eps) * mixer.norm.weight

    return mixer.out_proj(sum(gated_norm(y) for y in outputs) / len(outputs))


@pytest.mark.parametrize("scan", ["bidirectional", "cross"])
def test_multi_scan_mixer_matches_explicit_per_direction_loop(scan):
    mixer = MultiScanMamba2Mixer(grid_config(scan)).double()
    randomise(mixer)
    hidden = torch.randn(2, ROWS * COLS, mixer.in_proj.in_features, dtype=torch.float64)
    expected = explicit_mixer(mixer, hidden, scan)
    actual = mixer(hidden)
    assert ((actual - expected).norm() / expected.norm()).item() <= 1e-10


def test_scan_orders_visit_every_patch_once_and_invert():
    assert get_args(ConnectorScan) == ("bidirectional", "cross")
    for scan, count in [("bidirectional", 2), ("cross", 4)]:
        orders = scan_orders(scan, ROWS, COLS)
        assert orders.shape == (count, ROWS * COLS)
        restored = torch.gather(orders, 1, inverse_orders(orders))
        assert torch.equal(restored, torch.arange(ROWS * COLS).expand(count, -1))
    cross = scan_orders("cross", ROWS, COLS)
    assert cross[2, :ROWS].tolist() == [0, COLS, 2 * COLS]  # column-major walks down the first column


def test_unknown_scan_is_rejected():
    with pytest.raises(ValueError, match="unknown scan"):
        scan_orders("diagonal", 2, 2)


@pytest.mark.parametrize(
    "overrides, num_layers",
    [({}, 2), ({"connector_type": "mlp"}, 0), ({"connector_use_swiglu": False, "connector_num_layers": 3}, 3)],
)
def test_connector_variants_map_features_to_connector_width(overrides, num_layers):
    config = grid_config("bidirectional", **overrides)
    connector = MLMambaConnector(config)
    assert len(connector.layers) == num_layers
    features = torch.randn(2, ROWS * COLS, config.vision_feature_size)
    assert connector(features).shape == (2, ROWS * COLS, config.connector_hidden_size)


def test_connector_rejects_wrong_patch_count():
    connector = MLMambaConnector(grid_config("cross"))
    with pytest.raises(ValueError, match="expects 12 patches"):
        connector(torch.randn(1, 10, connector.input_proj.in_features))


def test_variant_dispatch_covers_exactly_the_configurable_variants():
    """Each variant table is keyed by the values its config field allows, no more and no fewer."""
    blocks = {
        connector_type: num_scan_blocks(MLMambaConfig.tiny(connector_type=connector_type, connector_num_layers=3))
        for connector_type in get_args(ConnectorType)
    }
    assert blocks == {"mlp": 0, "msc": 3}
    assert set(PROJECTOR_LAYERS) == set(get_args(ProjectorType))


@pytest.mark.parametrize(
    "projector_type, layers",
    [
        ("fused-gelu-mlp", [("Linear", 64, 256), "GELU", ("Linear", 256, 64), "GELU", ("Linear", 64, 64)]),
        ("gelu-mlp", [("Linear", 64, 64), "GELU", ("Linear", 64, 64)]),
        ("linear", [("Linear", 64, 64)]),
    ],
)
def test_projector_variants_have_the_released_layer_layout(projector_type, layers):
    """The layer order fixes the state-dict keys (`layers.0.weight`, ...) that released checkpoints use."""
    projector = MLMambaProjector(MLMambaConfig.tiny(projector_type=projector_type))
    described = [
        (type(layer).__name__, layer.in_features, layer.out_features) if isinstance(layer, torch.nn.Linear)
        else type(layer).__name__
        for layer in projector.layers
    ]
    assert described == layers
