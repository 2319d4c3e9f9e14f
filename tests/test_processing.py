import base64
import io
import json

import huggingface_hub
import numpy as np
import pytest
import torch
from conftest import tiny_processor, tiny_tokenizer
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoImageProcessor,
    AutoProcessor,
    BitImageProcessorPil,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    SiglipImageProcessorPil,
)
from transformers.testing_utils import CaptureLogger
from transformers.utils import is_torchvision_available
from transformers.utils import logging as transformers_logging

from modeling_mlmamba import (
    DEFAULT_MODEL,
    MLMambaConfig,
    MLMambaImageProcessor,
    MLMambaImageProcessorTorchvision,
    MLMambaProcessor,
)

# The image processor's backend that loading picks: torchvision's when it is installed, as transformers does.
DEFAULT_BACKEND = MLMambaImageProcessorTorchvision if is_torchvision_available() else MLMambaImageProcessor
IMAGENET_MEAN, IMAGENET_STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def random_image(width=70, height=50, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def reference_pixels(image: Image.Image, size: int, mean, std) -> np.ndarray:
    """The released "resize-naive" transform: RGB, bicubic resize to a square, /255, per-channel normalisation."""
    array = np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC), dtype=np.float64) / 255
    return ((array - mean) / std).transpose(2, 0, 1)


def per_tower_processors(size: int):
    """The two image processors earlier versions of this package used, one per tower: transformers' BiT (DINOv2's)
    and SigLIP processors, each resizing bicubically to the square without cropping and normalising its way."""
    common = dict(size={"height": size, "width": size}, resample=Image.Resampling.BICUBIC, do_convert_rgb=True)
    dino = BitImageProcessorPil(
        do_center_crop=False, crop_size=common["size"], image_mean=tuple(IMAGENET_MEAN), image_std=tuple(IMAGENET_STD),
        **common,
    )
    return dino, SiglipImageProcessorPil(image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5), **common)


