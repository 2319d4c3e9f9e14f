"""Everything between raw inputs and model tensors: images for both towers, the prompt, the chat format.

One `MLMambaProcessor` turns images and prompts into `input_ids`, `attention_mask` and `pixel_values` of shape
(images, 2, 3, H, W): each image resized naively to a square (bicubic, no crop) and normalised once for DINOv2
(index 0) and once for SigLIP (index 1). Each `<image>` in a prompt becomes `image_seq_length` placeholder
tokens that the model fills with that image's features, in order.
"""

import numpy as np
import torch
import transformers
from PIL import Image
from tokenizers import AddedToken
from transformers import BitImageProcessorPil, ProcessorMixin, SiglipImageProcessorPil
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_utils import load_image

IMAGE_TOKEN = "<image>"
DEFAULT_IMAGE_SIZE = 384
DEFAULT_IMAGE_SEQ_LENGTH = 729
DINO_MEAN, DINO_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIGLIP_MEAN, SIGLIP_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)

# The released Zephyr-style format (image first): `<image><|user|>\n{question}<|endoftext|>\n<|assistant|>\n`,
# each answer closed by `<|endoftext|>`, later user turns preceded by "\n". Like the released prompt builder, the
# text of a turn has any literal `<image>` removed and is stripped, and an empty answer is a single space. The
# answer and its `<|endoftext|>` (what training supervises) are marked for `return_assistant_tokens_mask`.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) or message['role'] not in ('user', 'assistant') -%}"
    "{{ raise_exception('ML-Mamba chats alternate user and assistant turns, starting with the user; got role '"
    " + message['role'] + ' at turn ' + loop.index0|string) }}"
    "{%- endif -%}"
    "{%- if message['content'] is string -%}"
    "{%- set parts = [{'type': 'text', 'text': message['content']}] -%}"
    "{%- else -%}"
    "{%- set parts = message['content'] -%}"
    "{%- endif -%}"
    "{%- set text = parts | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('\\n') -%}"
    "{%- set text = text | replace('<image>', '') | trim -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- if not loop.first -%}{{ '\\n' }}{%- endif -%}"
    "{%- for part in parts if part['type'] == 'image' -%}{{ '<image>' }}{%- endfor -%}"
    "{{ '<|user|>\\n' + text + '<|endoftext|>\\n' }}"
    "{%- else -%}"
    "{{ '<|assistant|>\\n' }}"
    "{%- generation -%}{{ (text if text else ' ') + '<|endoftext|>' }}{%- endgeneration -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\\n' }}{%- endif -%}"
)

# Tokenizer arguments that keep one row per prompt (no overflow/stride, which would split an image).
TEXT_KWARGS = (
    "add_special_tokens", "padding", "padding_side", "truncation", "max_length", "pad_to_multiple_of",
    "return_tensors", "return_attention_mask", "return_token_type_ids", "return_special_tokens_mask",
    "return_offsets_mapping", "return_length", "verbose",
)


def default_image_processors(image_size: int = DEFAULT_IMAGE_SIZE):
    """The released "resize-naive" transforms: a bicubic resize to image_size x image_size, no crop, and each
    tower's own normalisation (ImageNet mean/std for DINOv2, 0.5/0.5 for SigLIP). The PIL backend resizes exactly
    like the released torchvision transforms applied to PIL images."""
    common = dict(
        size={"height": image_size, "width": image_size}, resample=Image.Resampling.BICUBIC, do_convert_rgb=True,
    )
    dino = BitImageProcessorPil(
        do_center_crop=False, crop_size=common["size"], image_mean=DINO_MEAN, image_std=DINO_STD, **common
    )
    siglip = SiglipImageProcessorPil(image_mean=SIGLIP_MEAN, image_std=SIGLIP_STD, **common)
    return dino, siglip


def to_rgb_image(image) -> Image.Image:
    """Any supported image -> an 8-bit RGB PIL image, the form the released transforms started from.

    PIL images of any mode, numpy arrays and torch tensors (2-D grey, or 3-D with 1-4 channels first or last;
    numpy prefers channels last, torch channels first) of dtype uint8, uint16 (16-bit) or float in [0, 1], and
    paths or URLs. Alpha is dropped, as the released code's `convert("RGB")` did.
    """
    if isinstance(image, str):
        image = load_image(image)
    if isinstance(image, Image.Image):
        if image.width == 0 or image.height == 0:
            raise ValueError(f"got an empty image ({image.width}x{image.height} pixels)")
        if image.mode.startswith("I"):  # 16-bit files open as "I;16" or "I"
            return _array_to_rgb(np.clip(np.asarray(image), 0, 65535).astype(np.uint16), channels_first=False)
        if image.mode == "F":
            return _array_to_rgb(np.asarray(image), channels_first=False)
        if image.mode in ("P", "PA"):
            image = image.convert("RGBA")
        try:
            return image.convert("RGB")
        except ValueError as error:
            raise ValueError(f"cannot convert a PIL image of mode {image.mode!r} to RGB: {error}") from error
    if isinstance(image, torch.Tensor):
        if image.is_floating_point():
            image = image.float()
        return _array_to_rgb(image.detach().cpu().numpy(), channels_first=True)
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image, channels_first=False)
    raise TypeError(
        f"expected an image (PIL image, numpy array, torch tensor, path or URL), got {type(image).__name__}"
    )


