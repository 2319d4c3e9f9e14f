"""ML-Mamba: image -> two vision towers -> Mamba-2 Scan Connector -> projector -> Mamba-2 language model.

Read top to bottom: the vision tower, the projector, the base model that merges image features into the
token sequence, and the generation head. The connector lives in `connector.py`, the scan in `ssd.py`.
"""

import copy
import math
import os
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel, DynamicCache, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutput, BaseModelOutputWithPooling
from transformers.models.mamba2.modeling_mamba2 import Mamba2CausalLMOutput, Mamba2Output
from transformers.utils.generic import can_return_tuple

from .configuration_mlmamba import MLMambaConfig
from .connector import MLMambaConnector, ScanDirection
from .cuda_graphs import GenerationGraphs
from .gemv import decode_linear
from .input_checks import (
    InputValues, check_attention_mask, check_image_placeholders, check_keyword_arguments, check_label_values,
    check_labels, check_logits_to_keep, check_no_attentions, check_padding, check_pixel_values, check_token_ids,
    check_token_inputs,
)
from .mamba2 import CausalMamba2Mixer, GatedRMSNorm, Mamba2LanguageModel, RMSNorm
from .quantization import check_gpu_only_format, keep_4bit_layers_unpacked
from .saving import check_save_directory, save_aside

# transformers up to 5.2x passes a Mamba cache as `cache_params`, later releases call it `cache`; the
# language model's own output class tells us which name this installation uses.
CACHE_NAME = "cache" if "cache" in Mamba2CausalLMOutput.__dataclass_fields__ else "cache_params"
CACHE_ALIASES = ("cache", "cache_params", "past_key_values")
# What transformers passes to a forward beyond its named parameters (generate(), Trainer, peft, its model tests);
# any other keyword is an error. `return_dict` is taken by @can_return_tuple; `output_attentions` asks for nothing
# here (the language model has no attention; the towers' attentions come from get_image_features).
MODEL_KEYWORDS = ("return_dict", "output_attentions")
# Passed on to the loss: Trainer's token count across accumulated batches, and targets already shifted (sequence or
# context parallel training shifts before sharding).
LOSS_KEYWORDS = ("num_items_in_batch", "shift_labels")
# generate(tokenizer=...) (stop strings, token healing; `transformers serve` passes it) hands its tokenizers on to
# every forward call with the inputs.
GENERATE_KEYWORDS = ("tokenizer", "assistant_tokenizer")
HEAD_KEYWORDS = MODEL_KEYWORDS + LOSS_KEYWORDS + GENERATE_KEYWORDS


def pick_cache(**caches):
    """The recurrent cache, under whichever name it came: `cache` (transformers' name from 5.2x on),
    `cache_params` (earlier releases' name for a Mamba cache) or `past_key_values` (most models' name). Where the
    installed transformers calls it `cache`, the other two are deprecated there and warn, as transformers' own
    models do."""
    given = {name: cache for name, cache in caches.items() if cache is not None}
    if len({id(cache) for cache in given.values()}) > 1:
        raise ValueError(
            f"got different caches as {' and '.join(given)}; pass the recurrent cache once (any one of "
            f"{', '.join(CACHE_ALIASES)})"
        )
    if CACHE_NAME == "cache":
        for name in given.keys() - {"cache"}:
            warnings.warn(f"`{name}` is deprecated: this transformers release names the recurrent cache `cache`; "
                          "pass it as `cache`", FutureWarning, stacklevel=3)
    return next(iter(given.values()), None)


@dataclass
class MLMambaModelOutput(Mamba2Output):
    """The LM's output plus the projected image features of this forward (None when no image was given)."""

    image_hidden_states: torch.FloatTensor | None = None

    @property
    def past_key_values(self):
        """The recurrent cache, under the name most transformers models use, on every supported release."""
        return getattr(self, CACHE_NAME)


@dataclass
class MLMambaCausalLMOutput(Mamba2CausalLMOutput):
    """Loss, logits and recurrent cache, plus the projected image features of this forward."""

    image_hidden_states: torch.FloatTensor | None = None

    @property
    def past_key_values(self):
        """The recurrent cache, under the name most transformers models use, on every supported release."""
        return getattr(self, CACHE_NAME)


