"""Quantized ML-Mamba on a CUDA GPU, format by format: loading from a saved folder, what is quantized, logits close
to bf16, greedy generation identical with and without CUDA graphs (and graphs used exactly where
`graph_capturable` says they can be), and the batch-1 GEMV on torchao's int8 / float8 weights against its reference
and torchao's own linear. Skipped without CUDA or without the format's library.

    python -m pytest -q tests/gpu/test_quantization_gpu.py
"""

import importlib.util

import pytest
import torch
from conftest import image_prompt, random_pixels, tiny_model, tiny_processor
from transformers import BitsAndBytesConfig

from modeling_mlmamba import MLMambaForConditionalGeneration, gemv
from modeling_mlmamba.gemv import is_dense_weight, reference_gemv
from modeling_mlmamba.quantization import QUANTIZATION_FORMATS, graph_capturable, quantization_config

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

# Widths every format's kernels accept: in_proj 256 -> 1168 and out_proj 512 -> 256 are multiples of 16 (float8
# scaled matmul) and of 128 along the input (int4 groups of 128, tinygemm tiles).
TEXT_CONFIG = {"hidden_size": 256, "num_hidden_layers": 2, "state_size": 64, "head_dim": 32, "num_heads": 16,
               "chunk_size": 64, "vocab_size": 512}
FLOAT8_CAPABLE = torch.cuda.get_device_capability() >= (8, 9)
# Relative logit error against the same weights in bf16 (on a CPU with these widths: 0.021 torchao int8, 0.030
# LLM.int8(), 0.067 float8; 0.27 / 0.37 for NF4 / FP4 on the narrower CPU test model; another model's ~1.4).
LOGIT_ERROR_BOUNDS = {"bnb-nf4": 0.4, "bnb-fp4": 0.5, "bnb-int8": 0.05, "torchao-int8": 0.05, "torchao-float8": 0.15,
                      "torchao-float8-dynamic": 0.2, "torchao-int4": 0.5}


def format_params(names) -> list:
    params = []
    for name in names:
        library = QUANTIZATION_FORMATS[name].library
        marks = [pytest.mark.skipif(importlib.util.find_spec(library) is None, reason=f"{library} is not installed")]
        if name == "torchao-float8-dynamic":
            marks.append(pytest.mark.skipif(not FLOAT8_CAPABLE, reason="float8 matmuls need compute capability 8.9"))
        params.append(pytest.param(name, marks=marks))
    return params


ALL_FORMATS = format_params(sorted(QUANTIZATION_FORMATS))


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mlmamba-gpu")
    model = tiny_model(text_config=TEXT_CONFIG)
    model.save_pretrained(folder)
    tiny_processor(model.config).save_pretrained(folder)
    return folder


def load(folder, quantization=None):
    config = quantization_config(quantization) if isinstance(quantization, str) else quantization
    return MLMambaForConditionalGeneration.from_pretrained(
        folder, quantization_config=config, dtype=torch.bfloat16, device_map="cuda"
    ).eval()


def prompt(config, batch: int = 1) -> dict:
    ids = torch.tensor([image_prompt(config, [5 + i, 6, 7, 8]) for i in range(batch)], device="cuda")
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values": random_pixels(batch, config).to("cuda", torch.bfloat16)}


def generate(model, inputs, use_graphs: bool) -> torch.Tensor:
    model.config.use_cuda_graphs = use_graphs
    return model.generate(**inputs, max_new_tokens=12, min_new_tokens=12, do_sample=False, eos_token_id=None,
                          pad_token_id=0)


def relative_error(actual, expected) -> float:
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


@pytest.mark.parametrize("quantization", ALL_FORMATS)
def test_format_quantizes_the_language_model_projections_only(saved_model, quantization):
    model = load(saved_model, quantization)
    quantized = {name for name, p in model.named_parameters() if not is_dense_weight(p)}
    assert quantized == {f"model.language_model.layers.{i}.mixer.{proj}.weight" for i in range(2)
                         for proj in ("in_proj", "out_proj")}


