"""ML-Mamba: image -> two vision towers -> Mamba-2 Scan Connector -> projector -> Mamba-2 language model.

Read top to bottom: the vision tower, the projector, the base model that merges image features into the
token sequence, and the generation head. The connector lives in `connector.py`, the scan in `ssd.py`.
"""

import math
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
from .mamba2 import CausalMamba2Mixer, GatedRMSNorm, Mamba2LanguageModel, RMSNorm

# transformers up to 5.2x passes a Mamba cache as `cache_params`, later releases call it `cache`; the
# language model's own output class tells us which name this installation uses.
CACHE_NAME = "cache" if "cache" in Mamba2CausalLMOutput.__dataclass_fields__ else "cache_params"
CACHE_ALIASES = ("cache", "cache_params", "past_key_values")


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


class MLMambaVisionTower(nn.Module):
    """DINOv2-with-registers and SigLIP side by side: patch features of one layer, concatenated on channels.

    `pixel_values` is (images, 2, 3, H, W): index 0 normalised for DINOv2, index 1 for SigLIP, so both
    towers' inputs travel as one tensor through `generate()` and the processor.
    """

    def __init__(self, config: MLMambaConfig):
        super().__init__()
        self.dino = AutoModel.from_config(config.dino_config)
        self.siglip = AutoModel.from_config(config.siglip_config)
        self.feature_layer = config.vision_feature_layer
        # The released model uses patch tokens only: DINOv2 puts CLS and its registers first.
        self.dino_prefix_tokens = 1 + config.dino_config.num_register_tokens
        self.image_size = (config.dino_config.image_size, config.siglip_config.image_size)

    def forward(
        self, pixel_values: torch.Tensor, output_hidden_states: bool = False, output_attentions: bool = False
    ) -> BaseModelOutput:
        """`last_hidden_state`: both towers' patch features of `vision_feature_layer`, side by side (images, patches,
        DINOv2 + SigLIP channels). `hidden_states` and `attentions`, when asked for: DINOv2's, then SigLIP's."""
        if pixel_values.ndim != 5 or pixel_values.shape[1:3] != (2, 3):
            raise ValueError(
                "pixel_values must have shape (images, 2, 3, height, width): one DINOv2- and one "
                f"SigLIP-normalised copy of each RGB image; got {tuple(pixel_values.shape)}"
            )
        for tower_size in self.image_size:
            if pixel_values.shape[-2:] != (tower_size, tower_size):
                raise ValueError(
                    f"pixel_values are {tuple(pixel_values.shape[-2:])} pixels but the vision towers expect "
                    f"{tower_size}x{tower_size}; resize the images (the processor does this)"
                )
        trainable = any(p.requires_grad for p in self.parameters())
        towers = dict(output_hidden_states=True, output_attentions=output_attentions)
        with torch.set_grad_enabled(torch.is_grad_enabled() and trainable):
            dino = self.dino(pixel_values[:, 0].to(self.dino.dtype), **towers)
            siglip = self.siglip(pixel_values[:, 1].to(self.siglip.dtype), **towers)
        dino_patches = dino.hidden_states[self.feature_layer][:, self.dino_prefix_tokens :]
        siglip_patches = siglip.hidden_states[self.feature_layer]
        return BaseModelOutput(
            last_hidden_state=torch.cat([dino_patches, siglip_patches.to(dino_patches.dtype)], dim=-1),
            hidden_states=dino.hidden_states + siglip.hidden_states if output_hidden_states else None,
            attentions=dino.attentions + siglip.attentions if output_attentions else None,
        )


class MLMambaProjector(nn.Module):
    """Connector output -> LM embedding width. `fused-gelu-mlp` (released) is Linear-GELU-Linear-GELU-Linear."""

    def __init__(self, config: MLMambaConfig):
        super().__init__()
        source, target = config.connector_hidden_size, config.text_config.hidden_size
        if config.projector_type == "fused-gelu-mlp":
            layers = [nn.Linear(source, 4 * target), nn.GELU(), nn.Linear(4 * target, target), nn.GELU(),
                      nn.Linear(target, target)]
        elif config.projector_type == "gelu-mlp":
            layers = [nn.Linear(source, target), nn.GELU(), nn.Linear(target, target)]
        else:
            layers = [nn.Linear(source, target)]
        self.layers = nn.Sequential(*layers)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.layers(hidden_states)


