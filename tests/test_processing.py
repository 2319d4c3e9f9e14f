import numpy as np
import pytest
import torch
from conftest import tiny_processor, tiny_tokenizer
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoProcessor, BitImageProcessorPil, PreTrainedTokenizerFast, ProcessorMixin

from modeling_mlmamba import MLMambaConfig, MLMambaProcessor
from modeling_mlmamba.processing_mlmamba import default_image_processors

IMAGENET_MEAN, IMAGENET_STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def random_image(width=70, height=50, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def reference_pixels(image: Image.Image, size: int, mean, std) -> np.ndarray:
    """The released "resize-naive" transform: RGB, bicubic resize to a square, /255, per-channel normalisation."""
    array = np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC), dtype=np.float64) / 255
    return ((array - mean) / std).transpose(2, 0, 1)


def released_zephyr_prompt(turns: list[str]) -> str:
    """The released prompt builder: user turns wrapped with the assistant header, answers closed by end-of-text,
    later user turns preceded by a newline, message text stripped."""
    prompt = ""
    for index, message in enumerate(turns):
        message = message.replace("<image>", "").strip()
        if index % 2:
            prompt += f"{message if message else ' '}<|endoftext|>"
        else:
            prompt += ("\n" if index else "") + f"<|user|>\n{message}<|endoftext|>\n<|assistant|>\n"
    return prompt


def chat(*turns, images_first_turn: int = 1):
    messages = []
    for index, text in enumerate(turns):
        role = "assistant" if index % 2 else "user"
        content = [{"type": "image"}] * (images_first_turn if index == 0 else 0) + [{"type": "text", "text": text}]
        messages.append({"role": role, "content": content})
    return messages


def settings(processor) -> dict:
    """The processor's saved settings, without the `auto_map` entries that saving adds."""
    return {
        key: {k: v for k, v in value.items() if k != "auto_map"} if isinstance(value, dict) else value
        for key, value in processor.to_dict().items()
        if key != "auto_map"
    }


@pytest.fixture
def processor():
    return tiny_processor()


def test_default_processor_is_the_released_preprocessing():
    processor = MLMambaProcessor(tiny_tokenizer(model_max_length=2048))
    assert processor.image_size == 384 and processor.image_seq_length == 729
    assert processor.padding_side == "left" and processor.image_token == "<image>"
    image = random_image(500, 333)
    pixels = processor(images=image, text="<image>", return_tensors="np")["pixel_values"]
    assert pixels.shape == (1, 2, 3, 384, 384) and pixels.dtype == np.float32
    np.testing.assert_allclose(pixels[0, 0], reference_pixels(image, 384, IMAGENET_MEAN, IMAGENET_STD), atol=1e-5)
    np.testing.assert_allclose(pixels[0, 1], reference_pixels(image, 384, 0.5, 0.5), atol=1e-5)


def test_processor_from_model_config_follows_the_config():
    config = MLMambaConfig.tiny()
    tokenizer = tiny_tokenizer()
    processor = MLMambaProcessor.from_model_config(config, tokenizer)
    assert processor.image_size == config.dino_config.image_size == 56
    assert processor.image_seq_length == config.image_seq_length == 16
    assert processor.image_token_id == config.image_token_id


