"""Quantized ML-Mamba on CPU: loading through transformers' quantizers (torchao and bitsandbytes' CPU backend), what
gets quantized, generation, save / reload, the dtype rule, which weights the model's own kernels take, when CUDA
graphs decline, QLoRA, and the quality of the quantized default model."""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import image_prompt, load_example, random_pixels, tiny_model, tiny_processor
from peft import LoraConfig, PeftModel, get_peft_model, inject_adapter_in_model
from PIL import Image
from torch import nn
from transformers import BitsAndBytesConfig

from modeling_mlmamba import (
    DEFAULT_MODEL,
    MLMambaConfig,
    MLMambaForConditionalGeneration,
    MLMambaModel,
    MLMambaProcessor,
    cuda_graphs,
    gemv,
)
from modeling_mlmamba.gemv import is_dense_weight, reference_gemv
from modeling_mlmamba.lora import lora_config, qlora_model_and_processor
from modeling_mlmamba.modeling_mlmamba import loading_dtype
from modeling_mlmamba.quantization import (
    QUANTIZATION_FORMATS,
    check_gpu_only_format,
    graph_capturable,
    placement_device_types,
    quantization_config,
)
from modeling_mlmamba.shapes_vqa import EVAL_IMAGES, EVAL_SEED, evaluate
from modeling_mlmamba.training import MLMambaDataCollator

ROOT = Path(__file__).resolve().parent.parent


def requires(library: str):
    return pytest.mark.skipif(
        importlib.util.find_spec(library) is None,
        reason=f"{library} is not installed (`pip install -e '.[quantization]'`; the dev extra includes it)",
    )


def formats(*names: str) -> list:
    return [pytest.param(name, marks=requires(QUANTIZATION_FORMATS[name].library)) for name in names]


CPU_FORMATS = formats("torchao-int8", "bnb-int8", "bnb-nf4", "bnb-fp4")
# Relative logit error against the same weights in bf16, on the tiny random model (measured 0.022 torchao int8,
# 0.031 LLM.int8(), 0.27 NF4, 0.37 FP4; another model's logits are ~1.4 away).
LOGIT_ERROR_BOUNDS = {"torchao-int8": 0.05, "bnb-int8": 0.05, "bnb-nf4": 0.4, "bnb-fp4": 0.5}


def language_model_projections(prefix: str, num_layers: int) -> set[str]:
    return {f"{prefix}language_model.layers.{i}.mixer.{name}.weight" for i in range(num_layers)
            for name in ("in_proj", "out_proj")}


def quantized_parameters(model: nn.Module) -> set[str]:
    return {name for name, parameter in model.named_parameters() if not is_dense_weight(parameter)}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    """A tiny model and its processor saved to a folder, as a user's checkpoint."""
    folder = tmp_path_factory.mktemp("tiny-mlmamba")
    model = tiny_model()
    model.save_pretrained(folder)
    tiny_processor(model.config).save_pretrained(folder)
    return folder


def load(folder, quantization=None, model_class=MLMambaForConditionalGeneration, **kwargs):
    config = quantization_config(quantization) if isinstance(quantization, str) else quantization
    return model_class.from_pretrained(folder, quantization_config=config, dtype=torch.bfloat16, **kwargs).eval()


def image_inputs(config, batch: int = 1) -> dict:
    ids = torch.tensor([image_prompt(config, [5 + i, 6, 7]) for i in range(batch)])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": random_pixels(batch, config)}


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("quantization", CPU_FORMATS)
@pytest.mark.parametrize("model_class, prefix", [(MLMambaForConditionalGeneration, "model."), (MLMambaModel, "")])
def test_quantization_converts_exactly_the_language_model_projections(saved_model, quantization, model_class, prefix):
    model = load(saved_model, quantization, model_class)
    assert quantized_parameters(model) == language_model_projections(prefix, model.config.text_config.num_hidden_layers)
    if model_class is MLMambaForConditionalGeneration:
        assert model.lm_head.weight is model.model.language_model.embeddings.weight


