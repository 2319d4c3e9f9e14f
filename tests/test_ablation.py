"""benchmarks/ablation.py: the starting points (the base model's towers and LM, a fresh connector of the variant), the
results table, and a run end to end at toy size on a CPU."""

import json
import os

import pytest
import torch

from conftest import REPOSITORY, load_example, tiny_model, tiny_processor
from modeling_mlmamba import MLMambaForConditionalGeneration
from modeling_mlmamba.shapes_vqa import write_dataset


@pytest.fixture(scope="module")
def ablation():
    return load_example("ablation", "benchmarks")


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


def test_results_table_marks_question_types_no_scene_asked(ablation):
    """A small evaluation need not contain every kind of question: that column reads n/a, the mean is over the rest."""
    table = ablation.markdown_table({"mlp": {0: {"color": 1.0, "count": 0.5}}})
    header, _, row = table.splitlines()
    cells = dict(zip(header.split("|")[2:-1], row.split("|")[2:-1]))
    cells = {column.strip(): cell.strip() for column, cell in cells.items()}
    assert cells == {"color": "100.0 ± 0.0", "shape": "n/a", "count": "50.0 ± 0.0", "left": "n/a", "above": "n/a",
                     "exists": "n/a", "mean": "75.0 ± 0.0"}


def test_ablation_trains_scores_and_tabulates_a_variant_end_to_end(ablation, tmp_path, monkeypatch, capsys):
    """Two align steps of one variant through examples/finetune.py (a subprocess importing this checkout's package),
    scored on one held-out scene: the results file and the printed table hold that run."""
    monkeypatch.setenv("PYTHONPATH", f"{REPOSITORY}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    base = tiny_model(seed=5)
    base.save_pretrained(tmp_path / "base")
    tiny_processor(base.config).save_pretrained(tmp_path / "base")
    write_dataset(tmp_path / "data", num_images=4, seed=0)

    ablation.main([
        "--data", str(tmp_path / "data"), "--base", str(tmp_path / "base"), "--output", str(tmp_path / "runs"),
        "--seeds", "0", "--variants", "msc-cross", "--eval-images", "1", "--device", "cpu", "--",
        "--max_steps", "2", "--per_device_train_batch_size", "2", "--use_cpu", "--dataloader_num_workers", "0",
    ])
    saved = json.loads((tmp_path / "runs" / "results.json").read_text())
    assert saved["finetune_args"][:2] == ["--max_steps", "2"] and saved["eval_images"] == 1
    scores = saved["results"]["msc-cross"]["0"]
    assert set(scores) <= set(ablation.QUESTION_TYPES) and all(0 <= score <= 1 for score in scores.values())
    trained = MLMambaForConditionalGeneration.from_pretrained(tmp_path / "runs" / "msc-cross-seed0")
    assert trained.config.connector_scan == "cross"
    assert capsys.readouterr().out.splitlines()[-1].startswith("| msc-cross | ")