def test_from_model_config_adds_a_missing_image_token():
    backend = Tokenizer(models.WordLevel({"<|endoftext|>": 0, "[UNK]": 1, "hello": 2}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    plain = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", unk_token="[UNK]")
    with pytest.raises(ValueError, match="as one token"):
        MLMambaProcessor(plain)
    processor = MLMambaProcessor.from_model_config(MLMambaConfig.tiny(image_token_id=3), plain)
    assert processor.image_token_id == 3
    assert plain.encode("hello <image>", add_special_tokens=False) == [2, 3]


def test_from_model_config_rejects_a_tokenizer_disagreeing_with_the_config():
    with pytest.raises(ValueError, match="maps <image> to id 127 but the model's config.image_token_id is 5"):
        MLMambaProcessor.from_model_config(MLMambaConfig.tiny(image_token_id=5), tiny_tokenizer())


def test_save_and_load_keep_every_setting(tmp_path):
    tokenizer = tiny_tokenizer()
    dino, siglip = default_image_processors(56)
    template = "{% for message in messages %}{{ message['content'] }}{% endfor %}"
    processor = MLMambaProcessor(
        tokenizer, dino, siglip, image_seq_length=16, padding_side="right", chat_template=template
    )
    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, MLMambaProcessor)
    assert settings(loaded) == settings(processor)
    assert (loaded.image_seq_length, loaded.padding_side, loaded.image_size) == (16, "right", 56)
    assert loaded.chat_template == template
    assert loaded.tokenizer.get_vocab() == tokenizer.get_vocab()
    assert list(loaded.dino_image_processor.image_mean) == list(IMAGENET_MEAN)
    prompts = ["<image><|user|>\nwhat color is the circle?", "yes"]
    images = [random_image()]
    expected = processor(images=images, text=prompts, padding=True, return_tensors="pt")
    actual = loaded(images=images, text=prompts, padding=True, return_tensors="pt")
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[key], actual[key]) for key in expected)


def test_chat_template_is_the_released_prompt_with_the_image_first(processor):
    prompt = processor.apply_chat_template(chat("What color is the circle?"), add_generation_prompt=True)
    assert prompt == "<image><|user|>\nWhat color is the circle?<|endoftext|>\n<|assistant|>\n"
    assert prompt == "<image>" + released_zephyr_prompt(["What color is the circle?"])


def test_chat_template_multi_turn_matches_the_released_builder(processor):
    turns = ["  <image>\nWhat color is the circle? ", "red", "And the square?", "", "Count them."]
    prompt = processor.apply_chat_template(chat(*turns), add_generation_prompt=True)
    assert prompt == "<image>" + released_zephyr_prompt(turns)
    without_prompt = processor.apply_chat_template(chat(*turns[:2]))
    assert without_prompt == "<image>" + released_zephyr_prompt(turns[:2])


def test_chat_template_accepts_plain_string_content_and_text_only_chats(processor):
    messages = [{"role": "user", "content": "How many objects are there?"}]
    assert processor.apply_chat_template(messages, add_generation_prompt=True) == released_zephyr_prompt(
        ["How many objects are there?"]
    )


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}],
    ],
)
def test_chat_template_rejects_what_the_released_format_cannot_express(processor, messages):
    with pytest.raises(Exception, match="alternate user and assistant"):
        processor.apply_chat_template(messages)


def test_each_placeholder_expands_to_image_seq_length_tokens_in_order(processor):
    first, second = random_image(seed=1), random_image(seed=2)
    out = processor(images=[first, second], text="<image> what <image> color", return_tensors="pt")
    ids = out["input_ids"][0].tolist()
    n = processor.image_seq_length
    what, color = processor.tokenizer.convert_tokens_to_ids(["what", "color"])
    assert ids == [127] * n + [what] + [127] * n + [color]
    assert out["pixel_values"].shape == (2, 2, 3, 56, 56)
    alone = processor(images=second, text="<image>", return_tensors="pt")["pixel_values"][0]
    assert torch.equal(out["pixel_values"][1], alone)


def test_text_only_call_returns_no_pixels(processor):
    out = processor(text=["what color", "yes"], padding=True, return_tensors="pt")
    assert set(out.keys()) == {"input_ids", "attention_mask"}
    what, color, yes = processor.tokenizer.convert_tokens_to_ids(["what", "color", "yes"])
    assert out["input_ids"].tolist() == [[what, color], [0, yes]]
    assert out["attention_mask"].tolist() == [[1, 1], [0, 1]]


def test_nested_and_flat_image_lists_are_the_same_batch(processor):
    images = [random_image(seed=1), random_image(seed=2), random_image(seed=3)]
    prompts = ["<image><image> what", "yes", "<image> no"]
    flat = processor(images=images, text=prompts, padding=True, return_tensors="pt")
    nested = processor(images=[images[:2], [], images[2:]], text=prompts, padding=True, return_tensors="pt")
    assert all(torch.equal(flat[key], nested[key]) for key in flat)
    assert flat["pixel_values"].shape[0] == 3