def per_tower_pixels(images: list, size: int) -> np.ndarray:
    """(images, 2, 3, size, size) as the per-tower processors computed them."""
    towers = [np.asarray(p(images, return_tensors="np")["pixel_values"], np.float32) for p in per_tower_processors(size)]
    return np.stack(towers, axis=1)


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
    """The processor's saved settings (as JSON), without the `auto_map` entries that saving adds and without the
    image processor's class name, which names the backend that loading chooses."""
    unsaved = ("auto_map", "image_processor_type")
    return {
        key: {k: v for k, v in value.items() if k not in unsaved} if isinstance(value, dict) else value
        for key, value in json.loads(processor.to_json_string()).items()
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


def test_one_image_processor_gives_the_per_tower_processors_pixels_bit_for_bit():
    images = [random_image(70, 50, seed=1), random_image(33, 90, seed=2), random_image(56, 56, seed=3)]
    pixels = MLMambaImageProcessor(size={"height": 56, "width": 56})(images, return_tensors="np")["pixel_values"]
    assert pixels.shape == (3, 2, 3, 56, 56) and pixels.dtype == np.float32
    np.testing.assert_array_equal(pixels, per_tower_pixels(images, 56))


needs_torchvision = pytest.mark.skipif(not is_torchvision_available(), reason="the torchvision backend needs it")


@needs_torchvision
@pytest.mark.parametrize(
    "kwargs",
    [{}, {"resample": Image.Resampling.BILINEAR}, {"do_rescale": False}, {"do_normalize": False}, {"size": 40}],
)
def test_torchvision_backend_gives_the_pil_backends_pixels_bit_for_bit(kwargs):
    rng = np.random.default_rng(6)
    images = [
        random_image(70, 50, seed=1), random_image(33, 90, seed=2).convert("RGBA"), random_image(56, 56).convert("L"),
        rng.integers(0, 256, (40, 30, 3), dtype=np.uint8), torch.rand(3, 20, 64),
    ]
    expected = MLMambaImageProcessor(size=56)(images, return_tensors="np", **kwargs)["pixel_values"]
    torchvision_backend = MLMambaImageProcessorTorchvision(size=56)
    assert torchvision_backend.backend == "torchvision"
    actual = torchvision_backend(images, return_tensors="pt", **kwargs)["pixel_values"]
    assert actual.dtype == torch.float32
    np.testing.assert_array_equal(actual.numpy(), expected)
    np.testing.assert_array_equal(torchvision_backend(images, return_tensors="np", **kwargs)["pixel_values"], expected)


@needs_torchvision
def test_torchvision_backend_takes_the_same_settings_and_refuses_the_same_arguments(tmp_path):
    pil = MLMambaImageProcessor(size=56, siglip_image_mean=[0.4, 0.4, 0.4])
    pil.save_pretrained(tmp_path)
    loaded = AutoImageProcessor.from_pretrained(tmp_path, backend="torchvision")
    assert type(loaded) is MLMambaImageProcessorTorchvision
    saved_settings = [{**json.loads(each.to_json_string()), "image_processor_type": None} for each in (pil, loaded)]
    assert saved_settings[0] == saved_settings[1]
    assert type(AutoImageProcessor.from_pretrained(tmp_path, backend="pil")) is MLMambaImageProcessor
    with pytest.raises(ValueError, match="set dino_image_mean and siglip_image_mean"):
        loaded(random_image(), image_mean=[0.5, 0.5, 0.5])
    processor = MLMambaProcessor(tiny_tokenizer(), loaded, image_seq_length=16)
    pixels = processor(images=random_image(), text="<image>", return_tensors="pt")["pixel_values"]
    reference = MLMambaProcessor(tiny_tokenizer(), pil, image_seq_length=16)
    assert torch.equal(pixels, reference(images=random_image(), text="<image>", return_tensors="pt")["pixel_values"])


def test_loading_the_processor_logs_nothing(tmp_path):
    """transformers picks the torchvision backend when torchvision is installed; a processor registered with the PIL
    backend alone made every load log that the torchvision one is missing and that it falls back to PIL."""
    tiny_processor().save_pretrained(tmp_path)
    transformers_logging.warning_once.cache_clear()
    with CaptureLogger(transformers_logging.get_logger()) as captured:
        for folder in (DEFAULT_MODEL, tmp_path):
            AutoProcessor.from_pretrained(folder)
            AutoImageProcessor.from_pretrained(folder)
    assert captured.out == ""


def test_processor_exposes_its_image_processor_and_takes_the_standard_image_arguments(processor):
    assert isinstance(processor.image_processor, MLMambaImageProcessor)
    image = random_image()
    expected = processor(images=image, text="<image>", return_tensors="np")["pixel_values"]
    for kwargs in ({"do_resize": True, "size": {"height": 56, "width": 56}}, {"images_kwargs": {"size": 56}},
                   {"resample": Image.Resampling.BICUBIC, "do_rescale": True, "do_normalize": True}):
        actual = processor(images=image, text="<image>", return_tensors="np", **kwargs)["pixel_values"]
        np.testing.assert_array_equal(actual, expected)
    with pytest.raises(ValueError, match="model reads 56x56 images"):
        processor(images=image, text="<image>", size={"height": 84, "width": 84})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"size": {"shortest_edge": 56}}, "resizes every image to a square"),
        ({"size": {"height": 56, "width": 70}}, "resizes every image to a square"),
        ({"do_center_crop": True}, "without cropping"),
        ({"do_pad": True}, "nothing to pad"),
        ({"image_mean": [0.5, 0.5, 0.5]}, "set dino_image_mean and siglip_image_mean"),
        ({"do_convert_rgb": False}, "both towers read RGB"),
    ],
)
def test_image_processor_refuses_what_the_released_model_never_saw(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MLMambaImageProcessor(**kwargs)
    with pytest.raises(ValueError, match=message):
        MLMambaImageProcessor(size=56)(random_image(), **kwargs)


def test_tokenizer_pads_on_the_processor_side(processor):
    assert processor.tokenizer.padding_side == processor.padding_side == "left"
    right = MLMambaProcessor(tiny_tokenizer(), MLMambaImageProcessor(size=56), image_seq_length=16, padding_side="right")
    assert right.tokenizer.padding_side == "right"


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


def test_from_model_config_rejects_a_tokenizer_larger_than_the_vocabulary():
    config = MLMambaConfig.tiny()
    vocab_size = config.text_config.vocab_size
    with pytest.raises(ValueError, match=rf"tokenizer has {vocab_size + 8} tokens but the language model embeds only "
                                         rf"{vocab_size}.*resize_token_embeddings"):
        MLMambaProcessor.from_model_config(config, tiny_tokenizer(vocab_size + 8, image_token_id=config.image_token_id))


def test_save_and_load_keep_every_setting(tmp_path):
    tokenizer = tiny_tokenizer()
    template = "{% for message in messages %}{{ message['content'] }}{% endfor %}"
    processor = MLMambaProcessor(
        tokenizer, MLMambaImageProcessor(size=56), image_seq_length=16, padding_side="right", chat_template=template
    )
    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, MLMambaProcessor)
    assert type(loaded.image_processor) is DEFAULT_BACKEND
    assert settings(loaded) == settings(processor)
    assert (loaded.image_seq_length, loaded.padding_side, loaded.image_size) == (16, "right", 56)
    assert loaded.chat_template == template
    assert loaded.tokenizer.get_vocab() == tokenizer.get_vocab()
    assert list(loaded.image_processor.dino_image_mean) == list(IMAGENET_MEAN)
    assert type(AutoImageProcessor.from_pretrained(tmp_path)) is DEFAULT_BACKEND
    prompts = ["<image><|user|>\nwhat color is the circle?", "yes"]
    images = [random_image()]
    expected = processor(images=images, text=prompts, padding=True, return_tensors="pt")
    actual = loaded(images=images, text=prompts, padding=True, return_tensors="pt")
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[key], actual[key]) for key in expected)


