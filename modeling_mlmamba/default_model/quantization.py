"""Quantized ML-Mamba: the supported weight formats by name, and which of them CUDA graphs can capture.

Quantized loading is transformers' own: `from_pretrained(folder, quantization_config=quantization_config(name))`
(or any `BitsAndBytesConfig` / `TorchAoConfig`). Which modules stay unquantized is set on the model class
(`_keep_in_fp32_modules`), so it holds for every quantizer: the vision towers, the connector and the projector keep
their dtype. The LM head is tied to the embeddings, which transformers' quantizers leave out by default (a
`modules_to_not_convert` / `llm_int8_skip_modules` list of your own replaces that default: add `lm_head` to it).
What is quantized is the language model's Mamba-2 `in_proj` / `out_proj`, nearly all of its weights.

The model's own kernels (the fused batch-1 decode step and the GEMV) read only plain dense weights and the two
torchao layouts that `gemv.py` checks for; every other weight goes through its module's forward (bitsandbytes' or
torchao's kernels). Generation replays CUDA graphs only when every layer's kernels can be captured
(`graph_capturable`). QLoRA (adapters on a quantized LM) is in `lora.py`.
"""

import importlib.util
import sys
from collections.abc import Callable
from typing import NamedTuple

import torch
from transformers import BitsAndBytesConfig

from .gemv import is_dense_weight, torchao_tensor_type

# torchao tensors whose linear is plain device work (dequantize, matmul, scaled matmul, tinygemm), no host sync.
CAPTURABLE_TORCHAO_TENSORS = ("Int8Tensor", "Float8Tensor", "Int4TilePackedTo4dTensor")


def torchao_config(make: Callable):
    """`TorchAoConfig(make(torchao.quantization))`: torchao is imported here, when a torchao format is asked for,
    and nowhere else in the package."""
    import torchao.quantization
    from transformers import TorchAoConfig

    return TorchAoConfig(make(torchao.quantization))


class QuantizationFormat(NamedTuple):
    library: str
    stored: str  # what the quantized weights hold
    make_config: Callable[[torch.dtype], object]  # compute dtype -> transformers quantization config


QUANTIZATION_FORMATS = {
    "bnb-nf4": QuantizationFormat(
        "bitsandbytes", "4-bit NormalFloat, double-quantized block scales (QLoRA's format)",
        lambda dtype: BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                         bnb_4bit_compute_dtype=dtype),
    ),
    "bnb-fp4": QuantizationFormat(
        "bitsandbytes", "4-bit float, block scales",
        lambda dtype: BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=dtype),
    ),
    "bnb-int8": QuantizationFormat(
        "bitsandbytes", "LLM.int8(): int8 rows, outlier input columns in float16",
        lambda dtype: BitsAndBytesConfig(load_in_8bit=True),
    ),
    "torchao-int8": QuantizationFormat(
        "torchao", "int8, one scale per output row", lambda dtype: torchao_config(lambda ao: ao.Int8WeightOnlyConfig()),
    ),
    "torchao-float8": QuantizationFormat(
        "torchao", "float8 (e4m3), one scale per output row",
        lambda dtype: torchao_config(lambda ao: ao.Float8WeightOnlyConfig()),
    ),
    "torchao-float8-dynamic": QuantizationFormat(
        "torchao", "float8 weights and activations, per-row scales, activations quantized at run time (CUDA "
        "compute capability >= 8.9)",
        lambda dtype: torchao_config(lambda ao: ao.Float8DynamicActivationFloat8WeightConfig(granularity=ao.PerRow())),
    ),
    "torchao-int4": QuantizationFormat(
        "torchao", "int4 in groups of 128, tinygemm's tile-packed layout (CUDA, bf16)",
        lambda dtype: torchao_config(
            lambda ao: ao.Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d")
        ),
    ),
}


def quantization_config(name: str, compute_dtype: torch.dtype = torch.bfloat16):
    """The transformers quantization config of a format in `QUANTIZATION_FORMATS`, to pass to `from_pretrained`.

    `compute_dtype` is what bitsandbytes' 4-bit layers dequantize to; torchao computes in the activations' dtype.
    Raises before any loading when the format is unknown or its library is not installed.
    """
    if name not in QUANTIZATION_FORMATS:
        raise ValueError(f"unknown quantization format {name!r}; choose one of {sorted(QUANTIZATION_FORMATS)}")
    library = QUANTIZATION_FORMATS[name].library
    if importlib.util.find_spec(library) is None:
        raise ImportError(f"quantization format {name!r} needs {library}, which is not installed; "
                          f"`pip install {library}` (or this package's `quantization` extra)")
    return QUANTIZATION_FORMATS[name].make_config(compute_dtype)


def bitsandbytes_layers() -> tuple[type, type] | None:
    """bitsandbytes' (Linear4bit, Linear8bitLt), or None when bitsandbytes has not been imported.

    Looked up rather than imported: a model holds these layers only after transformers imported bitsandbytes for
    a quantized load, and importing it costs seconds (and logs backend messages) for every other user."""
    bnb = sys.modules.get("bitsandbytes")
    return None if bnb is None else (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)


