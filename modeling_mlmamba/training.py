"""Training data and stages: LLaVA-format conversations -> padded batches with labels, and the paper's stages.

`LlavaConversationDataset` reads the JSON format of LLaVA's instruction data; `MLMambaDataCollator` renders each
conversation with the processor's chat template and supervises only the assistant answers and their closing
`<|endoftext|>` (as released); `set_training_stage` freezes what a stage keeps fixed. All three work with
`transformers.Trainer`.
"""

import json
import logging
from pathlib import Path

import torch
from PIL import Image

from .processing_mlmamba import IMAGE_TOKEN

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
ROLES = {"human": "user", "gpt": "assistant"}

# What each stage trains (the paper's section 3.4 and the released recipe); everything else is frozen.
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

    The file is checked when the dataset is built, so a missing image or a malformed sample stops training at
    start-up, not thousands of steps in.
    """

    def __init__(self, data_file: str | Path, image_folder: str | Path | None = None):
        data_file = Path(data_file)
        if not data_file.is_file():
            raise FileNotFoundError(f"training data file {data_file} does not exist")
        try:
            records = json.loads(data_file.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{data_file} is not valid JSON: {error}") from error
        if not isinstance(records, list) or not records:
            raise ValueError(f"{data_file} must hold a non-empty JSON list of samples")
        self.image_folder = Path(image_folder) if image_folder is not None else data_file.parent
        for index, record in enumerate(records):
            _check_record(record, index, data_file)
        missing = [r["image"] for r in records if "image" in r and not (self.image_folder / r["image"]).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} image(s) named in {data_file} are not in {self.image_folder}, e.g. {missing[:3]}"
            )
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        image = None
        if "image" in record:
            with Image.open(self.image_folder / record["image"]) as file:
                image = file.convert("RGB")
        return {"image": image, "conversations": record["conversations"]}


def _check_record(record, index: int, data_file: Path) -> None:
    where = f"sample {index} of {data_file}"
    if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
        raise ValueError(f"{where} must be an object with a 'conversations' list")
    turns = record["conversations"]
    if not turns or len(turns) % 2:
        raise ValueError(f"{where} must have human/gpt turn pairs, got {len(turns)} turns")
    for position, turn in enumerate(turns):
        expected = "human" if position % 2 == 0 else "gpt"
        if not isinstance(turn, dict) or turn.get("from") != expected or not isinstance(turn.get("value"), str):
            raise ValueError(f"{where}: turn {position} must be {{'from': '{expected}', 'value': str}}, got {turn!r}")


def conversation_to_messages(conversations: list[dict], has_image: bool) -> list[dict]:
    """LLaVA turns -> chat messages. The image goes to the user turn holding `<image>`; a sample with an image
    but no `<image>` gets it in its first turn (LLaVA's convention)."""
    placeholders = sum(turn["value"].count(IMAGE_TOKEN) for turn in conversations)
    if placeholders > int(has_image):
        raise ValueError(
            f"the conversation has {placeholders} {IMAGE_TOKEN} placeholder(s) but {int(has_image)} image; "
            f"give one image per {IMAGE_TOKEN}"
        )
    messages = []
    for position, turn in enumerate(conversations):
        role = ROLES[turn["from"]]
        with_image = has_image and (IMAGE_TOKEN in turn["value"] or (placeholders == 0 and position == 0))
        content = [{"type": "image"}] if with_image else []
        messages.append({"role": role, "content": content + [{"type": "text", "text": turn["value"]}]})
    return messages


class MLMambaDataCollator:
    """Tokenizes conversations for training: `input_ids`, `attention_mask`, `labels` (-100 except assistant
    answers and their end-of-text) and `pixel_values`, padded on the processor's padding side.

    Each turn is tokenized on its own, as the released training did, so an answer's tokens are exactly the
    tokens the model generates after the chat template's generation prompt. Samples longer than `max_length`
    are cut from the end with a warning; a cut that would split the image drops the image and its placeholders
    (the text is then cut on its own).
    """

    def __init__(self, processor, max_length: int | None = None):
        self.processor = processor
        self.max_length = max_length or processor.tokenizer.model_max_length

    def encode(self, sample: dict) -> tuple[list[int], list[int], Image.Image | None]:
        """One sample -> (input ids, labels, image or None), before padding."""
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
            input_ids, labels, image = self._truncate(input_ids, labels, image)
        return input_ids, labels, image

    def _tokenize(self, text: str) -> list[int]:
        text = text.replace(IMAGE_TOKEN, IMAGE_TOKEN * self.processor.image_seq_length)
        return self.processor.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _truncate(self, input_ids, labels, image):
        logger.warning("a training sample of %d tokens is cut to max_length=%d", len(input_ids), self.max_length)
        image_id = self.processor.image_token_id
        kept = input_ids[: self.max_length].count(image_id)
        if image is not None and kept < self.processor.image_seq_length:
            # Without its image the text still trains: drop every placeholder first, then cut what remains.
            logger.warning("the cut splits the image (%d of its %d tokens left): the image is dropped",
                           kept, self.processor.image_seq_length)
            text = [(token, label) for token, label in zip(input_ids, labels) if token != image_id]
            input_ids, labels = [token for token, _ in text], [label for _, label in text]
            image = None
        return input_ids[: self.max_length], labels[: self.max_length], image

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
    "LlavaConversationDataset", "MLMambaDataCollator", "TRAINING_STAGES", "conversation_to_messages",
    "set_training_stage",
]
