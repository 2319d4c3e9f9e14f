"""Training data and stages: LLaVA-format conversations -> padded batches with labels, and the paper's stages.

`LlavaConversationDataset` reads and checks the JSON format of LLaVA's instruction data; `MLMambaDataCollator`
renders each conversation with the processor's chat template and supervises only the assistant answers and their
closing `<|endoftext|>`, as the released model was trained; `set_training_stage` freezes what a stage keeps fixed.
All three work with `transformers.Trainer` or any training loop; `training_run.py` holds the `Trainer` run itself.
"""

import json
import logging
import os
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from .image_processing_mlmamba import to_rgb_image
from .processing_mlmamba import IMAGE_TOKEN

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
ROLES = {"human": "user", "gpt": "assistant"}

# What each stage trains (the paper's training section and the released recipe); everything else is frozen.
TRAINING_STAGES = {
    "align": ("connector", "projector"),
    "finetune": ("connector", "projector", "language_model"),
    "full": ("connector", "projector", "language_model", "vision_tower"),
}


def set_training_stage(model, stage: str) -> int:
    """Make exactly the modules of `stage` trainable (the LM head goes with the language model); returns the
    number of trainable parameters. `model` is an `MLMambaForConditionalGeneration` or an `MLMambaModel`."""
    if stage not in TRAINING_STAGES:
        raise ValueError(f"unknown training stage {stage!r}; choose one of {sorted(TRAINING_STAGES)}")
    base = getattr(model, "model", model)
    model.requires_grad_(False)
    for name in TRAINING_STAGES[stage]:
        getattr(base, name).requires_grad_(True)
    if "language_model" in TRAINING_STAGES[stage] and hasattr(model, "lm_head"):
        model.lm_head.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class LlavaConversationDataset(torch.utils.data.Dataset):
    """Samples of a LLaVA-format JSON list: `{"image": path (optional), "conversations": [{"from": "human" |
    "gpt", "value": ...}, ...]}`. Image paths are relative to `image_folder` (default: the JSON's folder).

    Every sample is checked when the dataset is built, so that nothing stops training thousands of steps in: the
    turns, their text, the `<image>` placeholders against the image, and each image file (inside `image_folder`,
    decodable to the end, within PIL's decompression-bomb limit, convertible to RGB), in a thread pool. Bad
    samples raise one error that lists them, or with `skip_bad_samples=True` are left out and reported in the
    log and in `self.skipped`. Items are `{"image": PIL image in its file's mode or None, "conversations": ...,
    "index": position in the JSON}`: the collator hands the image to the processor, which converts it exactly as
    at inference.
    """

    def __init__(self, data_file: str | Path, image_folder: str | Path | None = None, skip_bad_samples: bool = False):
        data_file = Path(data_file)
        records = _read_records(data_file)
        self.image_folder = Path(image_folder) if image_folder is not None else data_file.parent
        if not self.image_folder.is_dir():
            raise FileNotFoundError(
                f"image_folder {self.image_folder} is not a folder; pass the folder the image paths of {data_file} "
                "are relative to"
            )
        bad = find_bad_samples(records, self.image_folder)
        if bad and (not skip_bad_samples or len(bad) == len(records)):
            raise ValueError(_bad_samples_message(bad, len(records), data_file, skip_bad_samples))
        if bad:
            logger.warning(_bad_samples_message(bad, len(records), data_file, skip_bad_samples))
        skipped = {sample.index for sample in bad}
        self.indices = [index for index in range(len(records)) if index not in skipped]
        self.records = [records[index] for index in self.indices]
        self.skipped = bad

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        image = None
        if "image" in record:
            with Image.open(self.image_folder / record["image"]) as file:
                image = file.copy()  # decoded, in the file's own mode; the file is closed
        return {"image": image, "conversations": record["conversations"], "index": self.indices[index]}


