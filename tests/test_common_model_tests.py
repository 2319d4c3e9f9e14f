"""transformers' own common model tests (`ModelTesterMixin`, `GenerationTesterMixin`) run against ML-Mamba, with
the tests that do not apply to it skipped, each with its reason.

The mixins are part of transformers' test suite, which the package does not install. Point the environment variable
TRANSFORMERS_TESTS_DIR at a folder whose `tests/` holds transformers' test suite of the installed version (a git
checkout at its tag: `tests/test_modeling_common.py` imports `tests/generation/test_utils.py` and
`tests/exporters/test_export.py`, which the PyPI source distribution does not ship) and install `parameterized`,
which the mixins import. Without them this module is skipped.
"""

import importlib
import importlib.machinery
import importlib.util
import os
import sys
import tempfile
import unittest
from pathlib import Path
from unittest import mock

import pytest
import torch
from conftest import random_pixels
from transformers.models.auto import modeling_auto

from modeling_mlmamba import MLMambaConfig, MLMambaForConditionalGeneration, MLMambaModel
from modeling_mlmamba.modeling_mlmamba import feature_depth

TESTS_DIR = os.environ.get("TRANSFORMERS_TESTS_DIR")
if not TESTS_DIR:
    pytest.skip("set TRANSFORMERS_TESTS_DIR to a folder holding transformers' tests/ (see this module's docstring)",
                allow_module_level=True)
if not (Path(TESTS_DIR) / "tests" / "test_modeling_common.py").is_file():
    pytest.skip(f"TRANSFORMERS_TESTS_DIR={TESTS_DIR} has no tests/test_modeling_common.py", allow_module_level=True)
pytest.importorskip("parameterized", reason="transformers' test mixins import parameterized")


def import_transformers_tests(name: str):
    """transformers' `tests/<name>.py`, imported inside a package of its own (`transformers_tests`), so that its
    relative imports resolve and it never meets this repository's own `tests` folder."""
    if "transformers_tests" not in sys.modules:
        spec = importlib.machinery.ModuleSpec("transformers_tests", None, is_package=True)
        spec.submodule_search_locations = [str(Path(TESTS_DIR) / "tests")]
        sys.modules["transformers_tests"] = importlib.util.module_from_spec(spec)
    return importlib.import_module(f"transformers_tests.{name}")


try:
    common = import_transformers_tests("test_modeling_common")
except ImportError as error:
    pytest.skip(f"transformers' test_modeling_common does not import from TRANSFORMERS_TESTS_DIR={TESTS_DIR}: "
                f"{error}", allow_module_level=True)
GenerationTesterMixin = import_transformers_tests("generation.test_utils").GenerationTesterMixin


class MLMambaModelTester:
    """Tiny configs and inputs in the layout transformers' mixins expect: each prompt starts with one image's
    placeholder tokens, then text."""

    # Seven prompts: test_eager_matches_sdpa_inference compares batches of seven and would fill a smaller batch up
    # with random ids that lack the image placeholders.
    def __init__(self, parent, batch_size: int = 7, text_length: int = 7):
        self.parent = parent
        self.batch_size = batch_size
        self.text_length = text_length
        config = self.get_config()
        self.seq_length = config.image_seq_length + text_length
        self.hidden_size = config.text_config.hidden_size
        self.num_hidden_layers = config.text_config.num_hidden_layers
        self.vocab_size = config.text_config.vocab_size
        self.image_token_id = config.image_token_id
        self.is_training = True

    def get_config(self) -> MLMambaConfig:
        # The image placeholder inside the vocabulary that test_resize_tokens_embeddings shrinks to (15 fewer
        # tokens): resizing refuses to drop it.
        return MLMambaConfig.tiny(image_token_id=100)

    def prepare_config_and_inputs_for_common(self):
        config = self.get_config()
        generator = torch.Generator().manual_seed(0)
        # Text ids from 1 on (0 is padding and end of text), below the image placeholder id.
        text = torch.randint(1, config.image_token_id, (self.batch_size, self.text_length), generator=generator)
        placeholders = torch.full((self.batch_size, config.image_seq_length), config.image_token_id)
        input_ids = torch.cat([placeholders, text], dim=1)
        inputs = {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "pixel_values": random_pixels(self.batch_size, config),
        }
        return config, inputs


