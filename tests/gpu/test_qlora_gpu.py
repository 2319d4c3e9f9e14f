"""QLoRA at the full `mlmamba+3b` size on one GPU, through `examples/lora.py` as a user runs it: the language model
loaded in 4-bit NF4, rank-16 adapters and the connector and projector trained with `Trainer` for 50 steps on a small
LLaVA-format set (one picture per colour, asked for its colour). The weights are random, so the loss starts near
log(vocabulary) and must fall as the adapters and connector learn the four answers.

    python -m pytest -q tests/gpu/test_qlora_gpu.py
"""

import importlib.util
import json
import statistics

import pytest
import torch
from conftest import load_example, tiny_processor
from PIL import Image

from modeling_mlmamba import MLMambaConfig, MLMambaForConditionalGeneration

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="QLoRA at full size needs a CUDA GPU"),
    pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed"),
]

COLORS = ("red", "green", "blue", "yellow")
STEPS = 50


@pytest.fixture(scope="module")
def full_size_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mlmamba-3b-random")
    config = MLMambaConfig()
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = MLMambaForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    tiny_processor(config, model_max_length=2048).save_pretrained(folder)  # 729 image tokens + the question
    del model
    torch.cuda.empty_cache()
    return folder


def write_colour_set(folder) -> str:
    records = []
    for color in COLORS:
        Image.new("RGB", (64, 64), color).save(folder / f"{color}.png")
        records.append({"image": f"{color}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat color is it?"}, {"from": "gpt", "value": color}]})
    (folder / "train.json").write_text(json.dumps(records * 8))
    return str(folder / "train.json")


def test_qlora_loss_falls_over_50_steps_at_full_size(full_size_folder, tmp_path, record_property):
    torch.cuda.reset_peak_memory_stats()
    trainer = load_example("lora").main([
        "--model_name_or_path", str(full_size_folder), "--quantization", "--data_file", write_colour_set(tmp_path),
        "--output_dir", str(tmp_path / "run"), "--max_steps", str(STEPS), "--per_device_train_batch_size", "4",
        "--learning_rate", "1e-3", "--lr_scheduler_type", "constant", "--bf16", "--gradient_checkpointing",
        "--logging_steps", "1", "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true",
    ])
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    record_property("losses", losses)
    record_property("peak_memory_gib", torch.cuda.max_memory_allocated() / 2**30)
    base = trainer.model.get_base_model()
    assert base.config.quantization_config.bnb_4bit_quant_type == "nf4"
    assert len(losses) == STEPS
    first, last = statistics.mean(losses[:10]), statistics.mean(losses[-10:])
    assert last < 0.5 * first, (first, last)
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()
