import numpy as np
import pytest
import torch
from conftest import tiny_model, tiny_processor
from PIL import Image
from transformers import pipeline

NEW_TOKENS = 10


def picture(seed: int, size=(60, 45)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def user_turn(question: str, images: int) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": question}]}]


# Mixed prompt lengths, with and without images, one with two images.
SAMPLES = [
    ("What color is the circle?", [picture(1)]),
    ("How many objects are there in this picture?", []),
    ("Is the red square above the blue triangle?", [picture(2, (90, 30))]),
    ("describe", [picture(3), picture(4)]),
    ("yes", []),
]


@pytest.fixture(scope="module")
def model_and_processor():
    model = tiny_model()
    return model, tiny_processor(model.config)


def greedy(model, inputs) -> torch.Tensor:
    output = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)
    return output[:, inputs["input_ids"].shape[1] :]


def test_padded_batch_generates_exactly_what_each_prompt_generates_alone(model_and_processor):
    model, processor = model_and_processor
    prompts = [processor.apply_chat_template(user_turn(q, len(images)), add_generation_prompt=True)
               for q, images in SAMPLES]
    alone = [greedy(model, processor(images=images or None, text=prompt, return_tensors="pt"))[0]
             for prompt, (_, images) in zip(prompts, SAMPLES)]

    batch = processor(images=[images for _, images in SAMPLES], text=prompts, padding=True, return_tensors="pt")
    lengths = batch["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) == len(SAMPLES)
    assert (batch["attention_mask"][:, -1] == 1).all()  # left padding: every prompt ends at the last position
    batched = greedy(model, batch)
    for index, expected in enumerate(alone):
        assert torch.equal(batched[index], expected), f"sample {index}"


def test_padded_prefill_logits_match_unpadded(model_and_processor):
    model, processor = model_and_processor
    prompts = [processor.apply_chat_template(user_turn(q, len(images)), add_generation_prompt=True)
               for q, images in SAMPLES]
    batch = processor(images=[images for _, images in SAMPLES], text=prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        batched = model(**batch).logits[:, -1]
        for index, (prompt, (_, images)) in enumerate(zip(prompts, SAMPLES)):
            alone = model(**processor(images=images or None, text=prompt, return_tensors="pt")).logits[0, -1]
            torch.testing.assert_close(batched[index], alone, rtol=1e-4, atol=1e-5)


def test_processor_pads_on_the_left_unless_told_otherwise():
    processor = tiny_processor()
    processor.tokenizer.padding_side = "right"  # the tokenizer's own setting does not matter
    left = processor(text=["what color is the circle", "yes"], padding=True)["attention_mask"]
    right = processor(text=["what color is the circle", "yes"], padding=True, padding_side="right")["attention_mask"]
    assert left[1] == [0, 0, 0, 0, 1]
    assert right[1] == [1, 0, 0, 0, 0]


def test_pipeline_answers_chat_messages(model_and_processor):
    model, processor = model_and_processor
    generator = pipeline("image-text-to-text", model=model, processor=processor)
    image = picture(7)
    content = [{"type": "image", "image": image}, {"type": "text", "text": "What color is the circle?"}]
    result = generator(text=[{"role": "user", "content": content}], max_new_tokens=NEW_TOKENS,
                       generate_kwargs={"do_sample": False, "eos_token_id": None})

    answer = result[0]["generated_text"][-1]
    assert answer["role"] == "assistant"
    prompt = processor.apply_chat_template(user_turn("What color is the circle?", 1), add_generation_prompt=True)
    expected = greedy(model, processor(images=image, text=prompt, return_tensors="pt"))[0]
    assert answer["content"].strip() == processor.decode(expected, skip_special_tokens=True).strip()
    assert answer["content"].strip()