class MLMambaCommonModelTest(common.ModelTesterMixin, GenerationTesterMixin, unittest.TestCase):
    all_model_classes = (MLMambaModel, MLMambaForConditionalGeneration)
    # Attention lives in the two vision towers (the language model is attention-free).
    has_attentions = True
    # Sub-configs for both towers and the language model: the mixin's composite-model checks apply.
    _is_composite = True
    additional_model_inputs = ["pixel_values"]
    # `get_image_features(...).last_hidden_state` holds both towers' patch features side by side, whose width is
    # config.vision_feature_size; the mixin looks for one `vision_config.hidden_size`, which this model has twice.
    skip_test_image_features_output_shape = True
    # Features come from the towers' second-to-last layer, as in the released model: their last block, final norm
    # and DINOv2's mask token take no part and get no gradient.
    test_all_params_have_gradient = False

    def setUp(self):
        self.model_tester = MLMambaModelTester(self)
        # The mixin tells a base model from a head, and which labels a head takes, by transformers' own tables of
        # model names; this model registers with the Auto classes at import instead, so it is added to the tables
        # for the test.
        for table, name in (
            (modeling_auto.MODEL_MAPPING_NAMES, MLMambaModel.__name__),
            (modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES, MLMambaForConditionalGeneration.__name__),
            (modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MLMambaForConditionalGeneration.__name__),
        ):
            patcher = mock.patch.dict(table, {MLMambaConfig.model_type: name})
            patcher.start()
            self.addCleanup(patcher.stop)
        if self._testMethodName.startswith("test_eager_matches_sdpa_inference"):
            # One method per dtype and padding case, generated by parameterized: skipped here rather than one by one.
            self.skipTest(
                "the test sets generic epsilon names (layer_norm_eps, rms_norm_eps, ...) on the config and saves it; "
                "they are no MLMambaConfig fields, so the save is refused (the config.json would not load back). "
                "Eager, SDPA and flex attention in both towers are compared in test_transformers_conventions.py and "
                "tests/gpu/test_gpu_attention.py"
            )

    @unittest.skip("The towers record hidden states through transformers' output capturing, so the mixin expects "
                   "forward's hidden_states to take layer indices; they are the Mamba-2 language model's, recorded "
                   "by hand (as transformers' Mamba2 does), and output_hidden_states is a flag")
    def test_can_capture_specific_layers_hidden_states(self):
        pass

    @unittest.skip("After checking that `cache_params` warns as deprecated, the test compares cache.get_seq_length(), "
                   "which a cache of recurrent layers only cannot give (transformers raises); "
                   "test_transformers_conventions.py checks the cache under each name")
    def test_bc_cache_name_forward(self):
        pass

    @unittest.skip("The language model's blocks hand on (mixer output, residual), which the next norm adds in one "
                   "fused kernel; each hidden state is their sum, made for the output only, so no gradient reaches "
                   "it from the logits")
    def test_retain_grad_hidden_states_attentions(self):
        pass

    def _image_features_get_expected_num_attentions(self, model_tester=None):
        """get_image_features' attentions are DINOv2's layers', then SigLIP's: of the blocks up to the feature layer,
        which is all each tower is built with."""
        config = self.model_tester.get_config()
        return sum(feature_depth(getattr(config, name), config.vision_feature_layer, name)
                   for name in ("dino_config", "siglip_config"))

    def _image_features_get_expected_num_hidden_states(self, model_tester=None):
        """get_image_features' hidden_states are DINOv2's (embeddings and each layer), then SigLIP's."""
        return self._image_features_get_expected_num_attentions() + 2

    @unittest.skip("Each tower is built from a copy of its sub-config cut to the feature layer's depth (the blocks "
                   "after it would run for nothing); the model's config keeps the pretrained depth, which saving and "
                   "conversion need, so the tower's config is a copy, not the same object")
    def test_internal_model_config_and_subconfig_are_same(self):
        pass

    def test_sdpa_can_dispatch_composite_models(self):
        """The mixin's composite check, for this model's sub-models (the mixin asks models with other sub-configs
        than one vision and one text config to write it themselves): saved and reloaded, both towers run sdpa, and
        with attn_implementation="eager" both run eager."""
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            with self.subTest(model_class.__name__), tempfile.TemporaryDirectory() as folder:
                model_class(config).save_pretrained(folder)
                for requested, expected in ((None, "sdpa"), ("eager", "eager")):
                    towers = model_class.from_pretrained(folder, attn_implementation=requested).base_model.vision_tower
                    self.assertEqual(towers.dino.config._attn_implementation, expected)
                    self.assertEqual(towers.siglip.config._attn_implementation, expected)

    @unittest.skip("forward's outputs are the language model's, which is attention-free; the towers' attentions come "
                   "from get_image_features (test_get_image_features_attentions)")
    def test_attention_outputs(self):
        pass