@pytest.mark.parametrize("quantization", CPU_FORMATS)
def test_quantized_model_generates_close_to_its_bf16_weights(saved_model, quantization):
    quantized, dense = load(saved_model, quantization), load(saved_model)
    inputs = image_inputs(quantized.config, batch=2)
    error = relative_error(logits(quantized, inputs), logits(dense, inputs))
    assert error <= LOGIT_ERROR_BOUNDS[quantization], error
    output = quantized.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert output.shape == (2, inputs["input_ids"].shape[1] + 4)


@pytest.mark.parametrize("quantization", CPU_FORMATS)
def test_quantized_model_saves_and_reloads_without_its_config(saved_model, quantization, tmp_path):
    quantized = load(saved_model, quantization)
    inputs = image_inputs(quantized.config)
    before = logits(quantized, inputs)  # bitsandbytes may change a layer's layout on its first forward
    quantized.save_pretrained(tmp_path)
    reloaded = MLMambaForConditionalGeneration.from_pretrained(tmp_path).eval()  # the config carries the format
    assert quantized_parameters(reloaded) == quantized_parameters(quantized)
    assert [type(p) for p in reloaded.parameters()] == [type(p) for p in quantized.parameters()]
    assert torch.equal(logits(reloaded, inputs), before)
    assert torch.equal(logits(quantized, inputs), before)


@pytest.mark.parametrize("quantization", formats("bnb-nf4", "bnb-fp4"))
def test_4bit_layers_keep_their_saved_layout_on_the_cpu(saved_model, quantization):
    """bitsandbytes' CPU repacking of 4-bit weights (on CPUs with AVX512-BF16) is turned off for every layer: the
    tiny in_proj's 296 rows would stop it, and undoing it for a save changes the weights."""
    import bitsandbytes

    model = load(saved_model, quantization)
    layers = [module for module in model.modules() if isinstance(module, bitsandbytes.nn.Linear4bit)]
    assert len(layers) == 2 * model.config.text_config.num_hidden_layers
    assert not any(layer.support_avx512bf16_for_cpu for layer in layers)
    logits(model, image_inputs(model.config))
    assert not any(getattr(layer.weight.quant_state, "packing_format_for_cpu", False) for layer in layers)


def test_placement_device_types_reads_every_form_of_device_map(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert placement_device_types(None) == placement_device_types("auto") == {"cpu"}
    assert placement_device_types({"model.vision_tower": 0, "model.connector": "cpu", "lm_head": "disk"}) == {
        "cuda", "cpu", "disk"}
    assert placement_device_types("cuda:1") == placement_device_types(torch.device("cuda")) == {"cuda"}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert placement_device_types("auto") == {"cuda"}


def test_loading_dtype_is_the_dtype_asked_for_or_the_saved_configs(saved_model):
    saved = MLMambaConfig.from_pretrained(saved_model).dtype or torch.float32
    assert loading_dtype(saved_model, {}) == loading_dtype(saved_model, {"dtype": "auto"}) == saved
    assert loading_dtype(saved_model, {"dtype": torch.bfloat16}) == torch.bfloat16
    assert loading_dtype(saved_model, {"torch_dtype": "float16"}) == torch.float16
    assert loading_dtype(saved_model, {"dtype": {"text_config": torch.bfloat16, "": torch.float32}}) == torch.bfloat16
    config = MLMambaConfig.tiny(dtype=torch.float16)
    assert loading_dtype("no-such-folder", {"config": config}) == torch.float16


@pytest.mark.parametrize("quantization", formats("torchao-int4", "torchao-float8-dynamic"))
def test_gpu_only_formats_are_refused_before_loading_where_they_cannot_run(saved_model, quantization, monkeypatch):
    """Named in one line before any weight is read, not half-way through transformers' quantizing."""
    def no_loading(*args, **kwargs):
        raise AssertionError("weights were read before the refusal")

    monkeypatch.setattr(MLMambaForConditionalGeneration, "_load_pretrained_model", no_loading)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="computes on CUDA GPUs only, and this machine has none: on a CPU choose"):
        load(saved_model, quantization)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(ValueError, match="device_map='cpu' puts every weight on cpu: load with device_map='cuda'"):
        load(saved_model, quantization, device_map="cpu")
    if quantization == "torchao-float8-dynamic":
        with pytest.raises(ValueError, match=r"compute capability 8.9 or later .* this GPU's is \(8, 0\)"):
            load(saved_model, quantization, device_map="cuda")
    else:
        config = quantization_config(quantization)
        with pytest.raises(ValueError, match="takes bfloat16 weights only, but this load is in torch.float32"):
            MLMambaForConditionalGeneration.from_pretrained(saved_model, quantization_config=config, device_map="cuda")
        assert check_gpu_only_format(config, {"": 0}, lambda: torch.bfloat16) is None  # bfloat16 on a GPU: no refusal


