"""Checks of the model's inputs: a bad input fails at once, with an error that names the argument, its value and
the fix, instead of deep inside torch or, worse, not at all.

Type, rank and shape checks read tensor metadata only. The checks of values (token ids inside the vocabulary,
padding on the left only, image placeholders matching the images) need the values on the host: `InputValues`
fetches all of them in one transfer, so checking a prompt or a training batch costs one host sync (labels one
more), and generate()'s one-token decode steps, which skip these checks, cost none.
"""

import difflib
import inspect
from dataclasses import dataclass, fields

import torch

IGNORE_INDEX = -100
TOKEN_ID_DTYPES = (torch.long, torch.int)
PADDING_FIX = "pad on the left: processor padding_side='left' (the processor's default)"


def require_tensor(name: str, value, fix: str) -> None:
    if not isinstance(value, torch.Tensor):
        kind = type(value)
        kind = kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__name__}"
        raise TypeError(f"{name} must be a torch.Tensor, got {kind}; {fix}")


def check_keyword_arguments(function, kwargs: dict, accepted: tuple[str, ...]) -> None:
    """Refuse the keyword arguments a `**kwargs` catch-all received beyond the `accepted` names, as Python refuses
    them for a function without one. The model's `forward` keeps `**kwargs` (transformers' Trainer passes loss
    arguments only to a forward that has it), and without this check a misspelt `pixel_value=...` would be dropped
    and the model would answer without the image."""
    unexpected = [key for key in kwargs if key not in accepted]
    if not unexpected:
        return
    takes = [key for key in inspect.signature(function).parameters if key not in ("self", "kwargs")]
    takes += [key for key in accepted if key not in takes]
    guesses = [f"{key!r} (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(key, takes, n=1))
               else repr(key) for key in unexpected]
    plural = "s" if len(unexpected) > 1 else ""
    raise TypeError(f"{function.__qualname__}() got unexpected keyword argument{plural} {', '.join(guesses)}; it takes "
                    f"{', '.join(takes)}")


def check_no_attentions(output_attentions) -> None:
    """The language model is Mamba-2, without attention: `generate(output_attentions=True)` (or a generation config
    asking for them) would find no attentions where transformers collects the LM's at every step."""
    if output_attentions:
        raise ValueError(
            f"output_attentions={output_attentions!r}: ML-Mamba's language model (Mamba-2) has no attention to "
            "return; drop it (and leave generation_config.output_attentions False), or for the vision towers' "
            "attentions call model.model.get_image_features(pixel_values, output_attentions=True)"
        )


def check_token_inputs(input_ids, inputs_embeds, hidden_size: int) -> tuple[int, int]:
    """(batch, length) of the prompts, given as `input_ids` (batch, length) or `inputs_embeds` (batch, length,
    hidden_size), exactly one of them."""
    if (input_ids is None) == (inputs_embeds is None):
        given = "neither" if input_ids is None else "both"
        raise ValueError(f"pass exactly one of input_ids (token ids) and inputs_embeds (token embeddings); got {given}")
    if input_ids is not None:
        require_tensor("input_ids", input_ids, "build it with torch.tensor([[...]]) or call the processor with "
                                               "return_tensors='pt'")
        if input_ids.dtype not in TOKEN_ID_DTYPES:
            raise TypeError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}; convert them with "
                            "input_ids.long()")
        if input_ids.ndim != 2:
            fix = "add the batch dimension: input_ids[None]" if input_ids.ndim == 1 else "give one row per prompt"
            raise ValueError(f"input_ids must have shape (batch, length), got shape {tuple(input_ids.shape)}; {fix}")
        name, shape = "input_ids", input_ids.shape
    else:
        require_tensor("inputs_embeds", inputs_embeds, "pass the embeddings as one tensor")
        if not inputs_embeds.is_floating_point():
            raise TypeError(f"inputs_embeds must be floating point, got dtype {inputs_embeds.dtype}; token ids go in "
                            "input_ids")
        if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != hidden_size:
            raise ValueError(
                f"inputs_embeds must have shape (batch, length, {hidden_size}), the language model's hidden size, "
                f"got {tuple(inputs_embeds.shape)}; build them with model.get_input_embeddings()(input_ids)"
            )
        name, shape = "inputs_embeds", inputs_embeds.shape
    if shape[0] == 0 or shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(shape)}); pass at least one prompt of at least one token")
    return shape[0], shape[1]


