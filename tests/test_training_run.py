"""The `Trainer` run that examples/finetune.py and examples/lora.py share: model construction with config
overrides, resume resolution and checkpoint checks for plain and LoRA models, and the all-or-nothing final folder."""

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_model, tiny_processor, tiny_tokenizer
from peft import get_peft_model
from PIL import Image
from transformers import HfArgumentParser, TrainingArguments

from modeling_mlmamba import MLMambaConfig, MLMambaForConditionalGeneration, MLMambaProcessor
from modeling_mlmamba import training_run
from modeling_mlmamba.lora import lora_config
from modeling_mlmamba.training_run import (
    DataArguments,
    ModelArguments,
    apply_config_overrides,
    build_model_and_processor,
    check_output_dir,
    check_same_config,
    config_architecture,
    resume_checkpoint,
    train,
)


def new_model_arguments(folder: Path, config: MLMambaConfig | None = None, **kwargs) -> ModelArguments:
    """A config file written by transformers (`to_json_file`) and the matching tokenizer in `folder`."""
    config = config or MLMambaConfig.tiny()
    config.to_json_file(folder / "config.json")
    tiny_tokenizer(config.text_config.vocab_size, config.image_token_id).save_pretrained(folder / "tokenizer")
    return ModelArguments(config_file=str(folder / "config.json"), tokenizer=str(folder / "tokenizer"), **kwargs)


# --- model and config overrides -----------------------------------------------------------------------------


def test_new_model_from_a_config_file_saved_by_transformers_with_overrides(tmp_path):
    model, processor = build_model_and_processor(
        new_model_arguments(tmp_path, config_overrides='{"connector_type": "mlp"}')
    )
    assert model.config.connector_type == "mlp"
    assert model.config.text_config.hidden_size == 64 and model.config.text_config.time_step_limit[1] == float("inf")
    assert processor.image_token_id == model.config.image_token_id == 127


def test_sub_config_overrides_merge_into_the_loaded_sub_config():
    """Only the named field changes: the loaded tiny text config keeps its width and vocabulary instead of taking
    the released Mamba-2 2.7B's (2560 wide, 50288 tokens)."""
    tiny = MLMambaConfig.tiny()
    config = apply_config_overrides(tiny, {"text_config": {"num_hidden_layers": 3}, "connector_num_layers": 1})
    expected = {**tiny.text_config.to_dict(), "num_hidden_layers": 3}
    assert config.text_config.to_dict() == expected
    assert config.dino_config.to_dict() == tiny.dino_config.to_dict()
    assert config.connector_num_layers == 1 and config.connector_hidden_size == 64


def test_sub_config_overrides_from_the_command_line_build_the_merged_model(tmp_path):
    model, _ = build_model_and_processor(
        new_model_arguments(tmp_path, config_overrides='{"siglip_config": {"num_hidden_layers": 2}}')
    )
    assert model.config.siglip_config.num_hidden_layers == 2
    # The tower is built up to its feature layer (-2: the second-to-last of the 2 blocks).
    assert len(model.model.vision_tower.siglip.encoder.layers) == 1
    assert model.config.siglip_config.hidden_size == 48 and model.config.text_config.hidden_size == 64


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"conector_type": "mlp"}, "unknown key 'conector_type'; the valid keys are \\[.*'connector_type'"),
        ({"text_config": {"hiden_size": 32}},
         "unknown key 'text_config.hiden_size'; the valid keys of text_config are \\[.*'hidden_size'"),
        ({"text_config": 32}, "text_config must be a JSON object of config fields, got 32"),
        (["connector_type"], "the overrides must be a JSON object of config fields"),
    ],
    ids=["unknown-field", "unknown-sub-config-field", "sub-config-not-an-object", "not-an-object"],
)
def test_bad_config_overrides_raise_naming_the_key_and_the_valid_ones(overrides, message):
    with pytest.raises(ValueError, match=f"--config_overrides: {message}"):
        apply_config_overrides(MLMambaConfig.tiny(), overrides)


def test_config_overrides_that_are_not_json_raise_before_building_a_model(tmp_path, monkeypatch):
    arguments = new_model_arguments(tmp_path, config_overrides="{connector_type: mlp}")
    monkeypatch.setattr(training_run, "MLMambaForConditionalGeneration", None)
    with pytest.raises(ValueError, match="--config_overrides '\\{connector_type: mlp\\}' is not valid JSON"):
        build_model_and_processor(arguments)