@requires("bitsandbytes")
def test_quantized_image_path_keeps_the_activation_dtype(saved_model, monkeypatch):
    """With every linear layer in int8 (towers, connector and projector too), the image features still flow in the
    activations' bf16: no dtype is taken from a weight, whose int8 storage would reach GELU and the biases."""
    monkeypatch.setattr(MLMambaForConditionalGeneration, "_keep_in_fp32_modules", [])
    model = load(saved_model, "bnb-int8")
    assert model.model.connector.input_proj.weight.dtype == torch.int8
    inputs = image_inputs(model.config)
    with torch.no_grad():
        features = model.get_image_features(inputs["pixel_values"])
        assert {image.dtype for image in features.pooler_output} == {torch.bfloat16}
    output = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert output.shape[1] == inputs["input_ids"].shape[1] + 3


def test_float16_load_keeps_the_image_path_in_float32(saved_model):
    model = MLMambaForConditionalGeneration.from_pretrained(saved_model, dtype=torch.float16).eval()
    dtypes = {name: {p.dtype for p in getattr(model.model, name).parameters()}
              for name in ("vision_tower", "connector", "projector", "language_model")}
    assert dtypes == {"vision_tower": {torch.float32}, "connector": {torch.float32}, "projector": {torch.float32},
                      "language_model": {torch.float16}}
    inputs = image_inputs(model.config)
    assert torch.isfinite(logits(model, inputs)).all()


@pytest.mark.parametrize("name", sorted(QUANTIZATION_FORMATS))
def test_format_whose_library_is_missing_fails_before_loading(name, monkeypatch):
    library = QUANTIZATION_FORMATS[name].library
    installed = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda module: None if module == library else installed(module))
    with pytest.raises(ImportError, match=f"{name}.*needs {library}.*pip install {library}"):
        quantization_config(name)


def test_unknown_format_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown quantization format 'int3'.*bnb-nf4"):
        quantization_config("int3")


# ---- which weights the Triton GEMV takes -----------------------------------------------------------------------


@pytest.fixture
def kernel_calls(monkeypatch):
    """The GEMV dispatch as on CUDA with Triton, CPU tensors standing in, and the kernel replaced by its reference:
    the list records the operands of every call that reached the kernel."""
    calls = []

    def recording_gemv(x, values, scale=None):
        calls.append((values, scale))
        return reference_gemv(x, values, scale)

    monkeypatch.setattr(gemv, "KERNEL_DEVICES", ("cpu",))
    monkeypatch.setattr(gemv, "triton", gemv.triton or object())
    monkeypatch.setattr(gemv, "gemv", recording_gemv)
    return calls


def linear(in_features=64, out_features=96, bias=False, dtype=torch.bfloat16, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias).to(dtype)


def torchao_linear(config) -> nn.Linear:
    from torchao.quantization import quantize_

    module = linear()
    quantize_(module, config)
    return module


class MarkedTensor(torch.Tensor):
    """A tensor subclass holding a plain tensor's values: still not a weight the kernel may read."""


def marked_linear() -> nn.Linear:
    module = linear()
    module.weight = nn.Parameter(module.weight.detach().as_subclass(MarkedTensor), requires_grad=False)
    return module


def lora_wrapped_linear() -> nn.Module:
    holder = nn.Module()
    holder.projection = linear()
    return inject_adapter_in_model(LoraConfig(r=2, target_modules=["projection"]), holder).projection


def torchao_grouped_int8() -> nn.Linear:
    from torchao.quantization import Int8WeightOnlyConfig, PerGroup

    return torchao_linear(Int8WeightOnlyConfig(granularity=PerGroup(32)))


