"""Configuration of ML-Mamba: two vision towers, the Mamba-2 Scan Connector, a projector and a Mamba-2 LM.

The defaults reproduce the released `mlmamba+3b` checkpoint (DINOv2-L/14-reg4 + SigLIP-SO400M/14 at
384 px, two bidirectional MSC blocks with SwiGLU, `fused-gelu-mlp` projector, Mamba-2 2.7B).
"""

from typing import Literal

from transformers import AutoConfig, PretrainedConfig
from transformers.models.auto import CONFIG_MAPPING

CONNECTOR_TYPES = ("mlp", "msc")
CONNECTOR_SCANS = ("bidirectional", "cross")
PROJECTOR_TYPES = ("fused-gelu-mlp", "gelu-mlp", "linear")

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


def _build_sub_config(value, defaults: dict) -> PretrainedConfig:
    """Accept a config object, a dict (merged over the released defaults) or None (the defaults)."""
    if isinstance(value, PretrainedConfig):
        return value
    if value is not None and not isinstance(value, dict):
        raise TypeError(f"expected a config object or a dict, got {type(value).__name__}")
    merged = {**defaults, **(value or {})}
    return CONFIG_MAPPING[merged.pop("model_type")](**merged)


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
    """

    model_type = "mlmamba"
    sub_configs = {"dino_config": AutoConfig, "siglip_config": AutoConfig, "text_config": AutoConfig}

    dino_config: dict | PretrainedConfig | None = None
    siglip_config: dict | PretrainedConfig | None = None
    text_config: dict | PretrainedConfig | None = None
    vision_feature_layer: int = -2
    connector_type: Literal["mlp", "msc"] = "msc"
    connector_scan: Literal["bidirectional", "cross"] = "bidirectional"
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
    projector_type: Literal["fused-gelu-mlp", "gelu-mlp", "linear"] = "fused-gelu-mlp"
    image_token_id: int = DEFAULT_IMAGE_TOKEN_ID
    initializer_range: float = 0.02
    use_cuda_graphs: bool = True
    tie_word_embeddings: bool = True

    def __post_init__(self, **kwargs):
        self.dino_config = _build_sub_config(self.dino_config, DINO_DEFAULTS)
        self.siglip_config = _build_sub_config(self.siglip_config, SIGLIP_DEFAULTS)
        self.text_config = _build_sub_config(self.text_config, TEXT_DEFAULTS)
        if self.connector_hidden_size is None:
            self.connector_hidden_size = self.text_config.hidden_size
        self._check_consistency()
        super().__post_init__(**kwargs)

    def _check_consistency(self):
        if self.connector_type not in CONNECTOR_TYPES:
            raise ValueError(f"connector_type must be one of {CONNECTOR_TYPES}, got {self.connector_type!r}")
        if self.connector_scan not in CONNECTOR_SCANS:
            raise ValueError(f"connector_scan must be one of {CONNECTOR_SCANS}, got {self.connector_scan!r}")
        if self.projector_type not in PROJECTOR_TYPES:
            raise ValueError(f"projector_type must be one of {PROJECTOR_TYPES}, got {self.projector_type!r}")
        if self.dino_grid != self.siglip_grid:
            raise ValueError(
                f"the two towers must produce the same patch grid to be concatenated: DINOv2 gives "
                f"{self.dino_grid}, SigLIP gives {self.siglip_grid}; adjust image_size / patch_size"
            )
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
        if not 0 <= self.image_token_id < self.text_config.vocab_size:
            raise ValueError(
                f"image_token_id {self.image_token_id} is outside the LM vocabulary (size {self.text_config.vocab_size})"
            )

    @staticmethod
    def _grid(vision_config) -> tuple[int, int]:
        size, patch = vision_config.image_size, vision_config.patch_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        patch_h, patch_w = (patch, patch) if isinstance(patch, int) else tuple(patch)
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