def test_config_overrides_do_not_go_with_a_pretrained_model(tmp_path):
    with pytest.raises(ValueError, match="--config_overrides and --tokenizer go with --config_file"):
        build_model_and_processor(ModelArguments(model_name_or_path=str(tmp_path), config_overrides="{}"))


# --- resuming ------------------------------------------------------------------------------------------------


def arguments(output: Path, **kwargs) -> TrainingArguments:
    settings = dict(per_device_train_batch_size=2, learning_rate=1e-2, report_to="none", use_cpu=True, seed=0,
                    save_strategy="no", disable_tqdm=True, max_steps=1)
    return TrainingArguments(output_dir=str(output), **{**settings, **kwargs})


@pytest.mark.parametrize("value", [None, False, "False", "false"])
def test_resume_off(tmp_path, value):
    assert resume_checkpoint(arguments(tmp_path, resume_from_checkpoint=value)) is None


@pytest.mark.parametrize("value", [True, "True", "true"])
def test_resume_true_takes_the_output_folders_last_checkpoint(tmp_path, value):
    for step in (2, 10, 9):
        (tmp_path / f"checkpoint-{step}").mkdir()
    assert resume_checkpoint(arguments(tmp_path, resume_from_checkpoint=value)) == str(tmp_path / "checkpoint-10")


def test_resume_true_without_checkpoints_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint-\\* folder in .*missing"):
        resume_checkpoint(arguments(tmp_path / "missing", resume_from_checkpoint="True"))


def test_resume_from_a_folder_that_does_not_exist_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="--resume_from_checkpoint .*nowhere: no such folder"):
        resume_checkpoint(arguments(tmp_path, resume_from_checkpoint=str(tmp_path / "nowhere")))


def test_checkpoint_of_the_same_model_passes(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    check_same_config(tmp_path, tiny_model(seed=1))


def test_checkpoint_whose_token_ids_were_aligned_by_the_trainer_passes(tmp_path):
    """transformers 5.17's Trainer copies the tokenizer's pad/bos/eos ids into the model config before saving a
    checkpoint, so the checkpoint's config differs from a fresh one in these ids only: the same model."""
    trained = tiny_model()
    trained.config.eos_token_id, trained.config.pad_token_id, trained.config.bos_token_id = 0, 0, None
    trained.config.text_config.bos_token_id = None
    trained.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert (saved["eos_token_id"], saved["pad_token_id"], saved["text_config"]["bos_token_id"]) == (0, 0, None)
    check_same_config(tmp_path, tiny_model())


@pytest.mark.parametrize(
    "overrides, difference",
    [
        (dict(connector_scan="cross"), "connector_scan: 'cross' in the checkpoint, 'bidirectional' now"),
        (dict(text_config=dict(num_hidden_layers=3)), "text_config.num_hidden_layers: 3 in the checkpoint, 2 now"),
        (dict(siglip_config=dict(hidden_act="gelu_pytorch_tanh")),
         "siglip_config.hidden_act: 'gelu_pytorch_tanh' in the checkpoint, 'gelu' now"),
    ],
    ids=["same-shapes-other-scan", "sub-config-size", "sub-config-activation"],
)
def test_checkpoint_of_another_architecture_raises_naming_the_field(tmp_path, overrides, difference):
    tiny_model(**overrides).save_pretrained(tmp_path)
    with pytest.raises(ValueError) as error:
        check_same_config(tmp_path, tiny_model())
    assert str(error.value).startswith(f"cannot resume from {tmp_path}: it holds another model ({difference})")


def test_architecture_holds_the_declared_fields_of_every_config_but_not_token_ids():
    fields = config_architecture(MLMambaConfig.tiny())
    assert fields["connector_scan"] == "bidirectional" and fields["image_token_id"] == 127
    assert fields["text_config.model_type"] == "mamba2" and fields["text_config.hidden_size"] == 64
    assert fields["dino_config.num_register_tokens"] == 4 and fields["siglip_config.hidden_act"] == "gelu"
    assert not [name for name in fields if name.rsplit(".", 1)[-1] in ("eos_token_id", "pad_token_id", "bos_token_id")]
    assert "use_cuda_graphs" not in fields and "transformers_version" not in fields


def test_weight_shapes_are_compared_for_fields_a_config_does_not_declare(tmp_path, monkeypatch):
    tiny_model(text_config=dict(hidden_size=32, num_heads=4)).save_pretrained(tmp_path)
    monkeypatch.setattr(training_run, "config_architecture", lambda config: {})
    with pytest.raises(ValueError, match="weight lm_head.weight: shape \\(128, 32\\) in the checkpoint, "
                                         "\\(128, 64\\) now"):
        check_same_config(tmp_path, tiny_model())


def test_resume_of_a_model_from_a_lora_checkpoint_raises_pointing_to_lora(tmp_path):
    get_peft_model(tiny_model(), lora_config(rank=4)).save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no config.json.*it holds a LoRA adapter: resume it with "
                                                "examples/lora.py"):
        check_same_config(tmp_path, tiny_model())