def torchao_dynamic_float8() -> nn.Linear:
    from torchao.quantization import Float8Tensor
    from torchao.quantization.quantize_.workflows.float8.float8_tensor import QuantizeTensorToFloat8Kwargs

    module = linear()
    weight = Float8Tensor.from_hp(module.weight.detach(), act_quant_kwargs=QuantizeTensorToFloat8Kwargs())
    module.weight = nn.Parameter(weight, requires_grad=False)
    return module


@pytest.mark.parametrize("make_module", [
    pytest.param(lambda: linear(bias=True), id="bias"),
    pytest.param(marked_linear, id="tensor subclass"),
    pytest.param(lora_wrapped_linear, id="LoRA-wrapped"),
    pytest.param(torchao_grouped_int8, id="torchao int8 in groups of 32", marks=requires("torchao")),
    pytest.param(torchao_dynamic_float8, id="torchao float8 with dynamic activations", marks=requires("torchao")),
])
def test_kernel_refuses_anything_but_plain_and_torchao_rowwise_weights(kernel_calls, make_module):
    assert gemv.gemv_operands(make_module(), torch.randn(1, 64, dtype=torch.bfloat16)) is None


def test_kernel_refuses_rows_it_was_not_written_for(kernel_calls):
    assert gemv.gemv_operands(linear(), torch.randn(2, 64, dtype=torch.bfloat16)) is None  # two rows
    assert gemv.gemv_operands(linear(dtype=torch.float32), torch.randn(1, 64)) is None  # float32
    assert gemv.gemv_operands(linear(dtype=torch.float16), torch.randn(1, 64, dtype=torch.float16)) is not None


@requires("torchao")
@pytest.mark.parametrize("config_name", ["Int8WeightOnlyConfig", "Float8WeightOnlyConfig"])
def test_kernel_reads_torchao_rowwise_weights_directly(kernel_calls, config_name):
    import torchao.quantization

    module = torchao_linear(getattr(torchao.quantization, config_name)())
    x = torch.randn(1, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        from_kernel, from_torchao = gemv.decode_linear(module, x), module(x)
    ((values, scale),) = kernel_calls
    assert values is module.weight.qdata and scale is module.weight.scale
    assert relative_error(from_kernel, from_torchao) <= 1e-2


def test_kernel_reads_plain_weights(kernel_calls):
    module = linear()
    gemv.decode_linear(module, torch.randn(1, 64, dtype=torch.bfloat16))
    ((values, scale),) = kernel_calls
    assert values is module.weight and scale is None


@pytest.mark.parametrize("quantization", CPU_FORMATS)
def test_quantized_decode_steps_give_the_kernel_only_what_it_reads(saved_model, quantization, kernel_calls):
    model = load(saved_model, quantization)
    model.generate(**image_inputs(model.config), max_new_tokens=3, min_new_tokens=3, do_sample=False)
    readable = {id(p) for p in model.parameters() if is_dense_weight(p)}
    readable |= {id(p.qdata) for p in model.parameters() if gemv.rowwise_quantized(p)}
    assert kernel_calls and all(id(values) in readable for values, _ in kernel_calls)
    # The LM head's row after the prefill and after each of the 2 decode steps, and in each decode step the LM's
    # projections unless they are bitsandbytes layers.
    projections_per_step = 0 if quantization.startswith("bnb") else 2 * model.config.text_config.num_hidden_layers
    assert sum(values is model.lm_head.weight for values, _ in kernel_calls) == 3
    assert len(kernel_calls) == 3 + 2 * projections_per_step


INTERPRETED_KERNEL = textwrap.dedent("""
    import torch, triton
    from modeling_mlmamba.gemv import _gemv_kernel, reference_gemv

    torch.manual_seed(0)
    out_features, in_features = 37, 200  # a partial block of rows, and several column blocks with a partial last one
    for dtype in (torch.bfloat16, torch.float16):
        x = torch.randn(1, in_features, dtype=dtype)
        scale = torch.rand(out_features, 1) / 64
        layouts = {
            "dense": (torch.randn(out_features, in_features, dtype=dtype), None),
            "int8": (torch.randint(-127, 128, (out_features, in_features), dtype=torch.int8), scale),
            "float8": ((torch.randn(out_features, in_features) * 50).to(torch.float8_e4m3fn), scale),
        }
        for name, (values, row_scale) in layouts.items():
            y = torch.empty(1, out_features, dtype=dtype)
            _gemv_kernel.fn[(triton.cdiv(out_features, 16),)](
                x, values, row_scale if row_scale is not None else values, y, out_features, in_features,
                values.stride(0), HAS_SCALE=row_scale is not None, BLOCK_N=16, BLOCK_K=64
            )
            expected = reference_gemv(x, values, row_scale).float()
            error = (y.float() - expected).abs().max() / expected.abs().max()
            assert error <= 2 ** -7, (name, dtype, error.item())  # one rounding step of bf16 at the largest output
            print(name, dtype, "ok")
""")


@requires("triton")
def test_gemv_kernel_matches_its_reference_under_the_triton_interpreter():
    result = subprocess.run(
        [sys.executable, "-c", INTERPRETED_KERNEL], capture_output=True, text=True, timeout=300, cwd=ROOT,
        env={**os.environ, "TRITON_INTERPRET": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("ok") == 6


@requires("torchao")
@pytest.mark.parametrize("config_name", ["Int8WeightOnlyConfig", "Float8WeightOnlyConfig"])
def test_gemv_reference_is_torchaos_own_linear(config_name):
    """The kernel's reference computes what torchao's linear computes for these layouts (an independent check of
    how the stored values and scales are read)."""
    import torchao.quantization

    module = torchao_linear(getattr(torchao.quantization, config_name)())
    x = torch.randn(1, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        assert relative_error(reference_gemv(x, module.weight.qdata, module.weight.scale), module(x)) <= 1e-2


# ---- CUDA graphs ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("quantization, capturable", [
    pytest.param("torchao-int8", True, marks=requires("torchao")),
    pytest.param("bnb-nf4", True, marks=requires("bitsandbytes")),
    pytest.param("bnb-fp4", True, marks=requires("bitsandbytes")),
    pytest.param("bnb-int8", False, marks=requires("bitsandbytes")),  # LLM.int8()'s outlier search syncs the host
])
def test_graph_capturable_per_format(saved_model, quantization, capturable):
    assert graph_capturable(load(saved_model, quantization)) is capturable


@requires("bitsandbytes")
def test_int8_without_outlier_search_is_capturable_and_unknown_subclasses_are_not(saved_model):
    assert graph_capturable(load(saved_model))
    assert graph_capturable(load(saved_model, BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=0.0)))
    model = load(saved_model)
    projection = model.model.language_model.layers[0].mixer.out_proj
    projection.weight = nn.Parameter(projection.weight.detach().as_subclass(MarkedTensor), requires_grad=False)
    assert not graph_capturable(model)


def generate_with_graphs(model, inputs, use_graphs: bool):
    model.config.use_cuda_graphs = use_graphs
    return model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False)


