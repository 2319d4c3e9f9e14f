"""Training: the collator's labels against the released chat layout, the stages, the dataset's start-up checks, a
few `transformers.Trainer` steps and the `examples/finetune.py` command line (the `Trainer` run itself is
tested in test_training_run.py).

Expected token ids and labels are computed here from the released text layout, tokenized in one piece with character
offsets, not turn by turn as the collator does.
"""

import io
import json
import logging
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_example, tiny_model, tiny_processor, tiny_tokenizer
from PIL import Image
from transformers import Trainer, TrainingArguments

from modeling_mlmamba import MLMambaConfig, MLMambaForConditionalGeneration, MLMambaModel, MLMambaProcessor
from modeling_mlmamba.shapes_vqa import (
    IMAGE_TOKEN_ID,
    TOKENIZER_VOCAB_SIZE,
    build_tokenizer,
    render,
    sample_scenes,
    scene_questions,
    write_dataset,
)
from modeling_mlmamba import training_run
from modeling_mlmamba.training import LlavaConversationDataset, MLMambaDataCollator, set_training_stage

IGNORE = -100
END = "<|endoftext|>"

# `MLMambaConfig.tiny()` as a plain JSON config file, the kind examples/configs/ holds.
TINY_CONFIG_FILE = dict(
    dino_config=dict(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=2, image_size=56, patch_size=14, layerscale_value=1.0
    ),
    siglip_config=dict(
        hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=2, image_size=56, patch_size=14
    ),
    text_config=dict(
        hidden_size=64, num_hidden_layers=2, state_size=16, head_dim=16, num_heads=8, chunk_size=8, vocab_size=128
    ),
    connector_state_size=16, connector_head_dim=16, connector_chunk_size=8, image_token_id=127,
)


@pytest.fixture(scope="module")
def processor():
    """A byte-level tokenizer (it encodes the `\\n` separators, which the word-level test tokenizer drops)
    over a tiny config whose image token and vocabulary match it."""
    config = MLMambaConfig.tiny(image_token_id=IMAGE_TOKEN_ID, text_config=dict(vocab_size=TOKENIZER_VOCAB_SIZE))
    return MLMambaProcessor.from_model_config(config, build_tokenizer())


@pytest.fixture(scope="module")
def images():
    return [render(scene) for scene in sample_scenes(3, 0, "train")]


def llava(turns, image_turn=0) -> list[dict]:
    """LLaVA turns for (question, answer) pairs, `<image>\\n` in front of question `image_turn` (None: no image)."""
    conversations = []
    for index, (question, answer) in enumerate(turns):
        prefix = "<image>\n" if index == image_turn else ""
        conversations += [{"from": "human", "value": prefix + question}, {"from": "gpt", "value": answer}]
    return conversations


def spec_encoding(processor, turns, image_turn=0) -> tuple[list[int], list[int]]:
    """The released layout: `<|user|>\\n{q}<|endoftext|>\\n<|assistant|>\\n{a}<|endoftext|>`, later turns after
    `\\n`, the image's placeholder positions first in their turn; only each answer and its closing end-of-text
    supervised."""
    text, supervised = "", []
    for index, (question, answer) in enumerate(turns):
        text += "\n" if index else ""
        text += "<image>" * processor.image_seq_length if index == image_turn else ""
        text += f"<|user|>\n{question}{END}\n<|assistant|>\n"
        supervised.append((len(text), len(text) + len(answer + END)))
        text += answer + END
    encoding = processor.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = []
    for token, (start, end) in zip(encoding["input_ids"], encoding["offset_mapping"]):
        inside = any(first <= start and end <= last for first, last in supervised)
        assert inside or not any(first < end and start < last for first, last in supervised)  # no straddling
        labels.append(token if inside else IGNORE)
    return encoding["input_ids"], labels


def supervised_runs(labels: list[int]) -> list[list[int]]:
    runs, current = [], []
    for label in labels + [IGNORE]:
        if label != IGNORE:
            current.append(label)
        elif current:
            runs.append(current)
            current = []
    return runs


# --- collator: labels -------------------------------------------------------------------------------------


def test_single_turn_labels_supervise_only_the_answer_and_its_end_of_text(processor, images):
    turns = [("What color is the circle?", "red")]
    batch = MLMambaDataCollator(processor)([{"image": images[0], "conversations": llava(turns)}])
    ids, labels = spec_encoding(processor, turns)
    assert batch["input_ids"].tolist() == [ids]
    assert batch["labels"].tolist() == [labels]
    assert batch["attention_mask"].tolist() == [[1] * len(ids)]
    n = processor.image_seq_length
    assert ids[:n] == [IMAGE_TOKEN_ID] * n and IMAGE_TOKEN_ID not in ids[n:]
    assert [processor.tokenizer.decode(run) for run in supervised_runs(labels)] == ["red" + END]
    assert batch["pixel_values"].shape == (1, 2, 3, processor.image_size, processor.image_size)


