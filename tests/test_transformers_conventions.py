"""transformers v5's conventions for VLMs: image features as a pooled output, tuples on request, hidden states,
resizing the vocabulary, the recurrent cache under every name a transformers release uses, attention backends."""

import copy
import importlib.util
import warnings

import pytest
import torch
from conftest import image_prompt, random_pixels, tiny_model, tiny_tokenizer
from transformers import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPooling

from modeling_mlmamba import MLMambaForConditionalGeneration
from modeling_mlmamba.modeling_mlmamba import CACHE_NAME


def prompt(config, text=(5, 6, 7)):
    return torch.tensor([image_prompt(config, list(text))]), random_pixels(1, config)


def test_image_features_are_a_pooled_output_with_one_projected_entry_per_image(model):
    config = model.config
    pixels = random_pixels(3, config)
    with torch.no_grad():
        out = model.get_image_features(pixels)
        towers = model.model.vision_tower
        dino = towers.dino(pixels[:, 0], output_hidden_states=True).hidden_states
        siglip = towers.siglip(pixels[:, 1], output_hidden_states=True).hidden_states
        # The towers are built up to the feature layer: its output is their last hidden state.
        patches = torch.cat([dino[-1][:, 1 + config.dino_config.num_register_tokens :], siglip[-1]], dim=-1)
        expected = model.model.projector(model.model.connector(patches))
    assert isinstance(out, BaseModelOutputWithPooling)
    assert torch.equal(out.last_hidden_state, patches)
    assert len(out.pooler_output) == 3
    for image, reference in zip(out.pooler_output, expected):
        assert image.shape == (config.image_seq_length, config.text_config.hidden_size)
        assert torch.equal(image, reference)
    assert out.hidden_states is None and out.attentions is None


def test_image_features_as_a_tuple_with_return_dict_false(model):
    pixels = random_pixels(2, model.config)
    with torch.no_grad():
        as_dict = model.get_image_features(pixels)
        as_tuple = model.get_image_features(pixels, return_dict=False)
        model.config.return_dict = False
        from_config = model.get_image_features(pixels)
    assert isinstance(as_tuple, tuple) and isinstance(from_config, tuple)
    assert torch.equal(as_tuple[0], as_dict.last_hidden_state)
    assert all(torch.equal(a, b) for a, b in zip(as_tuple[1], as_dict.pooler_output))


def test_image_features_carry_both_towers_hidden_states_and_attentions_when_asked():
    model = tiny_model()
    model.set_attn_implementation("eager")  # attention weights exist only there
    config = model.config
    pixels = random_pixels(1, config)
    with torch.no_grad():
        out = model.get_image_features(pixels, output_hidden_states=True, output_attentions=True)
        dino = model.model.vision_tower.dino(pixels[:, 0], output_hidden_states=True, output_attentions=True)
    # The towers are built up to the feature layer: their hidden states are the embeddings and those blocks.
    dino_blocks = len(model.model.vision_tower.dino.encoder.layer)
    siglip_blocks = len(model.model.vision_tower.siglip.encoder.layers)
    dino_entries = dino_blocks + 1
    assert len(out.hidden_states) == dino_entries + siglip_blocks + 1
    assert all(torch.equal(a, b) for a, b in zip(out.hidden_states[:dino_entries], dino.hidden_states))
    assert len(out.attentions) == dino_blocks + siglip_blocks
    assert all(torch.equal(a, b) for a, b in zip(out.attentions, dino.attentions))
    model.config.output_hidden_states = True
    with torch.no_grad():
        assert len(model.get_image_features(pixels).hidden_states) == len(out.hidden_states)


def test_forward_returns_tuples_with_return_dict_false(model):
    ids, pixels = prompt(model.config)
    with torch.no_grad():
        as_dict = model(input_ids=ids, pixel_values=pixels, labels=ids)
        as_tuple = model(input_ids=ids, pixel_values=pixels, labels=ids, return_dict=False)
        base = model.model(input_ids=ids, pixel_values=pixels, return_dict=False)
    assert isinstance(as_tuple, tuple) and isinstance(base, tuple)
    assert len(as_tuple) == len(as_dict.to_tuple()) == 4  # loss, logits, cache, image features
    for value, reference in zip(as_tuple, as_dict.to_tuple()):
        assert isinstance(value, DynamicCache) if isinstance(reference, DynamicCache) else torch.equal(value, reference)
    assert torch.equal(base[0], model.model(input_ids=ids, pixel_values=pixels).last_hidden_state)