@pytest.mark.parametrize("quantization", CPU_FORMATS)
def test_graph_seam_replays_capturable_formats_and_declines_the_others(saved_model, quantization, monkeypatch):
    model = load(saved_model, quantization)
    monkeypatch.setattr(type(model), "cuda_graph_devices", ("cpu",))
    inputs = image_inputs(model.config)
    eager = generate_with_graphs(model, inputs, use_graphs=False)
    first, second = (generate_with_graphs(model, inputs, use_graphs=True) for _ in range(2))
    graphs = model.cuda_graphs
    used = bool(graphs.decode_graphs) and bool(graphs.prefill_graphs)
    assert used is graph_capturable(model) and used is (quantization != "bnb-int8")
    assert torch.equal(first, eager) and torch.equal(second, eager)


def test_weights_are_checked_once_per_generate_call(monkeypatch):
    """The walk over every module (the graphs' staleness and capturability) runs once per `generate()` call, on its
    first forward, not per token."""
    model = tiny_model()
    monkeypatch.setattr(type(model), "cuda_graph_devices", ("cpu",))
    checks = []
    walk = cuda_graphs.weights_state

    def counted_walk(checked_model):
        checks.append(checked_model)
        return walk(checked_model)

    monkeypatch.setattr(cuda_graphs, "weights_state", counted_walk)
    inputs = image_inputs(model.config)
    for _ in range(2):
        model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert checks == [model, model]


