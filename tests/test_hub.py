"""A saved folder is a Hub repository: it must load, with its own code, where this package is not installed."""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_model, tiny_processor
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText
from transformers.dynamic_module_utils import get_relative_import_files

from modeling_mlmamba import (
    DEFAULT_MODEL,
    MLMambaConfig,
    MLMambaForConditionalGeneration,
    MLMambaImageProcessor,
    MLMambaProcessor,
    write_model_card,
)
from modeling_mlmamba.answering import answer_questions
from modeling_mlmamba.model_card import write_model_code
from modeling_mlmamba.processing_mlmamba import CHAT_TEMPLATE

PROMPT = "<image><|user|>\nWhat color is the circle?<|endoftext|>\n<|assistant|>\n"

# Runs in a fresh interpreter: loads the folder through the Auto classes and records where the classes came from.
LOAD_SCRIPT = """
import sys, torch
from transformers import AutoModelForImageTextToText, AutoProcessor
folder, image, out = sys.argv[1:4]
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
inputs = processor(images=image, text=sys.stdin.read(), return_tensors="pt")
with torch.no_grad():
    logits = model(**inputs).logits
modules = [type(model).__module__, type(processor).__module__, type(model.config).__module__]
torch.save({"logits": logits, "input_ids": inputs["input_ids"], "modules": modules,
            "imported": sorted(name for name in sys.modules if name.split(".")[0] == "modeling_mlmamba")}, out)
"""