def check_pixel_values(pixel_values, image_sizes: tuple[int, ...]) -> None:
    """`pixel_values` must be the processor's output: a float tensor (images, 2, 3, size, size) holding each image
    normalised for DINOv2 (index 0) and for SigLIP (index 1), at every tower's image size."""
    require_tensor("pixel_values", pixel_values, "call the processor with return_tensors='pt', or convert with "
                                                 "torch.from_numpy(array) / torch.stack(list_of_tensors)")
    if not pixel_values.is_floating_point():
        raise TypeError(
            f"pixel_values must be normalised floats, got dtype {pixel_values.dtype} (raw pixels?); pass the images "
            "through the processor, which resizes and normalises them for both towers"
        )
    if pixel_values.ndim != 5 or pixel_values.shape[1:3] != (2, 3):
        raise ValueError(
            "pixel_values must have shape (images, 2, 3, height, width): one DINOv2- and one "
            f"SigLIP-normalised copy of each RGB image; got {tuple(pixel_values.shape)}"
        )
    if pixel_values.shape[0] == 0:
        raise ValueError(f"pixel_values holds no images (shape {tuple(pixel_values.shape)}); pass pixel_values=None "
                         "for prompts without images")
    for tower_size in image_sizes:
        if pixel_values.shape[-2:] != (tower_size, tower_size):
            raise ValueError(
                f"pixel_values are {tuple(pixel_values.shape[-2:])} pixels but the vision towers expect "
                f"{tower_size}x{tower_size}; resize the images (the processor does this)"
            )


def check_attention_mask(attention_mask, batch: int, length: int, covers_cache: bool) -> None:
    """One row per prompt and one column per token; when continuing a cache it may also cover the cached tokens."""
    require_tensor("attention_mask", attention_mask, "use the processor's attention_mask (return_tensors='pt')")
    columns_fit = attention_mask.shape[-1] >= length if covers_cache else attention_mask.shape[-1] == length
    if attention_mask.ndim != 2 or attention_mask.shape[0] != batch or not columns_fit:
        expected = f"({batch}, {length}" + (" or more" if covers_cache else "") + ")"
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)} but the prompts need {expected}: one row per "
            "prompt and one column per token, 1 for tokens and 0 for padding; pass the attention_mask the "
            "processor returned with these input_ids"
        )


def check_labels(labels, batch: int, length: int) -> None:
    require_tensor("labels", labels, "build them like input_ids, with torch.tensor([[...]])")
    if labels.dtype not in TOKEN_ID_DTYPES:
        raise TypeError(f"labels must be integer token ids (-100 where no loss is wanted), got dtype {labels.dtype}")
    if tuple(labels.shape) != (batch, length):
        raise ValueError(
            f"labels have shape {tuple(labels.shape)} but the prompts have shape ({batch}, {length}); labels align "
            "with input_ids position by position (the model shifts them), so give one label per input token, "
            f"{IGNORE_INDEX} where no loss is wanted"
        )


def check_label_values(labels: torch.Tensor, vocab_size: int) -> None:
    """A label outside the vocabulary fails inside the loss (a device-side assert on CUDA); this costs one host sync
    per forward with labels."""
    outside = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab_size))
    if bool(outside.any()):
        raise ValueError(
            f"labels hold {int(outside.sum())} value(s) outside the vocabulary of {vocab_size} ids, e.g. "
            f"{int(labels[outside][0])}; use ids 0..{vocab_size - 1}, and {IGNORE_INDEX} where no loss is wanted"
        )


def check_logits_to_keep(logits_to_keep) -> None:
    if isinstance(logits_to_keep, torch.Tensor):
        if logits_to_keep.ndim != 1 or logits_to_keep.dtype not in TOKEN_ID_DTYPES:
            raise ValueError(f"a logits_to_keep tensor must be 1-D integer positions, got dtype "
                             f"{logits_to_keep.dtype} and shape {tuple(logits_to_keep.shape)}")
    elif isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int) or logits_to_keep < 0:
        raise ValueError(f"logits_to_keep must be an int >= 0 (0 keeps every position) or a 1-D tensor of "
                         f"positions, got {logits_to_keep!r}")


@dataclass
class MaskRow:
    """What the padding checks need of one attention_mask row."""

    tokens: int  # positions marked 1
    other_values: int  # positions marked neither 0 nor 1
    runs: int  # separate stretches of tokens (more than one: padding between tokens)
    ends_padded: bool  # padded on the right
    padded_placeholders: int  # image placeholder positions marked as padding


@dataclass
class InputValues:
    """The values the checks read, fetched from the device in one transfer (the one host sync)."""

    placeholders_per_row: list[int]
    id_range: tuple[int, int] | None
    mask_rows: list[MaskRow] | None

    @classmethod
    def fetch(cls, input_ids, placeholders: torch.Tensor, attention_mask) -> "InputValues":
        """`placeholders` (batch, length): where the image placeholders are; `attention_mask` may also cover
        cached tokens before them."""
        pieces = {"placeholders": placeholders.sum(1)}
        if input_ids is not None:
            pieces["id_range"] = torch.stack([input_ids.min(), input_ids.max()])
        if attention_mask is not None:
            tokens = attention_mask != 0
            new_tokens = tokens[:, -placeholders.shape[1]:]
            pieces.update(
                tokens=tokens.sum(1),
                other_values=(tokens & (attention_mask != 1)).sum(1),
                runs=tokens[:, 0].long() + (tokens[:, 1:] & ~tokens[:, :-1]).sum(1),
                ends_padded=~tokens[:, -1],
                padded_placeholders=(placeholders & ~new_tokens).sum(1),
            )
        device = placeholders.device
        host = torch.cat([piece.reshape(-1).to(device=device, dtype=torch.long) for piece in pieces.values()]).tolist()
        values, start = {}, 0
        for name, piece in pieces.items():
            values[name] = host[start : start + piece.numel()]
            start += piece.numel()
        mask_rows = None
        if attention_mask is not None:
            columns = [field.name for field in fields(MaskRow)]
            mask_rows = [MaskRow(*row) for row in zip(*(values[name] for name in columns))]
        id_range = tuple(values["id_range"]) if "id_range" in values else None
        return cls(values["placeholders"], id_range, mask_rows)


