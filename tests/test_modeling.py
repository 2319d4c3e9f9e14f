import json
import types
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
import transformers.modeling_utils
from conftest import image_prompt, random_pixels, tiny_model, tiny_processor
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, Dinov2Config, LlamaConfig, SiglipConfig

from modeling_mlmamba import MLMambaConfig, MLMambaForConditionalGeneration, MLMambaModel, MLMambaProcessor


def test_default_config_is_the_released_model():
    config = MLMambaConfig()
    assert config.image_seq_length == 729
    assert config.vision_feature_size == 1024 + 1152
    assert config.connector_hidden_size == 2560
    assert config.text_config.num_hidden_layers == 64
    assert config.text_config.vocab_size == 50288
    assert config.dino_config.num_register_tokens == 4
    assert config.siglip_config.num_hidden_layers == 27
    assert (config.connector_type, config.connector_scan, config.projector_type) == (
        "msc", "bidirectional", "fused-gelu-mlp",
    )


def test_sub_configs_accept_objects_and_dicts():
    text = MLMambaConfig.tiny().text_config
    config = MLMambaConfig.tiny(text_config=text, siglip_config={"num_hidden_layers": 2})
    assert config.text_config is text
    assert config.siglip_config.num_hidden_layers == 2


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"connector_type": "transformer"}, "connector_type"),
        ({"projector_type": "conv"}, "projector_type"),
        ({"siglip_config": {"image_size": 70}}, "same patch grid"),
        ({"image_token_id": 1000}, "outside the LM vocabulary"),
    ],
)
def test_inconsistent_config_is_rejected(overrides, message):
    with pytest.raises(ValueError, match=message):
        MLMambaConfig.tiny(**overrides)


POSITIVE_INTEGER = "must be a positive integer"
POSITIVE_NUMBER = "must be a positive number"


@pytest.mark.parametrize(
    "overrides, fragments",
    [
        ({"connector_num_layers": -1}, ["connector_num_layers", "-1", POSITIVE_INTEGER, "1 or more"]),
        ({"connector_num_layers": "2"}, ["connector_num_layers", "'2'", POSITIVE_INTEGER]),
        ({"text_config": {"num_hidden_layers": 0}}, ["text_config.num_hidden_layers", "got 0", POSITIVE_INTEGER]),
        ({"connector_norm_eps": 0.0}, ["connector_norm_eps", "0.0", POSITIVE_NUMBER, "1e-5"]),
        ({"connector_norm_eps": -1e-5}, ["connector_norm_eps", "-1e-05", POSITIVE_NUMBER]),
        ({"text_config": {"layer_norm_epsilon": 0.0}}, ["text_config.layer_norm_epsilon", "0.0", POSITIVE_NUMBER]),
        ({"dino_config": {"layer_norm_eps": -1e-6}}, ["dino_config.layer_norm_eps", "-1e-06", POSITIVE_NUMBER]),
        ({"siglip_config": {"layer_norm_eps": 0.0}}, ["siglip_config.layer_norm_eps", "0.0", POSITIVE_NUMBER]),
        ({"dino_config": {"patch_size": 0}}, ["dino_config.patch_size", "got 0", POSITIVE_INTEGER]),
        ({"dino_config": {"patch_size": 70}, "siglip_config": {"patch_size": 70}},
         ["dino_config.patch_size 70", "larger than its image_size 56", "at most the image_size"]),
        ({"connector_chunk_size": 0}, ["connector_chunk_size", "got 0", POSITIVE_INTEGER]),
        ({"text_config": {"chunk_size": -8}}, ["text_config.chunk_size", "-8", POSITIVE_INTEGER]),
        ({"connector_hidden_size": 0}, ["connector_hidden_size", "got 0", POSITIVE_INTEGER]),
        ({"connector_head_dim": 0}, ["connector_head_dim", "got 0", POSITIVE_INTEGER]),
        ({"dino_config": {"hidden_size": -32}}, ["dino_config.hidden_size", "-32", POSITIVE_INTEGER]),
        ({"connector_state_size": 0}, ["connector_state_size", "got 0", POSITIVE_INTEGER]),
        ({"text_config": {"state_size": -16}}, ["text_config.state_size", "-16", POSITIVE_INTEGER]),
        ({"connector_conv_kernel": 0}, ["connector_conv_kernel", "got 0", POSITIVE_INTEGER]),
        ({"text_config": {"conv_kernel": 0}}, ["text_config.conv_kernel", "got 0", POSITIVE_INTEGER]),
        ({"vision_feature_layer": 4}, ["vision_feature_layer 4", "dino_config's 3 layers", "-4 to 3", "both towers"]),
        ({"vision_feature_layer": -5}, ["vision_feature_layer -5", "dino_config's 3 layers"]),
        ({"vision_feature_layer": 3, "siglip_config": {"num_hidden_layers": 2}},
         ["vision_feature_layer 3", "siglip_config's 2 layers", "-3 to 2"]),
        ({"text_config": {"model_type": "llama", "num_hidden_layers": 2}},
         ["text_config has model_type 'llama'", "needs 'mamba2'", "Mamba2Config"]),
        ({"text_config": {"layer_norm_epsilon": 1}},
         ["text_config is not a valid Mamba2Config", "layer_norm_epsilon", "expected float", "fix that entry"]),
        ({"text_config": {"num_heads": 5}},
         ["text_config is not a valid Mamba2Config", "num_heads * head_dim", "fix that entry"]),
    ],
)
def test_invalid_values_are_rejected_naming_field_value_and_fix(overrides, fragments):
    with pytest.raises(ValueError) as raised:
        MLMambaConfig.tiny(**overrides)
    for fragment in fragments:
        assert fragment in str(raised.value)