def test_pil_numpy_and_torch_inputs_give_the_same_pixels(processor):
    image = random_image()
    array = np.array(image)
    expected = processor(images=image, text="<image>", return_tensors="pt")["pixel_values"]
    variants = [
        array,                                                   # HWC uint8
        np.ascontiguousarray(array.transpose(2, 0, 1)),          # CHW uint8
        torch.from_numpy(array).permute(2, 0, 1),                # torch CHW uint8
        torch.from_numpy(array),                                 # torch HWC uint8
        array.astype(np.float32) / 255,                          # HWC float in [0, 1]
        torch.from_numpy(array).permute(2, 0, 1).float() / 255,  # torch CHW float
        (array.astype(np.uint16) * 257),                         # 16-bit
    ]
    for variant in variants:
        actual = processor(images=variant, text="<image>", return_tensors="pt")["pixel_values"]
        assert torch.equal(actual, expected), type(variant)
    batch = torch.from_numpy(np.stack([array, array])).permute(0, 3, 1, 2)
    batched = processor(images=batch, text=["<image>", "<image>"], return_tensors="pt")["pixel_values"]
    assert torch.equal(batched, expected.expand(2, -1, -1, -1, -1))


def _with_alpha(image: Image.Image, mode: str) -> Image.Image:
    converted = image.convert(mode[:-1] if mode != "RGBA" else "RGB")
    alpha = Image.fromarray(np.random.default_rng(5).integers(0, 256, image.size[::-1], dtype=np.uint8))
    converted.putalpha(alpha)
    return converted


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda rgb: _with_alpha(rgb, "RGBA"), lambda rgb: rgb),
        (lambda rgb: _with_alpha(rgb, "LA"), lambda rgb: rgb.convert("L").convert("RGB")),
        (lambda rgb: rgb.convert("L"), lambda rgb: Image.merge("RGB", [rgb.convert("L")] * 3)),
        (lambda rgb: rgb.quantize(16), lambda rgb: rgb.quantize(16).convert("RGB")),
        (lambda rgb: rgb.convert("CMYK"), lambda rgb: rgb.convert("CMYK").convert("RGB")),
        (
            lambda rgb: Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16) * 257),
            lambda rgb: Image.merge("RGB", [rgb.convert("L")] * 3),
        ),
        (
            lambda rgb: Image.fromarray(np.asarray(rgb.convert("L")).astype(np.int32) * 257).convert("I"),
            lambda rgb: Image.merge("RGB", [rgb.convert("L")] * 3),
        ),
    ],
    ids=["RGBA", "LA", "L", "P", "CMYK", "16-bit", "32-bit-int"],
)
def test_every_image_mode_becomes_rgb(processor, make, expected):
    rgb = random_image()
    actual = processor(images=make(rgb), text="<image>", return_tensors="pt")["pixel_values"]
    reference = processor(images=expected(rgb), text="<image>", return_tensors="pt")["pixel_values"]
    assert torch.equal(actual, reference)


def test_images_can_be_paths(processor, tmp_path):
    image = random_image()
    image.save(tmp_path / "picture.png")
    from_path = processor(images=str(tmp_path / "picture.png"), text="<image>", return_tensors="pt")["pixel_values"]
    assert torch.equal(from_path, processor(images=image, text="<image>", return_tensors="pt")["pixel_values"])


def test_chat_messages_with_images_give_model_inputs(processor):
    image = random_image()
    messages = chat("What color is the circle?")
    messages[0]["content"][0]["image"] = image
    out = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    prompt = processor.apply_chat_template(chat("What color is the circle?"), add_generation_prompt=True)
    expected = processor(images=image, text=prompt, return_tensors="pt")
    assert all(torch.equal(out[key], expected[key]) for key in expected)


