"""scripts/export_default_model.py end to end on a toy run folder: it scores the model on held-out shapes-vqa scenes
and writes a folder the package loads without remote code, with those scores in its model card."""

import json

import pytest
from transformers import AutoModelForImageTextToText

from conftest import load_example, tiny_model, tiny_processor


@pytest.fixture(scope="module")
def export_script():
    return load_example("export_default_model", "scripts")


def test_export_scores_the_run_and_writes_a_folder_without_model_code(export_script, tmp_path, capsys):
    run = tmp_path / "run"
    model = tiny_model(seed=3)
    model.save_pretrained(run)
    tiny_processor(model.config).save_pretrained(run)
    assert list(run.glob("*.py")) and '"auto_map"' in (run / "config.json").read_text()

    export_script.main([str(run), "--output", str(tmp_path / "default_model"), "--num-images", "1", "--device", "cpu"])
    scores = json.loads(capsys.readouterr().out)
    output = tmp_path / "default_model"
    assert not list(output.glob("*.py"))
    assert all('"auto_map"' not in path.read_text() for path in [output / "config.json", *output.glob("*_config.json")])
    card = (output / "README.md").read_text()
    assert all(f"shapes-vqa {kind}" in card for kind in scores)
    reloaded = AutoModelForImageTextToText.from_pretrained(output)
    assert type(reloaded).__module__ == "modeling_mlmamba.modeling_mlmamba"  # the package's class, not a copy
    assert not [path.name for path in tmp_path.iterdir() if path.name.startswith(".export-")]