@pytest.mark.parametrize(
    "name, config",
    [("text_config", LlamaConfig()), ("dino_config", Dinov2Config()), ("siglip_config", SiglipConfig())],
)
def test_sub_config_of_another_model_type_is_rejected(name, config):
    with pytest.raises(ValueError, match=rf"{name} is a {type(config).__name__} \(model_type '{config.model_type}'\)"):
        MLMambaConfig.tiny(**{name: config})
    with pytest.raises(TypeError, match=f"{name} must be a"):
        MLMambaConfig.tiny(**{name: "mamba2"})


def test_config_of_another_model_is_rejected():
    with pytest.raises(ValueError, match="model_type is 'llama'"):
        MLMambaConfig.from_dict(LlamaConfig(num_hidden_layers=2).to_dict())


def test_misspelt_keyword_is_rejected_with_close_matches():
    with pytest.raises(ValueError, match=r"unknown keyword\(s\) conector_type='mlp' \(did you mean connector_type"):
        MLMambaConfig.tiny(conector_type="mlp")
    with pytest.raises(ValueError, match=r"vison_feature_layer=-1 \(did you mean vision_feature_layer\?\)"):
        MLMambaConfig.from_dict({**MLMambaConfig.tiny().to_dict(), "vison_feature_layer": -1})
    with pytest.raises(ValueError, match=r"completely_unknown=1;"):
        MLMambaConfig.tiny(completely_unknown=1)


@pytest.mark.parametrize(
    "keyword, value",
    [
        ("_name_or_path", "someone/model"), ("name_or_path", "someone/model"), ("architectures", ["MLMambaModel"]),
        ("auto_map", {"AutoConfig": "configuration_mlmamba.MLMambaConfig"}), ("transformers_version", "5.0.0"),
        ("torch_dtype", "bfloat16"), ("dtype", "float16"), ("output_hidden_states", True),
        ("output_attentions", False), ("return_dict", False), ("pad_token_id", 0), ("bos_token_id", 0),
        ("eos_token_id", 0), ("attn_implementation", "eager"), ("_attn_implementation", "sdpa"), ("num_labels", 3),
        ("use_cache", False), ("max_length", 30), ("model_type", "mlmamba"), ("_commit_hash", "0" * 40),
        ("quantization_config", {"quant_method": "bitsandbytes"}), ("transformers_weights", "model.safetensors"),
    ],
)
def test_keywords_transformers_passes_through_are_accepted(keyword, value):
    config = MLMambaConfig.tiny(**{keyword: value})
    assert MLMambaConfig.from_dict(config.to_dict()).to_dict() == config.to_dict()


