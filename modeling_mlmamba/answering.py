"""Answer questions about images with greedy generation, in padded batches: what the command line and the
shapes-vqa evaluation run."""

import torch


def chat_prompt(processor, question: str, with_image: bool) -> str:
    """The model's chat template for one user turn, ready for the answer (image first, as released)."""
    content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


@torch.inference_mode()
def answer_questions(model, processor, images, questions, max_new_tokens: int = 16, batch_size: int = 32):
    """One greedy answer per (image or None, question), decoded without special tokens and stripped.

    Prompts are padded on the processor's side (left), which the model's masking makes exact: each answer is
    the one the question gets alone.
    """
    if len(images) != len(questions):
        raise ValueError(f"got {len(images)} images for {len(questions)} questions; pass one (or None) per question")
    answers = []
    for start in range(0, len(questions), batch_size):
        batch_images = images[start : start + batch_size]
        prompts = [
            chat_prompt(processor, question, image is not None)
            for image, question in zip(batch_images, questions[start : start + batch_size])
        ]
        per_prompt = [[image] if image is not None else [] for image in batch_images]
        inputs = processor(
            images=per_prompt if any(per_prompt) else None, text=prompts, padding=True, return_tensors="pt"
        ).to(model.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        answers += [text.strip() for text in processor.batch_decode(new_tokens, skip_special_tokens=True)]
    return answers


__all__ = ["answer_questions", "chat_prompt"]
