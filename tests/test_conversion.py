"""End-to-end conversion of tiny sources in the released formats: timm towers, original checkpoint, tokenizer.

The DINOv2 checkpoint is saved at a larger image size than the model's, as released (518 px for a 384 px model),
so every test also goes through the position-embedding resampling. References are timm itself and the original
math re-implemented in `original_mlmamba.py`.
"""

import json
import logging
import os
import signal
import types
from pathlib import Path

import pytest
import torch
from conftest import image_prompt, random_pixels, tiny_tokenizer
from original_mlmamba import (
    RELEASED_RUN_CONFIG,
    reference_logits,
    synthetic_checkpoint,
    timm_dino_from_file,
    tiny_timm_towers,
    write_run_config,
)
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForImageTextToText, AutoProcessor

import conversion.convert
from conversion.convert import load_validated_model
from conversion.convert_original_mlmamba import main
from conversion.mapping import resample_position_embeddings
from conversion.sources import build_config

pytest.importorskip("timm")  # a test dependency (the dev extra): the references are timm's own towers

TINY_FLAGS = {
    "--dino-config": {"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2, "image_size": 56},
    "--siglip-config": {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 3, "num_attention_heads": 2,
                        "image_size": 56},
    "--text-config": {"hidden_size": 64, "num_hidden_layers": 2, "state_size": 16, "head_dim": 16, "num_heads": 8,
                      "chunk_size": 8, "vocab_size": 128},
    "--connector-config": {"connector_state_size": 16, "connector_head_dim": 16, "connector_chunk_size": 8,
                           "image_token_id": 127},
}
DINO_CHECKPOINT_IMAGE_SIZE = 70  # a 5x5 patch grid, resampled to the model's 4x4


def rel_err(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours.double() - reference.double()).norm() / reference.double().norm()).item()


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sources")
    config = build_config(RELEASED_RUN_CONFIG["model"], *(TINY_FLAGS[flag] for flag in TINY_FLAGS))
    dino, siglip = tiny_timm_towers(config, dino_image_size=DINO_CHECKPOINT_IMAGE_SIZE)
    save_file(dino.state_dict(), folder / "dino.safetensors")
    save_file(siglip.state_dict(), folder / "siglip.safetensors")
    checkpoint = synthetic_checkpoint(config)
    torch.save(checkpoint, folder / "latest-checkpoint.pt")
    write_run_config(folder / "config.json")
    tiny_tokenizer(config.text_config.vocab_size, config.image_token_id).save_pretrained(folder / "tokenizer")
    return types.SimpleNamespace(
        folder=folder,
        config=config,
        checkpoint=checkpoint["model"],
        dino_saved=dino,
        dino=timm_dino_from_file(config, folder / "dino.safetensors"),  # how the released code builds it
        siglip=siglip,
    )


def cli_args(sources, output, **replaced) -> list[str]:
    inputs = {
        "--checkpoint": sources.folder / "latest-checkpoint.pt",
        "--run-config": sources.folder / "config.json",
        "--dino": sources.folder / "dino.safetensors",
        "--siglip": sources.folder / "siglip.safetensors",
        "--tokenizer": sources.folder / "tokenizer",
        "--output": output,
        "--max-shard-size": "100KB",
        **{flag: json.dumps(value) for flag, value in TINY_FLAGS.items()},
        **replaced,
    }
    return [str(item) for pair in inputs.items() for item in pair]


@pytest.fixture(scope="module")
def converted(sources, tmp_path_factory):
    output = tmp_path_factory.mktemp("converted") / "ml-mamba"
    assert main(cli_args(sources, output)) == 0
    return output


@pytest.fixture(scope="module")
def model(converted):
    return AutoModelForImageTextToText.from_pretrained(converted).eval()


def saved_tensors(folder) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in folder.glob("*.safetensors"):
        with safe_open(shard, "pt") as handle:
            tensors.update({name: handle.get_tensor(name) for name in handle.keys()})
    return tensors


def test_vision_features_equal_timm_second_to_last_layer_patches(sources, model):
    pixels = random_pixels(2, sources.config)
    with torch.no_grad():
        ours = model.model.vision_tower(pixels).last_hidden_state
        dino = sources.dino.get_intermediate_layers(pixels[:, 0], n={len(sources.dino.blocks) - 2})[0]
        siglip = sources.siglip.get_intermediate_layers(pixels[:, 1], n={len(sources.siglip.blocks) - 2})[0]
    dino_width = sources.config.dino_config.hidden_size
    assert rel_err(ours[..., :dino_width], dino) <= 1e-5
    assert rel_err(ours[..., dino_width:], siglip) <= 1e-5


