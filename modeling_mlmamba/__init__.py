"""ML-Mamba for Hugging Face transformers.

`import modeling_mlmamba` is light (neither torch nor transformers is imported), so that the command line answers
`--help` and bad arguments at once. The first name taken from the package (`from modeling_mlmamba import
MLMambaForConditionalGeneration`, `modeling_mlmamba.DEFAULT_MODEL`, ...) imports the model code and registers
ML-Mamba with transformers' Auto classes; `register_auto_classes()` does the same explicitly.
"""

import importlib
from functools import cache
from pathlib import Path

# The embedded default model: a tiny ML-Mamba trained on shapes-vqa, what `python -m modeling_mlmamba` runs (which
# reads this path without registering anything); `modeling_mlmamba.DEFAULT_MODEL` registers, as users then load it.
DEFAULT_MODEL_FOLDER = str(Path(__file__).resolve().parent / "default_model")

# Public name -> the module that defines it.
_EXPORTS = {
    "MLMambaConfig": "configuration_mlmamba",
    "MLMambaForConditionalGeneration": "modeling_mlmamba",
    "MLMambaImageProcessor": "image_processing_mlmamba",
    "MLMambaImageProcessorTorchvision": "image_processing_mlmamba",
    "MLMambaModel": "modeling_mlmamba",
    "MLMambaPreTrainedModel": "modeling_mlmamba",
    "MLMambaProcessor": "processing_mlmamba",
    "write_model_card": "model_card",
}


@cache
def register_auto_classes() -> None:
    """Register ML-Mamba with transformers' Auto classes (`model_type: mlmamba`), and mark its classes so that
    `save_pretrained` copies their code into the saved folder with an `auto_map`."""
    from transformers import (
        AutoConfig,
        AutoImageProcessor,
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        AutoProcessor,
    )

    from .configuration_mlmamba import MLMambaConfig
    from .image_processing_mlmamba import MLMambaImageProcessor, MLMambaImageProcessorTorchvision
    from .modeling_mlmamba import MLMambaForConditionalGeneration, MLMambaModel
    from .processing_mlmamba import MLMambaProcessor

    AutoConfig.register(MLMambaConfig.model_type, MLMambaConfig, exist_ok=True)
    AutoModel.register(MLMambaConfig, MLMambaModel, exist_ok=True)
    AutoModelForImageTextToText.register(MLMambaConfig, MLMambaForConditionalGeneration, exist_ok=True)
    AutoModelForCausalLM.register(MLMambaConfig, MLMambaForConditionalGeneration, exist_ok=True)
    AutoImageProcessor.register(
        MLMambaConfig,
        image_processor_classes={"pil": MLMambaImageProcessor, "torchvision": MLMambaImageProcessorTorchvision},
        exist_ok=True,
    )
    AutoProcessor.register(MLMambaConfig, MLMambaProcessor, exist_ok=True)

    MLMambaConfig.register_for_auto_class()
    MLMambaModel.register_for_auto_class("AutoModel")
    MLMambaForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
    MLMambaImageProcessor.register_for_auto_class("AutoImageProcessor")
    MLMambaImageProcessorTorchvision.register_for_auto_class("AutoImageProcessor")
    MLMambaProcessor.register_for_auto_class()


def __getattr__(name: str):
    if name == "DEFAULT_MODEL":
        register_auto_classes()
        return DEFAULT_MODEL_FOLDER
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    register_auto_classes()
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), "DEFAULT_MODEL", *_EXPORTS})


__all__ = ["DEFAULT_MODEL", "register_auto_classes", *_EXPORTS]
