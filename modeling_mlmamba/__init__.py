"""ML-Mamba for Hugging Face transformers. Importing this package registers it with the Auto classes."""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
)

from .configuration_mlmamba import MLMambaConfig
from .modeling_mlmamba import MLMambaForConditionalGeneration, MLMambaModel, MLMambaPreTrainedModel
from .model_card import write_model_card
from .processing_mlmamba import MLMambaProcessor

AutoConfig.register(MLMambaConfig.model_type, MLMambaConfig, exist_ok=True)
AutoModel.register(MLMambaConfig, MLMambaModel, exist_ok=True)
AutoModelForImageTextToText.register(MLMambaConfig, MLMambaForConditionalGeneration, exist_ok=True)
AutoModelForCausalLM.register(MLMambaConfig, MLMambaForConditionalGeneration, exist_ok=True)
AutoProcessor.register(MLMambaConfig, MLMambaProcessor, exist_ok=True)

MLMambaConfig.register_for_auto_class()
MLMambaModel.register_for_auto_class("AutoModel")
MLMambaForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
MLMambaProcessor.register_for_auto_class()

__all__ = [
    "MLMambaConfig", "MLMambaForConditionalGeneration", "MLMambaModel", "MLMambaPreTrainedModel", "MLMambaProcessor",
    "write_model_card",
]