def test_logits_equal_the_original_math(sources, model):
    config, text_ids = sources.config, [5, 6, 7, 8, 9]
    pixels = random_pixels(1, config)
    with torch.no_grad():
        ours = model(input_ids=torch.tensor([image_prompt(config, text_ids)]), pixel_values=pixels).logits[0]
    reference = reference_logits(
        sources.checkpoint, sources.dino, sources.siglip, pixels[:, 0], pixels[:, 1], text_ids, config
    )
    assert ours.shape == reference.shape == (config.image_seq_length + len(text_ids), config.text_config.vocab_size)
    assert rel_err(ours, reference) <= 1e-4


def test_every_saved_tensor_comes_from_the_sources(sources, converted, model):
    candidates = [tensor for part in sources.checkpoint.values() for tensor in part.values()]
    for tower in (sources.dino_saved, sources.siglip):
        for name, tensor in tower.state_dict().items():
            candidates.extend(tensor.chunk(3) if name.endswith("qkv.weight") or name.endswith("qkv.bias") else [tensor])

    saved = saved_tensors(converted)
    dino, siglip = "model.vision_tower.dino.", "model.vision_tower.siglip."
    mask_token = saved.pop(dino + "embeddings.mask_token")
    assert torch.equal(mask_token, torch.zeros(1, sources.config.dino_config.hidden_size))
    positions = saved.pop(dino + "embeddings.position_embeddings")
    assert torch.equal(positions[:, 0], torch.zeros_like(positions[:, 0]))
    assert torch.equal(positions[:, 1:], sources.dino.pos_embed.detach())  # timm's own resampling
    assert torch.equal(saved.pop(siglip + "embeddings.position_embedding.weight"), sources.siglip.pos_embed[0].detach())
    # The towers end at the feature layer (the second-to-last block): the last blocks and final norms are dropped.
    last_dino, last_siglip = len(sources.dino.blocks) - 1, len(sources.siglip.blocks) - 1
    assert dino + f"encoder.layer.{last_dino - 1}.mlp.fc2.weight" in saved
    assert siglip + f"encoder.layers.{last_siglip - 1}.mlp.fc2.weight" in saved
    assert not [name for name in saved if name.startswith((
        dino + f"encoder.layer.{last_dino}.", siglip + f"encoder.layers.{last_siglip}.", dino + "layernorm.",
        siglip + "post_layernorm.",
    ))]
    for name, tensor in saved.items():
        assert any(c.shape == tensor.shape and torch.equal(c, tensor) for c in candidates), name
    assert model.lm_head.weight is model.get_input_embeddings().weight


def test_position_embeddings_are_resampled_as_timm_does():
    from timm.layers import resample_abs_pos_embed

    generator = torch.Generator().manual_seed(0)
    released = torch.randn(1, 37 * 37, 64, generator=generator)  # DINOv2's 518 px grid, narrower channels
    ours = resample_position_embeddings(released, (27, 27))
    theirs = resample_abs_pos_embed(released, new_size=(27, 27), num_prefix_tokens=0)
    assert ours.shape == (1, 27 * 27, 64)
    assert torch.equal(ours, theirs)


def test_output_folder_is_a_complete_hub_repo(sources, converted, model):
    files = {path.name for path in converted.iterdir()}
    assert {"config.json", "model.safetensors.index.json", "processor_config.json", "tokenizer.json",
            "tokenizer_config.json", "README.md"} <= files
    assert {"configuration_mlmamba.py", "modeling_mlmamba.py", "processing_mlmamba.py"} <= files  # remote code
    assert len([name for name in files if name.endswith(".safetensors")]) > 1
    config = json.loads((converted / "config.json").read_text())
    assert config["auto_map"]["AutoModelForImageTextToText"] == "modeling_mlmamba.MLMambaForConditionalGeneration"
    for name in ("dino_config", "siglip_config", "text_config"):
        ours, intended = getattr(model.config, name).to_dict(), getattr(sources.config, name).to_dict()
        assert {**ours, "dtype": None} == {**intended, "dtype": None}
    assert not [path for path in converted.parent.iterdir() if path.name.startswith(".")]  # no staging left

    processor = AutoProcessor.from_pretrained(converted)
    assert processor.image_token_id == model.config.image_token_id == sources.config.image_token_id
    assert processor.tokenizer.model_max_length == RELEASED_RUN_CONFIG["model"]["llm_max_length"]
    messages = [{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (90, 60), "red")},
                                             {"type": "text", "text": "what color is the circle ?"}]}]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    assert inputs["pixel_values"].shape == (1, 2, 3, 56, 56)
    output = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert output.shape == (1, inputs["input_ids"].shape[1] + 3)

    card = (converted / "README.md").read_text()
    assert "huangwenjun1994/ML-Mamba" in card and "float32" in card
    assert "base_model" not in card and "Table 2" not in card  # overridden configs are not the released model