def feature_depth(tower_config, feature_layer: int, name: str) -> int:
    """How many blocks a tower runs so that its output is `hidden_states[feature_layer]` of the full tower, where
    entry 0 is the embeddings and entry -1 the last block (before the final norm)."""
    layers = tower_config.num_hidden_layers
    depth = feature_layer + layers + 1 if feature_layer < 0 else feature_layer
    if not 0 <= depth <= layers:
        raise ValueError(
            f"vision_feature_layer {feature_layer} does not index the hidden states of {name} ({layers} layers: "
            f"entries 0 to {layers} or -{layers + 1} to -1); choose one inside that range"
        )
    return depth


def with_depth(tower_config, depth: int):
    """A copy of `tower_config` building only `depth` blocks; the config itself keeps the pretrained depth."""
    truncated = copy.deepcopy(tower_config)
    truncated.num_hidden_layers = depth
    return truncated


def unused_block_patterns(prefix: str, depth: int, tower_config) -> list[str]:
    """Key patterns of the pretrained blocks after the first `depth`, which the truncated tower does not build."""
    unused = range(depth, tower_config.num_hidden_layers)
    return [rf"{prefix}\.({'|'.join(map(str, unused))})\."] if unused else []


class MLMambaVisionTower(nn.Module):
    """DINOv2-with-registers and SigLIP side by side: patch features of one layer, concatenated on channels.

    `pixel_values` is (images, 2, 3, H, W): index 0 normalised for DINOv2, index 1 for SigLIP, so both
    towers' inputs travel as one tensor through `generate()` and the processor. Each tower is built only up to
    `vision_feature_layer` (the blocks after it and the final norm would run for nothing and, in training, leave
    parameters without gradients); the configs keep the pretrained depth.
    """

    def __init__(self, config: MLMambaConfig):
        super().__init__()
        dino_depth = feature_depth(config.dino_config, config.vision_feature_layer, "dino_config")
        siglip_depth = feature_depth(config.siglip_config, config.vision_feature_layer, "siglip_config")
        self.dino = AutoModel.from_config(with_depth(config.dino_config, dino_depth))
        self.siglip = AutoModel.from_config(with_depth(config.siglip_config, siglip_depth))
        # The features are taken before each tower's final norm, so `last_hidden_state` is the feature itself.
        self.dino.layernorm = nn.Identity()
        self.siglip.post_layernorm = nn.Identity()
        # DINOv2 reads `mask_token` only to mask patches in self-supervised training: a buffer under the same
        # state-dict key, so that training every tower parameter leaves none without a gradient.
        mask_token = self.dino.embeddings.mask_token.data
        del self.dino.embeddings.mask_token
        self.dino.embeddings.register_buffer("mask_token", mask_token)
        # Folders saved with the full towers hold the blocks after the feature layer and the final norms.
        self._keys_to_ignore_on_load_unexpected = [
            *unused_block_patterns(r"vision_tower\.dino\.encoder\.layer", dino_depth, config.dino_config),
            *unused_block_patterns(r"vision_tower\.siglip\.encoder\.layers", siglip_depth, config.siglip_config),
            r"vision_tower\.dino\.layernorm\.", r"vision_tower\.siglip\.post_layernorm\.",
        ]
        # The released model uses patch tokens only: DINOv2 puts CLS and its registers first.
        self.dino_prefix_tokens = 1 + config.dino_config.num_register_tokens
        self.image_size = (config.dino_config.image_size, config.siglip_config.image_size)

    def forward(
        self, pixel_values: torch.Tensor, output_hidden_states: bool = False, output_attentions: bool = False
    ) -> BaseModelOutput:
        """`last_hidden_state`: both towers' patch features of `vision_feature_layer`, side by side (images, patches,
        DINOv2 + SigLIP channels). `hidden_states` and `attentions`, when asked for: DINOv2's, then SigLIP's, of the
        blocks the towers are built with (up to the feature layer)."""
        check_pixel_values(pixel_values, self.image_size)
        trainable = any(p.requires_grad for p in self.parameters())
        towers = dict(output_hidden_states=output_hidden_states, output_attentions=output_attentions)
        with torch.set_grad_enabled(torch.is_grad_enabled() and trainable):
            # Each tower casts the pixels to its patch embedding's dtype itself.
            dino = self.dino(pixel_values[:, 0], **towers)
            siglip = self.siglip(pixel_values[:, 1], **towers)
        dino_patches = dino.last_hidden_state[:, self.dino_prefix_tokens :]
        return BaseModelOutput(
            last_hidden_state=torch.cat([dino_patches, siglip.last_hidden_state.to(dino_patches.dtype)], dim=-1),
            hidden_states=dino.hidden_states + siglip.hidden_states if output_hidden_states else None,
            attentions=dino.attentions + siglip.attentions if output_attentions else None,
        )