def test_unknown_key_from_another_transformers_version_is_kept_with_a_warning(tmp_path, caplog):
    """A config.json written by another transformers version may hold that version's own new keys: the folder must
    still load. Written by this version, the same key is a mistake."""
    config = MLMambaConfig.tiny()
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**saved, "new_field": 1, "transformers_version": "99.0.0"}))
    with caplog.at_level("WARNING"):
        loaded = MLMambaConfig.from_pretrained(tmp_path)
    assert loaded.new_field == 1
    assert "new_field=1" in caplog.text and "transformers 99.0.0" in caplog.text
    (tmp_path / "config.json").write_text(
        json.dumps({**saved, "new_field": 1, "transformers_version": transformers.__version__})
    )
    with pytest.raises(ValueError, match="unknown keyword.*new_field=1"):
        MLMambaConfig.from_pretrained(tmp_path)


def test_an_attribute_set_on_a_built_config_is_refused_at_save_before_anything_is_written(tmp_path):
    """transformers writes every attribute of a config to config.json, and loading refuses what is no field: a save
    that succeeded would leave a folder that cannot load. A key kept from another transformers version's config
    cannot be written under this version either."""
    model = tiny_model()
    model.config.layer_norm_eps = 1.0
    for save, folder in ((model.save_pretrained, tmp_path / "model"), (model.config.save_pretrained, tmp_path / "c")):
        with pytest.raises(ValueError, match=r"config attribute\(s\) layer_norm_eps=1.0 are no MLMambaConfig fields.*"
                                             r"del config.layer_norm_eps"):
            save(folder)
        assert not folder.exists()
    del model.config.layer_norm_eps
    model.save_pretrained(tmp_path / "model")
    assert not hasattr(MLMambaForConditionalGeneration.from_pretrained(tmp_path / "model").config, "layer_norm_eps")


@pytest.mark.parametrize("layer", [-4, 0, 3])
def test_every_hidden_state_of_both_towers_can_feed_the_connector(layer):
    """The range the config accepts is exactly what the towers return: embeddings (0) to the last block."""
    model = tiny_model(vision_feature_layer=layer)
    (features,) = model.get_image_features(random_pixels(1, model.config)).pooler_output
    assert features.shape == (model.config.image_seq_length, model.config.text_config.hidden_size)


def test_released_image_size_need_not_be_a_multiple_of_the_patch():
    """384 px in 14 px patches: 27 x 27 patches, the last 6 pixel rows and columns unused, as in the released
    towers, so such a config is valid."""
    config = MLMambaConfig.tiny(dino_config={"image_size": 60}, siglip_config={"image_size": 60})
    assert config.image_grid == (4, 4)


def test_forward_shapes(model):
    config = model.config
    ids = torch.tensor([image_prompt(config, [5, 6, 7]), image_prompt(config, [8, 9, 10])])
    out = model(input_ids=ids, pixel_values=random_pixels(2, config))
    assert out.logits.shape == (2, ids.shape[1], config.text_config.vocab_size)
    assert out.image_hidden_states.shape == (2, config.image_seq_length, config.text_config.hidden_size)
    features = model.get_image_features(random_pixels(3, config)).pooler_output
    assert [image.shape for image in features] == [(config.image_seq_length, config.text_config.hidden_size)] * 3


def test_text_only_forward(model):
    ids = torch.tensor([[3, 4, 5, 6]])
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (1, 4, model.config.text_config.vocab_size)
    assert out.image_hidden_states is None
    assert torch.isfinite(out.loss)