def _read_records(data_file: Path) -> list:
    """The JSON list of a data file, or an error that says what is wrong with the file as a whole."""
    if not data_file.is_file():
        raise FileNotFoundError(f"training data file {data_file} does not exist")
    try:
        text = data_file.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{data_file} is not UTF-8 text ({error}); re-save it as UTF-8, the encoding JSON files use"
        ) from error
    try:
        records = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{data_file} is not valid JSON: {error}; fix the file at that position") from error
    if not isinstance(records, list) or not records:
        found = "an empty list" if records == [] else f"a JSON {type(records).__name__}"
        raise ValueError(f"{data_file} must hold a non-empty JSON list of samples, got {found}")
    return records


@dataclass(frozen=True)
class BadSample:
    """A sample that cannot be trained on: its position in the data file, its image path as written, the kind
    of problem (a key of `FIXES`) and the specifics."""

    index: int
    image: str | None
    problem: str
    detail: str

    def __str__(self) -> str:
        image = f" (image {self.image!r})" if self.image is not None else ""
        return f"sample {self.index}{image}: {self.problem}: {self.detail}; fix: {FIXES[self.problem]}"


FIXES = {
    "malformed sample": "give it a 'conversations' list of alternating human/gpt turns, each {'from': ..., "
                        "'value': str}, and an optional 'image' path",
    "invalid text": "repair the text at that position (it must be valid Unicode; a JSON escape such as \\ud83d "
                    "without its pair is not)",
    "image placeholders": "put exactly one <image> in a human turn of a sample with an image and none in a sample "
                          "without",
    "image outside image_folder": "give the path relative to the image folder, without '..', or pass the "
                                  "folder that holds the image as image_folder",
    "missing image": "put the file under the image folder or correct the path",
    "unreadable image": "re-download or re-encode the file (it must decode completely with PIL)",
    "image too large": "downscale the file, or raise PIL.Image.MAX_IMAGE_PIXELS if you trust it",
}
REPORTED_SAMPLES = 5
IMAGES_PER_TASK = 256


def find_bad_samples(records: list, image_folder: Path, max_workers: int | None = None) -> list[BadSample]:
    """Every sample of `records` that would stop or silently spoil training, in order. Images are opened and
    decoded in `max_workers` threads (PIL decodes without holding the GIL); each distinct file once."""
    bad, images = [], {}
    for index, record in enumerate(records):
        problem = _record_problem(record)
        if problem is not None:
            bad.append(BadSample(index, _image_name(record), *problem))
        elif "image" in record:
            images.setdefault(record["image"], []).append(index)
    folder = Path(os.path.normpath(image_folder.absolute()))
    names = list(images)
    # A few hundred files per task: a task per file costs about as much time and memory as checking a small file.
    chunks = [names[start : start + IMAGES_PER_TASK] for start in range(0, len(names), IMAGES_PER_TASK)]
    with warnings.catch_warnings(), ThreadPoolExecutor(max_workers) as pool:
        # Oversized images are reported below; PIL's own warning about them would only repeat it.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        for chunk, problems in zip(chunks, pool.map(_image_problems, chunks, [folder] * len(chunks))):
            for name, problem in zip(chunk, problems):
                if problem is not None:
                    bad += [BadSample(index, name, *problem) for index in images[name]]
    return sorted(bad, key=lambda sample: sample.index)


def _image_problems(names: list[str], folder: Path) -> list[tuple[str, str] | None]:
    return [_image_problem(name, folder) for name in names]


def _image_name(record) -> str | None:
    return record.get("image") if isinstance(record, dict) and isinstance(record.get("image"), str) else None


def _record_problem(record) -> tuple[str, str] | None:
    """(problem, detail) for the conversation and the image field of one record, None when it is fine."""
    if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
        return "malformed sample", "it must be an object with a 'conversations' list"
    if "image" in record and (not isinstance(record["image"], str) or not record["image"]):
        return "malformed sample", f"'image' must be a non-empty path, got {record['image']!r}"
    turns = record["conversations"]
    if not turns or len(turns) % 2:
        return "malformed sample", f"it must have human/gpt turn pairs, got {len(turns)} turns"
    for position, turn in enumerate(turns):
        expected = "human" if position % 2 == 0 else "gpt"
        if not isinstance(turn, dict) or turn.get("from") != expected or not isinstance(turn.get("value"), str):
            return "malformed sample", f"turn {position} must be {{'from': '{expected}', 'value': str}}, got {turn!r}"
        try:
            turn["value"].encode("utf-8")
        except UnicodeEncodeError as error:
            return "invalid text", f"turn {position}, character {error.start}: {error.reason}"
    try:
        conversation_to_messages(turns, "image" in record)
    except ValueError as error:
        return "image placeholders", str(error)
    return None


