"""Pure mapping of the released ML-Mamba weights to this package's parameter names.

Sources: the four sub-state-dicts of the released `latest-checkpoint.pt`, and timm's DINOv2-with-registers
(`vit_large_patch14_reg4_dinov2.lvd142m`) and SigLIP (`vit_so400m_patch14_siglip_384`) checkpoints. Targets are the
names that our `save_pretrained` writes and that every supported transformers version reads: its own loading path
renames them in memory where a version needs to (DINOv2's attention: `attention.attention.query` in 5.17,
`attention.q_proj` from 5.23; saved files keep the former and load in both).

Nothing here reads files or builds models: functions take and return dicts of tensors. Every source tensor is
either mapped by a rule, on the `DROPPED` list, or reported; every problem is collected, never raised one by one.
"""

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from modeling_mlmamba.modeling_mlmamba import feature_depth

DINO_PREFIX = "model.vision_tower.dino."
SIGLIP_PREFIX = "model.vision_tower.siglip."
ORIGINAL_PARTS = ("mlp", "bidirectional_mamba", "projector", "llm_backbone")

# Source tensors that the converted model does not need, by source and whole-key pattern, with the reason (the
# towers' blocks after the feature layer and their final norms depend on the config: `unused_tower_keys`).
DROPPED = {
    "siglip": {
        r"attn_pool\..+": "SigLIP's attention-pooling (MAP) head makes an image-level embedding; ML-Mamba uses "
        "patch features only, and transformers' SiglipVisionModel with vision_use_head=False has no such head",
    },
    "llm_backbone": {
        r"lm_head\.weight": "equal to backbone.embedding.weight (checked); our lm_head is tied to the embeddings",
    },
}

TRUNCATED_TOWER_REASON = (
    "after the vision feature layer: the model builds each tower only up to `vision_feature_layer` (its features "
    "are taken before the later blocks and the final norm)"
)


def unused_tower_keys(tower_config, feature_layer: int, name: str) -> dict[str, str]:
    """The timm blocks after the feature layer and the final norm, which the truncated tower does not build."""
    depth = feature_depth(tower_config, feature_layer, name)
    unused = "|".join(map(str, range(depth, tower_config.num_hidden_layers)))
    blocks = {rf"blocks\.({unused})\..+": TRUNCATED_TOWER_REASON} if unused else {}
    return {**blocks, r"norm\.(weight|bias)": TRUNCATED_TOWER_REASON}


# Target parameters with no source tensor, set to a constant.
CONSTANTS = {
    DINO_PREFIX + "embeddings.mask_token": "zeros: DINOv2 uses it only to mask patches in self-supervised "
    "training (never at inference), and timm's checkpoint does not keep it",
    DINO_PREFIX + "embeddings.position_embeddings (row 0)": "zeros: timm adds DINOv2's class-token position into "
    "`cls_token`, which we copy unchanged; the sum the model computes is the same",
}

Produce = Callable[[re.Match, torch.Tensor], dict[str, torch.Tensor]]
Rule = tuple[str, str | Produce]


class ConversionError(ValueError):
    """Everything that stops a conversion, listed together so that one run shows every problem."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        listing = "\n".join(f"  - {problem}" for problem in self.problems)
        super().__init__(f"the conversion found {len(self.problems)} problem(s):\n{listing}")


@dataclass
class Converted:
    """Converted tensors by target name, the source each came from (for messages), and the problems so far."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    origins: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def add(self, target: str, tensor: torch.Tensor, origin: str) -> None:
        if target in self.tensors:
            self.problems.append(f"{target} would be filled twice: from {self.origins[target]} and from {origin}")
            return
        self.tensors[target] = tensor
        self.origins[target] = origin

    def update(self, other: "Converted") -> None:
        for target, tensor in other.tensors.items():
            self.add(target, tensor, other.origins[target])
        self.problems.extend(other.problems)