def test_single_turn_input_ids_are_the_processor_prompt_followed_by_the_answer(processor, images):
    sample = {"image": images[0], "conversations": llava([("How many objects are there?", "two")])}
    batch = MLMambaDataCollator(processor)([sample])
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many objects are there?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[images[0]], text=prompt, return_tensors="pt")
    answer = processor.tokenizer("two" + END, add_special_tokens=False)["input_ids"]
    assert batch["input_ids"][0].tolist() == inputs["input_ids"][0].tolist() + answer
    assert batch["labels"][0].tolist() == [IGNORE] * inputs["input_ids"].shape[1] + answer
    assert torch.equal(batch["pixel_values"], inputs["pixel_values"])


def test_multi_turn_labels_supervise_every_answer_and_its_end_of_text(processor, images):
    turns = [("What color is the circle?", "red"), ("Is the circle above the square?", "no"),
             ("How many objects are there?", "a red circle and two squares")]
    ids, labels = spec_encoding(processor, turns)
    batch = MLMambaDataCollator(processor)([{"image": images[1], "conversations": llava(turns)}])
    assert batch["input_ids"][0].tolist() == ids
    assert batch["labels"][0].tolist() == labels
    decoded = [processor.tokenizer.decode(run) for run in supervised_runs(labels)]
    assert decoded == ["red" + END, "no" + END, "a red circle and two squares" + END]
    newline = processor.tokenizer.convert_tokens_to_ids("Ċ")
    assert ids.count(newline) == 3 * 3 + 2  # after <|user|>, the question and <|assistant|>; between turns
    assert all(label == IGNORE for token, label in zip(ids, labels) if token in (newline, IMAGE_TOKEN_ID))
    user, assistant = processor.tokenizer.convert_tokens_to_ids(["<|user|>", "<|assistant|>"])
    assert all(label == IGNORE for token, label in zip(ids, labels) if token in (user, assistant))


def test_sample_without_image_has_no_placeholders_and_no_pixels(processor):
    turns = [("Is there a square in the image?", "yes"), ("What color is the square?", "blue")]
    batch = MLMambaDataCollator(processor)([{"image": None, "conversations": llava(turns, image_turn=None)}])
    ids, labels = spec_encoding(processor, turns, image_turn=None)
    assert batch["input_ids"][0].tolist() == ids and batch["labels"][0].tolist() == labels
    assert IMAGE_TOKEN_ID not in ids
    assert "pixel_values" not in batch


def test_image_without_placeholder_goes_to_the_first_turn(processor, images):
    turns = [("What color is the circle?", "red"), ("What shape is the red object?", "circle")]
    batch = MLMambaDataCollator(processor)([{"image": images[0], "conversations": llava(turns, image_turn=None)}])
    ids, labels = spec_encoding(processor, turns, image_turn=0)
    assert batch["input_ids"][0].tolist() == ids and batch["labels"][0].tolist() == labels


def test_image_placeholder_in_a_later_turn_places_the_image_there(processor, images):
    turns = [("Is there a circle in the image?", "yes"), ("What color is the circle?", "green")]
    batch = MLMambaDataCollator(processor)([{"image": images[0], "conversations": llava(turns, image_turn=1)}])
    ids, labels = spec_encoding(processor, turns, image_turn=1)
    assert batch["input_ids"][0].tolist() == ids and batch["labels"][0].tolist() == labels
    assert ids.index(IMAGE_TOKEN_ID) > 0


def test_mixed_batch_is_left_padded_and_carries_pixels_only_for_samples_with_images(processor, images):
    cases = [
        ([("What color is the circle?", "red")], 0, images[0]),
        ([("Is there a square in the image?", "no"), ("How many objects are there?", "one"),
          ("Is the circle above the triangle?", "yes")], None, None),
        ([("What shape is the blue object?", "triangle")], 0, images[2]),
    ]
    samples = [{"image": image, "conversations": llava(turns, where)} for turns, where, image in cases]
    batch = MLMambaDataCollator(processor)(samples)
    expected = [spec_encoding(processor, turns, where) for turns, where, _ in cases]
    longest = max(len(ids) for ids, _ in expected)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, longest)
    for row, (ids, labels) in enumerate(expected):
        pad = longest - len(ids)
        assert batch["input_ids"][row].tolist() == [0] * pad + ids
        assert batch["labels"][row].tolist() == [IGNORE] * pad + labels
        assert batch["attention_mask"][row].tolist() == [0] * pad + [1] * len(ids)
    assert min(longest - len(ids) for ids, _ in expected) == 0 < max(longest - len(ids) for ids, _ in expected)
    size = processor.image_size
    assert batch["pixel_values"].shape == (2, 2, 3, size, size)
    assert torch.equal(batch["pixel_values"], torch.from_numpy(processor.preprocess_images([images[0], images[2]])))


def test_batch_of_text_only_samples_has_no_pixel_values(processor):
    samples = [{"image": None, "conversations": llava([("How many objects are there?", "two")], None)}] * 2
    assert set(MLMambaDataCollator(processor)(samples)) == {"input_ids", "attention_mask", "labels"}


def test_placeholder_without_an_image_raises_naming_the_count(processor, images):
    sample = {"image": None, "conversations": llava([("What color is the circle?", "red")])}
    with pytest.raises(ValueError, match="1 <image> placeholder\\(s\\) but 0 image"):
        MLMambaDataCollator(processor)([sample])
    two = llava([("What color is the circle?", "red"), ("<image>\nAnd now?", "blue")])
    with pytest.raises(ValueError, match="2 <image> placeholder\\(s\\) but 1 image"):
        MLMambaDataCollator(processor)([{"image": images[0], "conversations": two}])