def test_folder_saved_with_one_image_processor_per_tower_loads_with_the_same_pixels(tmp_path):
    """Earlier versions saved `dino_image_processor` and `siglip_image_processor` in processor_config.json."""
    processor = tiny_processor()
    processor.save_pretrained(tmp_path)
    settings_file = tmp_path / "processor_config.json"
    saved = json.loads(settings_file.read_text())
    del saved["image_processor"]
    dino, siglip = per_tower_processors(56)
    saved.update(dino_image_processor=dino.to_dict(), siglip_image_processor=siglip.to_dict())
    settings_file.write_text(json.dumps(saved))

    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded.image_processor, MLMambaImageProcessor) and loaded.image_size == 56
    images = [random_image(seed=4), random_image(90, 20, seed=5)]
    actual = loaded(images=images, text=["<image>", "<image> what"], padding=True, return_tensors="np")
    np.testing.assert_array_equal(actual["pixel_values"], per_tower_pixels(images, 56))
    expected = processor(images=images, text=["<image>", "<image> what"], padding=True, return_tensors="np")
    np.testing.assert_array_equal(actual["input_ids"], expected["input_ids"])


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


def test_system_message_comes_after_the_images_and_before_the_first_user_turn(processor):
    messages = [{"role": "system", "content": [{"type": "text", "text": " Answer in one word. "}]}] + chat(
        "What color is the circle?", "red", "And the square?"
    )
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    without_system = processor.apply_chat_template(messages[1:], add_generation_prompt=True)
    assert prompt == "<image><|system|>\nAnswer in one word.<|endoftext|>\n" + without_system.removeprefix("<image>")
    text_only = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert processor.apply_chat_template(text_only, add_generation_prompt=True) == (
        "<|system|>\nBe brief.<|endoftext|>\n<|user|>\nhi<|endoftext|>\n<|assistant|>\n"
    )


