"""The original ML-Mamba, for conversion tests: synthetic sources in the released formats and a reference forward.

`synthetic_checkpoint` builds random tensors under exactly the key names of the released `latest-checkpoint.pt`;
`reference_logits` is the released model's math in plain PyTorch on those original names (sequential scans,
explicit forward/backward averaging), written independently of the package; `tiny_timm_towers` builds timm's own
DINOv2-reg4 and SigLIP architectures at tiny widths. Nothing here imports the package's modeling code.
"""

import copy
import json

import torch
import torch.nn.functional as F

RELEASED_RUN_CONFIG = {
    "model": {
        "model_id": "mlmamba+3b",
        "arch_specifier": "no-align+fused-gelu-mlp",
        "vision_backbone_id": "dinosiglip-vit-so-384px",
        "llm_backbone_id": "mamba2-2.7b",
        "image_resize_strategy": "resize-naive",
        "llm_max_length": 2048,
    }
}
DINO_TIMM_NAME = "vit_large_patch14_reg4_dinov2"
SIGLIP_TIMM_NAME = "vit_so400m_patch14_siglip_384"


def _randomize(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Random values everywhere (layer scales and norms included), so that a misplaced tensor changes the output."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name.endswith("norm.weight"):
                param.copy_(1 + 0.1 * noise)
            elif param.ndim >= 2 and "token" not in name and "pos_embed" not in name and "latent" not in name:
                param.copy_(noise / param[0].numel() ** 0.5)
            else:
                param.copy_(0.2 * noise)


def tiny_timm_towers(config, dino_image_size: int, seed: int = 0):
    """timm's DINOv2-reg4 (created at `dino_image_size`) and SigLIP, at the widths of `config`'s towers, random."""
    import timm

    generator = torch.Generator().manual_seed(seed)
    dino_config, siglip_config = config.dino_config, config.siglip_config
    dino = timm.create_model(
        DINO_TIMM_NAME, pretrained=False, num_classes=0, img_size=dino_image_size, patch_size=dino_config.patch_size,
        embed_dim=dino_config.hidden_size, depth=dino_config.num_hidden_layers,
        num_heads=dino_config.num_attention_heads, mlp_ratio=dino_config.mlp_ratio,
    )
    siglip = timm.create_model(
        SIGLIP_TIMM_NAME, pretrained=False, num_classes=0, img_size=siglip_config.image_size,
        patch_size=siglip_config.patch_size, embed_dim=siglip_config.hidden_size,
        depth=siglip_config.num_hidden_layers, num_heads=siglip_config.num_attention_heads,
        mlp_ratio=siglip_config.intermediate_size / siglip_config.hidden_size,
    )
    _randomize(dino, generator)
    _randomize(siglip, generator)
    return dino.eval(), siglip.eval()


def timm_dino_from_file(config, path):
    """What the released code does: timm creates DINOv2 at the model's image size from a checkpoint file."""
    import timm

    dino_config = config.dino_config
    return timm.create_model(
        DINO_TIMM_NAME, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, num_classes=0,
        img_size=dino_config.image_size, patch_size=dino_config.patch_size, embed_dim=dino_config.hidden_size,
        depth=dino_config.num_hidden_layers, num_heads=dino_config.num_attention_heads,
        mlp_ratio=dino_config.mlp_ratio,
    ).eval()


def synthetic_checkpoint(config, seed: int = 0) -> dict:
    """`{"model": {...}}` with the checkpoint's four sub-state-dicts (`mlp`, `bidirectional_mamba`, `projector`,
    `llm_backbone`), random tensors shaped for `config`."""
    generator = torch.Generator().manual_seed(seed)

    def linear(out_features, in_features):
        return torch.randn(out_features, in_features, generator=generator) / in_features**0.5

    def vector(size, mean=0.0, std=0.1):
        return mean + std * torch.randn(size, generator=generator)

    def mixer(hidden, expand, head_dim, state, groups, kernel, suffixes):
        inner = expand * hidden
        heads, conv_dim = inner // head_dim, inner + 2 * groups * state
        tensors = {
            "in_proj.weight": linear(inner + conv_dim + heads, hidden),
            "norm.weight": vector(inner, mean=1.0),
            "out_proj.weight": linear(hidden, inner),
        }
        for suffix in suffixes:
            tensors[f"conv1d{suffix}.weight"] = 0.3 * torch.randn(conv_dim, 1, kernel, generator=generator)
            tensors[f"conv1d{suffix}.bias"] = vector(conv_dim)
            tensors[f"dt_bias{suffix}"] = vector(heads, mean=-2.0, std=0.5)
            tensors[f"A_log{suffix}"] = torch.log(torch.rand(heads, generator=generator) * 7 + 1)
            tensors[f"D{suffix}"] = vector(heads, mean=1.0)
        return tensors

    hidden, text = config.connector_hidden_size, config.text_config
    mlp = {"0.weight": linear(hidden, config.vision_feature_size), "0.bias": vector(hidden)}
    bidirectional = {}
    for i in range(config.connector_num_layers):
        block_mixer = mixer(hidden, config.connector_expand, config.connector_head_dim, config.connector_state_size,
                            config.connector_n_groups, config.connector_conv_kernel, ("", "_b"))
        bidirectional.update({f"layers.{i}.mixer.{key}": value for key, value in block_mixer.items()})
        bidirectional[f"layers.{i}.norm.weight"] = vector(hidden, mean=1.0)
        bidirectional[f"layers.{i}.norm.bias"] = vector(hidden)
        for w in ("w1", "w2", "w3"):
            bidirectional[f"layers.{i}.mlp.{w}.weight"] = linear(hidden, hidden)
            bidirectional[f"layers.{i}.mlp.{w}.bias"] = vector(hidden)
    bidirectional["norm_f.weight"] = vector(hidden, mean=1.0)
    bidirectional["norm_f.bias"] = vector(hidden)

    width = text.hidden_size
    projector = {}
    for index, (out_features, in_features) in zip((0, 2, 4), ((4 * width, hidden), (width, 4 * width), (width, width))):
        projector[f"projector.{index}.weight"] = linear(out_features, in_features)
        projector[f"projector.{index}.bias"] = vector(out_features)

    embedding = torch.randn(text.vocab_size, width, generator=generator)
    llm = {"backbone.embedding.weight": embedding}
    for i in range(text.num_hidden_layers):
        layer_mixer = mixer(width, text.expand, text.head_dim, text.state_size, text.n_groups, text.conv_kernel, ("",))
        llm.update({f"backbone.layers.{i}.mixer.{key}": value for key, value in layer_mixer.items()})
        llm[f"backbone.layers.{i}.norm.weight"] = vector(width, mean=1.0)
    llm["backbone.norm_f.weight"] = vector(width, mean=1.0)
    llm["lm_head.weight"] = embedding.clone()
    return {"model": {"mlp": mlp, "bidirectional_mamba": bidirectional, "projector": projector, "llm_backbone": llm}}


def _rms_norm(x, weight, eps, groups=1):
    grouped = x.unflatten(-1, (groups, -1))
    return (grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + eps)).flatten(-2) * weight


