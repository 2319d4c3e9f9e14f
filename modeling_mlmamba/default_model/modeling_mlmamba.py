"""ML-Mamba: image -> two vision towers -> Mamba-2 Scan Connector -> projector -> Mamba-2 language model.

Read top to bottom: the vision tower, the projector, the base model that merges image features into the
token sequence, and the generation head. The connector lives in `connector.py`, the scan in `ssd.py`.
"""

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel, DynamicCache, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.models.mamba2.modeling_mamba2 import Mamba2CausalLMOutput, Mamba2Output

from .configuration_mlmamba import MLMambaConfig
from .connector import MLMambaConnector, ScanDirection
from .cuda_graphs import GenerationGraphs
from .gemv import decode_linear
from .mamba2 import CausalMamba2Mixer, GatedRMSNorm, Mamba2LanguageModel, RMSNorm

# transformers up to 5.2x passes a Mamba cache as `cache_params`, later releases call it `cache`; the
# language model's own output class tells us which name this installation uses.
CACHE_NAME = "cache" if "cache" in Mamba2CausalLMOutput.__dataclass_fields__ else "cache_params"


@dataclass
class MLMambaModelOutput(Mamba2Output):
    """The LM's output plus the projected image features of this forward (None when no image was given)."""

    image_hidden_states: torch.FloatTensor | None = None