@pytest.mark.parametrize(
    "messages, error, message",
    [
        ([{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}], Exception,
         "alternate user and assistant"),
        ([{"role": "assistant", "content": "hi"}], Exception, "alternate user and assistant"),
        ([{"role": "user", "content": "hi"}, {"role": "system", "content": "be brief"}], Exception,
         "system message can only be the first message; got one at message 1"),
        ([{"role": "system", "content": "be brief"}], Exception, "needs a user message after the system message"),
        ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": [{"type": "image"}]}], Exception,
         "images can only be in user messages; got one in the assistant message at 1"),
        ([{"role": "system", "content": [{"type": "image"}]}, {"role": "user", "content": "hi"}], Exception,
         "images can only be in user messages; got one in the system message at 0"),
        ([], ValueError, "got an empty chat"),
        ([[{"role": "user", "content": "hi"}], []], ValueError, "got an empty chat"),
    ],
)
def test_chat_template_rejects_what_the_released_format_cannot_express(processor, messages, error, message):
    with pytest.raises(error, match=message):
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


def _binary_alpha(image: Image.Image) -> np.ndarray:
    return np.where(np.random.default_rng(5).random(image.size[::-1]) < 0.5, 0, 255).astype(np.uint8)


def _with_alpha(image: Image.Image, mode: str) -> Image.Image:
    converted = image.convert(mode[:-1] if mode != "RGBA" else "RGB")
    converted.putalpha(Image.fromarray(_binary_alpha(image)))
    return converted


def _on_white(rgb: Image.Image, alpha: np.ndarray) -> Image.Image:
    """Straight-alpha compositing onto white, in exact integers for alpha 0 or 255."""
    blended = (np.asarray(rgb, np.float64) * alpha[..., None] + 255.0 * (255 - alpha[..., None])) / 255
    return Image.fromarray(np.round(blended).astype(np.uint8))


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda rgb: _with_alpha(rgb, "RGBA"), lambda rgb: _on_white(rgb, _binary_alpha(rgb))),
        (lambda rgb: _with_alpha(rgb, "LA"), lambda rgb: _on_white(rgb.convert("L").convert("RGB"), _binary_alpha(rgb))),
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
        (
            lambda rgb: Image.fromarray(np.asarray(rgb.convert("L")).astype(np.int32)).convert("I"),
            lambda rgb: Image.merge("RGB", [rgb.convert("L")] * 3),
        ),
        (
            lambda rgb: Image.fromarray(np.dstack([np.asarray(rgb), _binary_alpha(rgb)])),
            lambda rgb: _on_white(rgb, _binary_alpha(rgb)),
        ),
        (
            lambda rgb: _transparent_index_image(rgb),
            lambda rgb: _on_white(rgb.quantize(16).convert("RGB"), _transparent_index_alpha(rgb)),
        ),
    ],
    ids=["RGBA", "LA", "L", "P", "CMYK", "16-bit", "32-bit-int-16-bit-values", "32-bit-int-8-bit-values",
         "RGBA-array", "P-with-transparent-index"],
)
def test_every_image_mode_becomes_rgb(processor, make, expected):
    rgb = random_image()
    actual = processor(images=make(rgb), text="<image>", return_tensors="pt")["pixel_values"]
    reference = processor(images=expected(rgb), text="<image>", return_tensors="pt")["pixel_values"]
    assert torch.equal(actual, reference)


def _transparent_index_image(rgb: Image.Image) -> Image.Image:
    palette = rgb.quantize(16)
    palette.info["transparency"] = 0
    return palette


def _transparent_index_alpha(rgb: Image.Image) -> np.ndarray:
    return np.where(np.asarray(rgb.quantize(16)) == 0, 0, 255).astype(np.uint8)