def _array_to_rgb(array: np.ndarray, channels_first: bool) -> Image.Image:
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3:
        raise ValueError(f"an image array must have 2 or 3 dimensions, got shape {array.shape}")
    first, last = array.shape[0] in (1, 2, 3, 4), array.shape[-1] in (1, 2, 3, 4)
    if (channels_first and first) or (first and not last):
        array = np.moveaxis(array, 0, -1)
    elif not last:
        raise ValueError(f"cannot find the channel axis (1 to 4 channels, first or last) in an image of shape "
                         f"{array.shape}")
    if array.size == 0:
        raise ValueError(f"got an empty image (shape {array.shape})")
    array = _to_uint8(array)
    channels = array.shape[-1]
    if channels in (1, 2):
        array = np.repeat(array[..., :1], 3, axis=-1)
    return Image.fromarray(np.ascontiguousarray(array[..., :3]))


def _to_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.uint16:
        return np.round(array / 257.0).astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
            raise ValueError(
                f"float images must hold values in [0, 1], got the range [{array.min()}, {array.max()}]"
            )
        return np.round(array * 255.0).astype(np.uint8)
    raise TypeError(
        f"unsupported image dtype {array.dtype}: pass uint8 (0-255), uint16 (0-65535) or floats in [0, 1]"
    )


def _is_image_batch(images) -> bool:
    """A 4-D array or tensor is a batch of images; anything else that is not a list is one image."""
    return getattr(images, "ndim", None) == 4