@dataclass
class MLMambaCausalLMOutput(Mamba2CausalLMOutput):
    """Loss, logits and recurrent cache, plus the projected image features of this forward."""

    image_hidden_states: torch.FloatTensor | None = None


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

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
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
        with torch.set_grad_enabled(torch.is_grad_enabled() and trainable):
            dino = self.dino(pixel_values[:, 0].to(self.dino.dtype), output_hidden_states=True)
            siglip = self.siglip(pixel_values[:, 1].to(self.siglip.dtype), output_hidden_states=True)
        dino_patches = dino.hidden_states[self.feature_layer][:, self.dino_prefix_tokens :]
        siglip_patches = siglip.hidden_states[self.feature_layer]
        return torch.cat([dino_patches, siglip_patches.to(dino_patches.dtype)], dim=-1)


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
    _supports_sdpa = True
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

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected image features, (images, image_seq_length, text hidden size), ready to be placed in the LM."""
        features = self.vision_tower(pixel_values)
        features = features.to(self.projector.layers[0].weight.dtype)
        return self.projector(self.connector(features))

    def image_placeholder_mask(self, input_ids, inputs_embeds) -> torch.Tensor:
        """Where the image placeholder tokens are: (batch, length) booleans."""
        if input_ids is not None:
            return input_ids == self.config.image_token_id
        placeholder = self.get_input_embeddings()(
            torch.tensor(self.config.image_token_id, dtype=torch.long, device=inputs_embeds.device)
        )
        return (inputs_embeds == placeholder).all(-1)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        cache=None,
        cache_params=None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> MLMambaModelOutput:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(images, 2, 3, height, width)`, *optional*):
            Each image normalised for DINOv2 (index 0) and for SigLIP (index 1); `MLMambaProcessor` makes them.
            Their features replace the `config.image_token_id` placeholders of the prompts, in order.
        cache / cache_params (`Cache`, *optional*):
            The recurrent state of the language model; `cache_params` is the name older transformers use.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        cache = cache if cache is not None else cache_params
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)

        placeholders = self.image_placeholder_mask(input_ids, inputs_embeds)
        self.check_image_placeholders(placeholders, pixel_values, cache)
        inputs_embeds, image_features = self.merge_image_features(inputs_embeds, placeholders, pixel_values)

        use_cache = use_cache if use_cache is not None else (self.config.text_config.use_cache and not self.training)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config.text_config)
        last_hidden_state, hidden_states = self.language_model(
            inputs_embeds,
            cache=cache if use_cache else None,
            attention_mask=attention_mask,
            output_hidden_states=output_hidden_states or self.config.output_hidden_states,
        )
        return MLMambaModelOutput(
            last_hidden_state=last_hidden_state,
            hidden_states=hidden_states,
            image_hidden_states=image_features,
            **{CACHE_NAME: cache if use_cache else None},
        )

    def check_image_placeholders(self, placeholders, pixel_values, cache) -> None:
        """Every image needs exactly `image_seq_length` placeholder positions (a host sync, so kept out of graphs)."""
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

    def merge_image_features(self, inputs_embeds, placeholders, pixel_values):
        """Write the image features, image after image, into the placeholder positions of the sequence.

        Returns (embeddings, image features or None).
        """
        if pixel_values is None:
            return inputs_embeds, None
        image_features = self.get_image_features(pixel_values)
        mask = placeholders[..., None].expand_as(inputs_embeds)
        return inputs_embeds.masked_scatter(mask, image_features.to(inputs_embeds.dtype)), image_features


class MLMambaForConditionalGeneration(MLMambaPreTrainedModel, GenerationMixin):
    """ML-Mamba with its language-modelling head: `forward` for training and scoring, `generate` for answers."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embeddings.weight"}
    # Devices on which generate() replays captured prefill and decode graphs (see `cuda_graphs.py`).
    cuda_graph_devices = ("cuda",)

    def __init__(self, config: MLMambaConfig):
        super().__init__(config)
        self.model = MLMambaModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.cuda_graphs = GenerationGraphs()
        self.post_init()

    def new_cache(self) -> DynamicCache:
        """An empty recurrent cache for the language model (what `generate()` creates)."""
        return DynamicCache(config=self.config.text_config)

    def decay_rates(self) -> list[torch.Tensor]:
        """Each LM layer's A = -exp(A_log), fixed for given weights (decode graphs compute it once per call)."""
        return self.model.language_model.decay_rates()

    def prefill_logits(self, input_ids, attention_mask, pixel_values, cache) -> torch.Tensor:
        """Last-position logits (batch, 1, vocab) of a prompt, filling `cache`; no host syncs (graph-capturable)."""
        inputs_embeds = self.get_input_embeddings()(input_ids)
        placeholders = self.model.image_placeholder_mask(input_ids, inputs_embeds)
        inputs_embeds, _ = self.model.merge_image_features(inputs_embeds, placeholders, pixel_values)
        hidden_states, _ = self.model.language_model(inputs_embeds, cache=cache, attention_mask=attention_mask)
        return self.compute_logits(hidden_states[:, -1:])

    def decode_step(self, input_ids: torch.Tensor, states, decay_rates=None) -> torch.Tensor:
        """Logits (batch, vocab) of one token per sequence, updating the per-layer `states` in place."""
        return self.compute_logits(self.model.language_model.step(input_ids, states, decay_rates))

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The LM head in float32; a single row takes the batch-1 decode kernel in every path (eager, prefill
        graph, decode graph), so greedy tokens do not depend on whether graphs are used."""
        rows = hidden_states.reshape(-1, hidden_states.shape[-1]).to(self.lm_head.weight.dtype)
        return decode_linear(self.lm_head, rows).float().view(*hidden_states.shape[:-1], -1)

    def _graphs_apply(self, input_ids, cache, other_inputs) -> bool:
        """Inference on a graph device with input ids and a cache, nothing asked for beyond the logits."""
        return (
            self.config.use_cuda_graphs
            and input_ids is not None
            and input_ids.device.type in self.cuda_graph_devices
            and cache is not None
            and all(value is None or value is False for value in other_inputs.values())
            and not self.training
            and not torch.is_grad_enabled()
            and not getattr(cache.layers[0], "record_past", False)
        )

    def _replays_decode_graph(self, input_ids, cache, **other_inputs) -> bool:
        """Whether this forward is a plain decode step that the captured decode graph can take."""
        return (
            self._graphs_apply(input_ids, cache, other_inputs)
            and input_ids.shape[1] == 1
            and cache.has_previous_state(0)
        )

    def _replays_prefill_graph(self, input_ids, cache, logits_to_keep, **other_inputs) -> bool:
        """Whether this forward is the prefill of `generate()` (fresh cache, last logits only)."""
        return (
            self._graphs_apply(input_ids, cache, other_inputs)
            and isinstance(logits_to_keep, int)
            and logits_to_keep == 1
            and not cache.has_previous_state(0)
        )

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.get_image_features(pixel_values)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        cache=None,
        cache_params=None,
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
        """
        cache = cache if cache is not None else cache_params
        if self._replays_decode_graph(
            input_ids, cache, pixel_values=pixel_values, inputs_embeds=inputs_embeds, labels=labels,
            output_hidden_states=output_hidden_states,
        ):
            logits = self.cuda_graphs.decode(self, input_ids, cache)
            return MLMambaCausalLMOutput(logits=logits[:, None], **{CACHE_NAME: cache})
        if self._replays_prefill_graph(
            input_ids, cache, logits_to_keep, inputs_embeds=inputs_embeds, labels=labels,
            output_hidden_states=output_hidden_states,
        ):
            placeholders = self.model.image_placeholder_mask(input_ids, None)
            self.model.check_image_placeholders(placeholders, pixel_values, cache)
            logits = self.cuda_graphs.prefill(self, cache, input_ids, attention_mask, pixel_values)
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

    def prepare_inputs_for_generation(self, input_ids, is_first_iteration=False, **kwargs):
        """After the first step the prompt and its images live in the recurrent state: decode steps take only the
        newest token and the cache (this short path also keeps per-token Python work small)."""
        if kwargs.get("use_cache", True) and not is_first_iteration and kwargs.get(CACHE_NAME) is not None:
            prompt_only = ("pixel_values", "attention_mask", "inputs_embeds", "position_ids", "next_sequence_length",
                           "labels")
            return {"input_ids": input_ids[:, -1:], **{k: v for k, v in kwargs.items() if k not in prompt_only}}
        return super().prepare_inputs_for_generation(input_ids, is_first_iteration=is_first_iteration, **kwargs)


__all__ = ["MLMambaForConditionalGeneration", "MLMambaModel", "MLMambaPreTrainedModel"]
