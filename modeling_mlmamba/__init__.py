"""ML-Mamba for Hugging Face transformers. Importing this package registers it with the Auto classes."""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
)

from .configuration_mlmamba import MLMambaConfig
from .modeling_mlmamba import MLMambaForConditionalGeneration, MLMambaModel, MLMambaPreTrainedModel

AutoConfig.register(MLMambaConfig.model_type, MLMambaConfig, exist_ok=True)
AutoModel.register(MLMambaConfig, MLMambaModel, exist_ok=True)
AutoModelForImageTextToText.register(MLMambaConfig, MLMambaForConditionalGeneration, exist_ok=True)
AutoModelForCausalLM.register(MLMambaConfig, MLMambaForConditionalGeneration, exist_ok=True)

MLMambaConfig.register_for_auto_class()
MLMambaModel.register_for_auto_class("AutoModel")
MLMambaForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")

__all__ = ["MLMambaConfig", "MLMambaForConditionalGeneration", "MLMambaModel", "MLMambaPreTrainedModel"]