def placement_device_types(device_map) -> set[str]:
    """The device types that `from_pretrained(device_map=...)` puts weights on ("disk" for disk offload)."""
    if device_map is None:
        return {"cpu"}
    if isinstance(device_map, str) and device_map in ("auto", "balanced", "balanced_low_0", "sequential"):
        return {"cuda" if torch.cuda.is_available() else "cpu"}
    places = device_map.values() if isinstance(device_map, dict) else [device_map]
    return {"disk" if place == "disk" else torch.device("cuda", place).type if isinstance(place, int)
            else torch.device(place).type for place in places}


def check_gpu_only_format(quantization_config, device_map, dtype: Callable[[], torch.dtype]) -> None:
    """Refuse, before any weight is read, a torchao format that computes only on a GPU when the load would put
    weights elsewhere (transformers otherwise stops half-way through quantizing, the cause deep in a per-tensor
    report). `dtype` gives the dtype the weights load in; it is asked only for int4, which needs bfloat16."""
    quant_type = getattr(quantization_config, "quant_type", None)
    kind = type(quant_type).__name__
    float8_dynamic = kind == "Float8DynamicActivationFloat8WeightConfig"
    int4_tiles = kind == "Int4WeightOnlyConfig" and quant_type.int4_packing_format == "tile_packed_to_4d"
    if not (float8_dynamic or int4_tiles):
        return
    fix = "on a CPU choose a format that runs there (torchao-int8, torchao-float8, bitsandbytes)"
    if not torch.cuda.is_available():
        raise ValueError(f"torchao's {kind} computes on CUDA GPUs only, and this machine has none: {fix}")
    places = placement_device_types(device_map)
    if "cuda" not in places:  # with some weights on a GPU, transformers quantizes offloaded ones there too
        raise ValueError(f"torchao's {kind} computes on CUDA GPUs only, but device_map={device_map!r} puts every "
                         f"weight on {', '.join(sorted(places))}: load with device_map='cuda', {fix}")
    if float8_dynamic and (capability := torch.cuda.get_device_capability()) < (8, 9):
        raise ValueError(f"torchao's {kind} needs a GPU of compute capability 8.9 or later (its float8 matrix "
                         f"products), but this GPU's is {capability}: use torchao-float8 (weight-only) or "
                         "torchao-int8 here")
    if int4_tiles and (load_dtype := dtype()) != torch.bfloat16:
        raise ValueError(f"torchao's {kind} in the tile_packed_to_4d layout (tinygemm) takes bfloat16 weights only, "
                         f"but this load is in {load_dtype}: pass dtype=torch.bfloat16")


def keep_4bit_layers_unpacked(model: torch.nn.Module) -> None:
    """Keep bitsandbytes' 4-bit layers in their saved layout when they run on a CPU.

    For inference on a CPU with AVX512-BF16, bitsandbytes (0.50) repacks each 4-bit weight on first use into a
    layout of 32-row blocks, and that repacking is unsafe here: it stops with `AssertionError: N must be divisible
    by block_n` on other widths (the default model's `in_proj` has 844 rows, the released one's 10576), and undoing
    it, as saving and `.cuda()` do, rounds double-quantized scales to bf16 and, without double quantization, writes
    the scales transposed (a `bnb-fp4` model saved after one CPU forward came back 0.46 from its bf16 logits
    instead of 0.31). Each layer's own `support_avx512bf16_for_cpu` flag turns the repacking off; its general CPU
    kernel reads the saved layout of any width (on the default model, 15 % slower than repacked where that fits).
    """
    layers = bitsandbytes_layers()
    if layers is None:
        return
    for module in model.modules():
        if isinstance(module, layers[0]):
            module.support_avx512bf16_for_cpu = False


def capturable_kinds() -> tuple:
    """What `layer_capturable` accepts beyond plain dense weights: bitsandbytes' (Linear4bit, Linear8bitLt) or
    None, and torchao's `CAPTURABLE_TORCHAO_TENSORS` classes, as far as those libraries have been imported."""
    torchao_types = (torchao_tensor_type(name) for name in CAPTURABLE_TORCHAO_TENSORS)
    return bitsandbytes_layers(), tuple(kind for kind in torchao_types if kind is not None)


def layer_capturable(module: torch.nn.Module, kinds: tuple) -> bool:
    """Whether CUDA graphs can capture the kernels of `module`'s own weights (`kinds`: `capturable_kinds()`)."""
    bnb_layers, torchao_types = kinds
    if bnb_layers is not None:
        linear_4bit, linear_8bit = bnb_layers
        if isinstance(module, linear_8bit):
            # LLM.int8() looks for outlier columns with a host sync (`outliers.any()`) unless its threshold is 0.
            return module.state.threshold == 0
        if isinstance(module, linear_4bit):
            return True
    return all(
        weight is None or is_dense_weight(weight) or type(weight) in torchao_types
        for weight in module._parameters.values()
    )


def graph_capturable(model: torch.nn.Module) -> bool:
    """Whether every layer's weights run kernels that CUDA graphs can capture: plain dense weights, bitsandbytes'
    4-bit layers, LLM.int8() without outlier search, and torchao's `CAPTURABLE_TORCHAO_TENSORS`. Any other layer or
    tensor subclass declines, so generation then runs eagerly instead of failing inside a capture."""
    kinds = capturable_kinds()
    return all(layer_capturable(module, kinds) for module in model.modules())


__all__ = ["QUANTIZATION_FORMATS", "graph_capturable", "quantization_config"]
