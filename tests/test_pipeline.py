"""transformers' image-text-to-text pipeline runs ML-Mamba: batched chats answer like one chat at a time, and like
the processor + `generate()` directly."""

import numpy as np
import pytest
import torch
from conftest import tiny_model, tiny_processor
from PIL import Image
from transformers import pipeline

MAX_NEW_TOKENS = 5


def random_image(width: int, height: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def chats() -> list[list[dict]]:
    """Five chats with images, of different lengths (one with a system message, one multi-turn): more than a batch
    of 4. (transformers' pipelines batch only inputs with the same keys: chats without images go in their own
    batches.)"""
    def ask(image, text):
        return [{"role": "user", "content": ([{"type": "image", "image": image}] if image else [])
                 + [{"type": "text", "text": text}]}]

    return [
        ask(random_image(70, 50, 1), "what color is the circle ?"),
        ask(random_image(40, 90, 2), "how many objects are there in this picture ?"),
        [{"role": "system", "content": "one word ."}] + ask(random_image(56, 56, 3), "what shape ?"),
        ask(random_image(64, 32, 5), "describe this picture"),
        ask(random_image(30, 30, 4), "is there a triangle ?") + [{"role": "assistant", "content": "yes"}]
        + ask(None, "what color is it ?"),
    ]


@pytest.fixture(scope="module")
def model_and_processor():
    model = tiny_model()
    return model, tiny_processor(model.config)


def new_messages(outputs) -> list[str]:
    """The assistant message each chat got (the pipeline cuts it from the decoded full text: a word-level
    tokenizer leaves the joining space in front)."""
    return [output[0]["generated_text"][-1]["content"].strip() for output in outputs]


def test_batched_pipeline_answers_like_one_chat_at_a_time_and_like_generate(model_and_processor):
    model, processor = model_and_processor
    generator = pipeline("image-text-to-text", model=model, processor=processor)
    assert generator.image_processor is processor.image_processor
    settings = dict(max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    batched = generator(text=chats(), batch_size=4, generate_kwargs=settings)
    one_by_one = [generator(text=chat, generate_kwargs=settings) for chat in chats()]
    assert new_messages(batched) == new_messages(one_by_one)

    expected = []
    for chat in chats():
        inputs = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True,
                                               return_tensors="pt")
        with torch.no_grad():
            output = model.generate(**inputs, **settings)
        expected.append(processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    assert new_messages(batched) == expected
    assert any(text.strip() for text in expected)


def test_generation_arguments_given_to_a_pipeline_say_where_they_go(model_and_processor):
    """A pipeline hands keyword arguments it does not know to the processor: beam search asked for that way is
    refused with the place it goes, not run as greedy decoding."""
    model, processor = model_and_processor
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    chat = chats()[0]
    with pytest.raises(TypeError, match=r"\['num_beams'\] are generation arguments: .* generate_kwargs=\{\.\.\.\}"):
        pipe(chat, max_new_tokens=2, num_beams=2)
    output = pipe(chat, max_new_tokens=2, generate_kwargs={"num_beams": 2})
    assert output[0]["generated_text"][-1]["role"] == "assistant"
