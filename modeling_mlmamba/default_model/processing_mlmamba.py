"""Everything between raw inputs and model tensors: the prompt, the chat format, and the images (through
`MLMambaImageProcessor`).

One `MLMambaProcessor` turns images and prompts into `input_ids`, `attention_mask` and `pixel_values` of shape
(images, 2, 3, H, W): each image resized once (bicubic, to a square, no crop) and normalised for DINOv2 (index 0) and
for SigLIP (index 1). Each `<image>` in a prompt becomes `image_seq_length` placeholder tokens that the model fills
with that image's features, in order.
"""

from tokenizers import AddedToken
from transformers import GenerationConfig, ProcessorMixin
from transformers.feature_extraction_utils import BatchFeature
from transformers.utils.chat_template_utils import render_jinja_template

from .image_processing_mlmamba import MLMambaImageProcessor, MLMambaImagesKwargs, flat_images

IMAGE_TOKEN = "<image>"
DEFAULT_IMAGE_SEQ_LENGTH = 729

# The released Zephyr-style format, image first: `<image><|user|>\n{question}<|endoftext|>\n<|assistant|>\n`, each
# answer closed by `<|endoftext|>`, later user turns preceded by "\n". A system message (one, first) becomes
# `<|system|>\n{text}<|endoftext|>\n` right before the first `<|user|>`, after that turn's images: the model was
# trained with the image tokens at the very start of the sequence. Like the released prompt builder, the text of a
# message has any literal `<image>` removed and is stripped, and an empty answer is a single space. The answer and
# its `<|endoftext|>` (what training supervises) are marked for `return_assistant_tokens_mask`.
CHAT_TEMPLATE = (
    "{%- macro text_of(content) -%}"
    "{%- if content is none -%}{%- set text = '' -%}"
    "{%- elif content is string -%}{%- set text = content -%}"
    "{%- else -%}{%- set text = content | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('\\n')"
    " -%}{%- endif -%}"
    "{{- text | replace('<image>', '') | trim -}}"
    "{%- endmacro -%}"
    "{%- if not messages -%}"
    "{{ raise_exception('an ML-Mamba chat needs at least one user message; got an empty chat') }}"
    "{%- endif -%}"
    "{%- set system = messages[0] if messages[0]['role'] == 'system' else none -%}"
    "{%- set offset = 0 if system is none else 1 -%}"
    "{%- if messages | length == offset -%}"
    "{{ raise_exception('an ML-Mamba chat needs a user message after the system message') }}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- set position = loop.index0 | string -%}"
    "{%- set content = message['content'] -%}"
    "{%- set images = [] if content is none or content is string else content | selectattr('type', 'equalto', 'image')"
    " | list -%}"
    "{%- if images and message['role'] != 'user' -%}"
    "{{ raise_exception('images can only be in user messages; got one in the ' + message['role'] + ' message at '"
    " + position) }}"
    "{%- endif -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- if not loop.first -%}"
    "{{ raise_exception('a system message can only be the first message; got one at message ' + position) }}"
    "{%- endif -%}"
    "{%- elif (message['role'] == 'user') != ((loop.index0 - offset) % 2 == 0)"
    " or message['role'] not in ('user', 'assistant') -%}"
    "{{ raise_exception('ML-Mamba chats alternate user and assistant turns, starting with the user; got role '"
    " + message['role'] + ' at message ' + position) }}"
    "{%- elif message['role'] == 'user' -%}"
    "{%- if loop.index0 > offset -%}{{ '\\n' }}{%- endif -%}"
    "{{ '<image>' * (images | length) }}"
    "{%- if loop.index0 == 1 and system is not none -%}"
    "{{ '<|system|>\\n' + text_of(system['content']) + '<|endoftext|>\\n' }}"
    "{%- endif -%}"
    "{{ '<|user|>\\n' + text_of(content) + '<|endoftext|>\\n' }}"
    "{%- else -%}"
    "{{ '<|assistant|>\\n' }}"
    "{%- generation -%}{{ (text_of(content) or ' ') + '<|endoftext|>' }}{%- endgeneration -%}"
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
# Image processor arguments; `return_tensors` is shared with the tokenizer, the image sequence length is the
# processor's own setting.
IMAGE_KWARGS = tuple(
    name for name in MLMambaImagesKwargs.__annotations__ if name not in (*TEXT_KWARGS, "image_seq_length")
)
# What earlier versions of this package saved in processor_config.json: one image processor per tower.
TOWER_PROCESSOR_KEYS = ("dino_image_processor", "siglip_image_processor")


def render_chat(messages: list[dict], add_generation_prompt: bool = False, chat_template: str = CHAT_TEMPLATE) -> str:
    """A chat rendered with the chat template, without a tokenizer (which `apply_chat_template` needs): for text
    that is written before a tokenizer exists, such as a tokenizer's training text."""
    (rendered,), _ = render_jinja_template(
        conversations=[messages], chat_template=chat_template, add_generation_prompt=add_generation_prompt
    )
    return rendered


class MLMambaProcessor(ProcessorMixin):
    r"""
    Bundles the tokenizer and the image processor of ML-Mamba, and owns the chat format.

    Args:
        tokenizer: the language model's tokenizer; it must hold `image_token` as one token (see
            [`MLMambaProcessor.from_model_config`], which adds it). Its `padding_side` is set to `padding_side`,
            so that batches padded outside the processor (pipelines) are padded the same way.
        image_processor ([`MLMambaImageProcessor`] or [`MLMambaImageProcessorTorchvision`], *optional*): the
            shared resize and both towers' normalisations; pixel_values are (images, 2, 3, H, W), DINOv2 first.
            Default: 384 px, as released.
        image_seq_length (`int`): LM positions one image occupies (729 when released: a 27x27 patch grid).
        padding_side (`str`): where padding goes in a batch. Left, so that a recurrent model's last position is
            every prompt's last real token and generation continues from it.
        chat_template (`str`, *optional*): defaults to the released Zephyr-style format (`CHAT_TEMPLATE`): images
            first, then an optional system message as `<|system|>\n...<|endoftext|>\n`, then the turns.

    Folders saved by earlier versions, with one image processor per tower (`dino_image_processor` and
    `siglip_image_processor`), load into the same single image processor.
    """

    image_token = IMAGE_TOKEN

    def __init__(
        self,
        tokenizer=None,
        image_processor=None,
        image_seq_length: int = DEFAULT_IMAGE_SEQ_LENGTH,
        padding_side: str = "left",
        chat_template: str | None = None,
    ):
        if tokenizer is None:
            raise ValueError("MLMambaProcessor needs the language model's tokenizer")
        image_processor = MLMambaImageProcessor() if image_processor is None else image_processor
        # Both backends share the mixin; by name, since a folder's own copy of the code (trust_remote_code) defines
        # classes of the same names.
        if not any(cls.__name__ == "MLMambaImageProcessingMixin" for cls in type(image_processor).__mro__):
            raise TypeError(
                f"image_processor must be an MLMambaImageProcessor or MLMambaImageProcessorTorchvision (both towers' "
                f"pixels from one resize), got {type(image_processor).__name__}"
            )
        if not isinstance(image_seq_length, int) or image_seq_length < 1:
            raise ValueError(f"image_seq_length must be a positive integer, got {image_seq_length!r}")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.image_seq_length = image_seq_length
        self.padding_side = padding_side
        tokenizer.padding_side = padding_side
        self.image_token_id = _single_token_id(tokenizer, self.image_token)
        super().__init__(
            tokenizer, image_processor, chat_template=CHAT_TEMPLATE if chat_template is None else chat_template
        )

    @classmethod
    def from_model_config(cls, config, tokenizer, **kwargs) -> "MLMambaProcessor":
        """The processor that matches an `MLMambaConfig`: the towers' image size and the config's
        `image_seq_length`. Adds `<image>` to `tokenizer` as a special token when it lacks it, and checks that its
        id is the config's `image_token_id` and that every token id has an embedding in the language model."""
        if IMAGE_TOKEN not in tokenizer.get_vocab():
            tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
        token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if token_id != config.image_token_id:
            raise ValueError(
                f"the tokenizer maps {IMAGE_TOKEN} to id {token_id} but the model's config.image_token_id is "
                f"{config.image_token_id}; set image_token_id={token_id} in the config or use a tokenizer whose "
                f"{IMAGE_TOKEN} has id {config.image_token_id}"
            )
        vocab_size = config.text_config.vocab_size
        if len(tokenizer) > vocab_size:
            raise ValueError(
                f"the tokenizer has {len(tokenizer)} tokens but the language model embeds only {vocab_size} "
                f"(config.text_config.vocab_size): ids from {vocab_size} on would index past the embeddings; use the "
                "model's own tokenizer, or grow the model first with model.resize_token_embeddings(len(tokenizer))"
            )
        size = config.dino_config.image_size
        size = size if isinstance(size, int) else size[0]
        image_processor = MLMambaImageProcessor(size={"height": size, "width": size})
        return cls(tokenizer, image_processor, image_seq_length=config.image_seq_length, **kwargs)

    @classmethod
    def _get_arguments_from_pretrained(cls, pretrained_model_name_or_path, processor_dict=None, **kwargs):
        """transformers' loading, plus folders saved with one image processor per tower."""
        processor_dict = processor_dict or {}
        if "image_processor" in processor_dict or not all(key in processor_dict for key in TOWER_PROCESSOR_KEYS):
            return super()._get_arguments_from_pretrained(pretrained_model_name_or_path, processor_dict, **kwargs)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(pretrained_model_name_or_path, **kwargs)
        image_processor = MLMambaImageProcessor.from_tower_processors(
            *(processor_dict[key] for key in TOWER_PROCESSOR_KEYS)
        )
        return [tokenizer, image_processor]

    @property
    def image_size(self) -> int:
        """Side of the square every image is resized to."""
        return self.image_processor.image_size

    def apply_chat_template(self, conversation, *args, **kwargs):
        """transformers' own, with an empty chat refused up front. Assistant masks need a transformers that shifts
        them past the expanded image tokens (one with `ProcessorMixin._adjust_assistant_masks_indices`); older ones
        would mark the wrong tokens."""
        chats = conversation if conversation and isinstance(conversation[0], (list, tuple)) else [conversation]
        if not all(chats):
            raise ValueError("an ML-Mamba chat needs at least one user message; got an empty chat")
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
            kwargs: tokenizer arguments (`padding`, `truncation`, `max_length`, `return_tensors`, ...) and image
                processor arguments (`do_resize`, `size`, ...), flat or as `text_kwargs` / `images_kwargs`. Without
                truncation a prompt longer than the tokenizer's `model_max_length` is an error; truncation that
                would cut into an image or cut a generation prompt off a prompt's end is an error too.

        Returns:
            `BatchFeature` with `input_ids`, `attention_mask` and, with images, `pixel_values` of shape
            (images, 2, 3, H, W) in the order the placeholders appear.
        """
        if videos is not None or audio is not None:
            raise ValueError("ML-Mamba reads images and text only; got videos or audio")
        text_kwargs, images_kwargs = self._split_kwargs(kwargs)
        if text is None:
            raise ValueError(
                f"the processor needs a prompt: pass text with one {self.image_token} per image "
                "(processor.apply_chat_template builds it)"
            )
        prompts = [text] if isinstance(text, str) else text
        if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"text must be a string or a non-empty list of strings, got {type(text).__name__}")

        flat = self._match_images_to_prompts(images, prompts)
        pixel_values = self._preprocess_images(flat, images_kwargs) if flat else None
        replacements = [self.image_token * self.image_seq_length] * len(flat)
        expanded, offsets = self.get_text_with_replacements(list(prompts), replacements)
        text_inputs = self._tokenize(expanded, text_kwargs)
        if kwargs.get("return_text_replacement_offsets"):
            text_inputs["text_replacement_offsets"] = offsets
        if pixel_values is not None:
            text_inputs["pixel_values"] = pixel_values
        return BatchFeature(
            dict(text_inputs), tensor_type=text_kwargs.get("return_tensors"),
            skip_tensor_conversion=["text_replacement_offsets"],
        )

    @staticmethod
    def _split_kwargs(kwargs: dict) -> tuple[dict, dict]:
        """Flat keyword arguments (and `text_kwargs` / `images_kwargs` dicts) -> tokenizer and image arguments."""
        kwargs = dict(kwargs)
        text_kwargs, images_kwargs = dict(kwargs.pop("text_kwargs", {})), dict(kwargs.pop("images_kwargs", {}))
        kwargs.pop("return_text_replacement_offsets", None)
        unknown = sorted(set(kwargs) - set(TEXT_KWARGS) - set(IMAGE_KWARGS))
        unknown += sorted(set(text_kwargs) - set(TEXT_KWARGS)) + sorted(set(images_kwargs) - set(IMAGE_KWARGS))
        if unknown:
            defaults = GenerationConfig()
            generation = [name for name in unknown if hasattr(defaults, name)]
            advice = (f"; {generation} are generation arguments: pass them to model.generate(...), or to a pipeline "
                      "as generate_kwargs={...}") if generation else ""
            raise TypeError(
                f"unexpected arguments {unknown}; the processor takes images, text, tokenizer arguments {TEXT_KWARGS} "
                f"and image processor arguments {IMAGE_KWARGS}{advice}"
            )
        text_kwargs.update({key: value for key, value in kwargs.items() if key in TEXT_KWARGS})
        images_kwargs.update({key: value for key, value in kwargs.items() if key in IMAGE_KWARGS})
        return text_kwargs, images_kwargs

    def _match_images_to_prompts(self, images, prompts: list[str]) -> list:
        """Check the images against the placeholders and return them flat, in placeholder order."""
        counts = [prompt.count(self.image_token) for prompt in prompts]
        if images is None:
            if any(counts):
                raise ValueError(
                    f"the text has {sum(counts)} {self.image_token} placeholder(s) but no images were given; "
                    f"pass one image per placeholder"
                )
            return []
        groups = images if isinstance(images, (list, tuple)) else None
        if groups and all(isinstance(group, (list, tuple)) for group in groups):
            if len(groups) != len(prompts):
                raise ValueError(
                    f"got {len(groups)} lists of images for {len(prompts)} prompts; give one list per prompt "
                    "(empty for a prompt without images) or one flat list in placeholder order"
                )
            for index, (group, count) in enumerate(zip(groups, counts)):
                if len(group) != count:
                    raise ValueError(
                        f"prompt {index} has {count} {self.image_token} placeholder(s) but {len(group)} image(s) "
                        f"were given for it; add one {self.image_token} per image"
                    )
        elif groups and any(isinstance(group, (list, tuple)) for group in groups):
            raise TypeError("images must be a flat list of images or one list of images per prompt, not a mix")
        flat = flat_images(images)
        if len(flat) != sum(counts):
            if not any(counts):
                raise ValueError(
                    f"got {len(flat)} image(s) but the text has no {self.image_token} placeholder; put one "
                    f"{self.image_token} where each image goes (the chat template puts it first)"
                )
            raise ValueError(
                f"got {len(flat)} image(s) but {sum(counts)} {self.image_token} placeholder(s) in the text; "
                f"add one {self.image_token} per image"
            )
        return flat

    def _preprocess_images(self, images: list, images_kwargs: dict):
        pixel_values = self.image_processor(images, return_tensors="np", **images_kwargs)["pixel_values"]
        if pixel_values.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"the image arguments {images_kwargs} give {pixel_values.shape[-2]}x{pixel_values.shape[-1]} pixels, "
                f"but the model reads {self.image_size}x{self.image_size} images; leave the size to the processor"
            )
        return pixel_values

    def _tokenize(self, prompts: list[str], text_kwargs: dict) -> dict:
        """Tokenize expanded prompts, refusing over-long prompts and truncation that cuts into an image or cuts the
        generation prompt off a prompt's end."""
        text_kwargs = {key: value for key, value in text_kwargs.items() if key != "return_tensors"}
        text_kwargs.setdefault("padding_side", self.padding_side)
        keep_mask = text_kwargs.pop("return_attention_mask", True)
        truncation = text_kwargs.get("truncation") not in (None, False, "do_not_truncate")
        encoding = self.tokenizer(prompts, return_attention_mask=True, **text_kwargs)
        lengths = [sum(mask) for mask in encoding["attention_mask"]]
        limit = self.tokenizer.model_max_length
        if not truncation and max(lengths) > limit:
            longest = lengths.index(max(lengths))
            raise ValueError(
                f"prompt {longest} is {lengths[longest]} tokens long (each image counts {self.image_seq_length}) "
                f"but the model takes at most {limit} (tokenizer.model_max_length); shorten it or pass "
                "truncation=True"
            )
        if truncation:
            self._check_truncation(prompts, encoding, lengths, text_kwargs)
        if not keep_mask:
            del encoding["attention_mask"]
        return encoding

    def _check_truncation(self, prompts: list[str], encoding, lengths: list[int], text_kwargs: dict) -> None:
        untruncated = {key: value for key, value in text_kwargs.items() if key not in ("truncation", "max_length")}
        untruncated.update(padding=False, truncation=False)
        full_lengths = [len(ids) for ids in self.tokenizer(prompts, **untruncated)["input_ids"]]
        generation_prompt = self._generation_prompt()
        for index, prompt in enumerate(prompts):
            want = prompt.count(self.image_token)
            got = encoding["input_ids"][index].count(self.image_token_id)
            if want != got:
                raise ValueError(
                    f"truncation cut into an image in prompt {index} ({got} of its {want} image tokens are left); "
                    f"raise max_length (now {text_kwargs.get('max_length')}) or shorten the text"
                )
            cut = lengths[index] < full_lengths[index]
            if cut and self.tokenizer.truncation_side == "right" and generation_prompt and prompt.endswith(
                generation_prompt
            ):
                raise ValueError(
                    f"truncation would cut the end of prompt {index} ({full_lengths[index]} tokens, max_length "
                    f"{text_kwargs.get('max_length')}), where the generation prompt {generation_prompt!r} is; "
                    "truncate from the left (processor.tokenizer.truncation_side = 'left') or raise max_length"
                )

    def _generation_prompt(self) -> str:
        """What `add_generation_prompt=True` appends to a chat under this processor's template."""
        probe = [{"role": "user", "content": "?"}]
        with_prompt = render_chat(probe, add_generation_prompt=True, chat_template=self.chat_template)
        without = render_chat(probe, chat_template=self.chat_template)
        return with_prompt[len(without):] if with_prompt.startswith(without) else ""

    def preprocess_images(self, images: list):
        """(images, 2, 3, H, W) float32 numpy array of any images `to_rgb_image` takes: what `__call__` puts in
        `pixel_values`; data collators that tokenize on their own use it too."""
        return self.image_processor(images, return_tensors="np")["pixel_values"]


def _single_token_id(tokenizer, token: str) -> int:
    ids = tokenizer.encode(token, add_special_tokens=False)
    if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
        raise ValueError(
            f"the tokenizer must hold {token!r} as one token (it gives ids {ids}); build the processor with "
            f"MLMambaProcessor.from_model_config, which adds it"
        )
    return ids[0]


__all__ = ["CHAT_TEMPLATE", "MLMambaProcessor", "render_chat"]
