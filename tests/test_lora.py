"""LoRA with peft: adapters sit on exactly the language model's Mamba-2 projections, every forward path (training,
prefill, decode step) goes through them, and a trained adapter saves, reloads and merges into the same model."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPOSITORY, load_example, tiny_model, tiny_processor, tiny_tokenizer
from peft import PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from PIL import Image

from modeling_mlmamba import (
    DEFAULT_MODEL,
    MLMambaConfig,
    MLMambaForConditionalGeneration,
    MLMambaProcessor,
    training_run,
)
from modeling_mlmamba.lora import LANGUAGE_MODEL_PROJECTIONS, lora_config
from modeling_mlmamba.shapes_vqa import write_dataset
from modeling_mlmamba.training import MLMambaDataCollator

COLORS = ("red", "green", "blue", "yellow")
PEFT_PREFIX = "base_model.model."


def conversation(color: str) -> list[dict]:
    return [{"from": "human", "value": "<image>\nWhat color is it?"}, {"from": "gpt", "value": color}]


def color_samples() -> list[dict]:
    """One single-color picture per color, asked for its color, and a text-only sample."""
    samples = [{"image": Image.new("RGB", (32, 32), color), "conversations": conversation(color)} for color in COLORS]
    text_only = [{"from": "human", "value": "Is there a circle?"}, {"from": "gpt", "value": "no"}]
    return samples + [{"image": None, "conversations": text_only}]


@pytest.fixture(scope="module")
def processor():
    return tiny_processor()


@pytest.fixture(scope="module")
def batch(processor):
    return MLMambaDataCollator(processor)(color_samples())


def lora_model(seed: int = 0):
    """The tiny model with fresh (identity) rank-4 adapters; no dropout, so training and eval forwards agree."""
    return get_peft_model(tiny_model(seed), lora_config(rank=4, alpha=8, dropout=0.0))


def train(model, batch, steps: int = 3):
    """A few AdamW steps: enough to move every adapter away from its zero-initialised B matrix."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


@pytest.fixture
def trained(batch):
    return train(lora_model(), batch)


def logits(model, batch) -> torch.Tensor:
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    with torch.no_grad():
        return model(**inputs).logits


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


def lora_b(model, module_name: str) -> torch.Tensor:
    return model.get_submodule(PEFT_PREFIX + module_name).lora_B["default"].weight


def language_model_projections(model: MLMambaForConditionalGeneration) -> set[str]:
    return {
        f"model.language_model.layers.{index}.mixer.{projection}"
        for index in range(model.config.text_config.num_hidden_layers)
        for projection in ("in_proj", "out_proj")
    }


def test_target_regex_matches_exactly_the_language_model_projections():
    model = tiny_model()
    names = [name for name, _ in model.named_modules()]
    # The look-alikes the regex must skip exist in the tiny model: SigLIP's attention `out_proj` and the
    # connector's Mamba-2 mixers with their own `in_proj` / `out_proj`.
    assert any(name.startswith("model.vision_tower.siglip") and name.endswith(".out_proj") for name in names)
    assert any(name.startswith("model.connector") and name.endswith(".mixer.in_proj") for name in names)

    expected = language_model_projections(model)
    assert {name for name in names if re.fullmatch(LANGUAGE_MODEL_PROJECTIONS, name)} == expected
    base_names = [name for name, _ in model.model.named_modules()]  # MLMambaModel names the same modules too
    assert {name for name in base_names if re.fullmatch(LANGUAGE_MODEL_PROJECTIONS, name)} == {
        name.removeprefix("model.") for name in expected
    }


def test_peft_wraps_only_the_language_model_projections_and_trains_connector_and_projector():
    model = lora_model()
    wrapped = {name.removeprefix(PEFT_PREFIX) for name, layer in model.named_modules() if isinstance(layer, LoraLayer)}
    assert wrapped == language_model_projections(model.get_base_model())

    trainable = [name.removeprefix(PEFT_PREFIX) for name, p in model.named_parameters() if p.requires_grad]
    fully_trained = [name for name in trainable if ".modules_to_save." in name]
    assert all("lora_" in name or ".modules_to_save." in name for name in trainable)
    assert {name.split(".")[1] for name in fully_trained} == {"connector", "projector"}


def test_untrained_lora_is_the_identity(batch):
    assert torch.equal(logits(lora_model(), batch), logits(tiny_model(), batch))


