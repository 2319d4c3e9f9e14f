"""Configuration of ML-Mamba: two vision towers, the Mamba-2 Scan Connector, a projector and a Mamba-2 LM.

The defaults reproduce the released `mlmamba+3b` checkpoint (DINOv2-L/14-reg4 + SigLIP-SO400M/14 at
384 px, two bidirectional MSC blocks with SwiGLU, `fused-gelu-mlp` projector, Mamba-2 2.7B).
"""

import difflib
import math
from dataclasses import fields
from functools import cache
from typing import Literal, get_args, get_origin

import transformers
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig, GenerationConfig, PretrainedConfig
from transformers.models.auto import CONFIG_MAPPING
from transformers.utils import logging

logger = logging.get_logger(__name__)

# The variants, each defined once: the config checks values against these, and the modules dispatch on them.
ConnectorType = Literal["mlp", "msc"]
ConnectorScan = Literal["bidirectional", "cross"]
ProjectorType = Literal["fused-gelu-mlp", "gelu-mlp", "linear"]

# Keys of a model's config.json that transformers uses beyond the config's fields: written after the config is
# built (`auto_map` by custom-code saving, `quantization_config` by quantizers) or read when loading
# (`transformers_weights`, the weights file to load). A saved folder passes them back as keywords.
TRANSFORMERS_CONFIG_KEYS = ("auto_map", "quantization_config", "transformers_weights")

# The GPT-NeoX tokenizer has 50277 tokens and the LM's vocabulary is padded to 50288, so the first
# padding slot can hold the image placeholder without resizing the embeddings.
DEFAULT_IMAGE_TOKEN_ID = 50277

DINO_DEFAULTS = dict(
    model_type="dinov2_with_registers",
    hidden_size=1024,
    num_hidden_layers=24,
    num_attention_heads=16,
    mlp_ratio=4,
    image_size=384,
    patch_size=14,
    num_register_tokens=4,
    layerscale_value=1e-5,
    layer_norm_eps=1e-6,
)
SIGLIP_DEFAULTS = dict(
    model_type="siglip_vision_model",
    hidden_size=1152,
    intermediate_size=4304,
    num_hidden_layers=27,
    num_attention_heads=16,
    image_size=384,
    patch_size=14,
    layer_norm_eps=1e-6,
    vision_use_head=False,
    # The released model ran timm's `vit_so400m_patch14_siglip_384`, whose MLP uses exact (erf) GELU,
    # not transformers' SigLIP default `gelu_pytorch_tanh`.
    hidden_act="gelu",
)
TEXT_DEFAULTS = dict(
    model_type="mamba2",
    hidden_size=2560,
    num_hidden_layers=64,
    state_size=128,
    head_dim=64,
    num_heads=80,
    expand=2,
    n_groups=1,
    conv_kernel=4,
    chunk_size=256,
    vocab_size=50288,
    layer_norm_epsilon=1e-5,
    residual_in_fp32=True,
    tie_word_embeddings=True,
    pad_token_id=0,
    bos_token_id=0,
    eos_token_id=0,
)


def _build_sub_config(name: str, value, defaults: dict) -> PretrainedConfig:
    """Accept a config object, a dict (merged over the released defaults) or None (the defaults), of the released
    model type only: the modules and the checkpoint layout are written for DINOv2-with-registers, SigLIP's vision
    tower and Mamba-2."""
    expected = defaults["model_type"]
    config_class = CONFIG_MAPPING[expected]
    if isinstance(value, PretrainedConfig):
        if value.model_type != expected:
            raise ValueError(
                f"{name} is a {type(value).__name__} (model_type {value.model_type!r}), but ML-Mamba needs model_type "
                f"{expected!r}; pass a {config_class.__name__} or a dict of its fields"
            )
        return value
    if value is not None and not isinstance(value, dict):
        raise TypeError(
            f"{name} must be a {config_class.__name__}, a dict of its fields or None, got {type(value).__name__}"
        )
    merged = {**defaults, **(value or {})}
    model_type = merged.pop("model_type")
    if model_type != expected:
        raise ValueError(
            f"{name} has model_type {model_type!r}, but ML-Mamba needs {expected!r}; give the fields of a "
            f"{config_class.__name__} (the model_type key may be left out)"
        )
    try:
        return config_class(**merged)
    except StrictDataclassError as error:  # transformers' own checks; say which sub-config they are about
        raise ValueError(f"{name} is not a valid {config_class.__name__}: {error}; fix that entry of {name}") from error