# The projector variants, by `projector_type`: (connector width, LM width) -> the layers, in order.
PROJECTOR_LAYERS = {
    "fused-gelu-mlp": lambda source, target: [  # the released model
        nn.Linear(source, 4 * target), nn.GELU(), nn.Linear(4 * target, target), nn.GELU(), nn.Linear(target, target),
    ],
    "gelu-mlp": lambda source, target: [nn.Linear(source, target), nn.GELU(), nn.Linear(target, target)],
    "linear": lambda source, target: [nn.Linear(source, target)],
}


class MLMambaProjector(nn.Module):
    """Connector output -> LM embedding width, by one of the `PROJECTOR_LAYERS` variants."""

    def __init__(self, config: MLMambaConfig):
        super().__init__()
        make_layers = PROJECTOR_LAYERS[config.projector_type]
        self.layers = nn.Sequential(*make_layers(config.connector_hidden_size, config.text_config.hidden_size))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.layers(hidden_states)


# The image path: everything between the pixels and the language model.
IMAGE_PATH_MODULES = ("vision_tower", "connector", "projector")
# `from_pretrained` arguments that say where a config is read from.
HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")


def loading_dtype(pretrained_model_name_or_path, from_pretrained_kwargs: dict) -> torch.dtype:
    """The dtype `from_pretrained(pretrained_model_name_or_path, **from_pretrained_kwargs)` loads the language
    model's weights in: the `dtype` (or `torch_dtype`) given, its `text_config` entry when it is a dict per
    sub-config, or with "auto" or none the saved config's."""
    dtype = from_pretrained_kwargs.get("dtype", from_pretrained_kwargs.get("torch_dtype"))
    if isinstance(dtype, dict):
        dtype = dtype.get("text_config", dtype.get("", "auto"))
    if dtype is None or dtype == "auto":
        config = from_pretrained_kwargs.get("config")
        if not isinstance(config, MLMambaConfig):
            hub_kwargs = {key: from_pretrained_kwargs[key] for key in HUB_KWARGS if key in from_pretrained_kwargs}
            config = MLMambaConfig.from_pretrained(pretrained_model_name_or_path, **hub_kwargs)
        dtype = config.dtype or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