def _image_problem(name: str, folder: Path) -> tuple[str, str] | None:
    """(problem, detail) for the image file `name` under `folder`, None when it decodes. The path is checked
    lexically, so a folder of symbolic links to the images elsewhere still works."""
    path = Path(os.path.normpath(folder / name))
    if not path.is_relative_to(folder):
        return "image outside image_folder", f"{path} is not inside {folder}"
    if not path.is_file():
        return "missing image", f"{path} does not exist"
    try:
        with Image.open(path) as image:
            if Image.MAX_IMAGE_PIXELS is not None and image.width * image.height > Image.MAX_IMAGE_PIXELS:
                return "image too large", (f"{image.width}x{image.height} pixels is over the decompression bomb "
                                           f"limit PIL.Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS}")
            # JPEG decodes at 1/8 scale here: every byte of the file is still read and entropy-decoded.
            image.draft(image.mode, (1, 1))
            image.load()
            to_rgb_image(image)
    except Image.DecompressionBombError as error:
        return "image too large", f"{error} (PIL.Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS})"
    except Exception as error:  # what PIL raises for a broken file varies: OSError, SyntaxError, EOFError, ...
        return "unreadable image", f"{type(error).__name__}: {error}"
    return None


def _bad_samples_message(bad: list[BadSample], total: int, data_file: Path, skipping: bool) -> str:
    counts = Counter(sample.problem for sample in bad)
    summary = ", ".join(f"{problem}: {count}" for problem, count in counts.most_common())
    listed = "\n".join(f"  {sample}" for sample in bad[:REPORTED_SAMPLES])
    more = f"\n  ... and {len(bad) - REPORTED_SAMPLES} more" if len(bad) > REPORTED_SAMPLES else ""
    if skipping and len(bad) < total:
        return f"skipped {len(bad)} of {total} samples of {data_file} ({summary}):\n{listed}{more}"
    advice = ("no sample is left to train on" if skipping else
              "fix or remove them, or pass skip_bad_samples=True (--skip_bad_samples) to train on the others")
    return f"{len(bad)} of {total} samples of {data_file} cannot be trained on ({summary}); {advice}:\n{listed}{more}"


def conversation_to_messages(conversations: list[dict], has_image: bool) -> list[dict]:
    """LLaVA turns -> chat messages. The image goes to the user turn holding `<image>`; a sample with an image
    but no `<image>` gets it in its first turn (LLaVA's convention). The chat template shows images in user
    turns only, so an `<image>` in an answer is an error, not an image silently left out."""
    placeholders = sum(turn["value"].count(IMAGE_TOKEN) for turn in conversations)
    if placeholders > int(has_image):
        raise ValueError(
            f"the conversation has {placeholders} {IMAGE_TOKEN} placeholder(s) but {int(has_image)} image; "
            f"give one image per {IMAGE_TOKEN}"
        )
    messages = []
    for position, turn in enumerate(conversations):
        role = ROLES[turn["from"]]
        if role == "assistant" and IMAGE_TOKEN in turn["value"]:
            raise ValueError(f"turn {position} is an answer (gpt) holding {IMAGE_TOKEN}; put it in a human turn")
        with_image = has_image and (IMAGE_TOKEN in turn["value"] or (placeholders == 0 and position == 0))
        content = [{"type": "image"}] if with_image else []
        messages.append({"role": role, "content": content + [{"type": "text", "text": turn["value"]}]})
    return messages