@pytest.mark.parametrize("projection", ["in_proj", "out_proj"])
def test_lora_on_each_projection_changes_the_output(batch, projection):
    """The mixer calls its projections as modules: a LoRA on one of them is not bypassed by a fast path that
    reads `.weight` directly (as transformers' fused Mamba-2 training path does for `out_proj`)."""
    model = lora_model()
    before = logits(model, batch)
    with torch.no_grad():
        lora_b(model, f"model.language_model.layers.0.mixer.{projection}").normal_()
    assert relative_error(logits(model, batch), before) > 1e-3


def test_training_moves_every_lora_b_away_from_zero(trained):
    for name in language_model_projections(trained.get_base_model()):
        assert lora_b(trained, name).abs().max() > 0, name


def test_saved_adapter_on_a_fresh_base_model_gives_identical_logits(trained, batch, tmp_path):
    trained.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_config.json").is_file() and (tmp_path / "adapter_model.safetensors").is_file()

    reloaded = PeftModel.from_pretrained(tiny_model(seed=0), tmp_path).eval()
    assert torch.equal(logits(reloaded, batch), logits(trained, batch))


def test_merged_lora_equals_unmerged(trained, batch):
    unmerged = logits(trained, batch)
    merged = trained.merge_and_unload()
    assert type(merged) is MLMambaForConditionalGeneration
    assert not any(isinstance(module, LoraLayer) for module in merged.modules())
    assert relative_error(logits(merged, batch), unmerged) <= 1e-5


def greedy(model, inputs):
    return model.generate(
        **inputs, max_new_tokens=6, do_sample=False, eos_token_id=None, output_logits=True,
        return_dict_in_generate=True,
    )


def test_lora_model_generates_what_its_merged_model_generates(trained, processor):
    """Greedy decoding runs the one-token `step` path, which must apply the adapters just as the full forward."""
    messages = [{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (40, 30), "red")},
                                             {"type": "text", "text": "what color is it ?"}]}]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    with_lora = greedy(trained, inputs)
    with trained.disable_adapter():
        without_lora = greedy(trained, inputs)
    merged = greedy(trained.merge_and_unload(), inputs)

    assert torch.equal(with_lora.sequences, merged.sequences)
    for step_with_lora, step_merged, step_without in zip(with_lora.logits, merged.logits, without_lora.logits):
        assert relative_error(step_with_lora, step_merged) <= 1e-5
        assert relative_error(step_with_lora, step_without) > 1e-3


@pytest.fixture
def lora_example():
    return load_example("lora")


def write_training_folder(folder: Path) -> list[str]:
    """A LLaVA-format JSON with PNGs, a tiny config and a tokenizer whose `<image>` id is the config's; returns
    the example's arguments for a new model trained on them."""
    records = []
    for color in COLORS:
        Image.new("RGB", (32, 32), color).save(folder / f"{color}.png")
        records.append({"image": f"{color}.png", "conversations": conversation(color)})
    (folder / "train.json").write_text(json.dumps(records))
    config = MLMambaConfig.tiny()
    # Not `to_json_file`, so that a plain JSON config file (as hand-written ones are) is covered too.
    (folder / "config.json").write_text(json.dumps(config.to_diff_dict()))
    tiny_tokenizer(config.text_config.vocab_size, config.image_token_id).save_pretrained(folder / "tokenizer")
    return ["--config_file", str(folder / "config.json"), "--tokenizer", str(folder / "tokenizer"),
            "--data_file", str(folder / "train.json")]


def test_lora_example_saves_adapter_processor_and_loadable_merged_model(lora_example, batch, tmp_path):
    run = tmp_path / "run"
    trainer = lora_example.main([
        *write_training_folder(tmp_path), "--output_dir", str(run), "--lora_rank", "4", "--lora_dropout", "0",
        "--merge", "--max_steps", "2", "--per_device_train_batch_size", "2", "--learning_rate", "1e-2",
        "--gradient_checkpointing",
        "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true",
    ])
    assert (run / "adapter_config.json").is_file() and (run / "adapter_model.safetensors").is_file()
    assert MLMambaProcessor.from_pretrained(run).image_token_id == MLMambaConfig.tiny().image_token_id

    in_memory = trainer.model.get_base_model().eval()  # merge_and_unload folded the adapters into it in place
    loaded, loading_info = MLMambaForConditionalGeneration.from_pretrained(run / "merged", output_loading_info=True)
    assert not any(loading_info.values()), loading_info
    batch = {key: value.to(in_memory.device) for key, value in batch.items()}
    assert torch.equal(logits(loaded.to(in_memory.device).eval(), batch), logits(in_memory, batch))