class MLMambaProcessor(ProcessorMixin):
    r"""
    Bundles the tokenizer and the two image processors of ML-Mamba, and owns the chat format.

    Args:
        tokenizer: the language model's tokenizer; it must hold `image_token` as one token (see
            [`MLMambaProcessor.from_model_config`], which adds it).
        dino_image_processor, siglip_image_processor (*optional*): the transforms for each tower; both must resize
            to the same square without cropping. Default: [`default_image_processors`] at 384 px.
        image_seq_length (`int`): LM positions one image occupies (729 when released: a 27x27 patch grid).
        padding_side (`str`): where padding goes in a batch. Left, so that a recurrent model's last position is
            every prompt's last real token and generation continues from it.
        chat_template (`str`, *optional*): defaults to the released Zephyr-style format, image first.
    """

    image_token = IMAGE_TOKEN

    def __init__(
        self,
        tokenizer=None,
        dino_image_processor=None,
        siglip_image_processor=None,
        image_seq_length: int = DEFAULT_IMAGE_SEQ_LENGTH,
        padding_side: str = "left",
        chat_template: str | None = None,
    ):
        if tokenizer is None:
            raise ValueError("MLMambaProcessor needs the language model's tokenizer")
        if dino_image_processor is None or siglip_image_processor is None:
            default_dino, default_siglip = default_image_processors()
            dino_image_processor = dino_image_processor or default_dino
            siglip_image_processor = siglip_image_processor or default_siglip
        dino_image_processor, siglip_image_processor = map(_pil_backend, (dino_image_processor, siglip_image_processor))
        if not isinstance(image_seq_length, int) or image_seq_length < 1:
            raise ValueError(f"image_seq_length must be a positive integer, got {image_seq_length!r}")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.image_seq_length = image_seq_length
        self.padding_side = padding_side
        self.image_token_id = _single_token_id(tokenizer, self.image_token)
        self.image_size = _square_size(dino_image_processor, "DINOv2")
        if _square_size(siglip_image_processor, "SigLIP") != self.image_size:
            raise ValueError(
                f"both image processors must resize to the same size, got {self.image_size} for DINOv2 and "
                f"{_square_size(siglip_image_processor, 'SigLIP')} for SigLIP"
            )
        super().__init__(
            tokenizer, dino_image_processor, siglip_image_processor,
            chat_template=CHAT_TEMPLATE if chat_template is None else chat_template,
        )

    @classmethod
    def from_model_config(cls, config, tokenizer, **kwargs) -> "MLMambaProcessor":
        """The processor that matches an `MLMambaConfig`: the towers' image size and the config's
        `image_seq_length`. Adds `<image>` to `tokenizer` as a special token when it lacks it, and checks that its
        id is the config's `image_token_id`."""
        if IMAGE_TOKEN not in tokenizer.get_vocab():
            tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
        token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if token_id != config.image_token_id:
            raise ValueError(
                f"the tokenizer maps {IMAGE_TOKEN} to id {token_id} but the model's config.image_token_id is "
                f"{config.image_token_id}; set image_token_id={token_id} in the config or use a tokenizer whose "
                f"{IMAGE_TOKEN} has id {config.image_token_id}"
            )
        size = config.dino_config.image_size
        size = size if isinstance(size, int) else size[0]
        dino, siglip = default_image_processors(size)
        return cls(tokenizer, dino, siglip, image_seq_length=config.image_seq_length, **kwargs)

    def apply_chat_template(self, conversation, *args, **kwargs):
        """transformers' own. Assistant masks need a transformers that shifts them past the expanded image tokens
        (one with `ProcessorMixin._adjust_assistant_masks_indices`); older ones would mark the wrong tokens."""
        shifts_masks = hasattr(ProcessorMixin, "_adjust_assistant_masks_indices")
        if kwargs.get("return_assistant_tokens_mask") and not shifts_masks:
            raise NotImplementedError(
                "return_assistant_tokens_mask needs a newer transformers: this one does not account for the expanded "
                "image tokens. Upgrade transformers, or mask the prompt by its length."
            )
        return super().apply_chat_template(conversation, *args, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values"]

    def __call__(self, images=None, text=None, videos=None, audio=None, **kwargs) -> BatchFeature:
        """Tokenize prompts and preprocess their images.

        Args:
            images: one image, a list of images (in placeholder order across the batch), a list with one list of
                images per prompt, or a 4-D array/tensor holding a batch. See `to_rgb_image` for image types.
            text (`str` or `list[str]`): prompts with one `<image>` wherever an image goes (the chat template
                puts it first, as released).
            kwargs: tokenizer arguments (`padding`, `truncation`, `max_length`, `return_tensors`, ...). Without
                truncation a prompt longer than the tokenizer's `model_max_length` is an error.

        Returns:
            `BatchFeature` with `input_ids`, `attention_mask` and, with images, `pixel_values` of shape
            (images, 2, 3, H, W) in the order the placeholders appear.
        """
        if videos is not None or audio is not None:
            raise ValueError("ML-Mamba reads images and text only; got videos or audio")
        unknown = sorted(set(kwargs) - set(TEXT_KWARGS) - {"return_text_replacement_offsets"})
        if unknown:
            raise TypeError(f"unexpected arguments {unknown}; the processor takes images, text and {TEXT_KWARGS}")
        if text is None:
            raise ValueError(
                f"the processor needs a prompt: pass text with one {self.image_token} per image "
                "(processor.apply_chat_template builds it)"
            )
        prompts = [text] if isinstance(text, str) else text
        if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"text must be a string or a non-empty list of strings, got {type(text).__name__}")

        flat_images = self._match_images_to_prompts(images, prompts)
        replacements = [self.image_token * self.image_seq_length] * len(flat_images)
        expanded, offsets = self.get_text_with_replacements(list(prompts), replacements)
        text_inputs = self._tokenize(expanded, kwargs)
        if kwargs.get("return_text_replacement_offsets"):
            text_inputs["text_replacement_offsets"] = offsets
        if flat_images:
            text_inputs["pixel_values"] = self.preprocess_images(flat_images)
        return BatchFeature(
            dict(text_inputs), tensor_type=kwargs.get("return_tensors"),
            skip_tensor_conversion=["text_replacement_offsets"],
        )

    def _match_images_to_prompts(self, images, prompts: list[str]) -> list[Image.Image]:
        """Check the images against the placeholders and return them flat, in placeholder order, as RGB."""
        counts = [prompt.count(self.image_token) for prompt in prompts]
        if images is None:
            if any(counts):
                raise ValueError(
                    f"the text has {sum(counts)} {self.image_token} placeholder(s) but no images were given; "
                    f"pass one image per placeholder"
                )
            return []
        if _is_image_batch(images):
            images = list(images)
        elif not isinstance(images, (list, tuple)):
            images = [images]
        if images and all(isinstance(group, (list, tuple)) for group in images):
            if len(images) != len(prompts):
                raise ValueError(
                    f"got {len(images)} lists of images for {len(prompts)} prompts; give one list per prompt "
                    "(empty for a prompt without images) or one flat list in placeholder order"
                )
            for index, (group, count) in enumerate(zip(images, counts)):
                if len(group) != count:
                    raise ValueError(
                        f"prompt {index} has {count} {self.image_token} placeholder(s) but {len(group)} image(s) "
                        f"were given for it; add one {self.image_token} per image"
                    )
            images = [image for group in images for image in group]
        elif any(isinstance(group, (list, tuple)) for group in images):
            raise TypeError("images must be a flat list of images or one list of images per prompt, not a mix")
        if len(images) != sum(counts):
            if not any(counts):
                raise ValueError(
                    f"got {len(images)} image(s) but the text has no {self.image_token} placeholder; put one "
                    f"{self.image_token} where each image goes (the chat template puts it first)"
                )
            raise ValueError(
                f"got {len(images)} image(s) but {sum(counts)} {self.image_token} placeholder(s) in the text; "
                f"add one {self.image_token} per image"
            )
        return [_checked_rgb(image, index) for index, image in enumerate(images)]

    def _tokenize(self, prompts: list[str], kwargs: dict) -> dict:
        """Tokenize expanded prompts, refusing over-long prompts and truncation that cuts into an image."""
        text_kwargs = {key: kwargs[key] for key in TEXT_KWARGS if key in kwargs and key != "return_tensors"}
        text_kwargs.setdefault("padding_side", self.padding_side)
        keep_mask = text_kwargs.pop("return_attention_mask", True)
        encoding = self.tokenizer(prompts, return_attention_mask=True, **text_kwargs)
        lengths = [sum(mask) for mask in encoding["attention_mask"]]
        limit = self.tokenizer.model_max_length
        if text_kwargs.get("truncation") in (None, False, "do_not_truncate") and max(lengths) > limit:
            longest = int(np.argmax(lengths))
            raise ValueError(
                f"prompt {longest} is {lengths[longest]} tokens long (each image counts {self.image_seq_length}) "
                f"but the model takes at most {limit} (tokenizer.model_max_length); shorten it or pass "
                "truncation=True"
            )
        expected = [prompt.count(self.image_token) for prompt in prompts]
        found = [row.count(self.image_token_id) for row in encoding["input_ids"]]
        for index, (want, got) in enumerate(zip(expected, found)):
            if want != got:
                raise ValueError(
                    f"truncation cut into an image in prompt {index} ({got} of its {want} image tokens are left); "
                    "raise max_length or shorten the text"
                )
        if not keep_mask:
            del encoding["attention_mask"]
        return encoding

    def preprocess_images(self, images: list) -> np.ndarray:
        """(images, 2, 3, H, W) float32: each image (any type `to_rgb_image` takes) normalised for DINOv2, then
        for SigLIP. What `__call__` puts in `pixel_values`; data collators that tokenize on their own use it too."""
        images = [_checked_rgb(image, index) for index, image in enumerate(images)]
        towers = [
            np.asarray(processor(images, return_tensors="np")["pixel_values"], dtype=np.float32)
            for processor in (self.dino_image_processor, self.siglip_image_processor)
        ]
        return np.stack(towers, axis=1)