def test_loss_covers_only_answer_tokens(model):
    config = model.config
    prompt, answer = [5, 6, 7], [20, 21, 22]
    ids = torch.tensor([image_prompt(config, prompt + answer)])
    answer_start = ids.shape[1] - len(answer)
    labels = torch.full_like(ids, -100)
    labels[:, answer_start:] = ids[:, answer_start:]
    pixels = random_pixels(1, config)
    out = model(input_ids=ids, pixel_values=pixels, labels=labels)

    # Next-token prediction: the logit at position t predicts the label at t + 1.
    expected = F.cross_entropy(out.logits[0, answer_start - 1 : -1], ids[0, answer_start:])
    torch.testing.assert_close(out.loss, expected)

    # Labels on image positions never count, whatever they say.
    noisy = labels.clone()
    noisy[:, : config.image_seq_length] = 3
    torch.testing.assert_close(model(input_ids=ids, pixel_values=pixels, labels=noisy).loss, expected)


def test_image_features_land_in_placeholder_positions(model):
    config = model.config
    ids = torch.tensor([[9] + image_prompt(config, [5])])
    pixels = random_pixels(1, config)
    features = model.get_image_features(pixels).pooler_output
    embeds = model.get_input_embeddings()(ids)
    embeds[0, 1 : 1 + config.image_seq_length] = features[0]
    via_embeds = model(inputs_embeds=embeds).logits
    torch.testing.assert_close(model(input_ids=ids, pixel_values=pixels).logits, via_embeds)


def test_greedy_generate_with_cache_equals_full_recompute(model):
    config = model.config
    ids = torch.tensor([image_prompt(config, [5, 6, 7]), image_prompt(config, [8, 9, 10])])
    pixels = random_pixels(2, config)
    new_tokens = 8
    generated = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
        max_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
    )

    sequence = ids
    with torch.no_grad():
        for _ in range(new_tokens):
            logits = model(input_ids=sequence, pixel_values=pixels, use_cache=False).logits[:, -1]
            sequence = torch.cat([sequence, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, sequence)


def test_generate_text_only(model):
    out = model.generate(input_ids=torch.tensor([[3, 4, 5]]), max_new_tokens=4, do_sample=False, eos_token_id=None)
    assert out.shape == (1, 7)


def test_save_and_load_roundtrip_is_bit_exact(model, tmp_path):
    config = model.config
    ids = torch.tensor([image_prompt(config, [5, 6, 7])])
    pixels = random_pixels(1, config)
    expected = model(input_ids=ids, pixel_values=pixels).logits
    model.save_pretrained(tmp_path)

    files = sorted(p.name for p in tmp_path.iterdir())
    assert "model.safetensors" in files
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in files)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "mlmamba"
    assert saved["auto_map"]["AutoModelForImageTextToText"].endswith("MLMambaForConditionalGeneration")

    for loader in (MLMambaForConditionalGeneration, AutoModelForImageTextToText):
        loaded = loader.from_pretrained(tmp_path).eval()
        assert isinstance(loaded, MLMambaForConditionalGeneration)
        assert torch.equal(loaded(input_ids=ids, pixel_values=pixels).logits, expected)
        assert loaded.lm_head.weight.data_ptr() == loaded.get_input_embeddings().weight.data_ptr()

    assert isinstance(AutoConfig.from_pretrained(tmp_path), MLMambaConfig)
    base = AutoModel.from_pretrained(tmp_path)
    assert isinstance(base, MLMambaModel)
    torch.testing.assert_close(
        base.get_image_features(pixels).pooler_output, model.get_image_features(pixels).pooler_output, rtol=0, atol=0
    )


class Killed(BaseException):
    """Stands in for the process being killed: not an `Exception`, so nothing on the way may swallow it."""


def folder_contents(folder: Path) -> dict:
    return {path.name: path.read_bytes() if path.is_file() else folder_contents(path) for path in folder.iterdir()}


def weight_files(folder: Path) -> dict:
    return {name: data for name, data in folder_contents(folder).items() if ".safetensors" in name}


def assert_same_weights(model, reference):
    expected = reference.state_dict()
    actual = model.state_dict()
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), name