def test_lora_checkpoint_with_the_same_settings_passes(tmp_path):
    get_peft_model(tiny_model(), lora_config(rank=4)).save_pretrained(tmp_path)
    check_same_config(tmp_path, get_peft_model(tiny_model(seed=1), lora_config(rank=4)))


def test_lora_checkpoint_of_another_rank_raises_naming_the_rank_and_the_adapter_shapes(tmp_path):
    get_peft_model(tiny_model(), lora_config(rank=8)).save_pretrained(tmp_path)
    with pytest.raises(ValueError) as error:
        check_same_config(tmp_path, get_peft_model(tiny_model(), lora_config(rank=4)))
    message = str(error.value)
    assert "r: 8 in the checkpoint, 4 now" in message
    assert ("weight base_model.model.model.language_model.layers.0.mixer.in_proj.lora_A.weight: shape (8, 64) in the "
            "checkpoint, (4, 64) now") in message


def test_lora_checkpoint_of_another_base_model_raises_naming_the_weights(tmp_path):
    get_peft_model(tiny_model(connector_num_layers=1), lora_config(rank=4)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="weight base_model.model.model.connector.layers.1.mixer.directions.0.A_log: "
                                         "not in the checkpoint; .* and 13 more\\)"):
        check_same_config(tmp_path, get_peft_model(tiny_model(), lora_config(rank=4)))


def test_resume_of_a_lora_model_from_a_full_checkpoint_raises(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no adapter_config.json, so it is not a LoRA checkpoint"):
        check_same_config(tmp_path, get_peft_model(tiny_model(), lora_config(rank=4)))


# --- output folder -------------------------------------------------------------------------------------------


def test_push_to_hub_is_refused_at_start_up(tmp_path):
    with pytest.raises(ValueError, match="--push_to_hub uploads the output folder before .*hf upload"):
        check_output_dir(arguments(tmp_path / "out", push_to_hub=True, hub_model_id="user/model"))


def test_output_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "out").write_text("")
    with pytest.raises(FileExistsError, match="--output_dir .*out is a file"):
        check_output_dir(arguments(tmp_path / "out"))


def color_samples(count: int = 4) -> list[dict]:
    colors = ["red", "green", "blue", "yellow"]
    return [{"image": Image.new("RGB", (32, 32), colors[i % 4]),
             "conversations": [{"from": "human", "value": "<image>\nWhat color is it?"},
                               {"from": "gpt", "value": colors[i % 4]}]} for i in range(count)]


FINAL_FILES = {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json", "train_results.json",
               "all_results.json", "trainer_state.json", "training_args.bin"}


def test_final_folder_is_written_beside_the_output_and_moved_in_when_complete(tmp_path):
    output = tmp_path / "out"
    seen = {}

    def add_files(folder: Path) -> None:
        seen["folder"], seen["output_files"] = folder, sorted(p.name for p in output.iterdir())
        seen["folder_files"] = {p.name for p in folder.iterdir()}
        (folder / "NOTE.md").write_text("added")

    model, processor = tiny_model(), tiny_processor()
    trainer = train(model, processor, color_samples(), arguments(output, max_steps=2, save_strategy="steps",
                                                                 save_steps=1), add_files=add_files)
    assert seen["folder"] == tmp_path / "out.incomplete"
    assert seen["output_files"] == ["checkpoint-1", "checkpoint-2"]  # no final file before all are written
    assert FINAL_FILES <= seen["folder_files"]
    assert FINAL_FILES | {"NOTE.md", "checkpoint-1", "checkpoint-2"} <= {p.name for p in output.iterdir()}
    assert not (tmp_path / "out.incomplete").exists()
    loaded = MLMambaForConditionalGeneration.from_pretrained(output)
    assert all(torch.equal(value, trainer.model.state_dict()[key]) for key, value in loaded.state_dict().items())
    assert MLMambaProcessor.from_pretrained(output).image_token_id == 127
    assert json.loads((output / "trainer_state.json").read_text())["global_step"] == 2
    assert "train_loss" in json.loads((output / "train_results.json").read_text())