def test_transparent_pixels_are_white_whatever_colour_they_store(processor):
    black_and_transparent = Image.new("RGBA", (56, 56), (0, 0, 0, 0))
    white = Image.new("RGB", (56, 56), "white")
    transparent = processor(images=black_and_transparent, text="<image>", return_tensors="pt")["pixel_values"]
    assert torch.equal(transparent, processor(images=white, text="<image>", return_tensors="pt")["pixel_values"])


def test_32_bit_integer_images_outside_16_bits_are_rejected(processor):
    image = Image.fromarray(np.full((8, 8), 70000, np.int32))
    with pytest.raises(ValueError, match=r"image 0: a 32-bit integer image .* got the range \[70000, 70000\]"):
        processor(images=image, text="<image>")


def test_images_can_be_paths_pathlib_paths_and_data_urls(processor, tmp_path):
    image = random_image()
    image.save(tmp_path / "picture.png")
    expected = processor(images=image, text="<image>", return_tensors="pt")["pixel_values"]
    encoded = base64.b64encode((tmp_path / "picture.png").read_bytes()).decode()
    for source in (str(tmp_path / "picture.png"), tmp_path / "picture.png", f"data:image/png;base64,{encoded}",
                   encoded):
        assert torch.equal(processor(images=source, text="<image>", return_tensors="pt")["pixel_values"], expected)


def test_unreadable_image_sources_are_named(processor, tmp_path, monkeypatch):
    (tmp_path / "notes.txt").write_text("not a picture")
    cases = [
        (tmp_path / "missing.png", FileNotFoundError, f"image 0: image file {tmp_path / 'missing.png'} does not exist"),
        (str(tmp_path), IsADirectoryError, f"image 0: image path {tmp_path} is a folder"),
        (tmp_path / "notes.txt", ValueError, "notes.txt is not an image file that PIL can read"),
        ("http://127.0.0.1:9/picture.png", ConnectionError, "cannot fetch the image http://127.0.0.1:9/picture.png"),
        ("data:image/png;base64,@@@", ValueError, "the data URL does not hold valid base64 image data"),
    ]
    for source, error, message in cases:
        with pytest.raises(error, match=message.replace("\\", "\\\\")):
            processor(images=source, text="<image>")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConnectionError, match="cannot fetch the image https://example.com/a.png: offline mode"):
        processor(images="https://example.com/a.png", text="<image>")


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
    with pytest.raises(ValueError, match="truncation cut into an image.*raise max_length"):
        processor(images=random_image(), text="what color <image>", truncation=True, max_length=10)
    processor.tokenizer.truncation_side = "left"
    with pytest.raises(ValueError, match=r"truncation cut into an image in prompt 0 \(4 of its 16"):
        processor(images=random_image(), text="<image>what color is the circle ?", truncation=True, max_length=10)


def test_truncation_that_cuts_the_generation_prompt_off_is_rejected(processor):
    prompt = processor.apply_chat_template(chat("what color is the circle ? " * 4, images_first_turn=0),
                                           add_generation_prompt=True)
    with pytest.raises(ValueError, match=r"cut the end of prompt 0 .* '<\|assistant\|>\\n'.*truncation_side = 'left'"):
        processor(text=prompt, truncation=True, max_length=12)
    processor.tokenizer.truncation_side = "left"
    kept = processor(text=prompt, truncation=True, max_length=12)["input_ids"][0]
    assert kept == processor(text=prompt)["input_ids"][0][-12:]
    assert processor.tokenizer.convert_ids_to_tokens(kept)[-1] == "<|assistant|>"


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
        ("/no/such/picture.png", "<image>", FileNotFoundError, "image 0: image file /no/such/picture.png does not"),
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
    with pytest.raises(TypeError, match=r"unexpected arguments \['max_length'\]"):
        processor(text="yes", images_kwargs={"max_length": 3})


def test_processor_needs_the_two_tower_image_processor():
    with pytest.raises(TypeError, match="image_processor must be an MLMambaImageProcessor"):
        MLMambaProcessor(tiny_tokenizer(), BitImageProcessorPil(size={"height": 56, "width": 56}))