def test_bfloat16_output_from_a_folder_holding_a_bin_checkpoint(sources, tmp_path):
    dino_folder = tmp_path / "dino"
    dino_folder.mkdir()
    torch.save(sources.dino_saved.state_dict(), dino_folder / "pytorch_model.bin")
    output = tmp_path / "bf16"
    assert main(cli_args(sources, output, **{"--dino": dino_folder, "--dtype": "bfloat16"})) == 0
    saved = saved_tensors(output)
    assert {tensor.dtype for tensor in saved.values()} == {torch.bfloat16}
    name = "model.connector.layers.0.mixer.in_proj.weight"
    source = sources.checkpoint["bidirectional_mamba"]["layers.0.mixer.in_proj.weight"]
    assert torch.equal(saved[name], source.bfloat16())


def corrupted_checkpoint(sources, folder, change) -> str:
    checkpoint = {part: dict(tensors) for part, tensors in sources.checkpoint.items()}
    change(checkpoint)
    path = folder / "corrupted.pt"
    torch.save({"model": checkpoint}, path)
    return path


def truncated(path, folder):
    data = path.read_bytes()
    target = folder / f"truncated{path.suffix}"
    target.write_bytes(data[: len(data) // 2])
    return target


def drop_key(checkpoint):
    del checkpoint["bidirectional_mamba"]["layers.1.mixer.D_b"]


def add_key(checkpoint):
    checkpoint["llm_backbone"]["backbone.layers.0.mixer.extra_weight"] = torch.zeros(3)


def transpose_projector(checkpoint):
    checkpoint["projector"]["projector.2.weight"] = checkpoint["projector"]["projector.2.weight"].T.contiguous()


def all_three(checkpoint):
    drop_key(checkpoint), add_key(checkpoint), transpose_projector(checkpoint)


def nan_and_inf(checkpoint):
    projector, backbone = checkpoint["projector"], checkpoint["llm_backbone"]
    projector["projector.0.weight"] = projector["projector.0.weight"].clone()
    projector["projector.0.weight"][:, 3] = torch.nan  # a whole column: 256 values
    backbone["backbone.norm_f.weight"] = backbone["backbone.norm_f.weight"].clone()
    backbone["backbone.norm_f.weight"][1] = -torch.inf


def huge_value(checkpoint):
    checkpoint["mlp"]["0.bias"] = checkpoint["mlp"]["0.bias"].clone()
    checkpoint["mlp"]["0.bias"][0] = 1e6  # float16 reaches 65504


MISSING = "model parameter model.connector.layers.1.mixer.directions.1.D has no source tensor"
EXTRA = "checkpoint llm_backbone 'backbone.layers.0.mixer.extra_weight' (3,) is not used"
SHAPE = ("model.projector.layers.2.weight (from checkpoint projector 'projector.2.weight') has shape (256, 64) but "
         "the model expects (64, 256)")
NAN = ("model.projector.layers.0.weight (from checkpoint projector 'projector.0.weight') holds 256 NaN or infinite "
       "value(s): the source is damaged")
INF = ("model.language_model.norm_f.weight (from checkpoint llm_backbone 'backbone.norm_f.weight') holds 1 NaN or "
       "infinite value(s)")
OVERFLOW = ("model.connector.input_proj.bias (from checkpoint mlp '0.bias') has 1 value(s) beyond the range of "
            "torch.float16 (largest magnitude 1e+06); choose --dtype float32 or bfloat16")


@pytest.mark.parametrize(
    "make_input, messages",
    [
        (lambda s, f: {"--checkpoint": corrupted_checkpoint(s, f, drop_key)}, [MISSING]),
        (lambda s, f: {"--checkpoint": corrupted_checkpoint(s, f, add_key)}, [EXTRA]),
        (lambda s, f: {"--checkpoint": corrupted_checkpoint(s, f, transpose_projector)}, [SHAPE]),
        (lambda s, f: {"--checkpoint": corrupted_checkpoint(s, f, all_three)}, [MISSING, EXTRA, SHAPE]),
        (lambda s, f: {"--checkpoint": truncated(s.folder / "latest-checkpoint.pt", f)}, ["is not a torch.save file"]),
        (lambda s, f: {"--siglip": truncated(s.folder / "siglip.safetensors", f)},
         ["cannot read the SigLIP checkpoint", "SafetensorError"]),
        (lambda s, f: {"--checkpoint": s.folder / "config.json"}, ["is not a torch.save file"]),
        (lambda s, f: {"--dino": s.folder / "latest-checkpoint.pt"},
         ["the DINOv2 checkpoint", "is not a flat state dict of tensors"]),
        (lambda s, f: {"--connector-config": json.dumps({**TINY_FLAGS["--connector-config"], "image_token_id": 126})},
         ["the tokenizer does not fit the model", "maps <image> to id 127"]),
        (lambda s, f: {"--checkpoint": corrupted_checkpoint(s, f, nan_and_inf)}, [NAN, INF]),
        (lambda s, f: {"--checkpoint": corrupted_checkpoint(s, f, huge_value), "--dtype": "float16"}, [OVERFLOW]),
    ],
    ids=["missing-key", "extra-key", "wrong-shape", "three-at-once", "truncated-checkpoint", "truncated-timm-file",
         "non-checkpoint-file", "checkpoint-as-timm-file", "placeholder-id-mismatch", "nan-and-inf",
         "float16-overflow"],
)
def test_corrupted_inputs_fail_clearly_and_write_nothing(sources, tmp_path, capsys, make_input, messages):
    output = tmp_path / "out" / "ml-mamba"
    assert main(cli_args(sources, output, **make_input(sources, tmp_path))) == 1
    error = capsys.readouterr().err
    for message in messages:
        assert message in error
    assert "Nothing was written" in error
    assert not output.exists()
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def partial_folders(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if ".partial-" in path.name)


def folder_contents(folder: Path) -> dict:
    return {path.name: path.read_bytes() if path.is_file() else folder_contents(path) for path in folder.iterdir()}


@pytest.fixture
def inputs_never_read(monkeypatch):
    """Fails the test if the conversion starts reading its inputs: argument checks must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("the conversion read its inputs before rejecting its arguments")

    monkeypatch.setattr(conversion.convert, "read_run_config", refuse)


def output_that_is_a_file(tmp_path, monkeypatch) -> Path:
    (tmp_path / "ml-mamba").write_text("not a folder")
    return tmp_path / "ml-mamba"


def output_inside_a_file(tmp_path, monkeypatch) -> Path:
    (tmp_path / "parent").write_text("not a folder")
    return tmp_path / "parent" / "ml-mamba"


def output_in_a_folder_refusing_writes(tmp_path, monkeypatch) -> Path:
    """`tmp_path` behaves as a folder this user may not write (root writes anywhere, so a chmod would not do)."""
    make_folder = Path.mkdir

    def mkdir(path, *args, **kwargs):
        if path.parent == tmp_path:
            raise PermissionError(13, "Permission denied", str(path))
        make_folder(path, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    return tmp_path / "ml-mamba"


def free_output(tmp_path, monkeypatch) -> Path:
    return tmp_path / "ml-mamba"


@pytest.mark.parametrize(
    "make_output, flags, message",
    [
        (output_that_is_a_file, {}, "already exists and is not an empty folder"),
        (output_inside_a_file, {}, "cannot write next to the output"),
        (output_in_a_folder_refusing_writes, {}, "cannot write next to the output"),
        (free_output, {"--max-shard-size": "5 gigabytes"}, "--max-shard-size '5 gigabytes' is not a size"),
        (free_output, {"--max-shard-size": "lots"}, "--max-shard-size 'lots' is not a size"),
        (free_output, {"--max-shard-size": "0GB"}, "--max-shard-size '0GB' must be larger than zero"),
    ],
    ids=["output-is-a-file", "parent-is-a-file", "parent-not-writable", "unit-spelt-out", "no-number", "zero"],
)
def test_bad_output_or_shard_size_fails_before_any_input_is_read(sources, tmp_path, monkeypatch, capsys,
                                                                  inputs_never_read, make_output, flags, message):
    output = make_output(tmp_path, monkeypatch)
    before = folder_contents(tmp_path)
    assert main(cli_args(sources, output, **flags)) == 1
    error = capsys.readouterr().err
    assert message in error and "Nothing was written" in error
    assert folder_contents(tmp_path) == before


def test_partial_folder_of_a_killed_run_is_removed_with_a_notice(sources, tmp_path, caplog):
    output = tmp_path / "ml-mamba"
    stale = tmp_path / ".ml-mamba.partial-0123456789ab"
    stale.mkdir()
    (stale / "model-00001-of-00002.safetensors").write_bytes(b"half a shard")
    other_output = tmp_path / ".other.partial-0123456789ab"
    other_output.mkdir()
    with caplog.at_level(logging.WARNING, logger="conversion.convert"):
        assert main(cli_args(sources, output)) == 0
    assert f"removing {stale}, the unfinished output of an earlier conversion that was killed" in caplog.text
    assert partial_folders(tmp_path) == [other_output.name]
    assert (output / "config.json").is_file()


def interrupt_with(how):
    """Wraps `load_validated_model`, the last step before writing, to be interrupted right after it."""
    def interrupted(*args, **kwargs):
        model = load_validated_model(*args, **kwargs)
        if how == "SIGTERM":
            os.kill(os.getpid(), signal.SIGTERM)
        else:
            raise KeyboardInterrupt
        return model

    return interrupted


@pytest.mark.parametrize("how, status", [("SIGTERM", 143), ("Ctrl-C", 130)])
def test_interrupted_conversion_removes_its_partial_folder(sources, tmp_path, monkeypatch, capsys, how, status):
    handler = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(conversion.convert, "load_validated_model", interrupt_with(how))
    output = tmp_path / "ml-mamba"
    assert main(cli_args(sources, output)) == status
    assert "interrupted" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is handler


def test_failure_while_writing_removes_the_partial_folder(sources, tmp_path, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(conversion.convert, "write_model_card", disk_full)
    with pytest.raises(OSError, match="No space left on device"):
        main(cli_args(sources, tmp_path / "ml-mamba"))
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_left_alone(sources, tmp_path, capsys):
    output = tmp_path / "ml-mamba"
    output.mkdir()
    (output / "notes.txt").write_text("mine")
    assert main(cli_args(sources, output)) == 1
    assert "already exists and is not an empty folder" in capsys.readouterr().err
    assert [path.name for path in output.iterdir()] == ["notes.txt"]


def test_push_to_hub_uploads_the_finished_folder(sources, tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    calls = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kwargs: calls.append(("create", repo_id, kwargs)))

    def upload_folder(self, repo_id, folder_path, **kwargs):
        calls.append(("upload", repo_id, sorted(path.name for path in Path(folder_path).iterdir())))

    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    output = tmp_path / "ml-mamba"
    assert main(cli_args(sources, output, **{"--push-to-hub": "someone/ml-mamba"})) == 0
    assert calls[0] == ("create", "someone/ml-mamba", {"exist_ok": True})
    assert calls[1][:2] == ("upload", "someone/ml-mamba")
    assert calls[1][2] == sorted(path.name for path in output.iterdir())


def connection_lost(self, **kwargs):
    raise ConnectionError("connection reset by peer")


def interrupted_upload(self, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize(
    "upload, message",
    [
        (connection_lost, "wrote {output}, but uploading it to someone/ml-mamba failed: ConnectionError: connection "
                          "reset by peer; upload the folder again with `hf upload someone/ml-mamba {output}`"),
        (interrupted_upload, "interrupted (SIGINT) while uploading; {output} was written completely but not uploaded: "
                             "upload it with `hf upload someone/ml-mamba {output}`"),
    ],
    ids=["upload-fails", "upload-interrupted"],
)
def test_upload_that_fails_after_a_complete_write_exits_with_status_3(sources, tmp_path, monkeypatch, capsys,
                                                                       upload, message):
    from huggingface_hub import HfApi

    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kwargs: None)
    monkeypatch.setattr(HfApi, "upload_folder", upload)
    output = tmp_path / "ml-mamba"
    assert main(cli_args(sources, output, **{"--push-to-hub": "someone/ml-mamba"})) == 3
    error = capsys.readouterr().err
    assert message.format(output=output) in error
    assert "Nothing was written" not in error
    loaded = AutoModelForImageTextToText.from_pretrained(output)
    assert torch.equal(loaded.lm_head.weight, sources.checkpoint["llm_backbone"]["backbone.embedding.weight"])