def _pair(value) -> tuple:
    """An image or patch size as (height, width): transformers' vision configs take an int or a pair."""
    return (value, value) if isinstance(value, int) else tuple(value)


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}; set it to 1 or more")


def _check_positive_number(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(
            f"{name} must be a positive number, got {value!r}; it keeps a normalisation away from dividing by zero "
            "(the released model uses 1e-5 in the connector and the LM, 1e-6 in the towers)"
        )


@cache
def _keys_transformers_keeps() -> frozenset:
    """Keywords that are no field of ours but that transformers itself passes to a config and reads back:
    `PretrainedConfig`'s own attributes, generation settings that configs carry (`pad_token_id`, ...), and the
    keys it writes into config.json after building a config."""
    return frozenset(vars(PretrainedConfig())) | frozenset(vars(GenerationConfig())) | set(TRANSFORMERS_CONFIG_KEYS)


class MLMambaConfig(PretrainedConfig):
    r"""
    Configuration of [`MLMambaForConditionalGeneration`].

    Args:
        dino_config (`Dinov2WithRegistersConfig` or `dict`, *optional*):
            The DINOv2-with-registers tower. A dict is merged over the released ViT-L/14-reg4 @ 384 px.
        siglip_config (`SiglipVisionConfig` or `dict`, *optional*):
            The SigLIP tower. A dict is merged over the released SO400M/14 @ 384 px.
        text_config (`Mamba2Config` or `dict`, *optional*):
            The Mamba-2 language model. A dict is merged over the released Mamba-2 2.7B.
        vision_feature_layer (`int`, defaults to -2):
            Which entry of each tower's `hidden_states` feeds the connector (-2: second-to-last block).
        connector_type (`"mlp"` or `"msc"`): `msc` is the Mamba-2 Scan Connector; `mlp` the paper's baseline.
        connector_scan (`"bidirectional"` or `"cross"`): 1-D forward+reverse scans, or four 2-D grid scans.
        connector_num_layers (`int`): number of scan blocks in the MSC connector.
        connector_use_swiglu (`bool`): whether each block ends with `x + SwiGLU(LayerNorm(x))`.
        connector_hidden_size (`int`, *optional*): width of the connector; defaults to the LM's hidden size.
        connector_state_size, connector_head_dim, connector_expand, connector_n_groups,
        connector_conv_kernel, connector_chunk_size: Mamba-2 hyper-parameters of the connector's mixers.
        connector_norm_eps (`float`): epsilon of the connector's LayerNorms and gated RMSNorm.
        projector_type (`"fused-gelu-mlp"`, `"gelu-mlp"` or `"linear"`): the projector after the connector.
        image_token_id (`int`): the placeholder token that the model replaces with image features.
        initializer_range (`float`): std of the normal init of our linear and embedding weights (towers keep theirs).
        use_cuda_graphs (`bool`, defaults to True): on CUDA, `generate()` replays a captured graph of the LM's
            one-token step (one per batch size). Set `model.config.use_cuda_graphs = False` to decode eagerly.
        use_fused_decode_step (`bool`, defaults to True): on CUDA with Triton, each batch-1 decode step runs the LM
            in three fused kernels per layer (`decode_kernels.py`; larger batches run the per-op step with a
            streaming state-update kernel). Set False for the per-op step with mamba-ssm's kernels.

    Every value is checked when the config is built (also when it is loaded): a wrong one raises a `ValueError`
    that names the field, the value and the fix, and so does a keyword that is neither a field nor one that
    transformers itself passes to configs (with the fields it resembles).
    """

    model_type = "mlmamba"
    sub_configs = {"dino_config": AutoConfig, "siglip_config": AutoConfig, "text_config": AutoConfig}

    dino_config: dict | PretrainedConfig | None = None
    siglip_config: dict | PretrainedConfig | None = None
    text_config: dict | PretrainedConfig | None = None
    vision_feature_layer: int = -2
    connector_type: ConnectorType = "msc"
    connector_scan: ConnectorScan = "bidirectional"
    connector_num_layers: int = 2
    connector_use_swiglu: bool = True
    connector_hidden_size: int | None = None
    connector_state_size: int = 128
    connector_head_dim: int = 64
    connector_expand: int = 2
    connector_n_groups: int = 1
    connector_conv_kernel: int = 4
    connector_chunk_size: int = 256
    connector_norm_eps: float = 1e-5
    projector_type: ProjectorType = "fused-gelu-mlp"
    image_token_id: int = DEFAULT_IMAGE_TOKEN_ID
    initializer_range: float = 0.02
    use_cuda_graphs: bool = True
    use_fused_decode_step: bool = True
    tie_word_embeddings: bool = True

    def __post_init__(self, **kwargs):
        model_type = kwargs.pop("model_type", self.model_type)
        if model_type != self.model_type:
            raise ValueError(
                f"model_type is {model_type!r}: these are the settings of another kind of model; MLMambaConfig "
                f"reads configs of model_type {self.model_type!r}"
            )
        self.dino_config = _build_sub_config("dino_config", self.dino_config, DINO_DEFAULTS)
        self.siglip_config = _build_sub_config("siglip_config", self.siglip_config, SIGLIP_DEFAULTS)
        self.text_config = _build_sub_config("text_config", self.text_config, TEXT_DEFAULTS)
        if self.connector_hidden_size is None:
            self.connector_hidden_size = self.text_config.hidden_size
        super().__post_init__(**kwargs)
        self._check_keywords(kwargs)
        self._check_choices()
        self._check_connector()
        self._check_towers()
        self._check_language_model()

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        """transformers' own, after refusing attributes that are no field: set on a built config (`config.x = 1`),
        they would be written to config.json, which would then refuse to load."""
        field_names = {field.name for field in fields(self)}
        extra = sorted(
            key for key in vars(self)
            if not key.startswith("_") and key not in field_names and key not in _keys_transformers_keeps()
        )
        if extra:
            listed = ", ".join(f"{key}={getattr(self, key)!r}" for key in extra)
            raise ValueError(
                f"config attribute(s) {listed} are no MLMambaConfig fields: saved, the config.json would not load "
                f"back; delete them before saving (del config.{extra[0]}); the fields are listed in the MLMambaConfig "
                "docstring"
            )
        return super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)

    def _check_keywords(self, keywords: dict) -> None:
        """transformers stores every keyword it does not know as a plain attribute, so a misspelt field
        (`conector_type="mlp"`) would leave the real one at its default without a word: raise instead.

        A config.json written by another transformers version may hold that version's own new keys; those are
        logged and kept, so that the folder still loads.
        """
        unknown = sorted(key for key in keywords if key in vars(self) and key not in _keys_transformers_keeps())
        if not unknown:
            return
        names = [field.name for field in fields(self)]
        described = []
        for key in unknown:
            matches = difflib.get_close_matches(key, names, n=2)
            hint = f" (did you mean {' or '.join(matches)}?)" if matches else ""
            described.append(f"{key}={keywords[key]!r}{hint}")
        message = (
            f"MLMambaConfig got unknown keyword(s) {', '.join(described)}; its fields are listed in the "
            "MLMambaConfig docstring"
        )
        if self.transformers_version not in (None, transformers.__version__):
            logger.warning(
                f"{message}. The config was saved by transformers {self.transformers_version} and this is "
                f"{transformers.__version__}, so they may be keys of that version: kept as attributes."
            )
            return
        raise ValueError(message)

    def _check_choices(self) -> None:
        """Every `Literal` field against its allowed values (the annotation is their only definition)."""
        for field in fields(self):
            if get_origin(field.type) is Literal and getattr(self, field.name) not in get_args(field.type):
                raise ValueError(
                    f"{field.name} must be one of {get_args(field.type)}, got {getattr(self, field.name)!r}"
                )

    def _check_connector(self) -> None:
        for name in ("connector_num_layers", "connector_hidden_size", "connector_state_size", "connector_head_dim",
                     "connector_expand", "connector_n_groups", "connector_conv_kernel", "connector_chunk_size"):
            _check_positive_int(name, getattr(self, name))
        _check_positive_number("connector_norm_eps", self.connector_norm_eps)
        inner = self.connector_expand * self.connector_hidden_size
        if inner % self.connector_head_dim:
            raise ValueError(
                f"connector_expand * connector_hidden_size ({inner}) must be divisible by "
                f"connector_head_dim ({self.connector_head_dim})"
            )
        if (inner // self.connector_head_dim) % self.connector_n_groups:
            raise ValueError(
                f"the connector's {inner // self.connector_head_dim} heads must be divisible by "
                f"connector_n_groups ({self.connector_n_groups})"
            )

    def _check_towers(self) -> None:
        if isinstance(self.vision_feature_layer, bool) or not isinstance(self.vision_feature_layer, int):
            raise ValueError(f"vision_feature_layer must be an integer index, got {self.vision_feature_layer!r}")
        for name, tower in (("dino_config", self.dino_config), ("siglip_config", self.siglip_config)):
            for field in ("num_hidden_layers", "hidden_size", "num_attention_heads"):
                _check_positive_int(f"{name}.{field}", getattr(tower, field))
            _check_positive_number(f"{name}.layer_norm_eps", tower.layer_norm_eps)
            sizes, patches = _pair(tower.image_size), _pair(tower.patch_size)
            for field, pair in (("image_size", sizes), ("patch_size", patches)):
                for size in pair:
                    _check_positive_int(f"{name}.{field}", size)
            # Pixels past the last whole patch are not seen, as in the released towers (384 px in 14 px patches:
            # 27 x 27, the last 6 rows and columns unused); a patch larger than the image leaves nothing at all.
            if any(size < patch for size, patch in zip(sizes, patches)):
                raise ValueError(
                    f"{name}.patch_size {tower.patch_size} is larger than its image_size {tower.image_size}, so the "
                    "tower would see no patch; use a patch_size of at most the image_size"
                )
            depth = tower.num_hidden_layers
            # `hidden_states` holds the embeddings and then one entry per block: depth + 1 entries.
            if not -(depth + 1) <= self.vision_feature_layer <= depth:
                raise ValueError(
                    f"vision_feature_layer {self.vision_feature_layer} is beyond {name}'s {depth} layers (its "
                    f"hidden_states has {depth + 1} entries, indices {-(depth + 1)} to {depth}); choose a layer both "
                    "towers have (-2, the second-to-last block, when released)"
                )
        if self.dino_grid != self.siglip_grid:
            raise ValueError(
                f"the two towers must produce the same patch grid to be concatenated: DINOv2 gives "
                f"{self.dino_grid}, SigLIP gives {self.siglip_grid}; adjust image_size / patch_size"
            )

    def _check_language_model(self) -> None:
        text = self.text_config
        for field in ("num_hidden_layers", "hidden_size", "state_size", "head_dim", "num_heads", "expand", "n_groups",
                      "conv_kernel", "chunk_size", "vocab_size"):
            _check_positive_int(f"text_config.{field}", getattr(text, field))
        _check_positive_number("text_config.layer_norm_epsilon", text.layer_norm_epsilon)
        if not isinstance(self.image_token_id, int) or not 0 <= self.image_token_id < text.vocab_size:
            raise ValueError(
                f"image_token_id {self.image_token_id!r} is outside the LM vocabulary (size {text.vocab_size}); use "
                "the id of the tokenizer's <image> token, below text_config.vocab_size"
            )

    @staticmethod
    def _grid(vision_config) -> tuple[int, int]:
        (height, width), (patch_h, patch_w) = _pair(vision_config.image_size), _pair(vision_config.patch_size)
        return height // patch_h, width // patch_w

    @property
    def dino_grid(self) -> tuple[int, int]:
        return self._grid(self.dino_config)

    @property
    def siglip_grid(self) -> tuple[int, int]:
        return self._grid(self.siglip_config)

    @property
    def image_grid(self) -> tuple[int, int]:
        """Patch grid (rows, columns) of one image, shared by both towers (27 x 27 when released)."""
        return self.dino_grid

    @property
    def image_seq_length(self) -> int:
        """Number of LM positions one image occupies (729 when released)."""
        rows, cols = self.image_grid
        return rows * cols

    @property
    def vision_feature_size(self) -> int:
        """Channels after concatenating the two towers (DINO first, then SigLIP): 2176 when released."""
        return self.dino_config.hidden_size + self.siglip_config.hidden_size

    @classmethod
    def tiny(cls, **overrides) -> "MLMambaConfig":
        """A few-layer, narrow config for tests and examples (runs in milliseconds on a CPU)."""
        settings = dict(
            dino_config=dict(
                hidden_size=32, num_hidden_layers=3, num_attention_heads=2, image_size=56, patch_size=14,
                layerscale_value=1.0,
            ),
            siglip_config=dict(
                hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=2, image_size=56,
                patch_size=14,
            ),
            text_config=dict(
                hidden_size=64, num_hidden_layers=2, state_size=16, head_dim=16, num_heads=8, chunk_size=8,
                vocab_size=128,
            ),
            connector_state_size=16,
            connector_head_dim=16,
            connector_chunk_size=8,
            image_token_id=127,
        )
        for key in ("dino_config", "siglip_config", "text_config"):
            if isinstance(overrides.get(key), dict):
                overrides[key] = {**settings[key], **overrides[key]}
        return cls(**{**settings, **overrides})


__all__ = ["MLMambaConfig"]