def test_assistant_mask_covers_the_answers_and_their_end_of_text(processor):
    messages = chat("What color is the circle?", "red", "And the square?", "blue")
    messages[0]["content"][0]["image"] = random_image()
    request = dict(tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    if not hasattr(ProcessorMixin, "_adjust_assistant_masks_indices"):
        with pytest.raises(NotImplementedError, match="newer transformers"):
            processor.apply_chat_template(messages, **request)
        return
    out = processor.apply_chat_template(messages, **request)
    tokens = processor.tokenizer.convert_ids_to_tokens(out["input_ids"][0])
    assert [t for t, keep in zip(tokens, out["assistant_masks"][0]) if keep] == [
        "red", "<|endoftext|>", "blue", "<|endoftext|>",
    ]


def test_too_long_prompt_without_truncation_is_rejected():
    processor = tiny_processor(model_max_length=20)
    with pytest.raises(ValueError, match=r"prompt 1 is 22 tokens long .* at most 20"):
        processor(images=[random_image()], text=["yes", "<image> what color is the circle ?"], padding=True)
    truncated = processor(text="what color is the circle ? " * 5, truncation=True)
    assert len(truncated["input_ids"][0]) == 20


def test_truncation_that_cuts_an_image_is_rejected(processor):
    with pytest.raises(ValueError, match="truncation cut into an image"):
        processor(images=random_image(), text="what color <image>", truncation=True, max_length=10)


@pytest.mark.parametrize(
    "images, text, error, message",
    [
        (random_image(), "what color", ValueError, "no <image> placeholder"),
        (None, "<image> what", ValueError, "1 <image> placeholder.* no images"),
        ([random_image()], "<image><image>", ValueError, r"got 1 image\(s\) but 2 <image>"),
        ([random_image(), random_image()], "<image>", ValueError, r"got 2 image\(s\) but 1 <image>"),
        (Image.new("RGB", (0, 0)), "<image>", ValueError, "image 0: got an empty image"),
        (np.zeros((0, 5, 3), np.uint8), "<image>", ValueError, "empty image"),
        (42, "<image>", TypeError, "image 0: expected an image .* got int"),
        ("/no/such/picture.png", "<image>", ValueError, "image 0: Incorrect image source"),
        ({"image": 1}, "<image>", TypeError, "got dict"),
        ([[random_image()]] * 3, ["<image>", "<image>"], ValueError, "3 lists of images for 2 prompts"),
        ([[random_image()], []], ["<image>", "<image>"], ValueError, "prompt 1 has 1 <image>.* 0 image"),
        ([[random_image()], random_image()], ["<image>", "<image>"], TypeError, "not a mix"),
        (np.full((8, 8, 3), 2.0, np.float32), "<image>", ValueError, r"in \[0, 1\]"),
        (np.zeros((8, 8, 3), np.int64), "<image>", TypeError, "unsupported image dtype int64"),
        (np.zeros((8, 8, 7), np.uint8), "<image>", ValueError, "channel axis"),
        (random_image(), None, ValueError, "needs a prompt"),
        (None, 5, TypeError, "text must be a string"),
    ],
)
def test_bad_inputs_are_named(processor, images, text, error, message):
    with pytest.raises(error, match=message):
        processor(images=images, text=text)


def test_unknown_arguments_are_rejected_not_ignored(processor):
    with pytest.raises(TypeError, match=r"unexpected arguments \['do_sample'\]"):
        processor(text="yes", do_sample=False)


def test_image_processors_must_resize_naively_to_one_square():
    tokenizer = tiny_tokenizer()
    dino, siglip = default_image_processors(56)
    with pytest.raises(ValueError, match="DINOv2 image processor must resize to a square"):
        MLMambaProcessor(tokenizer, BitImageProcessorPil(), siglip)
    with pytest.raises(ValueError, match="must not crop"):
        MLMambaProcessor(tokenizer, BitImageProcessorPil(size={"height": 56, "width": 56}), siglip)
    with pytest.raises(ValueError, match="same size"):
        MLMambaProcessor(tokenizer, dino, default_image_processors(84)[1])
