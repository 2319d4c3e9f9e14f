"""The embedded default model: a complete Hub-format folder in the package that answers shapes-vqa questions, and
the command line that runs it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoModelForImageTextToText, AutoProcessor

from modeling_mlmamba import DEFAULT_MODEL, MLMambaForConditionalGeneration, MLMambaProcessor
from modeling_mlmamba.answering import answer_questions
from modeling_mlmamba.shapes_vqa import COLORS, EVAL_IMAGES, EVAL_SEED, QUESTION_TYPES, evaluate, sample_scenes, render

EXAMPLE_IMAGE = Path(__file__).resolve().parent.parent / "examples" / "images" / "shapes.png"


@pytest.fixture(scope="module")
def default_model():
    torch.manual_seed(0)
    return MLMambaForConditionalGeneration.from_pretrained(DEFAULT_MODEL).eval(), MLMambaProcessor.from_pretrained(
        DEFAULT_MODEL
    )


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "modeling_mlmamba", *args], capture_output=True, text=True, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


def test_default_model_answers_at_least_90_percent_of_every_held_out_question_type(default_model):
    """Real greedy generation on every question of the held-out scenes, scored per type, reaches the bar of the
    training issue and matches the scores its model card reports (written at export, on another machine: a
    question or two per type may tip the other way in float rounding)."""
    model, processor = default_model
    scores = evaluate(model, processor, num_images=EVAL_IMAGES, seed=EVAL_SEED)
    assert set(scores) == set(QUESTION_TYPES)
    assert all(score >= 0.90 for score in scores.values()), scores
    card = ModelCard.load(Path(DEFAULT_MODEL) / "README.md")
    recorded = {result.dataset_name.removeprefix("shapes-vqa "): result.metric_value for result in card.data.eval_results}
    assert recorded.keys() == scores.keys()
    assert all(abs(100 * scores[kind] - recorded[kind]) <= 2.0 for kind in scores), (scores, recorded)


def test_held_out_scenes_are_not_among_the_training_scenes():
    """The evaluation scenes are disjoint from the data the default model was trained on (README: 200000 scenes,
    seed 0), compared as sets of objects so that a reordering of the same picture also counts as shared."""
    def canonical(scene):
        return tuple(sorted(scene, key=repr))

    training = {canonical(scene) for scene in sample_scenes(200000, seed=0, split="train")}
    assert not training & {canonical(scene) for scene in sample_scenes(EVAL_IMAGES, seed=EVAL_SEED, split="test")}


def test_default_model_folder_is_complete_small_and_loads_through_the_auto_classes():
    folder = Path(DEFAULT_MODEL)
    names = {path.name for path in folder.iterdir()}
    assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json", "README.md"} <= names
    assert sum(path.stat().st_size for path in folder.iterdir()) <= 15 * 2**20
    assert {"configuration_mlmamba.py", "modeling_mlmamba.py", "processing_mlmamba.py"} <= names  # its own code
    card = (folder / "README.md").read_text()
    assert "pipeline_tag: image-text-to-text" in card and "library_name: transformers" in card
    assert "trust_remote_code=True" in card
    assert json.loads((folder / "config.json").read_text())["model_type"] == "mlmamba"
    assert type(AutoModelForImageTextToText.from_pretrained(DEFAULT_MODEL)).__name__ == "MLMambaForConditionalGeneration"
    assert type(AutoProcessor.from_pretrained(DEFAULT_MODEL)).__name__ == "MLMambaProcessor"


def test_command_line_prints_only_the_answer_the_model_gives(default_model):
    model, processor = default_model
    result = run_cli("--image", str(EXAMPLE_IMAGE), "--question", "What color is the circle?")
    assert result.returncode == 0, result.stderr
    (expected,) = answer_questions(model, processor, [str(EXAMPLE_IMAGE)], ["What color is the circle?"])
    assert result.stdout == expected + "\n"
    assert expected in COLORS


def test_command_line_takes_any_saved_model_folder(tmp_path, default_model):
    model, processor = default_model
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    image_path = tmp_path / "scene.png"
    render(sample_scenes(1, seed=3, split="test")[0]).save(image_path)
    question = "How many objects are there?"
    result = run_cli("--model", str(tmp_path), "--image", str(image_path), "--question", question,
                     "--max-new-tokens", "4")
    assert result.returncode == 0, result.stderr
    assert result.stdout == answer_questions(model, processor, [str(image_path)], [question], max_new_tokens=4)[0] + "\n"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--image", "no-such-file.png", "--question", "What?"], "no such file"),
        (["--image", __file__, "--question", "What?"], "is not an image file"),
        (["--image", str(EXAMPLE_IMAGE), "--question", "  "], "--question is empty"),
        (["--image", str(EXAMPLE_IMAGE), "--question", "What?", "--max-new-tokens", "0"], "at least 1"),
        (["--image", str(EXAMPLE_IMAGE), "--question", "What?", "--device", "nonsense"], "is not a torch device"),
    ],
)
def test_command_line_rejects_bad_input_with_a_clear_message(args, message):
    result = run_cli(*args)
    assert result.returncode != 0
    assert message in result.stderr
    assert result.stdout == ""