@pytest.mark.parametrize("quantization", ALL_FORMATS)
def test_format_logits_stay_close_to_bf16(saved_model, quantization):
    inputs = prompt(load(saved_model).config, batch=2)
    with torch.no_grad():
        error = relative_error(load(saved_model, quantization)(**inputs).logits, load(saved_model)(**inputs).logits)
    assert error <= LOGIT_ERROR_BOUNDS[quantization], error


@pytest.mark.parametrize("quantization", [*ALL_FORMATS, pytest.param(
    BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=0.0), id="bnb-int8-no-outliers",
    marks=pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed"),
)])
@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_tokens_identical_with_and_without_graphs(saved_model, quantization, batch):
    """The graph seam replays graphs exactly for the formats `graph_capturable` accepts (capture would fail for the
    others), and the replayed tokens are the eager ones."""
    model = load(saved_model, quantization)
    inputs = prompt(model.config, batch)
    eager = generate(model, inputs, use_graphs=False)
    replayed = [generate(model, inputs, use_graphs=True) for _ in range(2)]  # the second replays the prefill too
    graphs = model.cuda_graphs
    capturable = graph_capturable(model)
    assert bool(graphs.decode_graphs) is capturable and bool(graphs.prefill_graphs) is capturable
    assert all(torch.equal(tokens, eager) for tokens in replayed)


def test_graph_capturable_decision_per_format(saved_model):
    """The per-format decision, stated once: only LLM.int8() with its outlier threshold (a host sync) runs eagerly."""
    expected = {"bnb-int8": False, "bnb-nf4": True, "bnb-fp4": True, "torchao-int8": True, "torchao-float8": True,
                "torchao-int4": True, "torchao-float8-dynamic": True}
    for name, capturable in expected.items():
        if importlib.util.find_spec(QUANTIZATION_FORMATS[name].library) is None:
            continue
        if name == "torchao-float8-dynamic" and not FLOAT8_CAPABLE:
            continue
        assert graph_capturable(load(saved_model, name)) is capturable, name


@pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="torchao is not installed")
@pytest.mark.parametrize("quantization", ["torchao-int8", "torchao-float8"])
def test_decode_projections_read_torchao_weights_with_the_gemv(saved_model, quantization):
    model = load(saved_model, quantization)
    projection = model.model.language_model.layers[0].mixer.in_proj
    assert gemv.gemv_operands(projection, torch.ones(1, 256, device="cuda", dtype=torch.bfloat16)) is not None
    x = torch.randn(1, projection.in_features, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        from_kernel, from_torchao = gemv.decode_linear(projection, x), projection(x)
    weight = projection.weight
    assert relative_error(from_kernel, reference_gemv(x, weight.qdata, weight.scale)) <= 2 ** -7
    assert relative_error(from_kernel, from_torchao) <= 1e-2


@pytest.mark.parametrize("layout", ["dense", "int8", "float8"])
@pytest.mark.parametrize("shape", [(10576, 2560), (2560, 5120), (37, 200)])
def test_gemv_kernel_matches_its_reference(layout, shape):
    out_features, in_features = shape
    generator = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1, in_features, device="cuda", dtype=torch.bfloat16, generator=generator)
    scale = torch.rand(out_features, 1, device="cuda", generator=generator) / 64
    values = {
        "dense": lambda: torch.randn(out_features, in_features, device="cuda", dtype=torch.bfloat16,
                                     generator=generator),
        "int8": lambda: torch.randint(-127, 128, (out_features, in_features), device="cuda", dtype=torch.int8,
                                      generator=generator),
        "float8": lambda: (torch.randn(out_features, in_features, device="cuda", generator=generator) * 50).to(
            torch.float8_e4m3fn),
    }[layout]()
    row_scale = None if layout == "dense" else scale
    expected = reference_gemv(x, values, row_scale).float()
    error = (gemv.gemv(x, values, row_scale).float() - expected).abs().max() / expected.abs().max()
    assert error <= 2 ** -7


def test_dense_bf16_decode_projection_still_takes_the_gemv(saved_model):
    model = load(saved_model)
    projection = model.model.language_model.layers[0].mixer.out_proj
    operands = gemv.gemv_operands(projection, torch.ones(1, projection.in_features, device="cuda",
                                                         dtype=torch.bfloat16))
    assert operands is not None and operands[0] is projection.weight and operands[1] is None