def check_token_ids(id_range: tuple[int, int], vocab_size: int) -> None:
    low, high = id_range
    if low < 0 or high >= vocab_size:
        raise ValueError(
            f"input_ids hold token id {low if low < 0 else high}, outside the model's vocabulary of {vocab_size} ids "
            f"(0..{vocab_size - 1}); encode the prompts with this model's processor or tokenizer, call "
            f"model.resize_token_embeddings(len(tokenizer)) after adding tokens, and keep {IGNORE_INDEX} for labels"
        )


def check_padding(mask_rows: list[MaskRow], columns: int, builds_cache: bool) -> str:
    """Where the mask of `columns` positions pads: "right" (some row padded after its tokens), "left" (padding only
    before the tokens) or "none" (every position is a token, so the mask's products can be skipped); raises for
    padding no path of the model computes exactly.

    The mixers zero padded positions, which keeps the recurrent state exactly as without them only while no token
    came before: left padding. Padding after the tokens leaves every token's output exact (the scan is causal), so
    training and scoring without a cache may pad on the right, but the state at the end has run over the padding,
    so a cache built from it, and generate() continuing from its last position, would be wrong: refused. Padding
    between tokens would change the tokens after it: refused everywhere.
    """
    for row, stats in enumerate(mask_rows):
        if stats.other_values:
            raise ValueError(
                f"attention_mask row {row} holds {stats.other_values} value(s) other than 0 and 1; it must mark "
                "tokens with 1 and padding with 0 (an additive mask of 0 and -inf is not one)"
            )
    for row, stats in enumerate(mask_rows):
        if stats.tokens == 0:
            raise ValueError(f"attention_mask row {row} is all zeros: prompt {row} has no tokens; drop it from the "
                             "batch")
        if stats.runs > 1:
            raise ValueError(
                f"attention_mask row {row} has padding between tokens, which would change the recurrent state of "
                f"every token after it; {PADDING_FIX}"
            )
        if stats.padded_placeholders:
            raise ValueError(
                f"attention_mask row {row} marks {stats.padded_placeholders} image placeholder position(s) as "
                "padding; an image's positions must be marked 1"
            )
    right_padded = [row for row, stats in enumerate(mask_rows) if stats.ends_padded]
    if right_padded and builds_cache:
        raise ValueError(
            f"attention_mask pads row(s) {right_padded} on the right: the recurrent state would run over the padding "
            f"and generation would continue from a pad; {PADDING_FIX}. (Training and scoring may pad on the right "
            "with use_cache=False.)"
        )
    if right_padded:
        return "right"
    return "none" if all(stats.tokens == columns for stats in mask_rows) else "left"


def check_image_placeholders(
    placeholders_per_row: list[int], num_images: int | None, image_seq_length: int, image_token_id: int,
    continuing: bool,
) -> None:
    """Every image fills exactly `image_seq_length` placeholder positions of one prompt. Placeholders without
    pixel_values are allowed only once the cache holds the prompt: a decode step may feed back a generated
    placeholder id."""
    total = sum(placeholders_per_row)
    if num_images is None:
        if total and not continuing:
            raise ValueError(
                f"the prompt has {total} image placeholder tokens (id {image_token_id}) but no pixel_values were "
                "given; pass the images' pixel_values (the processor returns them with the prompt) or remove the "
                "placeholders"
            )
        return
    if total == 0 and num_images:
        raise ValueError(
            f"got pixel_values for {num_images} image(s) but the prompts have no image placeholder tokens (id "
            f"{image_token_id}); put an image placeholder where each image goes (the processor expands each <image> "
            "of the prompt, and the chat template adds one per image), or drop pixel_values"
        )
    if total != num_images * image_seq_length:
        raise ValueError(
            f"the prompts have {total} image placeholder tokens but {num_images} image(s) give "
            f"{num_images * image_seq_length} image features ({image_seq_length} per image); the processor expands "
            "each placeholder to exactly that many tokens"
        )
    for row, count in enumerate(placeholders_per_row):
        if count % image_seq_length:
            raise ValueError(
                f"prompt {row} has {count} image placeholder tokens, not a multiple of {image_seq_length} (the "
                "positions one image fills), so an image would be split across prompts; the processor expands "
                "each placeholder to exactly that many tokens"
            )