class MLMambaPreTrainedModel(PreTrainedModel):
    config_class = MLMambaConfig
    config: MLMambaConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = [
        "Mamba2LMBlock", "MLMambaConnectorBlock", "Dinov2WithRegistersLayer", "SiglipEncoderLayer",
    ]
    # Never quantized, by any of transformers' quantizers (each skips `_keep_in_fp32_modules`), and kept in float32
    # when the rest loads in float16: the whole image path, run once per image and a quarter of the weights at full
    # size (0.90 B of 3.60 B), while batch-1 decoding reads only the LM. Paths from the root of each class
    # (bitsandbytes matches them from the start; the head class adds its prefix). The LM head, tied to the
    # embeddings, is left out by the quantizers' own default.
    _keep_in_fp32_modules = list(IMAGE_PATH_MODULES)
    # Attention lives in the vision towers only, and both tower classes support every backend; v5 hands the
    # requested `attn_implementation` to each sub-config (or a dict gives one per sub-config name).
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _is_stateful = True

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """transformers' loading, with a clear error before any weight is read for a GPU-only torchao format that
        would land elsewhere (`quantization.check_gpu_only_format`); bitsandbytes' 4-bit layers then keep their
        saved layout on a CPU, where bitsandbytes' own repacking fails on most widths and does not save back
        intact (`quantization.keep_4bit_layers_unpacked`)."""
        check_gpu_only_format(kwargs.get("quantization_config"), kwargs.get("device_map"),
                              lambda: loading_dtype(pretrained_model_name_or_path, kwargs))
        loaded = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        keep_4bit_layers_unpacked(loaded[0] if isinstance(loaded, tuple) else loaded)
        return loaded

    def save_pretrained(self, save_directory, is_main_process: bool = True, *args, **kwargs):
        """transformers' saving, made all-or-nothing: the files are written aside and moved into the folder only once
        complete (`saving.py`), so an interrupted save leaves the previous one loadable; files it does not write
        (processor, tokenizer, README) stay. A `save_directory` that is a file raises.

        `config.json` also maps every Auto class to the copied code, so the folder loads through any of them with
        `trust_remote_code=True` (transformers writes only `AutoConfig` and the saved class's own).
        """
        check_save_directory(save_directory)
        if self._auto_class is not None:
            module = type(self).__module__.rsplit(".", 1)[-1]
            self.config.auto_map = {
                **(getattr(self.config, "auto_map", None) or {}),
                "AutoModel": f"{module}.MLMambaModel",
                "AutoModelForImageTextToText": f"{module}.MLMambaForConditionalGeneration",
                "AutoModelForCausalLM": f"{module}.MLMambaForConditionalGeneration",
            }
        # Ranks that write nothing, and distributed checkpoints (every rank writes its part), save in place.
        if kwargs.get("distributed_checkpoint") or not self.should_save_on_this_rank(is_main_process):
            return super().save_pretrained(save_directory, is_main_process, *args, **kwargs)
        if kwargs.get("push_to_hub"):
            # transformers names the Hub repo after the folder it writes, here the hidden one; keep the real name.
            kwargs.setdefault("repo_id", os.fspath(save_directory).split(os.path.sep)[-1])
        parent = super()

        def write(folder):
            parent.save_pretrained(folder, is_main_process, *args, **kwargs)

        save_aside(save_directory, write)

    def resize_token_embeddings(self, new_num_tokens=None, pad_to_multiple_of=None, mean_resizing=True):
        """transformers' resize (input embeddings, the tied LM head and `text_config.vocab_size` together), refusing
        a size that would drop the image placeholder token `config.image_token_id`."""
        if new_num_tokens is not None:
            multiple = pad_to_multiple_of or 1
            if math.ceil(new_num_tokens / multiple) * multiple <= self.config.image_token_id:
                raise ValueError(
                    f"new_num_tokens={new_num_tokens} would drop the image placeholder token (config.image_token_id="
                    f"{self.config.image_token_id}); keep at least {self.config.image_token_id + 1} tokens, or first "
                    "set config.image_token_id to a token of the new vocabulary"
                )
        return super().resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, (ScanDirection, CausalMamba2Mixer)):
            # Mamba-2's initialisation: A = -[1..heads], D = 1, dt spread log-uniformly over [1e-3, 1e-1].
            heads = module.A_log.shape[0]
            init.copy_(module.A_log, torch.log(torch.arange(1, heads + 1, dtype=torch.float32)))
            init.ones_(module.D)
            dt = torch.exp(torch.rand(heads) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp(min=1e-4)
            init.copy_(module.dt_bias, dt + torch.log(-torch.expm1(-dt)))
            init.kaiming_uniform_(module.conv1d.weight, a=math.sqrt(5))
            if module.conv1d.bias is not None:
                init.zeros_(module.conv1d.bias)
        elif isinstance(module, (GatedRMSNorm, RMSNorm)):
            init.ones_(module.weight)


class MLMambaModel(MLMambaPreTrainedModel):
    """Vision tower, connector, projector and the Mamba-2 backbone (no LM head)."""

    def __init__(self, config: MLMambaConfig):
        super().__init__(config)
        self.vision_tower = MLMambaVisionTower(config)
        self.connector = MLMambaConnector(config)
        self.projector = MLMambaProjector(config)
        self.language_model = Mamba2LanguageModel(config.text_config)
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
    ) -> BaseModelOutputWithPooling:
        """The image features the LM reads, laid out as transformers' VLMs return them: `pooler_output` holds one
        entry per image, its projected features (image_seq_length, text hidden size); `last_hidden_state` the
        towers' patch features that the connector reads; `hidden_states` / `attentions` the towers' (DINOv2's,
        then SigLIP's), when asked for. `return_dict=False` gives the same as a tuple."""
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if output_attentions is None:
            output_attentions = self.config.output_attentions
        vision = self.vision_tower(
            pixel_values, output_hidden_states=output_hidden_states, output_attentions=output_attentions
        )
        projected = self.projector(self.connector(vision.last_hidden_state))
        return BaseModelOutputWithPooling(
            last_hidden_state=vision.last_hidden_state,
            pooler_output=list(projected),
            hidden_states=vision.hidden_states,
            attentions=vision.attentions,
        )

    def image_placeholder_mask(self, input_ids, inputs_embeds) -> torch.Tensor:
        """Where the image placeholder tokens are: (batch, length) booleans."""
        if input_ids is not None:
            return input_ids == self.config.image_token_id
        placeholder = self.get_input_embeddings()(
            torch.tensor(self.config.image_token_id, dtype=torch.long, device=inputs_embeds.device)
        )
        return (inputs_embeds == placeholder).all(-1)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        cache=None,
        cache_params=None,
        past_key_values=None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> MLMambaModelOutput:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(images, 2, 3, height, width)`, *optional*):
            Each image normalised for DINOv2 (index 0) and for SigLIP (index 1); `MLMambaProcessor` makes them.
            Their features replace the `config.image_token_id` placeholders of the prompts, in order.
        attention_mask (`torch.Tensor` of shape `(batch, length)`, *optional*):
            1 for tokens, 0 for padding, which goes on the left (the processor's default). Padding on the right keeps
            the tokens' own outputs exact (training, scoring), but the final state runs over it: such a batch builds
            no cache unless asked, and is refused when asked. Padding between tokens is refused.
        cache / cache_params / past_key_values (`Cache`, *optional*):
            The recurrent state of the language model, under any of transformers' names for it. It holds the state
            after the tokens it has seen: continuing it, pass only the tokens it has not seen.
        return_dict, output_attentions (*optional*): as transformers passes them; any other keyword is a TypeError.
        """
        check_keyword_arguments(MLMambaModel.forward, kwargs, MODEL_KEYWORDS)
        cache = pick_cache(cache=cache, cache_params=cache_params, past_key_values=past_key_values)
        padding = self.check_inputs(input_ids, inputs_embeds, pixel_values, attention_mask, cache, use_cache)
        if padding == "none":
            attention_mask = None  # all ones: the checks read it already, so the LM need not look again
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)

        placeholders = self.image_placeholder_mask(input_ids, inputs_embeds)
        image_features = None
        if pixel_values is not None:
            # Image after image, into the placeholder positions of the sequence.
            image_features = torch.stack(self.get_image_features(pixel_values, return_dict=True).pooler_output)
            mask = placeholders[..., None].expand_as(inputs_embeds)
            inputs_embeds = inputs_embeds.masked_scatter(mask, image_features.to(inputs_embeds.dtype))

        # A right-padded batch (fine for scoring) builds no cache unless asked: its final state ran over the padding.
        use_cache = use_cache if use_cache is not None else (
            self.config.text_config.use_cache and not self.training and padding != "right"
        )
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config.text_config)
        last_hidden_state, hidden_states = self.language_model(
            inputs_embeds,
            cache=cache if use_cache else None,
            attention_mask=attention_mask,
            output_hidden_states=output_hidden_states,
            fused_decode_step=self.config.use_fused_decode_step,
        )
        return MLMambaModelOutput(
            last_hidden_state=last_hidden_state,
            hidden_states=hidden_states,
            image_hidden_states=image_features,
            **{CACHE_NAME: cache if use_cache else None},
        )

    def check_inputs(self, input_ids=None, inputs_embeds=None, pixel_values=None, attention_mask=None, cache=None,
                     use_cache=None) -> str | None:
        """Refuse bad inputs before any heavy work; returns where the attention mask pads (`check_padding`: "none"
        also without a mask), or None when the values were not read.

        Types and shapes are read from tensor metadata; the values (token ids, padding, placeholders) with one host
        sync, which is skipped on a one-token step that continues a cache (generate()'s decode step: its token came
        from the model) and while a CUDA graph captures the forward (no sync is allowed there; the graph seam calls
        this before any replay instead).
        """
        continuing = cache is not None and cache.has_previous_state(0)
        batch, length = check_token_inputs(input_ids, inputs_embeds, self.config.text_config.hidden_size)
        if pixel_values is not None:
            check_pixel_values(pixel_values, self.vision_tower.image_size)
        if attention_mask is not None:
            check_attention_mask(attention_mask, batch, length, covers_cache=continuing)
        tokens = input_ids if input_ids is not None else inputs_embeds
        capturing = tokens.is_cuda and torch.cuda.is_current_stream_capturing()
        if capturing or (continuing and length == 1 and pixel_values is None):
            return None
        values = InputValues.fetch(input_ids, self.image_placeholder_mask(input_ids, inputs_embeds), attention_mask)
        if values.id_range is not None:
            check_token_ids(values.id_range, self.get_input_embeddings().num_embeddings)
        check_image_placeholders(
            values.placeholders_per_row, None if pixel_values is None else pixel_values.shape[0],
            self.config.image_seq_length, self.config.image_token_id, continuing,
        )
        if values.mask_rows is None:
            return "none"
        return check_padding(values.mask_rows, attention_mask.shape[-1],
                             builds_cache=use_cache if use_cache is not None else cache is not None)


class MLMambaForConditionalGeneration(MLMambaPreTrainedModel, GenerationMixin):
    """ML-Mamba with its language-modelling head: `forward` for training and scoring, `generate` for answers."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embeddings.weight"}
    _keep_in_fp32_modules = [f"model.{name}" for name in IMAGE_PATH_MODULES]
    # Devices on which generate() replays captured prefill and decode graphs (`cuda_graphs.py` decides when).
    cuda_graph_devices = ("cuda",)

    def __init__(self, config: MLMambaConfig):
        super().__init__(config)
        self.model = MLMambaModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.cuda_graphs = GenerationGraphs()
        self.post_init()

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The LM head in float32; a single row takes the batch-1 decode kernel in every path (eager, prefill
        graph, decode graph), so greedy tokens do not depend on whether graphs are used."""
        rows = hidden_states.reshape(-1, hidden_states.shape[-1])
        return decode_linear(self.lm_head, rows).float().view(*hidden_states.shape[:-1], -1)

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def get_image_features(self, pixel_values: torch.Tensor, **kwargs) -> BaseModelOutputWithPooling:
        return self.model.get_image_features(pixel_values, **kwargs)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        cache=None,
        cache_params=None,
        past_key_values=None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> MLMambaCausalLMOutput:
        r"""
        labels (`torch.LongTensor` of shape `(batch, length)`, *optional*):
            Next-token targets, aligned with `input_ids` (shifted inside). -100 is ignored, and so are the image
            placeholder positions whatever their label.
        logits_to_keep (`int` or `torch.Tensor`, *optional*):
            Compute logits for only the last `logits_to_keep` positions (0: all); `generate()` sets 1.
        cache / cache_params / past_key_values (`Cache`, *optional*):
            The recurrent state of the language model, under any of transformers' names for it (see `MLMambaModel`).
        num_items_in_batch, shift_labels (*optional*): passed on to the loss, as transformers' Trainer passes them.
        tokenizer, assistant_tokenizer (*optional*): what generate() passes on with its inputs; not read here.
        return_dict, output_attentions (*optional*): as for `MLMambaModel`; any other keyword is a TypeError.
        """
        check_keyword_arguments(MLMambaForConditionalGeneration.forward, kwargs, HEAD_KEYWORDS)
        cache = pick_cache(cache=cache, cache_params=cache_params, past_key_values=past_key_values)
        logits = self.cuda_graphs.replay(
            self, cache, input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
            inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache, output_hidden_states=output_hidden_states,
            logits_to_keep=logits_to_keep, **kwargs,
        )
        if logits is not None:
            return MLMambaCausalLMOutput(logits=logits, **{CACHE_NAME: cache})

        self.check_head_inputs(input_ids, inputs_embeds, labels, logits_to_keep)
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            cache=cache,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden_states = hidden_states[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden_states = hidden_states[:, logits_to_keep]
        logits = self.compute_logits(hidden_states)

        loss = None
        if labels is not None:
            if input_ids is not None:
                labels = labels.masked_fill(input_ids == self.config.image_token_id, -100)
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size,
                                      **{name: kwargs[name] for name in LOSS_KEYWORDS if name in kwargs})

        return MLMambaCausalLMOutput(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            image_hidden_states=outputs.image_hidden_states,
            **{CACHE_NAME: outputs[CACHE_NAME] if CACHE_NAME in outputs else None},
        )

    def generate(self, *args, **kwargs):
        """`GenerationMixin.generate`, taking the recurrent cache as `past_key_values`, `cache` or `cache_params` on
        every supported transformers release: it goes on under the name this release's `generate` uses for a Mamba
        cache (`cache`, or `cache_params` before 5.2x).

        The cache holds the state after the tokens it has seen, not the tokens, and `generate` feeds `input_ids`
        to it whole: to continue a conversation, pass only the tokens it has not seen. After a `generate` call that
        is its last generated token (sampled but never fed back) followed by the new turn. `output_attentions=True`
        is refused: the language model has no attention whose weights `generate` could return per step.
        """
        generation_config = kwargs.get("generation_config") or self.generation_config
        check_no_attentions(kwargs.get("output_attentions", generation_config.output_attentions))
        cache = pick_cache(**{name: kwargs.pop(name, None) for name in CACHE_ALIASES})
        if cache is not None:
            kwargs[CACHE_NAME] = cache
        return super().generate(*args, **kwargs)

    def check_head_inputs(self, input_ids, inputs_embeds, labels, logits_to_keep) -> None:
        """What the head adds to the model's inputs: labels aligned with the prompts, inside the vocabulary."""
        check_logits_to_keep(logits_to_keep)
        if labels is not None:
            batch, length = check_token_inputs(input_ids, inputs_embeds, self.config.text_config.hidden_size)
            check_labels(labels, batch, length)
            check_label_values(labels, self.config.text_config.vocab_size)

    def _prepare_model_inputs(self, inputs=None, bos_token_id=None, model_kwargs=None):
        """transformers' own, then the prompt is checked as generate() received it: before transformers reads its
        shapes (a 1-D attention_mask or a list of ids would fail inside generate()), drops a mask of ones (whatever
        its shape) or repeats the rows (errors name the caller's rows). Padding on the right is refused even without
        a cache, since generation continues from the last position. Without a prompt transformers would start from
        BOS, which this model's tokenizer also uses as padding: refused too."""
        if inputs is None and all(model_kwargs.get(name) is None for name in ("input_ids", "inputs_embeds")):
            raise ValueError("generate() got no prompt; pass input_ids (with attention_mask and pixel_values, as the "
                             "processor returns them)")
        inputs, input_name, model_kwargs = super()._prepare_model_inputs(inputs, bos_token_id, model_kwargs)
        if input_name == "input_ids":
            self.model.check_inputs(
                input_ids=inputs, pixel_values=model_kwargs.get("pixel_values"),
                attention_mask=model_kwargs.get("attention_mask"), cache=model_kwargs.get(CACHE_NAME), use_cache=True,
            )
        return inputs, input_name, model_kwargs

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        """transformers repeats each input row by row, `expand_size` times (beam search, several return sequences).
        That suits tensors with one row per prompt, but `pixel_values` has one row per image: a prompt with images
        a and b would get a, a, b, b. Each copy of a prompt needs that prompt's whole group of images: a, b, a, b."""
        pixel_values = model_kwargs.pop("pixel_values", None)
        if pixel_values is not None and expand_size > 1:
            pixel_values = self.repeat_images_per_prompt(input_ids, pixel_values, expand_size)
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs
        )
        if pixel_values is not None:
            model_kwargs["pixel_values"] = pixel_values
        return input_ids, model_kwargs

    def repeat_images_per_prompt(self, input_ids, pixel_values, repeats: int) -> torch.Tensor:
        """The images of prompts that are each repeated `repeats` times in a row: every copy of a prompt gets its
        prompt's images, in order. Prompts own images by their placeholders (one host sync per generate() call)."""
        check_pixel_values(pixel_values, self.model.vision_tower.image_size)
        per_prompt = self.model.image_placeholder_mask(input_ids, None).sum(1).tolist()
        seq_length = self.config.image_seq_length
        check_image_placeholders(per_prompt, pixel_values.shape[0], seq_length, self.config.image_token_id, False)
        groups = pixel_values.split([count // seq_length for count in per_prompt])
        return torch.cat([group for group in groups for _ in range(repeats)])

    def prepare_inputs_for_generation(self, input_ids, is_first_iteration=False, **kwargs):
        """After the first step the prompt and its images live in the recurrent state: decode steps take only the
        newest token and the cache (this short path also keeps per-token Python work small)."""
        if kwargs.get("use_cache", True) and not is_first_iteration and kwargs.get(CACHE_NAME) is not None:
            prompt_only = ("pixel_values", "attention_mask", "inputs_embeds", "position_ids", "next_sequence_length",
                           "labels")
            return {"input_ids": input_ids[:, -1:], **{k: v for k, v in kwargs.items() if k not in prompt_only}}
        return super().prepare_inputs_for_generation(input_ids, is_first_iteration=is_first_iteration, **kwargs)


__all__ = ["MLMambaForConditionalGeneration", "MLMambaModel", "MLMambaPreTrainedModel"]
