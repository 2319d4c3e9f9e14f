"""The fused decode step's kernels at the full `mlmamba+3b` LM's shapes (64 layers, width 2560), against the
memory bandwidth measured in the same run, on one CUDA GPU with random weights.

Rows:
  * candidate tiles of the two fused projection kernels (RMSNorm + in_proj GEMV + conv update, 10576 x 2560;
    gated RMSNorm + out_proj GEMV + residual add, 2560 x 5120): microseconds per layer and the weight bytes read per
    second, the package's tiles (`IN_PROJ_TILES`, `OUT_PROJ_TILES`) marked "default"; in bf16 and, where torchao is
    installed, float8 and int8 (torchao's weight-only layouts, one scale per row);
  * cuBLAS (`torch.nn.functional.linear`) on the same two shapes, and the state-update kernel at batch 1 and 32
    (its float32 states read and written per second);
  * the whole 64-layer step, fused (batch 1) and per-op, at batches 1, 2, 4, 8 and 32; at batch 1 also without
    programmatic dependent launch and with the sweep's fastest tiles; and with float8 and int8 projections.
Each measurement is one CUDA graph that runs the kernel once for each of the 64 layers on that layer's own weights
(5.2 GB in bf16, a hundred times the L2 cache, so every weight comes from memory), replayed 20 times: the median
replay over 64 is the time per layer.

    python benchmarks/decode_step_kernels.py --json decode_step_kernels.json
"""

import argparse
import itertools
import json
import platform

import torch
import torch.nn.functional as F
import transformers

from benchmark import copy_bandwidth, replay_ms

from modeling_mlmamba import MLMambaConfig, decode_kernels
from modeling_mlmamba.cuda_graphs import capture_graph
from modeling_mlmamba.decode_kernels import (
    _launch_state_update,
    _state_rows_per_program,
    dependent_launch,
    gated_norm_out_proj,
    norm_in_proj_conv,
    residual_squares,
)
from modeling_mlmamba.gemv import weight_operands
from modeling_mlmamba.mamba2 import Mamba2LanguageModel

# Tiles (outputs, inputs per step) around the fastest ones, 4 or 8 warps; 1-byte weights are swept at twice the
# inputs per step (the same bytes).
TILE_SHAPES = [(4, 512), (4, 1024), (4, 2048), (8, 256), (8, 512), (8, 1024), (16, 256), (16, 512), (32, 256), (32, 512),
               (64, 256)]
REPLAYS = 20
QUANTIZED_LABELS = {"Float8WeightOnlyConfig": "float8", "Int8WeightOnlyConfig": "int8"}


def tiles(bytes_per_weight: int) -> list[tuple[int, int, int]]:
    steps = 2 if bytes_per_weight == 1 else 1
    return [(n, k * steps, warps) for (n, k), warps in itertools.product(TILE_SHAPES, (4, 8))]


def tile_name(tile) -> str:
    return f"{tile[0]}x{tile[1]} w{tile[2]}"


def graph_ms(fn) -> float:
    """fn() recorded once in a CUDA graph (after two warm-up calls, which compile the kernels) and replayed: the
    median milliseconds of one replay."""
    graph, _ = capture_graph(fn, [], pool=None)
    return replay_ms(torch.device("cuda"), graph.replay, REPLAYS)


