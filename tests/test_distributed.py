"""Multi-process training: `examples/finetune.py` under `torch.distributed.run` trains exactly like one process with
the same global batch, the accelerate configs in `examples/accelerate/` load and shard the model's blocks, and
`benchmarks/check_distributed_training.py` (which compares those launches on GPUs) runs end to end on CPU processes.

The two-process run uses the gloo backend on CPU, so it needs no GPU. Trainer gives rank r the r-th half of each
global batch of the seeded sampler, so both runs see the same samples per step. The model's loss takes Trainer's
`num_items_in_batch` (the supervised tokens of the global batch), so ranks with different token counts still add
up to the single-process token mean.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import FullyShardedDataParallelPlugin
from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
from conftest import REPOSITORY, load_example, tiny_model, tiny_processor
from safetensors.torch import load_file

from modeling_mlmamba import MLMambaConfig, MLMambaForConditionalGeneration
from modeling_mlmamba.shapes_vqa import IMAGE_TOKEN_ID, TOKENIZER_VOCAB_SIZE, write_dataset

EXAMPLES = REPOSITORY / "examples"
GLOO = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="this torch build has no torch.distributed gloo backend to run two CPU processes",
)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """A saved tiny model with its processor (`model/`) and 8 shapes-vqa samples (`data/train.json`)."""
    folder = tmp_path_factory.mktemp("inputs")
    model = tiny_model()
    model.save_pretrained(folder / "model")
    tiny_processor(model.config).save_pretrained(folder / "model")
    write_dataset(folder / "data", num_images=8, seed=0)
    return folder


def finetune(inputs: Path, output_dir: Path, launcher: list[str], *arguments: str) -> None:
    """Three `finetune`-stage steps of examples/finetune.py on CPU. With seed 3 the sampler's global batches split
    into halves with unequal supervised tokens (4 + 12, 6 + 10, 4 + 12), so a per-rank token mean would show."""
    command = [
        *launcher, str(EXAMPLES / "finetune.py"), "--model_name_or_path", str(inputs / "model"),
        "--data_file", str(inputs / "data" / "train.json"), "--stage", "finetune", "--output_dir", str(output_dir),
        "--use_cpu", "--seed", "3", "--max_steps", "3", "--learning_rate", "1e-3", "--logging_steps", "1",
        "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true", *arguments,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-4000:]


def logged_steps(output_dir: Path) -> list[dict]:
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return [entry for entry in history if "loss" in entry]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


@GLOO
def test_two_process_training_matches_one_process_with_the_same_global_batch(inputs, tmp_path):
    two, one = tmp_path / "two-processes", tmp_path / "one-process"
    finetune(
        inputs, two, [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"],
        "--ddp_backend", "gloo", "--per_device_train_batch_size", "2",
    )
    finetune(inputs, one, [sys.executable], "--per_device_train_batch_size", "4")

    steps_two, steps_one = logged_steps(two), logged_steps(one)
    assert [entry["step"] for entry in steps_two] == [entry["step"] for entry in steps_one] == [1, 2, 3]
    for key in ("loss", "grad_norm"):  # Adam hides a wrongly scaled gradient; the logged gradient norm does not
        torch.testing.assert_close(
            torch.tensor([entry[key] for entry in steps_two], dtype=torch.float64),
            torch.tensor([entry[key] for entry in steps_one], dtype=torch.float64), rtol=1e-5, atol=0, msg=key,
        )

    start = load_file(inputs / "model" / "model.safetensors")
    weights_two, weights_one = load_file(two / "model.safetensors"), load_file(one / "model.safetensors")
    assert weights_two.keys() == weights_one.keys() == start.keys()
    trained = [name for name in start if not name.startswith("model.vision_tower.")]
    trained_one, trained_start = (torch.cat([w[name].flatten() for name in trained]) for w in (weights_one, start))
    assert relative_error(trained_one, trained_start) > 1e-3, "three steps should visibly change the trained weights"
    for name in trained:
        assert relative_error(weights_two[name], weights_one[name]) <= 1e-5, name
    for name in start.keys() - set(trained):  # the frozen vision towers
        assert torch.equal(weights_two[name], start[name]) and torch.equal(weights_one[name], start[name]), name

    model, loading = MLMambaForConditionalGeneration.from_pretrained(two, output_loading_info=True)
    assert not loading["missing_keys"] and not loading["unexpected_keys"]
    parameters = dict(model.named_parameters())
    for name in trained:
        assert torch.equal(parameters[name], weights_two[name]), name


@pytest.mark.parametrize(
    ("name", "distributed_type", "num_machines"),
    [("ddp.yaml", "MULTI_GPU", 1), ("fsdp.yaml", "FSDP", 1), ("multi-node-fsdp.yaml", "FSDP", 2)],
)
def test_accelerate_config_loads_as_bf16_training_on_several_gpus(name, distributed_type, num_machines):
    config = load_config_from_file(str(EXAMPLES / "accelerate" / name))
    assert (config.distributed_type.value, config.num_machines, config.mixed_precision) == (
        distributed_type, num_machines, "bf16"
    )
    assert config.num_processes >= 2 * num_machines  # num_processes counts the GPUs of all machines
    if num_machines > 1:
        assert config.main_process_ip and config.main_process_port
    if distributed_type == "FSDP":
        assert config.fsdp_config["fsdp_version"] == 2
        assert config.fsdp_config["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"


def test_fsdp_config_wraps_every_repeated_block_the_model_names():
    model = tiny_model()
    fsdp = load_config_from_file(str(EXAMPLES / "accelerate" / "fsdp.yaml")).fsdp_config
    # No class list in the config: accelerate falls back to the model's `_no_split_modules`.
    assert "fsdp_transformer_layer_cls_to_wrap" not in fsdp
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=fsdp["fsdp_version"], auto_wrap_policy=fsdp["fsdp_auto_wrap_policy"]
    )
    wraps = fsdp2_prepare_auto_wrap_policy(plugin, model)

    class_names = {type(module).__name__ for module in model.modules()}
    assert set(model._no_split_modules) <= class_names, set(model._no_split_modules) - class_names
    wrapped = [type(module).__name__ for module in model.modules() if wraps(module)]
    config, towers = model.config, model.model.vision_tower
    assert sorted(wrapped) == sorted(  # the towers' blocks up to the feature layer, which is all they build
        ["Dinov2WithRegistersLayer"] * len(towers.dino.encoder.layer)
        + ["SiglipEncoderLayer"] * len(towers.siglip.encoder.layers)
        + ["MLMambaConnectorBlock"] * len(model.model.connector.layers)
        + ["Mamba2LMBlock"] * config.text_config.num_hidden_layers
    )


@GLOO
def test_distributed_check_compares_a_ddp_launch_with_one_process(tmp_path, monkeypatch, capsys):
    """Two steps of examples/finetune.py, once as one process and once under `accelerate launch` with ddp.yaml turned
    into two CPU processes, on a toy model that fits the shapes-vqa tokenizer (the launches import this checkout)."""
    monkeypatch.setenv("PYTHONPATH", f"{REPOSITORY}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    config_file = tmp_path / "config.json"
    MLMambaConfig.tiny(image_token_id=IMAGE_TOKEN_ID, text_config=dict(vocab_size=TOKENIZER_VOCAB_SIZE)).to_json_file(
        config_file
    )
    check = load_example("check_distributed_training", "benchmarks")
    results = check.main(["--cpu", "--steps", "2", "--launches", "ddp", "--checks", "--config_file", str(config_file),
                          "--workdir", str(tmp_path / "work"), "--json", str(tmp_path / "check.json")])
    assert list(results["losses"]) == ["one", "ddp"] and all(len(losses) == 2 for losses in results["losses"].values())
    assert list(results["differences"]) == ["DDP losses vs 1 GPU, 2 steps", "DDP final folder logits vs 1 GPU"]
    assert results["passed"] and json.loads((tmp_path / "check.json").read_text()) == results
    assert "passed: True" in capsys.readouterr().out


def test_distributed_check_refuses_a_model_that_does_not_fit_the_tokenizer(tmp_path, capsys):
    config_file = tmp_path / "config.json"
    MLMambaConfig.tiny().to_json_file(config_file)
    check = load_example("check_distributed_training", "benchmarks")
    with pytest.raises(SystemExit):
        check.main(["--cpu", "--config_file", str(config_file), "--workdir", str(tmp_path / "work")])
    assert f"needs image_token_id {IMAGE_TOKEN_ID} (got 127)" in capsys.readouterr().err
    assert not (tmp_path / "work").exists()