def test_failed_final_save_leaves_no_output_folder(tmp_path):
    def add_files(folder: Path) -> None:
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        train(tiny_model(), tiny_processor(), color_samples(), arguments(tmp_path / "out"), add_files=add_files)
    assert sorted(tmp_path.iterdir()) == []


def test_failed_final_save_leaves_an_earlier_final_folder_untouched(tmp_path):
    output = tmp_path / "out"
    train(tiny_model(), tiny_processor(), color_samples(), arguments(output))
    before = {path.name: path.read_bytes() for path in output.iterdir()}

    def add_files(folder: Path) -> None:
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        train(tiny_model(seed=3), tiny_processor(), color_samples(), arguments(output, learning_rate=0.5),
              add_files=add_files)
    assert {path.name: path.read_bytes() for path in output.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# A sample the collator rejects (a placeholder without an image): training stops at the step that meets it.
BAD_SAMPLE = {"image": None, "conversations": [{"from": "human", "value": "<image>\nWhat color is it?"},
                                               {"from": "gpt", "value": "red"}]}


def test_training_that_fails_at_its_first_step_leaves_no_output_folder(tmp_path):
    with pytest.raises(ValueError, match="placeholder"):
        train(tiny_model(), tiny_processor(), [BAD_SAMPLE] * 2, arguments(tmp_path / "out"))
    assert sorted(tmp_path.iterdir()) == []


def test_training_that_fails_leaves_a_pre_existing_output_folder_untouched(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="placeholder"):
        train(tiny_model(), tiny_processor(), [BAD_SAMPLE] * 2, arguments(tmp_path / "out"))
    assert [(p.name, p.read_text()) for p in (tmp_path / "out").iterdir()] == [("notes.txt", "mine")]


def test_training_that_fails_after_a_checkpoint_keeps_the_checkpoint(tmp_path):
    # In order, batches of two: the data loader reads one batch ahead, so reading the third fails in step two.
    samples = color_samples(4) + [BAD_SAMPLE] * 2
    with pytest.raises(ValueError, match="placeholder"):
        train(tiny_model(), tiny_processor(), samples, arguments(tmp_path / "out", max_steps=3, save_strategy="steps",
                                                                 save_steps=1, train_sampling_strategy="sequential"))
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["checkpoint-1"]


def test_final_save_replaces_the_weight_files_of_an_earlier_save(tmp_path):
    """An earlier run saved in two shards: its shards and index must go, or the folder would load that model."""
    output = tmp_path / "out"
    output.mkdir()
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                 "model.safetensors.index.json", "notes.txt"):
        (output / name).write_text("earlier")
    (output / "checkpoint-7").mkdir()
    trainer = train(tiny_model(), tiny_processor(), color_samples(), arguments(output))
    names = {p.name for p in output.iterdir()}
    assert FINAL_FILES | {"notes.txt", "checkpoint-7"} <= names
    assert not [name for name in names if "-of-" in name or name.endswith(".index.json")]
    loaded = MLMambaForConditionalGeneration.from_pretrained(output)
    assert all(torch.equal(value, trainer.model.state_dict()[key]) for key, value in loaded.state_dict().items())


def test_train_checks_the_checkpoint_before_building_a_trainer(tmp_path, monkeypatch):
    tiny_model(connector_scan="cross").save_pretrained(tmp_path / "other")
    monkeypatch.setattr(training_run, "Trainer", None)
    with pytest.raises(ValueError, match="cannot resume from .*connector_scan"):
        train(tiny_model(), tiny_processor(), color_samples(), arguments(tmp_path / "out"),
              checkpoint=str(tmp_path / "other"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("max_length", ["0", "-5"])
def test_max_length_that_is_not_positive_fails_at_argument_parsing(max_length):
    parser = HfArgumentParser((DataArguments,))
    with pytest.raises(ValueError, match=f"--max_length must be a positive number of tokens, got {max_length}"):
        parser.parse_args_into_dataclasses(args=["--data_file", "data.json", "--max_length", max_length])