class Step:
    """One batch's buffers for the fused kernels, laid out as `fused_decode_layers` lays them out."""

    def __init__(self, lm, batch: int):
        self.lm, self.dims = lm, lm.layers[0].mixer.dims
        dims, dtype = self.dims, lm.embeddings.weight.dtype
        generator = torch.Generator(device="cuda").manual_seed(0)
        self.residual = torch.randn(batch, lm.config.hidden_size, device="cuda", generator=generator)
        self.residual_sq = residual_squares(self.residual)
        self.spare = torch.empty_like(self.residual)
        self.spare_sq = torch.empty_like(self.residual_sq)
        self.projected = torch.empty(batch, dims.projection_size, device="cuda", dtype=dtype)
        self.conv_out = torch.empty(batch, dims.conv_dim, device="cuda", dtype=dtype)
        p_blocks = -(-dims.head_dim // _state_rows_per_program(dims.head_dim))
        self.gated = torch.randn(batch, dims.inner_size, device="cuda", generator=generator)
        self.gated_sq = self.gated.square().view(batch, dims.num_heads * p_blocks, -1).sum(-1)
        self.states = [
            (torch.randn(batch, dims.conv_dim, lm.config.conv_kernel, device="cuda", generator=generator).to(dtype),
             torch.randn(batch, dims.num_heads, dims.head_dim, dims.state_size, device="cuda", generator=generator))
            for _ in lm.layers]
        self.rates = lm.decay_rates()
        self.ids = torch.zeros(batch, dtype=torch.long, device="cuda")

    def in_proj(self, tile=None):
        for layer, (conv_state, _) in zip(self.lm.layers, self.states):
            mixer = layer.mixer
            norm_in_proj_conv(self.residual, self.residual_sq, layer.norm, mixer.in_proj, mixer.conv1d, conv_state,
                              self.dims.inner_size, self.projected, self.conv_out, tile=tile)

    def out_proj(self, tile=None):
        for layer in self.lm.layers:
            mixer = layer.mixer
            gated_norm_out_proj(self.gated, self.gated_sq, mixer.norm, mixer.out_proj, self.residual, self.spare,
                                self.spare_sq, tile=tile)

    def state_update(self):
        gate, _, dt = self.dims.split_projection(self.projected)
        x, B, C = self.dims.split_conv_output(self.conv_out)
        for layer, (_, ssm_state), A in zip(self.lm.layers, self.states, self.rates):
            mixer = layer.mixer
            _launch_state_update(ssm_state, x, dt, A, B, C, mixer.D, mixer.dt_bias, self.gated.view(x.shape),
                                 gate=gate.view(x.shape), out_sq=self.gated_sq, dependent=True)

    def cublas(self, name: str):
        row = self.projected.new_zeros(self.residual.shape[0], self.lm.config.hidden_size if name == "in_proj"
                                       else self.dims.inner_size)
        for layer in self.lm.layers:
            F.linear(row, getattr(layer.mixer, name).weight)

    def whole(self, fused: bool):
        self.lm.step(self.ids, self.states, self.rates, fused=fused)


def per_layer_us(ms: float, layers: int) -> float:
    return ms * 1e3 / layers


def sweep(step: Step, results: dict, bandwidth: float, label: str) -> dict:
    """Every candidate tile of both projection kernels; returns the fastest tile of each."""
    layers = len(step.lm.layers)
    values = {name: weight_operands(getattr(step.lm.layers[0].mixer, name).weight)[0] for name in ("in_proj", "out_proj")}
    weight_bytes = {name: tensor.nbytes for name, tensor in values.items()}
    rows = results.setdefault(f"tiles_{label}", {})
    fastest = {}
    for name, run in (("in_proj", step.in_proj), ("out_proj", step.out_proj)):
        measured = {}
        for tile in (*tiles(values[name].element_size()), None):
            us = per_layer_us(graph_ms(lambda: run(tile)), layers)
            measured[tile_name(tile) if tile else "default"] = {"us": us, "tb_per_s": weight_bytes[name] / us / 1e6}
        if label == "bf16":
            us = per_layer_us(graph_ms(lambda: step.cublas(name)), layers)
            measured["cublas"] = {"us": us, "tb_per_s": weight_bytes[name] / us / 1e6}
        measured["bandwidth_bound_us"] = weight_bytes[name] / bandwidth * 1e6
        rows[name] = measured
        best = sorted((v["us"], k) for k, v in measured.items() if isinstance(v, dict))[:6]
        print(f"{label} {name}: bound {measured['bandwidth_bound_us']:.1f} us, default {measured['default']['us']:.1f}"
              " us; best " + ", ".join(f"{k} {u:.1f} us" for u, k in best), flush=True)
        fastest[name] = min(tiles(values[name].element_size()), key=lambda tile: measured[tile_name(tile)]["us"])
    return fastest


def step_with_tiles(lm, label: str, fastest: dict, results: dict) -> None:
    """The fused batch-1 step with the sweep's fastest tiles in place of the package's."""
    size = 1 if weight_operands(lm.layers[0].mixer.in_proj.weight)[0].element_size() == 1 else 2
    package_tiles = decode_kernels.IN_PROJ_TILES, decode_kernels.OUT_PROJ_TILES
    decode_kernels.IN_PROJ_TILES = {**package_tiles[0], size: fastest["in_proj"]}
    decode_kernels.OUT_PROJ_TILES = {**package_tiles[1], size: fastest["out_proj"]}
    try:
        step = Step(lm, 1)
        ms = graph_ms(lambda: step.whole(True))
    finally:
        decode_kernels.IN_PROJ_TILES, decode_kernels.OUT_PROJ_TILES = package_tiles
    key = f"{label} batch 1 fused, fastest tiles (in_proj {tile_name(fastest['in_proj'])}, out_proj " \
          f"{tile_name(fastest['out_proj'])})"
    results.setdefault("whole_step_ms", {})[key] = ms
    print(f"{key}: {ms:.3f} ms per step (LM only, no head)", flush=True)


def state_updates(step: Step, results: dict) -> None:
    layers = len(step.lm.layers)
    for batch in (1, 32):
        step = Step(step.lm, batch) if batch > 1 else step
        us = per_layer_us(graph_ms(step.state_update), layers)
        state_bytes = 2 * step.states[0][1].nbytes
        results.setdefault("state_update", {})[f"batch {batch}"] = {"us": us, "tb_per_s": state_bytes / us / 1e6}
        print(f"state update batch {batch}: {us:.1f} us per layer, {state_bytes / us / 1e6:.2f} TB/s", flush=True)


def whole_steps(lm, label: str, batches, results: dict, fused_options=(True, False)) -> None:
    for batch in batches:
        step = Step(lm, batch)
        for fused in fused_options if batch <= decode_kernels.FUSED_MAX_BATCH else (False,):
            for pdl in (True, False) if fused and batch == 1 else (True,):
                decode_kernels.dependent_launch = dependent_launch if pdl else (lambda device: False)
                ms = graph_ms(lambda: step.whole(fused))
                key = f"{label} batch {batch} {'fused' if fused else 'per-op'}{'' if pdl else ', no dependent launch'}"
                results.setdefault("whole_step_ms", {})[key] = ms
                print(f"{key}: {ms:.3f} ms per step (LM only, no head)", flush=True)
    decode_kernels.dependent_launch = dependent_launch


def quantized(lm, config_name: str):
    import torchao.quantization

    torchao.quantization.quantize_(lm, getattr(torchao.quantization, config_name)(),
                                   filter_fn=lambda module, name: name.endswith(("in_proj", "out_proj")))
    return lm


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default="decode_step_kernels.json")
    parser.add_argument("--no-sweep", action="store_true", help="only the autotuned kernels and whole steps")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() or decode_kernels.triton is None:
        raise SystemExit("benchmarks/decode_step_kernels.py needs a CUDA GPU and triton")
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "transformers": transformers.__version__, "triton": decode_kernels.triton.__version__,
               "python": platform.python_version()}
    bandwidth = copy_bandwidth(torch.device("cuda"))
    results["copy_tb_per_s"] = bandwidth / 1e12
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
    torch.manual_seed(0)
    with torch.device("cuda"):
        lm = Mamba2LanguageModel(MLMambaConfig().text_config).to(torch.bfloat16).eval().requires_grad_(False)
    with torch.no_grad():
        if not args.no_sweep:
            step_with_tiles(lm, "bf16", sweep(Step(lm, 1), results, bandwidth, "bf16"), results)
        state_updates(Step(lm, 1), results)
        whole_steps(lm, "bf16", (1, 2, 4, 8, 32), results)
        try:
            import torchao  # noqa: F401
        except ImportError:
            results["quantized"] = "torchao is not installed"
        else:
            for config_name in ("Float8WeightOnlyConfig", "Int8WeightOnlyConfig"):
                del lm
                torch.cuda.empty_cache()
                with torch.device("cuda"):
                    lm = Mamba2LanguageModel(MLMambaConfig().text_config).to(torch.bfloat16).eval()
                lm = quantized(lm.requires_grad_(False), config_name)
                if not args.no_sweep:
                    label = QUANTIZED_LABELS[config_name]
                    step_with_tiles(lm, label, sweep(Step(lm, 1), results, bandwidth, label), results)
                whole_steps(lm, config_name, (1,), results)
    with open(args.json, "w") as handle:
        json.dump(results, handle, indent=2)
    return results


if __name__ == "__main__":
    main()