def test_forward_passes_trainers_loss_arguments_on_to_the_loss(model):
    """Trainer divides by the tokens of all accumulated batches (`num_items_in_batch`), and sequence-parallel
    training hands over targets already shifted (`shift_labels`); both reach transformers' causal-LM loss."""
    ids = torch.tensor([[3, 4, 5, 6, 7], [8, 9, 10, 11, 12]])
    labels = ids.clone()
    labels[0, :2] = -100
    with torch.no_grad():
        mean = model(input_ids=ids, labels=labels).loss
        over_accumulation = model(input_ids=ids, labels=labels, num_items_in_batch=21).loss
        shifted = torch.cat([labels[:, 1:], torch.full((2, 1), -100)], dim=1)
        from_shifted = model(input_ids=ids, labels=torch.zeros_like(ids), shift_labels=shifted).loss
    targets = 4 + 3  # tokens with a next-token target in each row
    torch.testing.assert_close(over_accumulation, mean * targets / 21)
    torch.testing.assert_close(from_shifted, mean)


def test_forward_takes_what_generate_and_peft_pass(model):
    """generate() adds return_dict, output_attentions when asked, and the tokenizer it was given (for stop strings,
    as `transformers serve` passes it); peft passes return_dict and output_attentions as None. The language model has no attention, so there are none
    to return."""
    ids, pixels = prompt(model.config)
    with torch.no_grad():
        expected = model(input_ids=ids, pixel_values=pixels).logits
        tokenizer = tiny_tokenizer()
        assert torch.equal(model(input_ids=ids, pixel_values=pixels, tokenizer=tokenizer).logits, expected)
        generated = model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=3, do_sample=False)
        assert torch.equal(model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=3, do_sample=False,
                                          tokenizer=tokenizer), generated)
        for extra in (dict(return_dict=True, output_attentions=True), dict(return_dict=None, output_attentions=None)):
            assert torch.equal(model(input_ids=ids, pixel_values=pixels, **extra).logits, expected)
            assert torch.equal(model.model(input_ids=ids, pixel_values=pixels, **extra).last_hidden_state,
                               model.model(input_ids=ids, pixel_values=pixels).last_hidden_state)


def test_hidden_states_are_the_residual_stream_after_each_layer_then_the_final_norm(model):
    ids, pixels = prompt(model.config)
    with torch.no_grad():
        out = model.model(input_ids=ids, pixel_values=pixels, output_hidden_states=True)
        model.config.output_hidden_states = True
        from_config = model(input_ids=ids, pixel_values=pixels)
        switched_off = model(input_ids=ids, pixel_values=pixels, output_hidden_states=False)
    assert len(out.hidden_states) == model.config.text_config.num_hidden_layers + 1
    assert torch.equal(out.hidden_states[-1], out.last_hidden_state)
    assert all(torch.equal(a, b) for a, b in zip(from_config.hidden_states, out.hidden_states))
    assert switched_off.hidden_states is None


def test_resized_vocabulary_keeps_the_image_token_and_the_tied_head(model, tmp_path):
    config = model.config
    ids, pixels = prompt(config)
    with torch.no_grad():
        before = model(input_ids=ids, pixel_values=pixels).logits
        model.resize_token_embeddings(config.text_config.vocab_size + 12)
        after = model(input_ids=ids, pixel_values=pixels).logits
    assert config.text_config.vocab_size == 140
    assert model.lm_head.weight is model.get_input_embeddings().weight
    assert after.shape[-1] == 140
    torch.testing.assert_close(after[..., :128], before)
    model.save_pretrained(tmp_path)
    reloaded = MLMambaForConditionalGeneration.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids, pixel_values=pixels).logits, after)


def test_resizing_below_the_image_token_is_refused(model):
    with pytest.raises(ValueError, match=r"new_num_tokens=100 would drop the image placeholder token"):
        model.resize_token_embeddings(100)
    assert model.get_input_embeddings().num_embeddings == 128
    model.resize_token_embeddings(100, pad_to_multiple_of=64)  # padded to 128: the image token stays
    assert model.config.text_config.vocab_size == 128