def test_lora_example_refuses_other_training_stages(lora_example, tmp_path):
    with pytest.raises(ValueError, match="--stage align does not apply to LoRA"):
        lora_example.main(["--stage", "align", "--data_file", "unused.json", "--output_dir", str(tmp_path)])


def lora_example_args(tmp_path: Path, *extra: str) -> list[str]:
    return [*write_training_folder(tmp_path), "--output_dir", str(tmp_path / "run"), "--lora_rank", "4",
            "--per_device_train_batch_size", "2", "--report_to", "none", "--disable_tqdm", "true", *extra]


def test_lora_example_resumes_from_its_last_checkpoint_with_resume_true(lora_example, tmp_path):
    """`--resume_from_checkpoint True` means the output folder's last checkpoint, not a folder named "True". The
    resumed run has another learning rate: from scratch, its second step would log another loss."""
    first = lora_example.main(lora_example_args(tmp_path, "--max_steps", "2", "--save_steps", "2",
                                                "--logging_steps", "1"))
    resumed = lora_example.main(lora_example_args(tmp_path, "--max_steps", "3", "--save_strategy", "no",
                                                  "--logging_steps", "1", "--learning_rate", "0.05",
                                                  "--resume_from_checkpoint", "True"))
    assert resumed.state.global_step == 3

    def losses(trainer):
        return [(entry["step"], entry["loss"]) for entry in trainer.state.log_history if "loss" in entry]

    assert losses(resumed)[:2] == losses(first) and [step for step, _ in losses(resumed)] == [1, 2, 3]


def test_lora_example_refuses_a_checkpoint_of_another_rank_before_any_step(lora_example, tmp_path, monkeypatch):
    lora_example.main(lora_example_args(tmp_path, "--max_steps", "1", "--save_steps", "1"))

    class NoTrainer:
        def __init__(self, *args, **kwargs):
            raise AssertionError("a Trainer was built: the error must come before any training")

    monkeypatch.setattr(training_run, "Trainer", NoTrainer)
    args = lora_example_args(tmp_path, "--max_steps", "2", "--resume_from_checkpoint", "True")
    args[args.index("--lora_rank") + 1] = "8"
    with pytest.raises(ValueError, match="cannot resume from .*checkpoint-1: it holds another model \\(r: 4 in the "
                                         "checkpoint, 8 now"):
        lora_example.main(args)


@pytest.mark.parametrize("flags", [pytest.param([], id="lora"), pytest.param(["--quantization"], id="qlora", marks=(
    pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed")))])
def test_lora_example_runs_as_a_script_on_a_folder_that_ships_its_code(flags, tmp_path):
    """As users run it: a fresh process, where nothing has registered ML-Mamba with transformers' Auto classes, on
    the default model's folder, whose processor config maps `AutoProcessor` to code copied into the folder (as a
    converted or Hub checkpoint's does); with `--quantization`, on its bitsandbytes 4-bit LM (NF4). The merged
    model's folder carries the model code too."""
    write_dataset(tmp_path / "data", num_images=2, seed=0)
    run = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, str(REPOSITORY / "examples" / "lora.py"), "--model_name_or_path", str(DEFAULT_MODEL),
         *flags, "--data_file", str(tmp_path / "data" / "train.json"), "--image_folder", str(tmp_path / "data"),
         "--output_dir", str(run), "--merge", "--max_steps", "1", "--per_device_train_batch_size", "2", "--use_cpu",
         "--report_to", "none", "--dataloader_num_workers", "0"],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": f"{REPOSITORY}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
             "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run / "adapter_model.safetensors").is_file() and (run / "processor_config.json").is_file()
    merged_config = json.loads((run / "merged" / "config.json").read_text())
    auto_class = merged_config["auto_map"]["AutoModelForImageTextToText"]
    assert auto_class == "modeling_mlmamba.MLMambaForConditionalGeneration"
    assert (run / "merged" / "modeling_mlmamba.py").is_file()
