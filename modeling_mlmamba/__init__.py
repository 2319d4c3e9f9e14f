"""ML-Mamba for Hugging Face transformers. Importing this package registers it with the Auto classes."""

from pathlib import Path

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
)

from .configuration_mlmamba import MLMambaConfig
from .image_processing_mlmamba import MLMambaImageProcessor
from .modeling_mlmamba import MLMambaForConditionalGeneration, MLMambaModel, MLMambaPreTrainedModel
from .model_card import write_model_card
from .processing_mlmamba import MLMambaProcessor

# The embedded default model: a tiny ML-Mamba trained on shapes-vqa, what `python -m modeling_mlmamba` runs.
DEFAULT_MODEL = str(Path(__file__).resolve().parent / "default_model")

AutoConfig.register(MLMambaConfig.model_type, MLMambaConfig, exist_ok=True)
AutoModel.register(MLMambaConfig, MLMambaModel, exist_ok=True)
AutoModelForImageTextToText.register(MLMambaConfig, MLMambaForConditionalGeneration, exist_ok=True)
AutoModelForCausalLM.register(MLMambaConfig, MLMambaForConditionalGeneration, exist_ok=True)
AutoImageProcessor.register(MLMambaConfig, image_processor_classes={"pil": MLMambaImageProcessor}, exist_ok=True)
AutoProcessor.register(MLMambaConfig, MLMambaProcessor, exist_ok=True)

MLMambaConfig.register_for_auto_class()
MLMambaModel.register_for_auto_class("AutoModel")
MLMambaForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
MLMambaImageProcessor.register_for_auto_class("AutoImageProcessor")
MLMambaProcessor.register_for_auto_class()

__all__ = [
    "DEFAULT_MODEL", "MLMambaConfig", "MLMambaForConditionalGeneration", "MLMambaImageProcessor", "MLMambaModel",
    "MLMambaPreTrainedModel", "MLMambaProcessor", "write_model_card",
]