def generation_cache(output):
    """The cache of `generate(return_dict_in_generate=True)`: transformers >= 5.2x names the field `cache`,
    earlier releases `past_key_values`."""
    return getattr(output, "cache", None) or output.past_key_values


@pytest.mark.parametrize("cache_name", ["past_key_values", "cache", "cache_params"])
def test_generate_continues_a_conversation_from_its_cache(model, cache_name):
    """The cache of the first answer, continued with the tokens it has not seen (the answer's last token and the
    next turn), gives what generating over the whole conversation from scratch gives."""
    ids, pixels = prompt(model.config)
    greedy = dict(do_sample=False, eos_token_id=None, max_new_tokens=4, return_dict_in_generate=True,
                  output_scores=True)
    first = model.generate(input_ids=ids, pixel_values=pixels, **greedy)
    next_turn = torch.tensor([[8, 9, 10]])
    conversation = torch.cat([first.sequences, next_turn], dim=1)
    scratch = model.generate(input_ids=conversation, pixel_values=pixels, **greedy)

    unseen = torch.cat([first.sequences[:, -1:], next_turn], dim=1)
    continued = model.generate(input_ids=unseen, **greedy, **{cache_name: generation_cache(first)})
    assert torch.equal(continued.sequences[:, unseen.shape[1]:], scratch.sequences[:, conversation.shape[1]:])
    for step, reference in zip(continued.scores, scratch.scores):
        torch.testing.assert_close(step, reference, rtol=1e-5, atol=1e-5)


def test_forward_takes_the_cache_under_every_name_and_returns_it_as_past_key_values(model):
    """Where transformers names the cache `cache` (5.2x on), the older names work and warn as deprecated, as in
    transformers' own models; before, they are this release's names and do not warn."""
    ids, pixels = prompt(model.config)
    token = torch.tensor([[9]])
    with torch.no_grad():
        prefill = model(input_ids=ids, pixel_values=pixels, use_cache=True)
        cache = prefill.past_key_values
        assert cache is prefill[CACHE_NAME]
        reference = model(input_ids=token, cache=copy.deepcopy(cache)).logits
        for name in ("past_key_values", "cache_params"):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                out = model(input_ids=token, **{name: copy.deepcopy(cache)})
            assert torch.equal(out.logits, reference)
            deprecated = [w for w in caught if f"`{name}` is deprecated" in str(w.message)]
            assert len(deprecated) == (1 if CACHE_NAME == "cache" else 0)
        with pytest.raises(ValueError, match="got different caches as cache and past_key_values"):
            model(input_ids=token, cache=cache, past_key_values=copy.deepcopy(cache))


def attention_model(folder, implementation):
    return MLMambaForConditionalGeneration.from_pretrained(folder, attn_implementation=implementation).eval()


def test_flex_attention_reaches_both_towers_and_matches_sdpa(model, tmp_path):
    """Compiling flex attention's kernels takes minutes on a CPU, so its uncompiled (unfused) form runs here:
    the same code path through transformers and both towers, with plain PyTorch kernels underneath."""
    model.save_pretrained(tmp_path)
    ids, pixels = prompt(model.config)
    sdpa = attention_model(tmp_path, "sdpa")
    with torch.compiler.set_stance("force_eager"):
        flex = attention_model(tmp_path, "flex_attention")
        towers = flex.model.vision_tower
        assert towers.dino.config._attn_implementation == towers.siglip.config._attn_implementation == "flex_attention"
        with torch.no_grad():
            torch.testing.assert_close(
                flex(input_ids=ids, pixel_values=pixels).logits, sdpa(input_ids=ids, pixel_values=pixels).logits,
                rtol=1e-5, atol=1e-5,
            )
    per_tower = attention_model(tmp_path, {"dino_config": "eager", "siglip_config": "sdpa", "text_config": "sdpa"})
    assert per_tower.model.vision_tower.dino.config._attn_implementation == "eager"
    assert per_tower.model.vision_tower.siglip.config._attn_implementation == "sdpa"


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None,
                    reason="flash-attn is installed: tests/gpu/test_gpu_attention.py runs it")
def test_flash_attention_is_accepted_by_the_model_and_fails_only_on_the_missing_package(model, tmp_path):
    model.save_pretrained(tmp_path)
    with pytest.raises(ImportError, match="package for FlashAttention2 doesn't seem to be installed"):
        attention_model(tmp_path, "flash_attention_2")