def test_interrupted_save_leaves_the_previous_save_loadable(tmp_path, monkeypatch):
    old, new = tiny_model(seed=0), tiny_model(seed=1)
    old.save_pretrained(tmp_path, max_shard_size="100KB")
    tiny_processor(old.config).save_pretrained(tmp_path)
    before = folder_contents(tmp_path)
    assert len([name for name in before if name.endswith(".safetensors")]) > 2

    shards_written = []

    def killed_after_the_first_shard(tensors, filename, *args, **kwargs):
        if shards_written:
            raise Killed
        shards_written.append(filename)
        save_file(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", killed_after_the_first_shard)
    with pytest.raises(Killed):
        new.save_pretrained(tmp_path, max_shard_size="100KB")
    assert len(shards_written) == 1
    assert folder_contents(tmp_path) == before  # byte for byte, and no hidden folder left behind
    assert_same_weights(MLMambaForConditionalGeneration.from_pretrained(tmp_path), old)
    assert not torch.equal(old.lm_head.weight, new.lm_head.weight)


@pytest.mark.parametrize(
    "first, second", [("1GB", "100KB"), ("100KB", "1GB"), ("100KB", "300KB")],
    ids=["sharded-over-single-file", "single-file-over-sharded", "fewer-shards-over-more"],
)
def test_save_replaces_the_weights_and_keeps_every_other_file(tmp_path, first, second):
    old, new = tiny_model(seed=0), tiny_model(seed=1)
    folder = tmp_path / "model"
    old.save_pretrained(folder, max_shard_size=first)
    processor = tiny_processor(old.config)
    processor.save_pretrained(folder)
    (folder / "README.md").write_text("my notes")
    (folder / "runs").mkdir()
    (folder / "runs" / "events.log").write_text("step 1")
    others = folder_contents(folder)

    new.save_pretrained(folder, max_shard_size=second)
    new.save_pretrained(tmp_path / "fresh", max_shard_size=second)
    assert weight_files(folder) == weight_files(tmp_path / "fresh")  # no weight file of the old save is left
    assert_same_weights(MLMambaForConditionalGeneration.from_pretrained(folder), new)
    kept = folder_contents(folder)
    for name in ("README.md", "runs", "processor_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert kept[name] == others[name]
    assert MLMambaProcessor.from_pretrained(folder).image_token_id == processor.image_token_id
    assert not [name for name in kept if name.startswith(".")]


def test_save_on_a_process_that_does_not_write_changes_nothing(tmp_path):
    """Distributed training calls save_pretrained on every rank; only the main one writes, the others must not
    touch the folder (nor remove the weights that the main rank is replacing)."""
    old, new = tiny_model(seed=0), tiny_model(seed=1)
    old.save_pretrained(tmp_path)
    before = folder_contents(tmp_path)
    new.save_pretrained(tmp_path, is_main_process=False)
    assert folder_contents(tmp_path) == before


def test_save_onto_a_file_raises_and_leaves_it_alone(tmp_path, model):
    path = tmp_path / "model"
    path.write_text("not a folder")
    with pytest.raises(ValueError, match=r"save_directory .*model' is a file, not a folder; pass the path of a folder"):
        model.save_pretrained(path)
    assert path.read_text() == "not a folder"
    assert [entry.name for entry in tmp_path.iterdir()] == ["model"]


@pytest.fixture
def fake_hub(monkeypatch):
    """HfApi without a network: repositories are created on request, each commit's files are recorded."""
    from huggingface_hub import HfApi, ModelCard
    from huggingface_hub.errors import EntryNotFoundError

    commits = []

    def create_commit(self, repo_id, operations, **kwargs):
        commits.append((repo_id, {op.path_in_repo: Path(op.path_or_fileobj).read_bytes() for op in operations}))

    def no_card_yet(repo_id, **kwargs):
        raise EntryNotFoundError(f"{repo_id} has no README.md yet")

    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kwargs: types.SimpleNamespace(repo_id=repo_id))
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    monkeypatch.setattr(ModelCard, "load", no_card_yet)
    return commits


def test_push_to_hub_uploads_a_complete_save(fake_hub, model):
    model.push_to_hub("someone/tiny-mlmamba")
    [(repo_id, files)] = fake_hub
    assert repo_id == "someone/tiny-mlmamba"
    assert {"config.json", "generation_config.json", "model.safetensors", "modeling_mlmamba.py", "saving.py",
            "README.md"} <= files.keys()
    assert not [name for name in files if name.startswith(".")]
    uploaded = safetensors.torch.load(files["model.safetensors"])
    assert torch.equal(uploaded["model.connector.input_proj.weight"], model.model.connector.input_proj.weight)


def test_save_with_push_to_hub_names_the_repo_after_the_folder(fake_hub, model, tmp_path):
    folder = tmp_path / "tiny-mlmamba"
    model.save_pretrained(folder, push_to_hub=True)
    [(repo_id, files)] = fake_hub
    assert repo_id == "tiny-mlmamba"
    assert files == folder_contents(folder)


def test_lm_head_is_tied_to_embeddings(model):
    assert model.lm_head.weight is model.get_input_embeddings().weight


def test_placeholder_count_mismatch_names_both_counts(model):
    config = model.config
    ids = torch.tensor([image_prompt(config, [5])[: config.image_seq_length - 2] + [5]])
    with pytest.raises(ValueError, match=rf"{config.image_seq_length - 2} image placeholder tokens.*"
                                         rf"{config.image_seq_length} image features"):
        model(input_ids=ids, pixel_values=random_pixels(1, config))
    with pytest.raises(ValueError, match="no pixel_values"):
        model(input_ids=ids)


@pytest.mark.parametrize(
    "shape, message",
    [((1, 3, 56, 56), r"\(images, 2, 3, height, width\)"), ((1, 2, 1, 56, 56), r"\(images, 2, 3"),
     ((1, 2, 3, 42, 56), "expect 56x56")],
)
def test_wrong_pixel_shapes_are_rejected(model, shape, message):
    ids = torch.tensor([image_prompt(model.config, [5])])
    with pytest.raises(ValueError, match=message):
        model(input_ids=ids, pixel_values=torch.randn(*shape))


@pytest.mark.parametrize("every_n_layers", [1, 2])
def test_gradient_checkpointing_gives_the_same_gradients(every_n_layers):
    """Full checkpointing and transformers' `every_n_layers` (checkpoint some blocks, keep the others' activations):
    the same gradients as no checkpointing, and exactly the chosen LM blocks run their forward again in backward."""
    def gradients(checkpointing: bool):
        model = tiny_model(text_config=dict(num_hidden_layers=4))
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}, every_n_layers=every_n_layers
            )
            if every_n_layers == 1:
                assert model.model.connector.layers[0].gradient_checkpointing
        blocks = model.model.language_model.layers
        mixer_calls = []
        for block in blocks:
            block.mixer.register_forward_pre_hook(lambda mixer, _: mixer_calls.append(mixer.layer_idx))
        config = model.config
        ids = torch.tensor([image_prompt(config, [5, 6, 7, 8])])
        model(input_ids=ids, pixel_values=random_pixels(1, config), labels=ids).loss.backward()
        checkpointed = [bool(block.gradient_checkpointing) for block in blocks]
        assert [mixer_calls.count(block.mixer.layer_idx) for block in blocks] == [1 + flag for flag in checkpointed]
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, checkpointed

    (plain, none), (checkpointed, chosen) = gradients(False), gradients(True)
    assert not any(none)
    positions = [index for index, flag in enumerate(chosen) if flag]
    assert len(positions) == 4 // every_n_layers
    assert all(later - earlier == every_n_layers for earlier, later in zip(positions, positions[1:]))
    assert plain.keys() == checkpointed.keys()
    assert any(name.startswith("model.connector.layers") for name in plain)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7)


def test_frozen_vision_towers_get_no_gradients(model):
    model.train()
    model.model.vision_tower.requires_grad_(False)
    config = model.config
    ids = torch.tensor([image_prompt(config, [5, 6])])
    model(input_ids=ids, pixel_values=random_pixels(1, config), labels=ids).loss.backward()
    assert all(p.grad is None for p in model.model.vision_tower.parameters())
    assert model.model.connector.input_proj.weight.grad is not None
