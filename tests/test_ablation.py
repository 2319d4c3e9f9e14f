"""The connector ablation's starting points: the base model's towers and LM, a fresh connector of the variant."""


import pytest
import torch

from conftest import load_example, tiny_model, tiny_processor
from modeling_mlmamba import MLMambaForConditionalGeneration



@pytest.fixture(scope="module")
def ablation():
    return load_example("ablation")


@pytest.mark.parametrize("variant", ["mlp", "msc-bidirectional", "msc-cross"])
def test_starting_point_keeps_towers_and_lm_and_gives_a_fresh_connector_of_the_variant(ablation, tmp_path, variant):
    base = tiny_model(seed=5)
    base.save_pretrained(tmp_path / "base")
    tiny_processor(base.config).save_pretrained(tmp_path / "base")

    start = MLMambaForConditionalGeneration.from_pretrained(
        ablation.starting_point(tmp_path / "base", variant, seed=0, folder=tmp_path / "start")
    )
    assert {k: getattr(start.config, k) for k in ablation.VARIANTS[variant]} == ablation.VARIANTS[variant]
    base_weights, start_weights = base.state_dict(), start.state_dict()
    for key, value in start_weights.items():
        if key.startswith(ablation.TRAINED_PREFIXES):
            continue
        assert torch.equal(value, base_weights[key]), key
    fresh = [key for key in start_weights if key.startswith(ablation.TRAINED_PREFIXES) and key in base_weights
             and start_weights[key].shape == base_weights[key].shape and start_weights[key].ndim == 2]
    assert fresh and not any(torch.equal(start_weights[key], base_weights[key]) for key in fresh)
    assert (tmp_path / "start" / "processor_config.json").is_file()


def test_results_table_gives_mean_and_spread_over_seeds(ablation):
    scores = {kind: 0.5 for kind in ("color", "shape", "count", "left", "above", "exists")}
    table = ablation.markdown_table({"mlp": {0: {**scores, "color": 0.8}, 1: {**scores, "color": 1.0}}})
    header, _, row = table.splitlines()
    assert header.split("|")[2].strip() == "color"
    assert row.split("|")[2].strip() == "90.0 ± 14.1"
    assert row.split("|")[-2].strip() == "56.7 ± 2.4"  # per-seed means 55.0 and 58.3