def _checked_rgb(image, index: int) -> Image.Image:
    try:
        return to_rgb_image(image)
    except TypeError as error:
        raise TypeError(f"image {index}: {error}") from error
    except ValueError as error:
        raise ValueError(f"image {index}: {error}") from error


def _single_token_id(tokenizer, token: str) -> int:
    ids = tokenizer.encode(token, add_special_tokens=False)
    if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
        raise ValueError(
            f"the tokenizer must hold {token!r} as one token (it gives ids {ids}); build the processor with "
            f"MLMambaProcessor.from_model_config, which adds it"
        )
    return ids[0]


def _pil_backend(image_processor):
    """The same image processor on the PIL backend, which resizes like the released transforms.

    A saved image processor records its base class name (e.g. `BitImageProcessor`), and transformers reloads
    that name with the torchvision backend whenever torchvision is installed; its resize differs slightly.
    """
    name = type(image_processor).__name__
    pil_class = None if name.endswith("Pil") else getattr(transformers, f"{name}Pil", None)
    return image_processor if pil_class is None else pil_class(**image_processor.to_dict())


def _square_size(image_processor, tower: str) -> int:
    """The output size of a naive square resize; anything else (crop, shortest edge) is not the released model."""
    size = dict(image_processor.size) if image_processor.size is not None else {}
    if set(size) != {"height", "width"} or size["height"] != size["width"]:
        raise ValueError(
            f"the {tower} image processor must resize to a square {{'height': S, 'width': S}}, got size {size}"
        )
    if getattr(image_processor, "do_center_crop", False):
        raise ValueError(
            f"the {tower} image processor must not crop (ML-Mamba resizes naively); set do_center_crop=False"
        )
    return size["height"]


__all__ = ["MLMambaProcessor", "default_image_processors", "to_rgb_image"]