class MLMambaPreTrainedModel(PreTrainedModel):
    config_class = MLMambaConfig
    config: MLMambaConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = [
        "Mamba2LMBlock", "MLMambaConnectorBlock", "Dinov2WithRegistersLayer", "SiglipEncoderLayer",
    ]
    # Attention lives in the vision towers only, and both tower classes support every backend; v5 hands the
    # requested `attn_implementation` to each sub-config (or a dict gives one per sub-config name).
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _is_stateful = True

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Map every Auto class to the copied code in `config.json`, so the folder loads through any of them with
        `trust_remote_code=True` (transformers writes only `AutoConfig` and the saved class's own)."""
        if self._auto_class is not None:
            module = type(self).__module__.rsplit(".", 1)[-1]
            self.config.auto_map = {
                **(getattr(self.config, "auto_map", None) or {}),
                "AutoModel": f"{module}.MLMambaModel",
                "AutoModelForImageTextToText": f"{module}.MLMambaForConditionalGeneration",
                "AutoModelForCausalLM": f"{module}.MLMambaForConditionalGeneration",
            }
        return super().save_pretrained(save_directory, *args, **kwargs)

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
        features = vision.last_hidden_state.to(self.projector.layers[0].weight.dtype)
        projected = self.projector(self.connector(features))
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
        cache / cache_params / past_key_values (`Cache`, *optional*):
            The recurrent state of the language model, under any of transformers' names for it. It holds the state
            after the tokens it has seen: continuing it, pass only the tokens it has not seen.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        cache = pick_cache(cache=cache, cache_params=cache_params, past_key_values=past_key_values)
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)

        placeholders = self.image_placeholder_mask(input_ids, inputs_embeds)
        self.check_image_placeholders(placeholders, pixel_values, cache)
        image_features = None
        if pixel_values is not None:
            # Image after image, into the placeholder positions of the sequence.
            image_features = torch.stack(self.get_image_features(pixel_values, return_dict=True).pooler_output)
            mask = placeholders[..., None].expand_as(inputs_embeds)
            inputs_embeds = inputs_embeds.masked_scatter(mask, image_features.to(inputs_embeds.dtype))

        use_cache = use_cache if use_cache is not None else (self.config.text_config.use_cache and not self.training)
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config.text_config)
        last_hidden_state, hidden_states = self.language_model(
            inputs_embeds,
            cache=cache if use_cache else None,
            attention_mask=attention_mask,
            output_hidden_states=output_hidden_states,
        )
        return MLMambaModelOutput(
            last_hidden_state=last_hidden_state,
            hidden_states=hidden_states,
            image_hidden_states=image_features,
            **{CACHE_NAME: cache if use_cache else None},
        )

    def check_image_placeholders(self, placeholders, pixel_values, cache) -> None:
        """Every image needs exactly `image_seq_length` placeholder positions. This is a host sync, so it is skipped
        while a CUDA graph captures the forward; the graph seam checks before each replay instead."""
        if placeholders.is_cuda and torch.cuda.is_current_stream_capturing():
            return
        num_placeholders = int(placeholders.sum())
        if pixel_values is None:
            if num_placeholders and cache is None:
                raise ValueError(
                    f"the prompt has {num_placeholders} image placeholder tokens but no pixel_values were given"
                )
            return
        num_images, per_image = pixel_values.shape[0], self.config.image_seq_length
        if num_placeholders != num_images * per_image:
            raise ValueError(
                f"the prompts have {num_placeholders} image placeholder tokens but {num_images} image(s) give "
                f"{num_images * per_image} image features ({per_image} per image); the processor expands each "
                "placeholder to exactly that many tokens"
            )


class MLMambaForConditionalGeneration(MLMambaPreTrainedModel, GenerationMixin):
    """ML-Mamba with its language-modelling head: `forward` for training and scoring, `generate` for answers."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embeddings.weight"}
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
        rows = hidden_states.reshape(-1, hidden_states.shape[-1]).to(self.lm_head.weight.dtype)
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
        """
        cache = pick_cache(cache=cache, cache_params=cache_params, past_key_values=past_key_values)
        logits = self.cuda_graphs.replay(
            self, cache, input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
            inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache, output_hidden_states=output_hidden_states,
            logits_to_keep=logits_to_keep, **kwargs,
        )
        if logits is not None:
            return MLMambaCausalLMOutput(logits=logits, **{CACHE_NAME: cache})

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
                                      **kwargs)

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
        is its last generated token (sampled but never fed back) followed by the new turn.
        """
        cache = pick_cache(**{name: kwargs.pop(name, None) for name in CACHE_ALIASES})
        if cache is not None:
            kwargs[CACHE_NAME] = cache
        return super().generate(*args, **kwargs)

    def prepare_inputs_for_generation(self, input_ids, is_first_iteration=False, **kwargs):
        """After the first step the prompt and its images live in the recurrent state: decode steps take only the
        newest token and the cache (this short path also keeps per-token Python work small)."""
        if kwargs.get("use_cache", True) and not is_first_iteration and kwargs.get(CACHE_NAME) is not None:
            prompt_only = ("pixel_values", "attention_mask", "inputs_embeds", "position_ids", "next_sequence_length",
                           "labels")
            return {"input_ids": input_ids[:, -1:], **{k: v for k, v in kwargs.items() if k not in prompt_only}}
        return super().prepare_inputs_for_generation(input_ids, is_first_iteration=is_first_iteration, **kwargs)


__all__ = ["MLMambaForConditionalGeneration", "MLMambaModel", "MLMambaPreTrainedModel"]