@pytest.mark.parametrize("quantization", [None, *CPU_FORMATS])
def test_one_walk_finds_what_graph_capturable_finds(saved_model, quantization):
    """`weights_state` folds `graph_capturable` into the fingerprint's walk: the same answer, dense and quantized."""
    model = load(saved_model, quantization)
    assert cuda_graphs.weights_state(model)[1] is graph_capturable(model) is (quantization != "bnb-int8")


# ---- QLoRA ------------------------------------------------------------------------------------------------------

COLORS = ("red", "green", "blue", "yellow")


def color_batch(processor) -> dict:
    samples = [
        {"image": Image.new("RGB", (32, 32), color),
         "conversations": [{"from": "human", "value": "<image>\nWhat color is it?"}, {"from": "gpt", "value": color}]}
        for color in COLORS
    ]
    return MLMambaDataCollator(processor)(samples)


def quantized_storage(model) -> list[torch.Tensor]:
    return [(p.qdata if hasattr(p, "qdata") else p.data).clone() for p in model.parameters() if not is_dense_weight(p)]


def assert_same_greedy_answers(reference, quantized, inputs, new_tokens: int = 2) -> None:
    """The quantized model picks the reference's greedy token wherever the reference's choice is clearer than the
    two models' logit difference (a near-tie of a random tiny model may flip either way), comparing step by step
    while both answers still share their prefix."""
    answers = [model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, output_logits=True,
                              return_dict_in_generate=True) for model in (reference, quantized)]
    prompt = inputs["input_ids"].shape[1]
    compared = 0
    for step, (expected, actual) in enumerate(zip(answers[0].logits, answers[1].logits)):
        top_two = expected.float().topk(2).values
        clear = top_two[:, 0] - top_two[:, 1] > 2 * (expected.float() - actual.float()).abs().amax(-1)
        tokens = [answer.sequences[:, prompt + step] for answer in answers]
        assert torch.equal(tokens[0][clear], tokens[1][clear]), f"step {step}: {tokens}"
        compared += int(clear.sum())
        if not torch.equal(*tokens):
            break
    assert compared, "every greedy choice was a near-tie: nothing was compared"


@pytest.mark.parametrize("quantization", formats("bnb-nf4", "torchao-int8"))
def test_qlora_adapter_trains_on_the_quantized_lm_and_serves_both_bases(saved_model, quantization, tmp_path):
    torch.manual_seed(0)
    model, processor = qlora_model_and_processor(saved_model, quantization)
    assert not any(p.requires_grad for p in model.parameters())
    assert {p.dtype for p in model.parameters() if is_dense_weight(p)} == {torch.float32}
    frozen = quantized_storage(model)
    peft_model = get_peft_model(model, lora_config(rank=4, alpha=8, dropout=0.0))
    batch = color_batch(processor)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    losses = []
    for _ in range(4):
        loss = peft_model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(before, after) for before, after in zip(frozen, quantized_storage(model), strict=True))
    peft_model.save_pretrained(tmp_path / "adapter")

    inputs = {key: value for key, value in batch.items() if key != "labels"}
    on_dense = PeftModel.from_pretrained(load(saved_model), tmp_path / "adapter").eval()
    on_quantized = PeftModel.from_pretrained(load(saved_model, quantization), tmp_path / "adapter").eval()
    base_error = relative_error(logits(load(saved_model, quantization), inputs), logits(load(saved_model), inputs))
    assert relative_error(logits(on_quantized, inputs), logits(on_dense, inputs)) <= 2 * base_error + 1e-3
    assert_same_greedy_answers(on_dense, on_quantized, inputs)

    merged = PeftModel.from_pretrained(load(saved_model), tmp_path / "adapter").merge_and_unload().eval()
    assert type(merged) is MLMambaForConditionalGeneration and not quantized_parameters(merged)
    assert relative_error(logits(merged, inputs), logits(on_dense, inputs)) <= 1e-2


