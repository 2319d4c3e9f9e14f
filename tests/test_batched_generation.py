from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from conftest import tiny_model, tiny_processor
from PIL import Image
from transformers import pipeline

from modeling_mlmamba.modeling_mlmamba import CACHE_NAME

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


def greedy(model, inputs, **options) -> torch.Tensor:
    """The new tokens of `generate()`: greedy unless `options` say otherwise."""
    options = {"do_sample": False, **options}
    output = model.generate(**inputs, max_new_tokens=NEW_TOKENS, eos_token_id=None, **options)
    return output[:, inputs["input_ids"].shape[1] :]


def sample_prompts(processor) -> list[str]:
    return [processor.apply_chat_template(user_turn(q, len(images)), add_generation_prompt=True)
            for q, images in SAMPLES]


def each_sample_alone(processor):
    """The processor's inputs for each sample on its own: no padding, and its images only."""
    return [processor(images=images or None, text=prompt, return_tensors="pt")
            for prompt, (_, images) in zip(sample_prompts(processor), SAMPLES)]


def padded_batch(processor, **kwargs):
    images = [images for _, images in SAMPLES]
    return processor(images=images, text=sample_prompts(processor), padding=True, return_tensors="pt", **kwargs)


@pytest.fixture(scope="module")
def greedy_alone(model_and_processor):
    model, processor = model_and_processor
    return [greedy(model, inputs)[0] for inputs in each_sample_alone(processor)]


def test_padded_batch_generates_exactly_what_each_prompt_generates_alone(model_and_processor, greedy_alone):
    model, processor = model_and_processor
    batch = padded_batch(processor)
    lengths = batch["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) == len(SAMPLES)
    assert (batch["attention_mask"][:, -1] == 1).all()  # left padding: every prompt ends at the last position
    batched = greedy(model, batch)
    for index, expected in enumerate(greedy_alone):
        assert torch.equal(batched[index], expected), f"sample {index}"


def tokens_and_logits(model, inputs, **options) -> tuple[torch.Tensor, torch.Tensor]:
    """The new tokens (batch, steps) of `generate()` and the logits (batch, steps, vocab) they were chosen from."""
    output = model.generate(**inputs, max_new_tokens=NEW_TOKENS, eos_token_id=None, return_dict_in_generate=True,
                            output_logits=True, **options)
    return output.sequences[:, inputs["input_ids"].shape[1] :], torch.stack(output.logits, dim=1)


def test_every_return_sequence_sees_its_own_prompts_images(model_and_processor):
    """generate() repeats each prompt once per return sequence; each copy must get its prompt's whole group of
    images (a, b, a, b), not the images repeated one by one (a, a, b, b). Sampling from the top-1 token is greedy
    decoding, so every copy answers like its prompt alone, token for token and logit for logit (prompts with 0, 1
    and 2 images)."""
    model, processor = model_and_processor
    copies = 3
    tokens, logits = tokens_and_logits(model, padded_batch(processor), do_sample=True, top_k=1,
                                       num_return_sequences=copies)
    assert tokens.shape[0] == copies * len(SAMPLES)
    for index, inputs in enumerate(each_sample_alone(processor)):
        expected_tokens, expected_logits = tokens_and_logits(model, inputs, do_sample=False)
        for copy in range(copies):
            row = copies * index + copy
            assert torch.equal(tokens[row], expected_tokens[0]), f"sample {index}, copy {copy}"
            torch.testing.assert_close(logits[row], expected_logits[0], rtol=1e-4, atol=1e-5,
                                       msg=f"sample {index}, copy {copy}")


def answer_log_probability(model, inputs, answer: torch.Tensor) -> torch.Tensor:
    """log p(answer | prompt and its images), from one forward over the whole sequence without a cache."""
    ids = torch.cat([inputs["input_ids"], answer[None]], dim=1)
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=inputs.get("pixel_values"), use_cache=False).logits[0]
    log_probs = torch.log_softmax(logits[-answer.shape[0] - 1 : -1].float(), dim=-1)
    return log_probs.gather(1, answer[:, None]).sum()


