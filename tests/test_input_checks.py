"""Every bad input is refused before any heavy work, with an error that names the argument, its value and the fix."""

import pytest
import torch
from conftest import image_prompt, random_pixels
from transformers import DynamicCache

from modeling_mlmamba import MLMambaConfig, MLMambaModel, input_checks

CONFIG = MLMambaConfig.tiny()
VOCAB = CONFIG.text_config.vocab_size
HIDDEN = CONFIG.text_config.hidden_size
IMAGE = CONFIG.image_token_id
PER_IMAGE = CONFIG.image_seq_length
IDS = torch.tensor([image_prompt(CONFIG, [5, 6, 7]), image_prompt(CONFIG, [8, 9, 10])])
PIXELS = random_pixels(2, CONFIG)
LENGTH = IDS.shape[1]
TEXT = torch.tensor([[3, 4, 5], [6, 7, 8]])
# Two images' worth of placeholders in all, but one and a half of them in the first prompt.
SPLIT_IMAGE_IDS = torch.tensor([[IMAGE] * (3 * PER_IMAGE // 2) + [5] * (PER_IMAGE // 2),
                                [IMAGE] * (PER_IMAGE // 2) + [5] * (3 * PER_IMAGE // 2)])


def ones(*shape):
    return torch.ones(*shape, dtype=torch.long)


def text_with_mask(rows):
    return dict(input_ids=TEXT, attention_mask=torch.tensor(rows))


def images_with_mask(mask):
    return dict(input_ids=IDS, pixel_values=PIXELS, attention_mask=mask)


# name: (inputs, error type, what the message must say)
BAD_FORWARD_INPUTS = {
    "token id past the vocabulary": (
        dict(input_ids=torch.tensor([[3, VOCAB]])),
        ValueError, rf"input_ids hold token id {VOCAB}, outside .* {VOCAB} ids.*resize_token_embeddings",
    ),
    "negative token id": (
        dict(input_ids=torch.tensor([[3, -100]])),
        ValueError, r"input_ids hold token id -100, outside.*keep -100 for labels",
    ),
    "1-D input_ids": (
        dict(input_ids=torch.tensor([3, 4, 5])),
        ValueError, r"input_ids must have shape \(batch, length\), got shape \(3,\); add the batch dimension",
    ),
    "list input_ids": (
        dict(input_ids=[[3, 4, 5]]),
        TypeError, r"input_ids must be a torch.Tensor, got list; build it with torch.tensor",
    ),
    "float input_ids": (
        dict(input_ids=torch.tensor([[3.0, 4.0]])),
        TypeError, r"input_ids must hold integer token ids, got dtype torch.float32.*\.long\(\)",
    ),
    "empty input_ids": (
        dict(input_ids=ones(1, 0)),
        ValueError, r"input_ids is empty \(shape \(1, 0\)\)",
    ),
    "both ids and embeddings": (
        dict(input_ids=TEXT, inputs_embeds=torch.randn(2, 3, HIDDEN)),
        ValueError, "exactly one of input_ids .* and inputs_embeds .*; got both",
    ),
    "neither ids nor embeddings": (
        dict(),
        ValueError, "exactly one of input_ids .* and inputs_embeds .*; got neither",
    ),
    "embeddings of the wrong width": (
        dict(inputs_embeds=torch.randn(1, 4, HIDDEN // 2)),
        ValueError, rf"inputs_embeds must have shape \(batch, length, {HIDDEN}\).*got \(1, 4, {HIDDEN // 2}\)",
    ),
    "2-D embeddings": (
        dict(inputs_embeds=torch.randn(4, HIDDEN)),
        ValueError, rf"inputs_embeds must have shape \(batch, length, {HIDDEN}\).*got \(4, {HIDDEN}\)",
    ),
    "integer embeddings": (
        dict(inputs_embeds=ones(1, 4, HIDDEN)),
        TypeError, "inputs_embeds must be floating point, got dtype torch.int64",
    ),
    "numpy pixel_values": (
        dict(input_ids=IDS, pixel_values=PIXELS.numpy()),
        TypeError, r"pixel_values must be a torch.Tensor, got numpy.ndarray.*return_tensors='pt'",
    ),
    "list of pixel_values": (
        dict(input_ids=IDS, pixel_values=list(PIXELS)),
        TypeError, r"pixel_values must be a torch.Tensor, got list.*torch.stack",
    ),
    "raw uint8 pixel_values": (
        dict(input_ids=IDS, pixel_values=PIXELS.clamp(0, 1).mul(255).to(torch.uint8)),
        TypeError, "pixel_values must be normalised floats, got dtype torch.uint8.*through the processor",
    ),
    "single-tower pixel_values": (
        dict(input_ids=IDS, pixel_values=PIXELS[:, 0]),
        ValueError, r"pixel_values must have shape \(images, 2, 3, height, width\).*got \(2, 3, 56, 56\)",
    ),
    "pixel_values of no images": (
        dict(input_ids=TEXT, pixel_values=PIXELS[:0]),
        ValueError, r"pixel_values holds no images \(shape \(0, 2, 3, 56, 56\)\); pass pixel_values=None",
    ),
    "an image split across prompts": (
        dict(input_ids=SPLIT_IMAGE_IDS, pixel_values=PIXELS),
        ValueError, rf"prompt 0 has {3 * PER_IMAGE // 2} image placeholder tokens, not a multiple of {PER_IMAGE}",
    ),
    "placeholders without pixel_values": (
        dict(input_ids=IDS),
        ValueError, rf"{2 * PER_IMAGE} image placeholder tokens \(id {IMAGE}\) but no pixel_values",
    ),
    "pixel_values for a prompt without placeholders": (
        dict(input_ids=TEXT, pixel_values=PIXELS),
        ValueError, rf"got pixel_values for 2 image\(s\) but the prompts have no image placeholder tokens "
                    rf"\(id {IMAGE}\)",
    ),
    "labels shorter than the ids": (
        dict(input_ids=IDS, pixel_values=PIXELS, labels=IDS[:, :-1]),
        ValueError, rf"labels have shape \(2, {LENGTH - 1}\) but the prompts have shape \(2, {LENGTH}\)",
    ),
    "labels for one prompt of two": (
        dict(input_ids=TEXT, labels=TEXT[:1]),
        ValueError, r"labels have shape \(1, 3\) but the prompts have shape \(2, 3\)",
    ),
    "float labels": (
        dict(input_ids=TEXT, labels=TEXT.float()),
        TypeError, "labels must be integer token ids .*, got dtype torch.float32",
    ),
    "label past the vocabulary": (
        dict(input_ids=TEXT, labels=torch.tensor([[3, 4, VOCAB + 5], [-100, 6, 7]])),
        ValueError, rf"labels hold 1 value\(s\) outside the vocabulary of {VOCAB} ids, e.g. {VOCAB + 5}",
    ),
    "negative logits_to_keep": (
        dict(input_ids=TEXT, logits_to_keep=-1),
        ValueError, r"logits_to_keep must be an int >= 0 .*got -1",
    ),
    "mask for one prompt of two": (
        images_with_mask(ones(1, LENGTH)),
        ValueError, rf"attention_mask has shape \(1, {LENGTH}\) but the prompts need \(2, {LENGTH}\)",
    ),
    "mask shorter than the ids": (
        images_with_mask(ones(2, LENGTH - 2)),
        ValueError, rf"attention_mask has shape \(2, {LENGTH - 2}\) but the prompts need \(2, {LENGTH}\)",
    ),
    "mask longer than the ids": (
        images_with_mask(ones(2, LENGTH + 2)),
        ValueError, rf"attention_mask has shape \(2, {LENGTH + 2}\) but the prompts need \(2, {LENGTH}\)",
    ),
    "1-D mask": (
        dict(input_ids=TEXT[:1], attention_mask=ones(3)),
        ValueError, r"attention_mask has shape \(3,\) but the prompts need \(1, 3\)",
    ),
    "list mask": (
        dict(input_ids=TEXT, attention_mask=[[1, 1, 1], [1, 1, 1]]),
        TypeError, "attention_mask must be a torch.Tensor, got list",
    ),
    "mask row of zeros": (
        text_with_mask([[1, 1, 1], [0, 0, 0]]),
        ValueError, "attention_mask row 1 is all zeros: prompt 1 has no tokens; drop it",
    ),
    "additive mask": (
        text_with_mask([[0.0, 0.0, 0.0], [float("-inf"), 0.0, 0.0]]),
        ValueError, r"attention_mask row 1 holds 1 value\(s\) other than 0 and 1",
    ),
    "padding between tokens": (
        text_with_mask([[1, 1, 1], [1, 0, 1]]),
        ValueError, "attention_mask row 1 has padding between tokens.*padding_side='left'",
    ),
    "padded image positions": (
        images_with_mask(torch.cat([torch.zeros(2, 2, dtype=torch.long), ones(2, LENGTH - 2)], dim=1)),
        ValueError, r"attention_mask row 0 marks 2 image placeholder position\(s\) as padding",
    ),
    "right padding with a cache": (
        dict(**text_with_mask([[1, 1, 1], [1, 1, 0]]), use_cache=True),
        ValueError, r"attention_mask pads row\(s\) \[1\] on the right.*padding_side='left'",
    ),
    # forward takes **kwargs (Trainer passes loss arguments only to such a forward): without a check these would be
    # dropped, the model answering without the image or reading the padding as tokens.
    "misspelt pixel_values": (
        dict(input_ids=TEXT, pixel_value=PIXELS),
        TypeError, r"MLMambaForConditionalGeneration.forward\(\) got unexpected keyword argument 'pixel_value' "
                   r"\(did you mean 'pixel_values'\?\); it takes input_ids, pixel_values, attention_mask, .*labels",
    ),
    "misspelt attention_mask and an unknown name": (
        dict(input_ids=TEXT, atention_mask=torch.tensor([[0, 1, 1], [1, 1, 1]]), colour="red"),
        TypeError, r"unexpected keyword arguments 'atention_mask' \(did you mean 'attention_mask'\?\), 'colour'; ",
    ),
    # The state carries the position: position ids would only mean packed sequences, which the scan cannot split.
    "position_ids": (
        dict(input_ids=TEXT, position_ids=torch.arange(3).expand(2, 3)),
        TypeError, r"unexpected keyword argument 'position_ids'; it takes input_ids",
    ),
}


def count_heavy_work(model) -> list:
    """A list that grows whenever the vision tower or the language model starts."""
    calls = []
    for module in (model.model.vision_tower, model.model.language_model):
        module.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("name", BAD_FORWARD_INPUTS)
def test_forward_refuses_bad_input_before_any_heavy_work(model, name):
    inputs, error, message = BAD_FORWARD_INPUTS[name]
    heavy_work = count_heavy_work(model)
    with pytest.raises(error, match=message):
        model(**inputs)
    assert not heavy_work


def test_base_model_and_image_features_check_their_inputs_too():
    torch.manual_seed(0)
    base = MLMambaModel(CONFIG).eval()
    with pytest.raises(ValueError, match=rf"input_ids hold token id {VOCAB}"):
        base(input_ids=torch.tensor([[3, VOCAB]]))
    with pytest.raises(TypeError, match="pixel_values must be a torch.Tensor, got numpy.ndarray"):
        base.get_image_features(PIXELS.numpy())
    with pytest.raises(TypeError, match=r"MLMambaModel.forward\(\) got unexpected keyword argument 'labels'; it "
                                        r"takes input_ids, .*, return_dict, output_attentions$"):
        base(input_ids=TEXT, labels=TEXT)


BAD_GENERATE_INPUTS = {
    "list input_ids": (
        dict(input_ids=[[3, 4, 5]]),
        TypeError, "input_ids must be a torch.Tensor, got list",
    ),
    "1-D input_ids": (
        dict(input_ids=torch.tensor([3, 4, 5])),
        ValueError, "input_ids must have shape .*add the batch dimension",
    ),
    "token id past the vocabulary": (
        dict(input_ids=torch.tensor([[3, VOCAB]])),
        ValueError, rf"input_ids hold token id {VOCAB}",
    ),
    "1-D mask": (
        dict(input_ids=TEXT[:1], attention_mask=ones(3)),
        ValueError, r"attention_mask has shape \(3,\) but the prompts need \(1, 3\)",
    ),
    # transformers drops a mask of ones before the first forward; a wrong shape still means a wrong call.
    "mask of ones for one prompt of two": (
        dict(input_ids=TEXT, attention_mask=ones(1, 3)),
        ValueError, r"attention_mask has shape \(1, 3\) but the prompts need \(2, 3\)",
    ),
    "mask row of zeros": (
        text_with_mask([[1, 1, 1], [0, 0, 0]]),
        ValueError, "attention_mask row 1 is all zeros",
    ),
    "right padding": (
        text_with_mask([[1, 1, 1], [1, 1, 0]]),
        ValueError, r"pads row\(s\) \[1\] on the right.*padding_side='left'",
    ),
    "right padding without a cache": (
        dict(**text_with_mask([[1, 1, 1], [1, 1, 0]]), use_cache=False),
        ValueError, r"pads row\(s\) \[1\] on the right",
    ),
    "numpy pixel_values": (
        dict(input_ids=IDS, pixel_values=PIXELS.numpy()),
        TypeError, "pixel_values must be a torch.Tensor, got numpy.ndarray",
    ),
    "placeholders without pixel_values": (
        dict(input_ids=IDS),
        ValueError, rf"{2 * PER_IMAGE} image placeholder tokens .* but no pixel_values",
    ),
    "pixel_values for a prompt without placeholders": (
        dict(input_ids=TEXT, pixel_values=PIXELS),
        ValueError, "got pixel_values for 2 image.* no image placeholder tokens",
    ),
    "more images than placeholders": (
        dict(input_ids=IDS, pixel_values=random_pixels(3, CONFIG)),
        ValueError, rf"{2 * PER_IMAGE} image placeholder tokens but 3 image\(s\)",
    ),
    "an image split across prompts": (
        dict(input_ids=SPLIT_IMAGE_IDS, pixel_values=PIXELS),
        ValueError, "prompt 0 has .* not a multiple",
    ),
    "no prompt": (
        dict(),
        ValueError, r"generate\(\) got no prompt; pass input_ids",
    ),
    "misspelt pixel_values": (
        dict(input_ids=TEXT, pixel_value=PIXELS),
        ValueError, r"not used by the model: \['pixel_value'\]",
    ),
    "attentions asked of generate": (
        dict(input_ids=TEXT, output_attentions=True, return_dict_in_generate=True),
        ValueError, r"output_attentions=True: ML-Mamba's language model \(Mamba-2\) has no attention",
    ),
}


@pytest.mark.parametrize("beams", [1, 2])
@pytest.mark.parametrize("name", BAD_GENERATE_INPUTS)
def test_generate_refuses_bad_input_before_any_heavy_work(model, name, beams):
    """With beams the prompts are repeated; errors still name the caller's rows and counts."""
    inputs, error, message = BAD_GENERATE_INPUTS[name]
    heavy_work = count_heavy_work(model)
    with pytest.raises(error, match=message):
        model.generate(**inputs, max_new_tokens=3, num_beams=beams, do_sample=False)
    assert not heavy_work


def test_decode_steps_read_no_input_values(model, monkeypatch):
    """The value checks cost a host sync when generate() prepares the prompt and one at the prefill, none per
    decoded token."""
    fetches = []
    fetch = input_checks.InputValues.fetch
    monkeypatch.setattr(input_checks.InputValues, "fetch", lambda *args: fetches.append(1) or fetch(*args))
    model.generate(input_ids=IDS, attention_mask=ones(2, LENGTH), pixel_values=PIXELS, max_new_tokens=6,
                   do_sample=False, eos_token_id=None)
    assert len(fetches) == 2


def test_placeholders_without_pixels_are_allowed_only_once_the_cache_holds_the_prompt(model):
    """A decode step may feed back a generated placeholder id; a prompt may not arrive without its images, even
    with a (still empty) cache, as generate() passes one."""
    cache = DynamicCache(config=CONFIG.text_config)
    placeholder = torch.tensor([[IMAGE]])
    with torch.no_grad():
        with pytest.raises(ValueError, match="no pixel_values"):
            model(input_ids=placeholder, cache=cache, use_cache=True)
        model(input_ids=IDS[:1], pixel_values=PIXELS[:1], cache=cache, use_cache=True)
        logits = model(input_ids=placeholder, cache=cache, use_cache=True).logits
    assert logits.shape == (1, 1, VOCAB)


def test_a_captured_prefill_graph_checks_the_inputs_before_replaying(model, monkeypatch):
    """A graph replays whatever was copied into its input buffers, and copying broadcasts a mask of one row."""
    monkeypatch.setattr(type(model), "cuda_graph_devices", ("cpu",))

    def prefill(attention_mask):
        with torch.no_grad():
            return model(input_ids=TEXT, attention_mask=attention_mask, cache=DynamicCache(config=CONFIG.text_config),
                         logits_to_keep=1).logits

    prefill(ones(2, 3))  # a prompt shape is captured the second time it is seen
    prefill(ones(2, 3))
    assert model.cuda_graphs.prefill_graphs
    with pytest.raises(ValueError, match=r"attention_mask has shape \(1, 3\) but the prompts need \(2, 3\)"):
        prefill(ones(1, 3))


@pytest.mark.parametrize("rows, padding", [
    ([[1, 1, 1], [1, 1, 1]], "none"), ([[0, 1, 1], [1, 1, 1]], "left"), ([[1, 1, 0], [1, 1, 1]], "right"),
])
def test_the_value_checks_say_where_the_mask_pads(model, rows, padding):
    checks = model.model.check_inputs
    assert checks(input_ids=TEXT, attention_mask=torch.tensor(rows), use_cache=False) == padding
    assert checks(input_ids=TEXT) == "none"


def test_the_language_model_gets_no_mask_of_ones(model, monkeypatch):
    """The checks have read the mask's values already: a mask of ones is dropped there, so the language model
    neither multiplies by it nor reads it again (a second host sync)."""
    masks = []
    language_model = model.model.language_model
    forward = language_model.forward
    monkeypatch.setattr(language_model, "forward",
                        lambda *args, **kwargs: masks.append(kwargs["attention_mask"]) or forward(*args, **kwargs))
    left_padded = torch.tensor([[0, 1, 1], [1, 1, 1]])
    with torch.no_grad():
        for mask in (None, ones(2, 3), left_padded):
            model(input_ids=TEXT, attention_mask=mask)
    assert masks[0] is None and masks[1] is None and masks[2] is left_padded