# --- collator: truncation -----------------------------------------------------------------------------------


def test_over_long_sample_is_cut_to_max_length_with_a_warning(processor, caplog):
    turns = [("Is there a square in the image?", "yes"), ("What color is the square?", "blue")]
    ids, labels = spec_encoding(processor, turns, image_turn=None)
    max_length = len(ids) - 3
    with caplog.at_level(logging.WARNING, logger="modeling_mlmamba.training"):
        batch = MLMambaDataCollator(processor, max_length=max_length)(
            [{"image": None, "conversations": llava(turns, None)}]
        )
    assert batch["input_ids"][0].tolist() == ids[:max_length]
    assert batch["labels"][0].tolist() == labels[:max_length]
    assert any(r.levelno == logging.WARNING and f"cut to max_length={max_length}" in r.getMessage()
               for r in caplog.records)


def test_cut_inside_an_image_drops_the_image_and_all_its_placeholders(processor, images, caplog):
    turns = [("Is there a circle in the image?", "yes"), ("What color is the circle?", "green")]
    with_image, _ = spec_encoding(processor, turns, image_turn=1)
    text_ids, text_labels = spec_encoding(processor, turns, image_turn=None)
    before_image = with_image.index(IMAGE_TOKEN_ID)
    max_length = before_image + 5
    with caplog.at_level(logging.WARNING, logger="modeling_mlmamba.training"):
        batch = MLMambaDataCollator(processor, max_length=max_length)(
            [{"image": images[0], "conversations": llava(turns, image_turn=1)}]
        )
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    assert IMAGE_TOKEN_ID not in ids and "pixel_values" not in batch
    assert before_image <= len(ids) <= max_length
    assert ids == text_ids[: len(ids)] and labels == text_labels[: len(ids)]
    assert any("image is dropped" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    config = MLMambaConfig.tiny(image_token_id=IMAGE_TOKEN_ID, text_config=dict(vocab_size=TOKENIZER_VOCAB_SIZE))
    torch.manual_seed(0)
    loss = MLMambaForConditionalGeneration(config)(**batch).loss
    assert math.isfinite(loss.item())


def test_cut_inside_a_leading_image_keeps_a_trainable_text_sample(processor, images, caplog):
    """max_length below the image's length: the image cannot fit, so the sample goes on without it, and the
    model still trains on it (instead of receiving an empty sequence)."""
    turns = [("How many objects are there?", "three")]
    text_ids, _ = spec_encoding(processor, turns, image_turn=None)
    max_length = processor.image_seq_length - 6
    assert max_length < len(text_ids)
    with caplog.at_level(logging.WARNING, logger="modeling_mlmamba.training"):
        batch = MLMambaDataCollator(processor, max_length=max_length)(
            [{"image": images[0], "conversations": llava(turns)}]
        )
    ids = batch["input_ids"][0].tolist()
    assert IMAGE_TOKEN_ID not in ids and "pixel_values" not in batch
    assert 0 < len(ids) <= max_length and ids == text_ids[: len(ids)]
    config = MLMambaConfig.tiny(image_token_id=IMAGE_TOKEN_ID, text_config=dict(vocab_size=TOKENIZER_VOCAB_SIZE))
    torch.manual_seed(0)
    logits = MLMambaForConditionalGeneration(config)(**batch).logits
    assert logits.shape[:2] == batch["input_ids"].shape and torch.isfinite(logits).all()


def test_cut_never_splits_an_image_placeholder_block(processor, images):
    """At every max_length a sample keeps all its image's placeholders and the image, or none and no image, and
    its text is the uncut text's start."""
    turns = [("Is there a circle in the image?", "yes"), ("What color is the circle?", "green")]
    with_image, image_labels = spec_encoding(processor, turns, image_turn=1)
    text_ids, text_labels = spec_encoding(processor, turns, image_turn=None)
    sample = {"image": images[0], "conversations": llava(turns, image_turn=1)}
    for max_length in range(1, len(with_image) + 1):
        batch = MLMambaDataCollator(processor, max_length=max_length)([sample])
        ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
        if "pixel_values" in batch:
            assert ids.count(IMAGE_TOKEN_ID) == processor.image_seq_length, max_length
            assert (ids, labels) == (with_image[:max_length], image_labels[:max_length])
        else:
            assert IMAGE_TOKEN_ID not in ids, max_length
            assert (ids, labels) == (text_ids[: len(ids)], text_labels[: len(ids)]) and len(ids) <= max_length
    assert "pixel_values" in MLMambaDataCollator(processor, max_length=len(with_image) - 1)([sample])


def test_sample_whose_answers_are_all_cut_away_is_reported_by_its_index(processor, caplog):
    turns = [("Is there a square in the image? How many objects are there?", "yes")]
    ids, labels = spec_encoding(processor, turns, image_turn=None)
    first_answer = next(position for position, label in enumerate(labels) if label != IGNORE)
    sample = {"image": None, "conversations": llava(turns, None), "index": 41}
    with caplog.at_level(logging.WARNING, logger="modeling_mlmamba.training"):
        batch = MLMambaDataCollator(processor, max_length=first_answer)([sample])
    assert batch["labels"].eq(IGNORE).all()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert f"training sample 41 keeps no answer token after the cut to max_length={first_answer}: it trains on " \
           "nothing; raise max_length or shorten the sample's first question" in warnings
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="modeling_mlmamba.training"):
        MLMambaDataCollator(processor, max_length=first_answer + 1)([sample])
    assert not any("keeps no answer token" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("max_length", [0, -3, 2.5])
def test_collator_rejects_a_max_length_that_is_not_a_positive_integer(processor, max_length):
    with pytest.raises(ValueError, match=f"max_length must be a positive number of tokens .*got {max_length}"):
        MLMambaDataCollator(processor, max_length=max_length)


def test_placeholder_in_an_answer_raises_instead_of_dropping_the_image(processor, images):
    conversations = [{"from": "human", "value": "What color is it?"}, {"from": "gpt", "value": "<image> red"}]
    with pytest.raises(ValueError, match="turn 1 is an answer \\(gpt\\) holding <image>; put it in a human turn"):
        MLMambaDataCollator(processor)([{"image": images[0], "conversations": conversations}])


# --- training stages ----------------------------------------------------------------------------------------

STAGE_PREFIXES = {
    "align": ("model.connector.", "model.projector."),
    "finetune": ("model.connector.", "model.projector.", "model.language_model.", "lm_head."),
    "full": ("model.connector.", "model.projector.", "model.language_model.", "lm_head.", "model.vision_tower."),
}


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("stage", sorted(STAGE_PREFIXES))
def test_training_stage_makes_exactly_its_modules_trainable(stage, tied):
    model = tiny_model(tie_word_embeddings=tied, text_config=dict(tie_word_embeddings=tied))
    set_training_stage(model, "full" if stage != "full" else "align")  # a previous stage must not leak
    count = set_training_stage(model, stage)
    names = [name for name, _ in model.named_parameters(remove_duplicate=False)]
    assert {name.split(".")[0] + "." + name.split(".")[1] for name in names if name.startswith("model.")} == {
        "model.vision_tower", "model.connector", "model.projector", "model.language_model"
    }  # no parameter outside the four modules and the head
    assert ("lm_head.weight" in dict(model.named_parameters())) == (not tied)
    for name, parameter in model.named_parameters(remove_duplicate=False):
        assert parameter.requires_grad == name.startswith(STAGE_PREFIXES[stage]), name
    modules = [model.model.connector, model.model.projector]
    if stage != "align":
        modules += [model.model.language_model, model.lm_head]
    if stage == "full":
        modules.append(model.model.vision_tower)
    intended = {id(p): p.numel() for module in modules for p in module.parameters()}
    assert count == sum(intended.values()) == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_training_stage_works_on_the_base_model():
    base = tiny_model().model
    assert isinstance(base, MLMambaModel)
    count = set_training_stage(base, "finetune")
    assert not any(p.requires_grad for p in base.vision_tower.parameters())
    assert all(p.requires_grad for p in base.language_model.parameters())
    assert count == sum(p.numel() for name in ("connector", "projector", "language_model")
                        for p in getattr(base, name).parameters())


def test_unknown_training_stage_raises_naming_the_choices():
    with pytest.raises(ValueError, match="unknown training stage 'lora'.*'align', 'finetune', 'full'"):
        set_training_stage(tiny_model(), "lora")


# --- dataset ------------------------------------------------------------------------------------------------


def write_json(path: Path, records) -> Path:
    path.write_text(json.dumps(records))
    return path


def good_record(image="a.png"):
    record = {"conversations": llava([("What color is the circle?", "red")], image_turn=0 if image else None)}
    return {"image": image, **record} if image else record


def test_dataset_reads_samples_with_and_without_images(tmp_path, images):
    images[0].save(tmp_path / "a.png")
    data = write_json(tmp_path / "data.json", [good_record(), good_record(image=None)])
    dataset = LlavaConversationDataset(data)
    assert len(dataset) == 2 and dataset.skipped == []
    first, second = dataset[0], dataset[1]
    assert first["image"].mode == "RGB" and first["image"].size == (128, 128)
    assert first["conversations"] == good_record()["conversations"] and first["index"] == 0
    assert second["image"] is None and second["index"] == 1
    elsewhere = tmp_path / "json"
    elsewhere.mkdir()
    moved = write_json(elsewhere / "data.json", [good_record()])
    assert LlavaConversationDataset(moved, image_folder=tmp_path)[0]["image"].size == (128, 128)


def test_dataset_image_folder_that_does_not_exist_raises(tmp_path):
    data = write_json(tmp_path / "data.json", [good_record()])
    with pytest.raises(FileNotFoundError, match="image_folder .*elsewhere is not a folder"):
        LlavaConversationDataset(data, image_folder=tmp_path / "elsewhere")


def test_dataset_missing_data_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.json does not exist"):
        LlavaConversationDataset(tmp_path / "nowhere.json")


def test_dataset_invalid_json_raises(tmp_path):
    (tmp_path / "bad.json").write_text('[{"conversations": [}')
    with pytest.raises(ValueError, match="bad.json is not valid JSON: .*line 1 column 21"):
        LlavaConversationDataset(tmp_path / "bad.json")


def test_dataset_file_that_is_not_utf8_raises_naming_the_encoding(tmp_path):
    (tmp_path / "latin1.json").write_bytes(json.dumps([good_record(None)]).replace("red", "rouge é").encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.json is not UTF-8 text .*re-save it as UTF-8"):
        LlavaConversationDataset(tmp_path / "latin1.json")


def test_dataset_file_with_a_utf8_byte_order_mark_reads(tmp_path):
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps([good_record(None)]).encode())
    assert len(LlavaConversationDataset(tmp_path / "bom.json")) == 1


@pytest.mark.parametrize("records", [{}, [], {"conversations": []}], ids=["object", "empty", "one-sample"])
def test_dataset_that_is_not_a_list_of_samples_raises(tmp_path, records):
    with pytest.raises(ValueError, match="non-empty JSON list"):
        LlavaConversationDataset(write_json(tmp_path / "data.json", records))


def bad_samples_error(data: Path, **kwargs) -> str:
    with pytest.raises(ValueError) as error:
        LlavaConversationDataset(data, **kwargs)
    return str(error.value)


@pytest.mark.parametrize(
    "record, message",
    [
        ({"image": "a.png"}, "sample 1 (image 'a.png'): malformed sample: it must be an object with a "
                             "'conversations' list"),
        ({"conversations": []}, "sample 1: malformed sample: it must have human/gpt turn pairs, got 0 turns"),
        ({"conversations": [{"from": "human", "value": "hi"}]},
         "sample 1: malformed sample: it must have human/gpt turn pairs, got 1 turns"),
        ({"conversations": [{"from": "gpt", "value": "hi"}, {"from": "human", "value": "yes"}]},
         "sample 1: malformed sample: turn 0 must be {'from': 'human', 'value': str}"),
        ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt"}]},
         "sample 1: malformed sample: turn 1 must be {'from': 'gpt', 'value': str}"),
        ({"image": 7, **good_record(None)}, "sample 1: malformed sample: 'image' must be a non-empty path, got 7"),
    ],
    ids=["no-conversations", "no-turns", "odd-turns", "wrong-role", "no-value", "image-not-a-path"],
)
def test_dataset_malformed_turns_raise_naming_the_sample(tmp_path, images, record, message):
    images[0].save(tmp_path / "a.png")
    error = bad_samples_error(write_json(tmp_path / "data.json", [good_record(), record]))
    assert "1 of 2 samples of" in error and message in error and "fix: give it a 'conversations' list" in error