def _mamba2_scan_branch(p, x, suffix, groups, eps):
    """in_proj -> causal conv + SiLU -> selective scan, one step at a time (+ D skip) -> gated RMSNorm.

    `p` holds one mixer's tensors under mamba_ssm names; `suffix` picks the conv/dt/A/D set ("" or "_b").
    Returns the gated, normalised scan output before `out_proj`: (batch, length, inner).
    """
    inner = p["out_proj.weight"].shape[1]
    heads = p[f"A_log{suffix}"].shape[0]
    conv_weight, conv_bias = p[f"conv1d{suffix}.weight"], p[f"conv1d{suffix}.bias"]
    conv_dim, kernel = conv_weight.shape[0], conv_weight.shape[-1]
    state = (conv_dim - inner) // (2 * groups)
    z, xbc, dt = (x @ p["in_proj.weight"].T).split([inner, conv_dim, heads], dim=-1)

    length = x.shape[1]
    padded = F.pad(xbc, (0, 0, kernel - 1, 0))
    xbc = F.silu(sum(padded[:, j : j + length] * conv_weight[:, 0, j] for j in range(kernel)) + conv_bias)
    xs, B, C = xbc.split([inner, groups * state, groups * state], dim=-1)
    xs = xs.unflatten(-1, (heads, -1))
    B = B.unflatten(-1, (groups, state)).repeat_interleave(heads // groups, dim=2)
    C = C.unflatten(-1, (groups, state)).repeat_interleave(heads // groups, dim=2)
    dt = F.softplus(dt + p[f"dt_bias{suffix}"])
    A = -torch.exp(p[f"A_log{suffix}"])

    h = x.new_zeros(x.shape[0], heads, xs.shape[-1], state)
    outputs = []
    for t in range(length):
        h = torch.exp(dt[:, t] * A)[:, :, None, None] * h + (dt[:, t, :, None] * xs[:, t])[..., None] * B[:, t, :, None]
        outputs.append((h * C[:, t, :, None]).sum(-1) + p[f"D{suffix}"][:, None] * xs[:, t])
    y = torch.stack(outputs, dim=1).flatten(-2)
    return _rms_norm(y * F.silu(z), p["norm.weight"], eps, groups)


def _sub(state_dict: dict, prefix: str) -> dict:
    return {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}


def reference_logits(checkpoint_model, dino, siglip, dino_pixels, siglip_pixels, text_ids, config):
    """Logits of the released model for one image followed by `text_ids`, in float64, from the original tensors."""
    sd = {part: {k: v.double() for k, v in tensors.items()} for part, tensors in checkpoint_model.items()}
    eps, groups = config.connector_norm_eps, config.connector_n_groups

    # Vision: second-to-last block of each timm tower, patch tokens only, DINO then SigLIP on the channel axis.
    with torch.no_grad():
        dino, siglip = copy.deepcopy(dino).double(), copy.deepcopy(siglip).double()
        dino_features = dino.get_intermediate_layers(dino_pixels.double(), n={len(dino.blocks) - 2})[0]
        siglip_features = siglip.get_intermediate_layers(siglip_pixels.double(), n={len(siglip.blocks) - 2})[0]
    x = torch.cat([dino_features, siglip_features], dim=-1)

    # Connector: Linear + GELU, bidirectional Mamba-2 blocks with SwiGLU, final LayerNorm.
    x = F.gelu(x @ sd["mlp"]["0.weight"].T + sd["mlp"]["0.bias"])
    connector = sd["bidirectional_mamba"]
    for i in range(config.connector_num_layers):
        mixer = _sub(connector, f"layers.{i}.mixer.")
        forward = _mamba2_scan_branch(mixer, x, "", groups, eps)
        backward = _mamba2_scan_branch(mixer, x.flip(1), "_b", groups, eps).flip(1)
        x = x + ((forward + backward) / 2) @ mixer["out_proj.weight"].T
        norm = _sub(connector, f"layers.{i}.norm.")
        normed = F.layer_norm(x, x.shape[-1:], norm["weight"], norm["bias"], eps)
        mlp = _sub(connector, f"layers.{i}.mlp.")
        gate = F.silu(normed @ mlp["w1.weight"].T + mlp["w1.bias"]) * (normed @ mlp["w2.weight"].T + mlp["w2.bias"])
        x = x + gate @ mlp["w3.weight"].T + mlp["w3.bias"]
    x = F.layer_norm(x, x.shape[-1:], connector["norm_f.weight"], connector["norm_f.bias"], eps)

    # Projector: Linear GELU Linear GELU Linear.
    projector = sd["projector"]
    for index in (0, 2, 4):
        x = x @ projector[f"projector.{index}.weight"].T + projector[f"projector.{index}.bias"]
        x = F.gelu(x) if index < 4 else x

    # Mamba-2 LM over [image features, prompt embeddings]; pre-norm residual blocks, tied head.
    llm, text = sd["llm_backbone"], config.text_config
    hidden = torch.cat([x, llm["backbone.embedding.weight"][torch.tensor(text_ids)][None]], dim=1)
    for i in range(text.num_hidden_layers):
        mixer = _sub(llm, f"backbone.layers.{i}.mixer.")
        normed = _rms_norm(hidden, llm[f"backbone.layers.{i}.norm.weight"], text.layer_norm_epsilon)
        scanned = _mamba2_scan_branch(mixer, normed, "", text.n_groups, text.layer_norm_epsilon)
        hidden = hidden + scanned @ mixer["out_proj.weight"].T
    hidden = _rms_norm(hidden, llm["backbone.norm_f.weight"], text.layer_norm_epsilon)
    return (hidden @ llm["lm_head.weight"].T)[0]


def write_run_config(path) -> None:
    path.write_text(json.dumps(RELEASED_RUN_CONFIG, indent=2))
