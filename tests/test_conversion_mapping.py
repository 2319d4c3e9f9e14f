"""Conversion pieces that need no timm: the original checkpoint's key mapping, validation and the CLI surface."""

import argparse
import re

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer
from original_mlmamba import RELEASED_RUN_CONFIG, synthetic_checkpoint

from conversion.convert import PAPER_RESULTS, card_arguments
from conversion.convert_original_mlmamba import build_parser, main
from conversion.mapping import ConversionError, apply_rules, map_original, resample_position_embeddings
from conversion.sources import build_config, image_token_id_for, load_original_checkpoint, projector_type


def test_original_checkpoint_fills_connector_projector_and_language_model():
    model = tiny_model()
    checkpoint = synthetic_checkpoint(model.config)["model"]
    converted = map_original(checkpoint)
    assert converted.problems == []
    expected = {
        name for name in model.state_dict()
        if not name.startswith("model.vision_tower.") and name != "lm_head.weight"  # the head is tied
    }
    assert set(converted.tensors) == expected

    # The unsuffixed conv/dt/A/D set scans forward (direction 0), the `_b` set backward (direction 1).
    connector, mixer = checkpoint["bidirectional_mamba"], "model.connector.layers.1.mixer."
    for name in ("dt_bias", "A_log", "D", "conv1d.weight"):
        suffixed = name.replace("conv1d.", "conv1d_b.") if name.startswith("conv1d") else name + "_b"
        assert converted.tensors[f"{mixer}directions.0.{name}"] is connector[f"layers.1.mixer.{name}"]
        assert converted.tensors[f"{mixer}directions.1.{name}"] is connector[f"layers.1.mixer.{suffixed}"]
    assert converted.tensors["model.language_model.embeddings.weight"] is checkpoint["llm_backbone"][
        "backbone.embedding.weight"
    ]
    assert converted.tensors["model.connector.input_proj.weight"] is checkpoint["mlp"]["0.weight"]


def test_every_mapping_problem_is_reported_at_once():
    checkpoint = synthetic_checkpoint(tiny_model().config)["model"]
    checkpoint["mlp"]["1.weight"] = torch.zeros(3)
    checkpoint["bidirectional_mamba"]["norm_f.bias"] = [0.0, 1.0]
    checkpoint["llm_backbone"]["lm_head.weight"] = checkpoint["llm_backbone"]["lm_head.weight"] + 1
    del checkpoint["projector"]
    checkpoint["optimizer"] = {}

    problems = map_original(checkpoint).problems
    assert len(problems) == 5
    for expected in ("checkpoint mlp '1.weight' (3,) is not used", "'norm_f.bias' is a list, not a tensor",
                     "differs from 'backbone.embedding.weight'", "no 'projector' sub-state-dict",
                     "unexpected entry 'optimizer'"):
        assert any(expected in problem for problem in problems), expected


def test_a_parameter_filled_twice_is_reported():
    rules = [(r"(a|b)", "target")]
    converted = apply_rules("source", {"a": torch.zeros(1), "b": torch.ones(1)}, rules)
    assert converted.problems == ["target would be filled twice: from source 'a' and from source 'b'"]


def test_position_embeddings_must_form_a_square_grid():
    with pytest.raises(ValueError, match="do not form a square grid"):
        resample_position_embeddings(torch.zeros(1, 1 + 16, 8), (3, 3))
    unchanged = torch.randn(1, 9, 8)
    assert resample_position_embeddings(unchanged, (3, 3)) is unchanged


@pytest.mark.parametrize(
    "arch_specifier, expected",
    [("no-align+fused-gelu-mlp", "fused-gelu-mlp"), ("gelu-mlp", "gelu-mlp"), ("linear", "linear")],
)
def test_arch_specifier_names_the_projector(arch_specifier, expected):
    assert projector_type(arch_specifier) == expected


def test_run_config_other_than_the_released_one_is_rejected_with_every_reason():
    run = {**RELEASED_RUN_CONFIG["model"], "vision_backbone_id": "clip-vit-l", "arch_specifier": "fused-ldpnet"}
    with pytest.raises(ConversionError) as error:
        build_config(run, connector={"connector_layers": 3})
    message = str(error.value)
    assert "'vision_backbone_id' is 'clip-vit-l'" in message
    assert "unknown fields ['connector_layers']" in message
    assert "arch_specifier 'fused-ldpnet'" in message


def test_released_run_config_builds_the_released_model_config():
    config = build_config(RELEASED_RUN_CONFIG["model"])
    assert (config.projector_type, config.image_seq_length, config.text_config.num_hidden_layers) == (
        "fused-gelu-mlp", 729, 64,
    )
    assert config.siglip_config.hidden_act == "gelu"  # timm's SigLIP, which the released model ran


def test_checkpoint_with_pickled_objects_is_refused(tmp_path):
    path = tmp_path / "latest-checkpoint.pt"
    torch.save({"model": {"mlp": argparse.Namespace(weights="arbitrary object")}}, path)
    with pytest.raises(ConversionError, match="cannot read checkpoint .*Weights only load failed"):
        load_original_checkpoint(path)


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for action in build_parser()._actions:
        for flag in action.option_strings:
            assert flag in text
        assert action.help and len(action.help) > 20
    for flag in ("--checkpoint", "--run-config", "--dino", "--siglip", "--tokenizer", "--output", "--dtype",
                 "--push-to-hub", "--dino-config", "--siglip-config", "--text-config", "--connector-config"):
        assert flag in text


def test_help_documents_every_exit_status(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    statuses = text[text.index("exit status:"):]
    for status, meaning in [("0", "written"), ("1", "nothing was written"), ("2", "command line"),
                            ("3", "the upload of --push-to-hub failed"), ("130", "Ctrl-C"), ("143", "SIGTERM")]:
        assert re.search(rf"\b{status}\b.*{re.escape(meaning)}", statuses), status


def test_image_placeholder_takes_the_tokenizers_id_or_the_first_free_one():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    assert image_token_id_for(tiny_tokenizer(vocab_size=128, image_token_id=100)) == 100
    backend = Tokenizer(models.WordLevel({"<|endoftext|>": 0, "red": 1, "blue": 2}, unk_token="<|endoftext|>"))
    without_placeholder = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")
    assert image_token_id_for(without_placeholder) == 3  # where MLMambaProcessor.from_model_config adds it


def test_model_card_claims_paper_results_only_for_the_released_configuration(tmp_path):
    released = card_arguments(RELEASED_RUN_CONFIG["model"], "bfloat16", True, "someone/ml-mamba", tmp_path)
    assert released["eval_results"] == PAPER_RESULTS and released["base_model"] == "huangwenjun1994/ML-Mamba"
    assert "Table 2" in released["eval_source"] and "bfloat16" in released["description"]
    assert released["repo_id"] == "someone/ml-mamba"
    overridden = card_arguments(RELEASED_RUN_CONFIG["model"], "float32", False, None, tmp_path)
    assert "eval_results" not in overridden and "base_model" not in overridden
    assert overridden["repo_id"] == tmp_path.as_posix()
