"""scripts/export_default_model.py end to end on a toy run folder: it scores the model on held-out shapes-vqa scenes
and writes a folder that carries its code like any saved folder, with those scores in its model card."""

import json
from pathlib import Path

import pytest
from conftest import load_example, tiny_model, tiny_processor
from transformers import AutoModelForImageTextToText

import modeling_mlmamba


@pytest.fixture(scope="module")
def export_script():
    return load_example("export_default_model", "scripts")


def test_export_scores_the_run_and_writes_a_folder_with_the_package_code(export_script, tmp_path, capsys):
    run = tmp_path / "run"
    model = tiny_model(seed=3)
    model.save_pretrained(run)
    tiny_processor(model.config).save_pretrained(run)
    assert list(run.glob("*.py")) and '"auto_map"' in (run / "config.json").read_text()

    export_script.main([str(run), "--output", str(tmp_path / "default_model"), "--num-images", "1", "--device", "cpu"])
    scores = json.loads(capsys.readouterr().out)
    output = tmp_path / "default_model"
    # Like any saved folder, it carries the model code (identical to the package's) and its auto_map.
    package = Path(modeling_mlmamba.__file__).parent
    copies = list(output.glob("*.py"))
    assert copies and all(copy.read_text() == (package / copy.name).read_text() for copy in copies)
    assert '"auto_map"' in (output / "config.json").read_text()
    card = (output / "README.md").read_text()
    assert all(f"shapes-vqa {kind}" in card for kind in scores)
    reloaded = AutoModelForImageTextToText.from_pretrained(output)
    assert type(reloaded).__module__ == "modeling_mlmamba.modeling_mlmamba"  # the package's class, not a copy
    assert not [path.name for path in tmp_path.iterdir() if path.name.startswith(".export-")]