def test_beam_search_scores_every_beam_with_its_own_prompts_images(model_and_processor):
    """Beam search repeats each prompt once per beam. Without a length penalty a returned beam's score is the log
    probability of its tokens, which a plain forward over the prompt alone (its own images, no padding, no cache)
    recomputes independently."""
    model, processor = model_and_processor
    beams = 2
    batch = padded_batch(processor)
    output = model.generate(
        **batch, max_new_tokens=NEW_TOKENS, num_beams=beams, num_return_sequences=beams, do_sample=False,
        length_penalty=0.0, eos_token_id=None, return_dict_in_generate=True, output_scores=True,
    )
    answers = output.sequences[:, batch["input_ids"].shape[1] :]
    alone = each_sample_alone(processor)
    for row, answer in enumerate(answers):
        expected = answer_log_probability(model, alone[row // beams], answer)
        torch.testing.assert_close(output.sequences_scores[row], expected, rtol=1e-4, atol=1e-4,
                                   msg=f"sample {row // beams}, beam {row % beams}")


@pytest.mark.parametrize("assistance", ["assistant_model", "prompt_lookup_num_tokens"])
def test_assisted_decoding_is_refused_before_any_forward(model_and_processor, assistance):
    """Assisted decoding and prompt lookup verify drafted tokens and roll the cache back to the accepted ones, which
    a recurrent state cannot do: transformers refuses them for stateful models, before the model runs."""
    model, processor = model_and_processor
    inputs = each_sample_alone(processor)[3]  # two images
    forwards = []
    hook = model.register_forward_pre_hook(lambda *_: forwards.append(1))
    option = {"assistant_model": model} if assistance == "assistant_model" else {"prompt_lookup_num_tokens": 3}
    try:
        with pytest.raises(ValueError, match="not supported with stateful models"):
            greedy(model, inputs, **option)
    finally:
        hook.remove()
    assert not forwards


def test_right_padded_batch_is_refused_by_generate(model_and_processor):
    model, processor = model_and_processor
    batch = padded_batch(processor, padding_side="right")
    with pytest.raises(ValueError, match=r"pads row\(s\) \[.*\] on the right.*padding_side='left'"):
        greedy(model, batch)


def test_right_padded_batch_scores_exactly_without_a_cache(model_and_processor):
    """Padding after the tokens leaves every token's logits exact (the scan is causal), so training and scoring may
    pad on the right; the forward then builds no cache by default, since its final state ran over the padding."""
    model, processor = model_and_processor
    batch = padded_batch(processor, padding_side="right")
    with torch.no_grad():
        scored = model(**batch)
        for index, inputs in enumerate(each_sample_alone(processor)):
            alone = model(**inputs).logits[0]
            torch.testing.assert_close(scored.logits[index, : alone.shape[0]], alone, rtol=1e-4, atol=1e-5)
        assert getattr(scored, CACHE_NAME) is None
        assert getattr(model(**padded_batch(processor)), CACHE_NAME) is not None
        with pytest.raises(ValueError, match="on the right"):
            model(**batch, use_cache=True)


def test_padded_prefill_logits_match_unpadded(model_and_processor):
    model, processor = model_and_processor
    with torch.no_grad():
        batched = model(**padded_batch(processor)).logits[:, -1]
        for index, inputs in enumerate(each_sample_alone(processor)):
            alone = model(**inputs).logits[0, -1]
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


def test_generate_from_several_threads_answers_as_one_at_a_time(model_and_processor):
    """The input checks and the per-prompt image expansion keep no state on the model, so concurrent calls (a
    server's worker threads) cannot see each other's inputs."""
    model, processor = model_and_processor
    inputs = each_sample_alone(processor)
    with ThreadPoolExecutor(max_workers=len(inputs)) as pool:
        answers = list(pool.map(lambda sample: greedy(model, sample, num_beams=2, num_return_sequences=2), inputs))
    for index, (answer, sample) in enumerate(zip(answers, inputs)):
        assert torch.equal(answer, greedy(model, sample, num_beams=2, num_return_sequences=2)), f"sample {index}"