def test_dataset_missing_image_is_reported_with_its_path_and_the_fix(tmp_path, images):
    images[0].save(tmp_path / "a.png")
    error = bad_samples_error(write_json(tmp_path / "data.json", [good_record(), good_record("missing.png")]))
    assert f"sample 1 (image 'missing.png'): missing image: {tmp_path / 'missing.png'} does not exist" in error
    assert "fix: put the file under the image folder or correct the path" in error


def image_files(folder: Path, images) -> dict[str, str]:
    """Broken image files next to a good one, by case: name -> the problem each must be reported as."""
    images[0].save(folder / "a.png")
    png, jpeg = (folder / "a.png").read_bytes(), io.BytesIO()
    images[0].save(jpeg, format="JPEG")
    (folder / "truncated.png").write_bytes(png[: len(png) // 2])
    (folder / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (folder / "text.png").write_text("not an image")
    (folder / "empty.png").write_bytes(b"")
    return {"truncated.png": "unreadable image: OSError: image file is truncated",
            "truncated.jpg": "unreadable image: OSError: image file is truncated",
            "text.png": "unreadable image: UnidentifiedImageError: cannot identify image file",
            "empty.png": "unreadable image: UnidentifiedImageError: cannot identify image file"}


@pytest.mark.parametrize("name", ["truncated.png", "truncated.jpg", "text.png", "empty.png"])
def test_dataset_broken_image_file_is_reported_at_construction(tmp_path, images, name):
    problem = image_files(tmp_path, images)[name]
    error = bad_samples_error(write_json(tmp_path / "data.json", [good_record(), good_record(name)]))
    assert f"sample 1 (image '{name}'): {problem}" in error
    assert "fix: re-download or re-encode the file (it must decode completely with PIL)" in error


@pytest.mark.parametrize("limit", [16 * 16 - 1, 16 * 16 // 2 - 1], ids=["over-the-limit", "over-twice-the-limit"])
def test_dataset_image_over_the_decompression_bomb_limit_is_reported(tmp_path, monkeypatch, limit):
    """PIL warns above `MAX_IMAGE_PIXELS` and refuses to open above twice that; both are reported."""
    Image.new("RGB", (16, 16), "red").save(tmp_path / "big.png")
    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    error = bad_samples_error(write_json(tmp_path / "data.json", [good_record(), good_record("big.png")]))
    assert "sample 1 (image 'big.png'): image too large: " in error and "decompression bomb" in error
    assert f"PIL.Image.MAX_IMAGE_PIXELS = {limit})" in error or f"PIL.Image.MAX_IMAGE_PIXELS = {limit};" in error
    assert "1 of 2 samples" in error and "fix: downscale the file, or raise PIL.Image.MAX_IMAGE_PIXELS" in error


def test_dataset_image_paths_escaping_the_image_folder_are_reported(tmp_path, images):
    folder = tmp_path / "images"
    folder.mkdir()
    images[0].save(folder / "a.png")
    images[1].save(tmp_path / "outside.png")
    records = [good_record(), good_record("../outside.png"), good_record(str(tmp_path / "outside.png")),
               good_record(str(folder / "a.png"))]
    error = bad_samples_error(write_json(tmp_path / "data.json", records), image_folder=folder)
    assert "2 of 4 samples" in error
    for index, name in [(1, "../outside.png"), (2, str(tmp_path / "outside.png"))]:
        assert (f"sample {index} (image '{name}'): image outside image_folder: {tmp_path / 'outside.png'} is not "
                f"inside {folder}") in error
    assert "sample 3" not in error  # an absolute path inside the folder is fine


def test_dataset_follows_symbolic_links_inside_the_image_folder(tmp_path, images):
    (tmp_path / "store").mkdir()
    images[0].save(tmp_path / "store" / "a.png")
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "linked").symlink_to(tmp_path / "store")
    data = write_json(tmp_path / "data.json", [good_record("linked/a.png")])
    assert LlavaConversationDataset(data, image_folder=tmp_path / "images")[0]["image"].size == (128, 128)


@pytest.mark.parametrize(
    "turns, image, message",
    [
        ([("<image>\nWhat color is it?", "red")], None, "the conversation has 1 <image> placeholder(s) but 0 image"),
        ([("<image>\nWhat color is it?", "red"), ("<image>\nAnd now?", "blue")], "a.png",
         "the conversation has 2 <image> placeholder(s) but 1 image"),
        ([("What color is it?", "<image> red")], "a.png", "turn 1 is an answer (gpt) holding <image>"),
    ],
    ids=["placeholder-without-image", "two-placeholders-one-image", "placeholder-in-an-answer"],
)
def test_dataset_placeholders_that_do_not_match_the_image_are_reported(tmp_path, images, turns, image, message):
    images[0].save(tmp_path / "a.png")
    conversations = [{"from": role, "value": text} for turn in turns for role, text in zip(("human", "gpt"), turn)]
    record = {"conversations": conversations, **({"image": image} if image else {})}
    error = bad_samples_error(write_json(tmp_path / "data.json", [good_record(), record]))
    assert f"sample 1{f' (image {image!r})' if image else ''}: image placeholders: {message}" in error
    assert "fix: put exactly one <image> in a human turn of a sample with an image" in error


def test_dataset_text_that_cannot_be_encoded_is_reported(tmp_path, images):
    """A JSON escape of half a surrogate pair loads as a Python string that no tokenizer can encode."""
    images[0].save(tmp_path / "a.png")
    data = tmp_path / "data.json"
    data.write_text(json.dumps([good_record()])[:-1] + ', {"conversations": [{"from": "human", "value": "hi"}, '
                    '{"from": "gpt", "value": "smile \\ud83d"}]}]')
    error = bad_samples_error(data)
    assert "sample 1: invalid text: turn 1, character 6: surrogates not allowed" in error
    assert "fix: repair the text at that position (it must be valid Unicode" in error


def test_dataset_error_lists_the_first_five_bad_samples_and_counts_them_by_problem(tmp_path, images):
    image_files(tmp_path, images)
    records = [good_record("missing.png")] * 4 + [good_record()] + [good_record("text.png")] * 3
    error = bad_samples_error(write_json(tmp_path / "data.json", records))
    assert error.startswith(f"7 of 8 samples of {tmp_path / 'data.json'} cannot be trained on (missing image: 4, "
                            "unreadable image: 3); fix or remove them, or pass skip_bad_samples=True")
    listed = [line.split(" (")[0].strip() for line in error.splitlines()[1:6]]
    assert listed == ["sample 0", "sample 1", "sample 2", "sample 3", "sample 5"]
    assert error.splitlines()[-1] == "  ... and 2 more"


def test_dataset_skip_bad_samples_trains_on_the_rest_and_reports_them(tmp_path, images, caplog):
    problems = image_files(tmp_path, images)
    names = ["a.png", "truncated.png", "a.png", "missing.png", "text.png", None]
    data = write_json(tmp_path / "data.json", [good_record(name) for name in names])
    with caplog.at_level(logging.WARNING, logger="modeling_mlmamba.training"):
        dataset = LlavaConversationDataset(data, skip_bad_samples=True)
    assert len(dataset) == 3 and [dataset[i]["index"] for i in range(3)] == [0, 2, 5]
    assert [dataset[i]["image"] is None for i in range(3)] == [False, False, True]
    assert [(bad.index, bad.image, bad.problem) for bad in dataset.skipped] == [
        (1, "truncated.png", "unreadable image"), (3, "missing.png", "missing image"),
        (4, "text.png", "unreadable image"),
    ]
    assert problems["truncated.png"].split(": ", 1)[1] in dataset.skipped[0].detail
    [warning] = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert warning.startswith(f"skipped 3 of 6 samples of {data} (unreadable image: 2, missing image: 1):")
    assert "sample 3 (image 'missing.png'): missing image" in warning


def test_dataset_skip_bad_samples_still_raises_when_no_sample_is_left(tmp_path):
    data = write_json(tmp_path / "data.json", [good_record("missing.png")])
    assert "no sample is left to train on" in bad_samples_error(data, skip_bad_samples=True)


def test_dataset_checks_each_image_file_once(tmp_path, images, monkeypatch):
    images[0].save(tmp_path / "a.png")
    opened, original = [], Image.open

    def recording_open(path, *args, **kwargs):
        opened.append(Path(path).name)
        return original(path, *args, **kwargs)

    monkeypatch.setattr(Image, "open", recording_open)
    LlavaConversationDataset(write_json(tmp_path / "data.json", [good_record()] * 5))
    assert opened == ["a.png"]


def test_dataset_keeps_a_16_bit_image_for_the_processor_to_convert(tmp_path):
    """Training and inference read images one way: the dataset returns the file's image as it is and the collator
    hands it to `processor.preprocess_images`; a 16-bit PNG scales by 1/257 there, where `convert("RGB")`
    would clip it to white."""
    gradient = np.linspace(0, 65535, 56 * 56).reshape(56, 56).astype(np.uint16)
    Image.fromarray(gradient).save(tmp_path / "deep.png")
    data = write_json(tmp_path / "data.json", [good_record("deep.png")])
    sample = LlavaConversationDataset(data)[0]
    assert sample["image"].mode in ("I;16", "I")  # how Pillow opens a 16-bit PNG depends on its version
    processor = tiny_processor()
    batch = MLMambaDataCollator(processor)([sample])
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the circle?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    with Image.open(tmp_path / "deep.png") as image:
        at_inference = processor(images=[image], text=prompt, return_tensors="pt")["pixel_values"]
        clipped = torch.from_numpy(processor.preprocess_images([image.convert("RGB")]))
    assert torch.equal(batch["pixel_values"], at_inference)
    assert not torch.allclose(batch["pixel_values"], clipped, atol=0.1)


# --- a few Trainer steps ------------------------------------------------------------------------------------


def shapes_samples(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    samples = []
    for scene in sample_scenes(count, seed, "train"):
        questions = rng.sample(scene_questions(scene), 2)
        turns = [(question.text, question.answer) for question in questions]
        samples.append({"image": render(scene), "conversations": llava(turns)})
    return samples


def test_trainer_steps_lower_the_loss_of_a_fixed_batch(tmp_path):
    processor = tiny_processor()
    collator = MLMambaDataCollator(processor)
    samples = shapes_samples(8, seed=0)
    fixed_batch = collator(samples)
    assert (fixed_batch["labels"] != IGNORE).sum() > 0
    model = tiny_model(seed=0)

    def batch_loss() -> float:
        model.eval()
        with torch.no_grad():
            return model(**fixed_batch).loss.item()

    before = batch_loss()
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=4, learning_rate=3e-3,
        lr_scheduler_type="constant", remove_unused_columns=False, report_to="none", use_cpu=True, seed=0,
        save_strategy="no", logging_steps=1, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=samples, data_collator=collator)
    trainer.train()
    after = batch_loss()
    assert trainer.state.global_step == 8
    assert len([entry for entry in trainer.state.log_history if "loss" in entry]) == 8
    assert after < 0.8 * before, (before, after)


# --- examples/finetune.py -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finetune():
    return load_example("finetune")


@pytest.fixture
def workspace(tmp_path):
    """A tiny config file, the matching tokenizer (`<image>` at 127) and four shapes-vqa samples on disk."""
    (tmp_path / "config.json").write_text(json.dumps(TINY_CONFIG_FILE))
    tiny_tokenizer().save_pretrained(tmp_path / "tokenizer")
    data = write_dataset(tmp_path / "data", num_images=4, seed=0, max_turns=2)
    return tmp_path, data


def finetune_args(workspace, output: str, *extra: str) -> list[str]:
    folder, data = workspace
    return [
        "--config_file", str(folder / "config.json"), "--tokenizer", str(folder / "tokenizer"),
        "--data_file", str(data), "--output_dir", str(folder / output), "--per_device_train_batch_size", "2",
        "--use_cpu", "--report_to", "none", "--disable_tqdm", "true", "--seed", "0", *extra,
    ]


class NoTrainer:
    def __init__(self, *args, **kwargs):
        raise AssertionError("a Trainer was built: the error must come before any training")


def test_finetune_trains_and_writes_a_loadable_model_with_processor_and_card(finetune, workspace):
    trainer = finetune.main(finetune_args(workspace, "out", "--max_steps", "2", "--stage", "full",
                                          "--save_strategy", "no"))
    assert trainer.state.global_step == 2
    output = workspace[0] / "out"
    model = MLMambaForConditionalGeneration.from_pretrained(output)
    tiny = MLMambaConfig.tiny()
    for name in ("connector_type", "connector_scan", "projector_type", "image_token_id", "image_seq_length"):
        assert getattr(model.config, name) == getattr(tiny, name), name
    assert model.config.text_config.hidden_size == tiny.text_config.hidden_size
    trained = trainer.model.state_dict()
    assert all(torch.equal(value, trained[key]) for key, value in model.state_dict().items())
    processor = MLMambaProcessor.from_pretrained(output)
    assert (processor.image_seq_length, processor.image_token_id, processor.image_size) == (16, 127, 56)
    sample = LlavaConversationDataset(workspace[1])[0]
    batch = MLMambaDataCollator(processor)([sample])
    assert math.isfinite(model(**batch).loss.item())
    card = (output / "README.md").read_text()
    assert "ml-mamba" in card and "stage `full`" in card and "train.json" in card


def test_finetune_checkpoints_every_n_th_block_from_the_training_arguments(finetune, workspace):
    """The README's faster setting on one large GPU: `--gradient_checkpointing_kwargs '{"every_n_layers": 2}'`."""
    trainer = finetune.main(finetune_args(workspace, "out", "--max_steps", "1", "--save_strategy", "no",
                                          "--gradient_checkpointing", "--gradient_checkpointing_kwargs",
                                          '{"every_n_layers": 2}'))
    assert trainer.state.global_step == 1
    flags = [bool(block.gradient_checkpointing) for block in trainer.model.model.language_model.layers]
    assert flags.count(True) == len(flags) // 2 and all(a != b for a, b in zip(flags, flags[1:]))


def test_finetune_align_stage_changes_only_connector_and_projector(finetune, workspace, monkeypatch):
    initial = {}
    original = finetune.set_training_stage

    def record_then_set(model, stage):
        initial.update({key: value.clone() for key, value in model.state_dict().items()})
        return original(model, stage)

    monkeypatch.setattr(finetune, "set_training_stage", record_then_set)
    trainer = finetune.main(finetune_args(workspace, "out", "--max_steps", "2", "--stage", "align",
                                          "--learning_rate", "1e-2", "--save_strategy", "no"))
    final = trainer.model.state_dict()
    changed = {key for key, value in final.items() if not torch.equal(value, initial[key])}
    assert changed and all(key.startswith(("model.connector.", "model.projector.")) for key in changed)
    assert any(key.startswith("model.connector.") for key in changed)
    assert any(key.startswith("model.projector.") for key in changed)


def test_finetune_unknown_stage_fails_at_argument_parsing(finetune, workspace, monkeypatch, capsys):
    monkeypatch.setattr(training_run, "Trainer", NoTrainer)
    with pytest.raises(SystemExit) as exit_info:
        finetune.main(finetune_args(workspace, "out", "--stage", "lora"))
    assert exit_info.value.code == 2
    assert "invalid choice: 'lora'" in capsys.readouterr().err


def test_finetune_missing_data_file_raises_before_training(finetune, workspace, monkeypatch):
    monkeypatch.setattr(training_run, "Trainer", NoTrainer)
    args = finetune_args(workspace, "out", "--max_steps", "1")
    args[args.index("--data_file") + 1] = str(workspace[0] / "missing.json")
    with pytest.raises(FileNotFoundError, match="missing.json does not exist"):
        finetune.main(args)
    assert not (workspace[0] / "out").exists()


def test_finetune_bad_sample_stops_before_training_and_writes_nothing(finetune, workspace, monkeypatch):
    folder, data = workspace
    records = json.loads(data.read_text())
    (data.parent / records[2]["image"]).write_bytes(b"not a png")
    monkeypatch.setattr(training_run, "Trainer", NoTrainer)
    with pytest.raises(ValueError, match=f"sample 2 \\(image '{records[2]['image']}'\\): unreadable image"):
        finetune.main(finetune_args(workspace, "out", "--max_steps", "1"))
    assert not (folder / "out").exists()
    (folder / "out").mkdir()
    (folder / "out" / "earlier.txt").write_text("kept")
    with pytest.raises(ValueError, match="unreadable image"):
        finetune.main(finetune_args(workspace, "out", "--max_steps", "1"))
    assert [p.name for p in (folder / "out").iterdir()] == ["earlier.txt"]


def test_finetune_skip_bad_samples_trains_on_the_others(finetune, workspace):
    folder, data = workspace
    records = json.loads(data.read_text())
    (data.parent / records[2]["image"]).unlink()
    trainer = finetune.main(finetune_args(workspace, "out", "--max_steps", "1", "--save_strategy", "no",
                                          "--skip_bad_samples"))
    assert len(trainer.train_dataset) == 3 and [bad.index for bad in trainer.train_dataset.skipped] == [2]
    assert (folder / "out" / "model.safetensors").is_file()


def test_finetune_resume_from_a_checkpoint_of_another_config_fails_before_any_step(finetune, workspace, monkeypatch):
    checkpoint = workspace[0] / "other"
    MLMambaForConditionalGeneration(MLMambaConfig(**TINY_CONFIG_FILE)).save_pretrained(checkpoint)
    monkeypatch.setattr(training_run, "Trainer", NoTrainer)
    args = finetune_args(workspace, "out", "--max_steps", "1", "--config_overrides", '{"connector_type": "mlp"}',
                         "--resume_from_checkpoint", str(checkpoint))
    with pytest.raises(ValueError, match="cannot resume from .*connector_type"):
        finetune.main(args)


def test_finetune_resume_from_its_own_checkpoint_continues_training(finetune, workspace):
    first = finetune.main(finetune_args(workspace, "out", "--max_steps", "2", "--save_steps", "2"))
    assert first.state.global_step == 2
    checkpoint = workspace[0] / "out" / "checkpoint-2"
    assert (checkpoint / "config.json").is_file()
    resumed = finetune.main(finetune_args(workspace, "out", "--max_steps", "3", "--save_strategy", "no",
                                          "--resume_from_checkpoint", str(checkpoint)))
    assert resumed.state.global_step == 3