def run_without_the_package(tmp_path, script: str, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    """Run `script` in a new interpreter that cannot import `modeling_mlmamba` (not from the checkout, not from an
    editable install): a module of that name on PYTHONPATH, which wins over both, refuses to import."""
    blocker = tmp_path / "blocker"
    blocker.mkdir(exist_ok=True)
    (blocker / "modeling_mlmamba.py").write_text("raise ImportError('modeling_mlmamba must come from the folder')\n")
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(PYTHONPATH=str(blocker), HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    completed = subprocess.run(
        [sys.executable, "-c", script, *args], input=stdin, cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed


@pytest.fixture(scope="module")
def hub_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-mlmamba")
    model = tiny_model()
    model.save_pretrained(folder)
    tiny_processor(model.config).save_pretrained(folder)
    return folder, model


def test_saved_folder_maps_every_auto_class_to_its_own_code(hub_folder):
    folder, _ = hub_folder
    auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
    assert auto_map == {
        "AutoConfig": "configuration_mlmamba.MLMambaConfig",
        "AutoModel": "modeling_mlmamba.MLMambaModel",
        "AutoModelForImageTextToText": "modeling_mlmamba.MLMambaForConditionalGeneration",
        "AutoModelForCausalLM": "modeling_mlmamba.MLMambaForConditionalGeneration",
    }
    processor_map = json.loads((folder / "processor_config.json").read_text())["auto_map"]
    assert processor_map == {"AutoProcessor": "processing_mlmamba.MLMambaProcessor"}
    for module in {entry.split(".")[0] for entry in [*auto_map.values(), *processor_map.values()]}:
        assert (folder / f"{module}.py").is_file()
    for code in folder.glob("*.py"):
        assert "from modeling_mlmamba" not in code.read_text(), f"{code.name} imports the installed package"


def test_fresh_process_loads_the_folder_with_its_own_code_and_same_logits(hub_folder, tmp_path):
    folder, model = hub_folder
    image_path = tmp_path / "picture.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 64, 3), dtype=np.uint8)).save(image_path)
    inputs = tiny_processor(model.config)(images=str(image_path), text=PROMPT, return_tensors="pt")
    with torch.no_grad():
        expected = model(**inputs).logits

    run_without_the_package(tmp_path, LOAD_SCRIPT, str(folder), str(image_path), str(tmp_path / "out.pt"),
                            stdin=PROMPT)
    result = torch.load(tmp_path / "out.pt", weights_only=True)
    assert result["imported"] == []
    assert all(module.startswith("transformers_modules.") for module in result["modules"]), result["modules"]
    assert torch.equal(result["input_ids"], inputs["input_ids"])
    assert torch.equal(result["logits"], expected)


def test_small_max_shard_size_gives_sharded_safetensors_that_load_bit_exactly(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path, max_shard_size="200KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all(name.endswith(".safetensors") for name in shards)
    assert not (tmp_path / "model.safetensors").exists()
    saved = {key: value for shard in shards for key, value in load_file(tmp_path / shard).items()}
    assert set(saved) == set(index["weight_map"])

    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert isinstance(loaded, MLMambaForConditionalGeneration)
    expected = model.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def test_model_card_has_the_hub_metadata(hub_folder):
    folder, model = hub_folder
    card = write_model_card(
        folder, model.config, model_name="tiny-mlmamba", repo_id="someone/tiny-mlmamba",
        base_model="state-spaces/mamba2-130m", tags=["shapes-vqa"], datasets=["synthetic/shapes-vqa"],
        eval_results={"shapes-vqa": 97.5}, eval_source="measured with the shapes-vqa benchmark",
    )
    text = (folder / "README.md").read_text()
    assert text == str(card)
    metadata = yaml.safe_load(text.split("---")[1])
    assert metadata["license"] == "apache-2.0"
    assert metadata["library_name"] == "transformers"
    assert metadata["pipeline_tag"] == "image-text-to-text"
    assert metadata["base_model"] == ["state-spaces/mamba2-130m"]
    assert {"ml-mamba", "mamba2", "shapes-vqa", "custom_code"} <= set(metadata["tags"])
    assert metadata["datasets"] == ["synthetic/shapes-vqa"]
    [result] = metadata["model-index"][0]["results"]
    assert result["dataset"]["name"] == "shapes-vqa" and result["metrics"][0]["value"] == 97.5
    assert "| shapes-vqa | 97.5 |" in text
    assert 'repo = "someone/tiny-mlmamba"' in text
    assert f"{model.config.image_seq_length} image tokens" in text
    assert f"Mamba-2, {model.config.text_config.num_hidden_layers} layers" in text


def test_model_card_without_evaluation_has_no_model_index(tmp_path):
    write_model_card(tmp_path, MLMambaConfig.tiny())
    text = (tmp_path / "README.md").read_text()
    metadata = yaml.safe_load(text.split("---")[1])
    assert "model-index" not in metadata and "base_model" not in metadata
    assert "## Evaluation" not in text
    with pytest.raises(ValueError, match="is not a folder"):
        write_model_card(tmp_path / "missing", MLMambaConfig.tiny())


def test_model_card_usage_snippet_runs_from_the_folder(hub_folder, tmp_path):
    folder, model = hub_folder
    write_model_card(folder, model.config)
    [snippet] = re.findall(r"```python\n(.*?)```", (folder / "README.md").read_text(), re.S)
    assert f'repo = "{folder.as_posix()}"' in snippet
    check = textwrap.dedent("""
        import sys
        assert isinstance(output, __import__("torch").Tensor) and output.shape[1] > inputs["input_ids"].shape[1]
        assert not any(name.split(".")[0] == "modeling_mlmamba" for name in sys.modules)
    """)
    run_without_the_package(tmp_path, snippet + check)


# --- the embedded default model is a Hub folder like any other -----------------------------------------------------

REPO = Path(__file__).resolve().parent.parent
EXAMPLE_IMAGE = REPO / "examples" / "images" / "shapes.png"
CLASSES_WITH_CODE = (MLMambaConfig, MLMambaForConditionalGeneration, MLMambaImageProcessor, MLMambaProcessor)

ANSWER_SCRIPT = """
import sys, torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
folder, image, question = sys.argv[1:4]
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
messages = [{"role": "user", "content": [{"type": "image", "image": Image.open(image)}, {"type": "text", "text": question}]}]
inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                       return_tensors="pt")
output = model.generate(**inputs, max_new_tokens=4, do_sample=False)
assert not any(name.split(".")[0] == "modeling_mlmamba" for name in sys.modules)
assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
print(processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip())
"""


def package_code_files() -> dict[str, Path]:
    """What `save_pretrained` copies: the module of each class with code, and every sibling module it imports."""
    files = {}
    for cls in CLASSES_WITH_CODE:
        module_file = Path(sys.modules[cls.__module__].__file__)
        for path in [module_file, *map(Path, get_relative_import_files(module_file))]:
            files[path.name] = path
    return files


def test_default_model_folder_code_is_the_package_code():
    """The folder's code is a copy, refreshed by `write_model_code` (the export script's --refresh-code)."""
    refresh = "refresh it: modeling_mlmamba.model_card.write_model_code(modeling_mlmamba.DEFAULT_MODEL)"
    expected = package_code_files()
    folder = Path(DEFAULT_MODEL)
    assert sorted(path.name for path in folder.glob("*.py")) == sorted(expected), f"stale code copies; {refresh}"
    for name, source in expected.items():
        assert (folder / name).read_bytes() == source.read_bytes(), f"default_model/{name} is out of date; {refresh}"
    assert (folder / "chat_template.jinja").read_text() == CHAT_TEMPLATE


def test_default_model_folder_maps_its_auto_classes_to_its_code():
    config = json.loads((Path(DEFAULT_MODEL) / "config.json").read_text())
    assert config["auto_map"]["AutoModelForImageTextToText"] == "modeling_mlmamba.MLMambaForConditionalGeneration"
    processor = json.loads((Path(DEFAULT_MODEL) / "processor_config.json").read_text())
    assert processor["auto_map"] == {"AutoProcessor": "processing_mlmamba.MLMambaProcessor"}
    assert processor["image_processor"]["auto_map"]["AutoImageProcessor"] == (
        "image_processing_mlmamba.MLMambaImageProcessor"
    )


def test_default_model_copy_answers_without_the_package_like_with_it(tmp_path):
    copy = shutil.copytree(DEFAULT_MODEL, tmp_path / "mlmamba-shapes-vqa-tiny")
    question = "What color is the circle?"
    result = run_without_the_package(tmp_path, ANSWER_SCRIPT, str(copy), str(EXAMPLE_IMAGE), question)
    model = MLMambaForConditionalGeneration.from_pretrained(DEFAULT_MODEL).eval()
    (expected,) = answer_questions(model, MLMambaProcessor.from_pretrained(DEFAULT_MODEL), [str(EXAMPLE_IMAGE)],
                                   [question], max_new_tokens=4)
    assert result.stdout.strip() == expected and expected in {"red", "green", "blue", "yellow"}


def test_default_model_card_snippet_runs_from_any_directory(tmp_path):
    [snippet] = re.findall(r"```python\n(.*?)```", (Path(DEFAULT_MODEL) / "README.md").read_text(), re.S)
    assert "from modeling_mlmamba import DEFAULT_MODEL as repo" in snippet
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "mods")}
    result = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip()


def test_write_model_code_replaces_edited_and_stale_copies(tmp_path):
    folder = shutil.copytree(DEFAULT_MODEL, tmp_path / "model")
    (folder / "connector.py").write_text("edited\n")
    (folder / "old_module.py").write_text("no longer imported\n")
    (folder / "ssd.py").unlink()
    written = write_model_code(folder)
    assert written == sorted(package_code_files())
    assert sorted(path.name for path in folder.glob("*.py")) == written
    for name, source in package_code_files().items():
        assert (folder / name).read_bytes() == source.read_bytes()
    with pytest.raises(ValueError, match="is not a folder"):
        write_model_code(tmp_path / "missing")


def test_model_card_without_remote_code_runs_with_the_package(hub_folder, tmp_path):
    folder, model = hub_folder
    write_model_card(folder, model.config, remote_code=False)
    [snippet] = re.findall(r"```python\n(.*?)```", (folder / "README.md").read_text(), re.S)
    assert "trust_remote_code" not in snippet and "modeling_mlmamba.register_auto_classes()" in snippet
    check = "\nassert type(model).__module__ == 'modeling_mlmamba.modeling_mlmamba', type(model).__module__\n"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", snippet + check], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