def apply_rules(source: str, state_dict: Mapping, rules: list[Rule], prefix: str = "", dropped=()) -> Converted:
    """Map each tensor by the first rule whose pattern matches its whole key; report keys that no rule takes.

    A rule's target is a `re` replacement template, or a function returning `{target: tensor}` for mappings that
    split or reshape. Keys matching a `dropped` pattern are skipped on purpose.
    """
    result = Converted()
    for key, tensor in state_dict.items():
        origin = f"{source} {key!r}"
        if not isinstance(tensor, torch.Tensor):
            result.problems.append(f"{origin} is a {type(tensor).__name__}, not a tensor")
            continue
        if any(re.fullmatch(pattern, key) for pattern in dropped):
            continue
        match, target = next(((m, t) for p, t in rules if (m := re.fullmatch(p, key))), (None, None))
        if match is None:
            result.problems.append(
                f"{origin} {tuple(tensor.shape)} is not used: no parameter of the model takes it and it is not on "
                "the drop list (is this the right file?)"
            )
            continue
        try:
            produced = target(match, tensor) if callable(target) else {match.expand(target): tensor}
        except ValueError as error:
            result.problems.append(f"{origin}: {error}")
            continue
        for name, value in produced.items():
            result.add(prefix + name, value, origin)
    return result