@requires("bitsandbytes")
def test_lora_example_trains_qlora_from_a_saved_model(saved_model, tmp_path):
    lora_example = load_example("lora")
    for color in COLORS:
        Image.new("RGB", (32, 32), color).save(tmp_path / f"{color}.png")
    records = [{"image": f"{color}.png", "conversations": [{"from": "human", "value": "<image>\nWhat color?"},
                                                          {"from": "gpt", "value": color}]} for color in COLORS]
    (tmp_path / "train.json").write_text(json.dumps(records))
    trainer = lora_example.main([
        "--model_name_or_path", str(saved_model), "--quantization", "--data_file", str(tmp_path / "train.json"),
        "--output_dir", str(tmp_path / "run"), "--lora_rank", "4", "--max_steps", "2",
        "--per_device_train_batch_size", "2", "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true",
    ])
    base = trainer.model.get_base_model()
    assert base.config.quantization_config.bnb_4bit_quant_type == "nf4"
    projections = language_model_projections("model.", base.config.text_config.num_hidden_layers)
    assert quantized_parameters(base) == {name.replace(".weight", ".base_layer.weight") for name in projections}
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()


# ---- quality ----------------------------------------------------------------------------------------------------


@requires("torchao")
def test_int8_default_model_answers_within_two_points_of_full_precision():
    """Every question of the held-out shapes-vqa scenes, with the embedded default model in full precision and
    with its language model in torchao int8 weight-only: per question type, at most 2 points apart."""
    processor = MLMambaProcessor.from_pretrained(DEFAULT_MODEL)
    full = MLMambaForConditionalGeneration.from_pretrained(DEFAULT_MODEL).eval()
    quantized = MLMambaForConditionalGeneration.from_pretrained(
        DEFAULT_MODEL, quantization_config=quantization_config("torchao-int8")
    ).eval()
    assert quantized_parameters(quantized) == language_model_projections("model.", 4)
    full_scores = evaluate(full, processor, num_images=EVAL_IMAGES, seed=EVAL_SEED)
    quantized_scores = evaluate(quantized, processor, num_images=EVAL_IMAGES, seed=EVAL_SEED)
    assert all(abs(quantized_scores[kind] - full_scores[kind]) <= 0.02 for kind in full_scores), (
        quantized_scores, full_scores
    )


def load_benchmark():
    script = ROOT / "benchmarks" / "benchmark_quantization.py"
    spec = importlib.util.spec_from_file_location("benchmark_quantization", script)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    return benchmark


def test_benchmark_stops_before_any_work_when_a_formats_library_is_missing(monkeypatch, tmp_path):
    benchmark = load_benchmark()
    installed = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda module: None if module == "torchao" else installed(module))
    monkeypatch.setattr(benchmark, "shapes_vqa_scores", lambda *args: pytest.fail("the benchmark started measuring"))
    with pytest.raises(SystemExit, match="--formats torchao-int8: .*needs torchao.*pip install torchao"):
        benchmark.main(["--shapes-vqa", "--device", "cpu", "--formats", "torchao-int8",
                        "--json", str(tmp_path / "quality.json")])
    assert not (tmp_path / "quality.json").exists()


@pytest.mark.parametrize("quantization", formats("torchao-int4", "torchao-float8-dynamic"))
def test_benchmark_stops_before_any_work_when_the_load_would_refuse_a_format(quantization, monkeypatch, tmp_path):
    benchmark = load_benchmark()
    monkeypatch.setattr(benchmark, "shapes_vqa_scores", lambda *args: pytest.fail("the benchmark started measuring"))
    with pytest.raises(SystemExit, match=f"--formats {quantization}: torchao's .* computes on CUDA GPUs only"):
        benchmark.main(["--shapes-vqa", "--device", "cpu", "--formats", quantization,
                        "--json", str(tmp_path / "quality.json")])
    assert not (tmp_path / "quality.json").exists()


def test_a_plain_model_does_not_import_bitsandbytes():
    """bitsandbytes (like torchao) is looked up, never imported by the package: its import takes seconds and logs
    backend messages, which every user of an unquantized model would pay. (torchao cannot be checked this way:
    transformers itself imports it whenever it is installed.)"""
    code = (
        "import sys, torch\n"
        "from modeling_mlmamba import MLMambaConfig, MLMambaForConditionalGeneration\n"
        "from modeling_mlmamba import quantization\n"
        "model = MLMambaForConditionalGeneration(MLMambaConfig.tiny()).eval()\n"
        "model.generate(input_ids=torch.tensor([[5, 6, 7]]), max_new_tokens=2)\n"
        "quantization.graph_capturable(model)\n"
        "print('bitsandbytes' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).resolve().parent.parent)
    assert result.stdout.strip() == "False"
