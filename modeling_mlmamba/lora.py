"""LoRA for ML-Mamba with peft: low-rank adapters on the language model's Mamba-2 projections, while the
connector and the projector (small, and new in ML-Mamba) train in full and are saved with the adapter.

    from peft import get_peft_model
    model = get_peft_model(MLMambaForConditionalGeneration.from_pretrained(folder), lora_config(rank=16))

The adapter leaves every forward path of the model in place: the mixers call `in_proj` and `out_proj` as modules
in training, prefill and decode steps (the batch-1 decode kernel in `gemv.py` takes plain `nn.Linear` only), so
a peft-wrapped projection is never bypassed.

QLoRA trains the same adapters on a quantized language model: `qlora_model_and_processor(folder)` loads it in 4-bit
NF4 (or another format of `quantization.QUANTIZATION_FORMATS`) and prepares it with peft's
`prepare_model_for_kbit_training`; `get_peft_model(model, lora_config())` then adds the adapters as above. The saved
adapter loads onto the quantized base and onto the unquantized one alike.
"""

from pathlib import Path

import torch
from peft import LoraConfig, prepare_model_for_kbit_training

from . import register_auto_classes
from .model_card import write_model_card
from .modeling_mlmamba import MLMambaForConditionalGeneration
from .processing_mlmamba import MLMambaProcessor
from .quantization import quantization_config

# Module names under `MLMambaForConditionalGeneration` ("model.language_model...") or `MLMambaModel`
# ("language_model..."). Scoped to the language model on purpose: a bare `out_proj` also names SigLIP's attention
# output, and the connector's Mamba-2 blocks have mixers with the same `in_proj`/`out_proj` names.
LANGUAGE_MODEL_PROJECTIONS = r"(.*\.)?language_model\.layers\.\d+\.mixer\.(in_proj|out_proj)"

# Trained in full and stored in the adapter folder: the released model trains them in every stage.
FULLY_TRAINED_MODULES = ("connector", "projector")


def lora_config(rank: int = 16, alpha: float = 32, dropout: float = 0.05) -> LoraConfig:
    """The LoRA setup for ML-Mamba: rank-`rank` adapters scaled by `alpha / rank` on the language model's
    `in_proj` and `out_proj`, connector and projector trained in full.

    No `task_type`: the plain `PeftModel` passes every argument (`pixel_values`, the recurrent cache) straight to
    the model's own `forward` and `generate`; peft's causal-LM wrapper adds only prompt-learning input handling,
    which LoRA does not use. Load a saved adapter with `PeftModel.from_pretrained(base_model, adapter_folder)`.
    """
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=LANGUAGE_MODEL_PROJECTIONS,
        modules_to_save=list(FULLY_TRAINED_MODULES),
    )


def save_merged_model(peft_model, processor, folder: str | Path, base_model: str | None, description: str):
    """Fold the adapters into the projections and save a plain ML-Mamba folder with its processor and model card,
    which loads without peft; returns the merged model. `peft_model` is left without adapters."""
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(folder)
    processor.save_pretrained(folder)
    write_model_card(folder, merged.config, base_model=base_model, description=description)
    return merged


def qlora_model_and_processor(model_name_or_path: str | None, quantization: str = "bnb-nf4",
                              compute_dtype: torch.dtype = torch.bfloat16, **from_pretrained_kwargs):
    """A saved ML-Mamba with its language model quantized (`quantization.quantization_config(quantization)`) and
    prepared for adapter training, and its processor.

    peft's `prepare_model_for_kbit_training` freezes every weight and, for the bitsandbytes formats, upcasts the
    unquantized ones (towers, connector, projector, embeddings, norms) to float32, as QLoRA trains; gradient
    checkpointing is left to the trainer's own flag. `compute_dtype` is what the 4-bit layers dequantize to.
    """
    if model_name_or_path is None:
        raise ValueError("quantized training starts from a saved model, but model_name_or_path is None; pass a "
                         "saved or converted ML-Mamba folder or Hub id")
    register_auto_classes()  # the folder's processor config names its classes through the Auto classes
    model = MLMambaForConditionalGeneration.from_pretrained(
        model_name_or_path, quantization_config=quantization_config(quantization, compute_dtype),
        **from_pretrained_kwargs,
    )
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model, MLMambaProcessor.from_pretrained(model_name_or_path)


__all__ = [
    "FULLY_TRAINED_MODULES", "LANGUAGE_MODEL_PROJECTIONS", "lora_config", "qlora_model_and_processor",
    "save_merged_model",
]