def resample_position_embeddings(positions: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Patch position embeddings (1, side * side, dim) of a square grid, resampled to `grid` = (rows, cols).

    The operation timm's `resample_abs_pos_embed` applies when a model is created at another image size than its
    checkpoint (DINOv2 is trained at 518 px = 37x37 patches; ML-Mamba runs it at 384 px = 27x27): bicubic with
    antialiasing, in float32. Done once here, so the converted model never interpolates at run time.
    """
    if positions.ndim != 3 or positions.shape[0] != 1:
        raise ValueError(f"position embeddings must have shape (1, positions, dim), got {tuple(positions.shape)}")
    side = math.isqrt(positions.shape[1])
    if side * side != positions.shape[1]:
        raise ValueError(
            f"{positions.shape[1]} patch positions do not form a square grid (a timm checkpoint whose pos_embed "
            "also covers class or register tokens?)"
        )
    if (side, side) == tuple(grid):
        return positions
    dim = positions.shape[-1]
    image = positions.float().reshape(1, side, side, dim).permute(0, 3, 1, 2)
    image = F.interpolate(image, size=tuple(grid), mode="bicubic", antialias=True, align_corners=False)
    return image.permute(0, 2, 3, 1).reshape(1, -1, dim).to(positions.dtype)


def _split_qkv(templates: tuple[str, str, str]) -> Produce:
    """timm fuses query, key and value into one `qkv` projection (q rows, then k, then v); transformers has three."""

    def produce(match: re.Match, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        if tensor.ndim == 0 or tensor.shape[0] % 3:
            raise ValueError(f"a fused qkv tensor needs a first dimension divisible by 3, got {tuple(tensor.shape)}")
        return {match.expand(template): part for template, part in zip(templates, tensor.chunk(3))}

    return produce


def _dino_positions(grid: tuple[int, int]) -> Produce:
    def produce(match: re.Match, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        patches = resample_position_embeddings(tensor, grid)
        class_position = patches.new_zeros(1, 1, patches.shape[-1])  # see CONSTANTS
        return {"embeddings.position_embeddings": torch.cat([class_position, patches], dim=1)}

    return produce


def _siglip_positions(grid: tuple[int, int]) -> Produce:
    def produce(match: re.Match, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"embeddings.position_embedding.weight": resample_position_embeddings(tensor, grid)[0]}

    return produce


def _vit_block_rules(names: dict[str, str], qkv: tuple[str, str, str], layer: str) -> list[Rule]:
    """Rules for timm ViT blocks: `names` maps timm sub-modules (weight + bias) to transformers ones in one block."""
    rules: list[Rule] = [
        (r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)", _split_qkv(tuple(rf"{layer}.\1.{name}.\2" for name in qkv)))
    ]
    for timm_name, hf_name in names.items():
        rules.append((rf"blocks\.(\d+)\.{re.escape(timm_name)}\.(weight|bias)", rf"{layer}.\1.{hf_name}.\2"))
    return rules


def timm_dino_rules(grid: tuple[int, int]) -> list[Rule]:
    """timm `vit_*_reg4_dinov2` (no_embed_class: positions for patches only) -> Dinov2WithRegistersModel."""
    block = {"norm1": "norm1", "attn.proj": "attention.output.dense", "norm2": "norm2", "mlp.fc1": "mlp.fc1",
             "mlp.fc2": "mlp.fc2"}
    qkv = ("attention.attention.query", "attention.attention.key", "attention.attention.value")
    return [
        ("cls_token", "embeddings.cls_token"),
        ("reg_token", "embeddings.register_tokens"),
        ("pos_embed", _dino_positions(grid)),
        (r"patch_embed\.proj\.(weight|bias)", r"embeddings.patch_embeddings.projection.\1"),
        (r"blocks\.(\d+)\.ls([12])\.gamma", r"encoder.layer.\1.layer_scale\2.lambda1"),
        *_vit_block_rules(block, qkv, "encoder.layer"),
        (r"norm\.(weight|bias)", r"layernorm.\1"),
    ]


def timm_siglip_rules(grid: tuple[int, int]) -> list[Rule]:
    """timm `vit_so400m_patch14_siglip_384` (no class token) -> SiglipVisionModel without its pooling head."""
    block = {"norm1": "layer_norm1", "attn.proj": "self_attn.out_proj", "norm2": "layer_norm2", "mlp.fc1": "mlp.fc1",
             "mlp.fc2": "mlp.fc2"}
    qkv = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    return [
        ("pos_embed", _siglip_positions(grid)),
        (r"patch_embed\.proj\.(weight|bias)", r"embeddings.patch_embedding.\1"),
        *_vit_block_rules(block, qkv, "encoder.layers"),
        (r"norm\.(weight|bias)", r"post_layernorm.\1"),
    ]


_CONNECTOR = "model.connector."
_LM = "model.language_model."
# Per sub-state-dict of the checkpoint. In the connector's mixers, the unsuffixed conv/dt/A/D set is the forward
# scan (our direction 0) and the `_b` set the backward scan (direction 1); in_proj, norm and out_proj are shared.
ORIGINAL_RULES: dict[str, list[Rule]] = {
    "mlp": [(r"0\.(weight|bias)", _CONNECTOR + r"input_proj.\1")],
    "bidirectional_mamba": [
        (r"layers\.(\d+)\.mixer\.(in_proj|norm|out_proj)\.weight", _CONNECTOR + r"layers.\1.mixer.\2.weight"),
        (r"layers\.(\d+)\.mixer\.(conv1d\.weight|conv1d\.bias|dt_bias|A_log|D)",
         _CONNECTOR + r"layers.\1.mixer.directions.0.\2"),
        (r"layers\.(\d+)\.mixer\.conv1d_b\.(weight|bias)", _CONNECTOR + r"layers.\1.mixer.directions.1.conv1d.\2"),
        (r"layers\.(\d+)\.mixer\.(dt_bias|A_log|D)_b", _CONNECTOR + r"layers.\1.mixer.directions.1.\2"),
        (r"layers\.(\d+)\.(norm|mlp\.w[123])\.(weight|bias)", _CONNECTOR + r"layers.\1.\2.\3"),
        (r"norm_f\.(weight|bias)", _CONNECTOR + r"norm_f.\1"),
    ],
    "projector": [
        (r"projector\.(\d+)\.(weight|bias)", r"model.projector.layers.\1.\2"),
        (r"projector\.(weight|bias)", r"model.projector.layers.0.\1"),  # the `linear` projector
    ],
    "llm_backbone": [
        # mamba_ssm says `embedding`, transformers' Mamba2Model `embeddings` (v5 loading does not rename it).
        (r"backbone\.embedding\.weight", _LM + "embeddings.weight"),
        (r"backbone\.layers\.(\d+)\.norm\.weight", _LM + r"layers.\1.norm.weight"),
        (r"backbone\.layers\.(\d+)\.mixer\.(in_proj\.weight|conv1d\.weight|conv1d\.bias|dt_bias|A_log|D|norm\.weight"
         r"|out_proj\.weight)", _LM + r"layers.\1.mixer.\2"),
        (r"backbone\.norm_f\.weight", _LM + "norm_f.weight"),
    ],
}


def map_timm_dino(state_dict: Mapping, grid: tuple[int, int], hidden_size: int,
                  dropped: Mapping[str, str] | None = None) -> Converted:
    """timm DINOv2-with-registers weights -> our `model.vision_tower.dino.*`, positions resampled to `grid`."""
    result = apply_rules("DINOv2", state_dict, timm_dino_rules(grid), prefix=DINO_PREFIX, dropped=dropped or {})
    result.add(DINO_PREFIX + "embeddings.mask_token", torch.zeros(1, hidden_size), "a constant (see CONSTANTS)")
    return result


def map_timm_siglip(state_dict: Mapping, grid: tuple[int, int], dropped: Mapping[str, str] | None = None) -> Converted:
    """timm SigLIP weights -> our `model.vision_tower.siglip.*`, pooling head dropped, positions on `grid`."""
    return apply_rules("SigLIP", state_dict, timm_siglip_rules(grid), prefix=SIGLIP_PREFIX,
                       dropped={**DROPPED["siglip"], **(dropped or {})})


def untied_lm_head_problems(llm_backbone: Mapping) -> list[str]:
    """The original LM ties its head to the embeddings; a checkpoint where they differ is not the released model."""
    head, embedding = llm_backbone.get("lm_head.weight"), llm_backbone.get("backbone.embedding.weight")
    if not isinstance(head, torch.Tensor) or not isinstance(embedding, torch.Tensor):
        return []
    if head.shape != embedding.shape or not torch.equal(head, embedding):
        return [
            "checkpoint llm_backbone 'lm_head.weight' differs from 'backbone.embedding.weight', but ML-Mamba ties "
            "them (and so does this package): this is not a released ML-Mamba checkpoint"
        ]
    return []


def map_original(checkpoint_model: Mapping) -> Converted:
    """The checkpoint's `"model"` dict (four sub-state-dicts) -> our connector, projector and language model."""
    result = Converted()
    for part in checkpoint_model:
        if part not in ORIGINAL_RULES:
            result.problems.append(
                f"the checkpoint's 'model' has an unexpected entry {part!r} (expected {ORIGINAL_PARTS})"
            )
    for part, rules in ORIGINAL_RULES.items():
        sub_state_dict = checkpoint_model.get(part)
        if not isinstance(sub_state_dict, Mapping):
            result.problems.append(f"the checkpoint's 'model' has no {part!r} sub-state-dict")
            continue
        result.update(apply_rules(f"checkpoint {part}", sub_state_dict, rules, dropped=DROPPED.get(part, {})))
    if isinstance(checkpoint_model.get("llm_backbone"), Mapping):
        result.problems.extend(untied_lm_head_problems(checkpoint_model["llm_backbone"]))
    return result


def map_all(config, checkpoint_model: Mapping, dino: Mapping, siglip: Mapping) -> Converted:
    """Every source of an `MLMambaConfig` model, mapped: vision towers on the config's patch grid, then the rest."""
    layer = config.vision_feature_layer
    result = map_timm_dino(dino, config.dino_grid, config.dino_config.hidden_size,
                           unused_tower_keys(config.dino_config, layer, "dino_config"))
    result.update(map_timm_siglip(siglip, config.siglip_grid,
                                  unused_tower_keys(config.siglip_config, layer, "siglip_config")))
    result.update(map_original(checkpoint_model))
    return result