class MLMambaDataCollator:
    """Tokenizes conversations for training: `input_ids`, `attention_mask`, `labels` (-100 except assistant
    answers and their end-of-text) and `pixel_values`, padded on the processor's padding side.

    Each turn is tokenized on its own, as the released training did, so an answer's tokens are exactly the
    tokens the model generates after the chat template's generation prompt. Images go through the processor's
    `preprocess_images`, the conversion inference uses. Samples longer than `max_length` are cut from the end
    with a warning; a cut never splits an image's placeholders: it drops the image and all of them (the text is
    then cut on its own). A sample whose answers are all cut away trains on nothing and gets its own warning.
    """

    def __init__(self, processor, max_length: int | None = None):
        if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
            raise ValueError(f"max_length must be a positive number of tokens or None (the tokenizer's "
                             f"model_max_length), got {max_length!r}")
        self.processor = processor
        self.max_length = max_length or processor.tokenizer.model_max_length

    def encode(self, sample: dict) -> tuple[list[int], list[int], Image.Image | None]:
        """One sample -> (input ids, labels, image or None), before padding. `sample["index"]`, when given
        (`LlavaConversationDataset` gives it), names the sample in warnings."""
        image = sample.get("image")
        messages = conversation_to_messages(sample["conversations"], image is not None)
        input_ids, labels, rendered = [], [], ""
        for end in range(1, len(messages) + 1):
            supervised = messages[end - 1]["role"] == "assistant"
            text = self.processor.apply_chat_template(messages[:end], add_generation_prompt=not supervised)
            ids = self._tokenize(text[len(rendered):])
            input_ids += ids
            labels += ids if supervised else [IGNORE_INDEX] * len(ids)
            rendered = text
        if len(input_ids) > self.max_length:
            name = f"training sample {sample['index']}" if "index" in sample else "a training sample"
            input_ids, labels, image = self._truncate(input_ids, labels, image, name)
        return input_ids, labels, image

    def _tokenize(self, text: str) -> list[int]:
        text = text.replace(IMAGE_TOKEN, IMAGE_TOKEN * self.processor.image_seq_length)
        return self.processor.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _truncate(self, input_ids, labels, image, name: str):
        logger.warning("%s of %d tokens is cut to max_length=%d", name, len(input_ids), self.max_length)
        image_id = self.processor.image_token_id
        kept = input_ids[: self.max_length].count(image_id)
        if image is not None and kept < self.processor.image_seq_length:
            # Without its image the text still trains: drop every placeholder first, then cut what remains.
            logger.warning("the cut splits the image of %s (%d of its %d tokens left): the image is dropped",
                           name, kept, self.processor.image_seq_length)
            text = [(token, label) for token, label in zip(input_ids, labels) if token != image_id]
            input_ids, labels = [token for token, _ in text], [label for _, label in text]
            image = None
        input_ids, labels = input_ids[: self.max_length], labels[: self.max_length]
        if all(label == IGNORE_INDEX for label in labels):
            logger.warning("%s keeps no answer token after the cut to max_length=%d: it trains on nothing; raise "
                           "max_length or shorten the sample's first question", name, self.max_length)
        return input_ids, labels, image

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        encoded = [self.encode(sample) for sample in samples]
        longest = max(len(ids) for ids, _, _ in encoded)
        pad_id = self.processor.tokenizer.pad_token_id
        batch = {"input_ids": [], "attention_mask": [], "labels": []}
        for ids, labels, _ in encoded:
            padding = longest - len(ids)
            pieces = {"input_ids": (ids, pad_id), "attention_mask": ([1] * len(ids), 0), "labels": (labels, IGNORE_INDEX)}
            for key, (values, fill) in pieces.items():
                row = [fill] * padding + values if self.processor.padding_side == "left" else values + [fill] * padding
                batch[key].append(row)
        batch = {key: torch.tensor(rows, dtype=torch.long) for key, rows in batch.items()}
        images = [image for _, _, image in encoded if image is not None]
        if images:
            batch["pixel_values"] = torch.from_numpy(self.processor.preprocess_images(images))
        return batch


__all__ = [
    "BadSample", "LlavaConversationDataset", "MLMambaDataCollator", "TRAINING_STAGES", "conversation_to_messages",
    "find_bad_samples", "set_training_stage",
]
