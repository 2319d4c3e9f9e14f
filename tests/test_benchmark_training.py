"""benchmarks/benchmark_training.py: its FLOP arithmetic, and its run end to end at toy size on a CPU (the GPU numbers in
docs/benchmarks.md come from it)."""

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import load_example
from modeling_mlmamba import MLMambaConfig, MLMambaForConditionalGeneration

TEXT_TOKENS = 200


@pytest.fixture(scope="module")
def benchmark():
    return load_example("benchmark_training", "benchmarks")


@pytest.mark.parametrize("lm_width", [64, 256])
def test_model_flops_agree_with_torch_flop_counter_on_a_forward_pass(benchmark, lm_width):
    """The MFU's numerator, counted by hand (dense weights, attention, SSD chunks), against torch's own count of
    every matmul and convolution of a real forward pass; the hand count leaves out small terms (depthwise convs,
    the reference scan's extra einsums), so it may be a little lower, never higher."""
    config = MLMambaConfig.tiny(text_config=dict(hidden_size=lm_width, num_heads=lm_width // 8))
    model = MLMambaForConditionalGeneration(config).eval()
    sample = benchmark.SyntheticSamples(config, TEXT_TOKENS, size=1)[0]
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(**{key: value[None] for key, value in sample.items() if key != "labels"})
    towers = model.model.vision_tower
    vision = benchmark.vit_forward_flops(towers.dino.config, benchmark.parameter_count(towers.dino)) + (
        benchmark.vit_forward_flops(towers.siglip.config, benchmark.parameter_count(towers.siglip))
    )
    training = benchmark.model_flops_per_sample(model, config.image_seq_length + TEXT_TOKENS)
    forward = vision + (training - vision) / 3  # the trainable part is counted 3x (forward and backward)
    assert 0.85 <= forward / counter.get_total_flops() <= 1.0


def test_benchmark_runs_trainer_and_checks_frozen_towers_and_tied_head(benchmark, tmp_path):
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(MLMambaConfig.tiny().to_dict()))
    results = benchmark.main([
        "--config_file", str(config_file), "--text_tokens", "24", "--per_device_batch_size", "2", "--warmup", "1",
        "--steps", "2", "--profile_steps", "1", "--json", str(tmp_path / "results.json"),
    ])
    assert json.loads((tmp_path / "results.json").read_text())["samples_per_second"] == results["samples_per_second"]
    assert results["checks"] == {
        "frozen_parameters_without_grad": True, "frozen_parameters_without_optimizer_state": True,
        "lm_head_tied_to_embeddings": True, "all_ranks_passed": True,
    }
    assert len(results["losses"]) == 4 and results["samples_per_second"] > 0
    assert results["sequence_length"] == MLMambaConfig.tiny().image_seq_length + 24
    assert "Name" in results["profile"]  # the kernel table of the profiled step
