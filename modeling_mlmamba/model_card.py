"""What a saved ML-Mamba folder needs to stand alone on the Hub besides weights and processor: its model card
(`README.md`: metadata, a usage snippet, the architecture) and a copy of the model code."""

from collections.abc import Mapping, Sequence
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from transformers.dynamic_module_utils import custom_object_save

from .processing_mlmamba import render_chat

PAPER_URL = "https://arxiv.org/abs/2407.19832"
DEFAULT_TAGS = ("ml-mamba", "mamba2", "multimodal", "vision-language", "custom_code")

USAGE = '''```python
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
{package_import}
{repo_line}
processor = AutoProcessor.from_pretrained(repo{remote_code})
model = AutoModelForImageTextToText.from_pretrained(repo{remote_code})

image = Image.new("RGB", ({size}, {size}), "white")  # your picture, e.g. Image.open("photo.jpg")
content = [{{"type": "image", "image": image}}, {{"type": "text", "text": "{question}"}}]
messages = [{{"role": "user", "content": content}}]
inputs = processor.apply_chat_template(
    messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
)
output = model.generate(**inputs, max_new_tokens=32, do_sample=False)
print(processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```'''


def write_model_card(
    folder,
    config,
    *,
    model_name: str | None = None,
    repo_id: str | None = None,
    base_model: str | Sequence[str] | None = None,
    license: str = "apache-2.0",
    datasets: Sequence[str] | None = None,
    tags: Sequence[str] = (),
    eval_results: Mapping[str, float] | None = None,
    eval_metric: str = "accuracy",
    eval_source: str | None = None,
    description: str | None = None,
    question: str = "What is in the image?",
    remote_code: bool = True,
    embedded: bool = False,
) -> ModelCard:
    """Write `folder/README.md` for a saved ML-Mamba model and return the card.

    Args:
        folder: the folder holding the saved model (and processor).
        config: its `MLMambaConfig`; the architecture summary is read from it.
        model_name: title of the card and name in the `model-index`; defaults to the folder's name.
        repo_id: where users load it from, used in the usage snippet; defaults to the folder's path.
        base_model: the Hub id(s) this model was converted or fine-tuned from.
        license, datasets, tags: card metadata; `tags` are added to the ML-Mamba defaults.
        eval_results: benchmark name -> score (e.g. `{"shapes-vqa": 97.5}`), written to the `model-index`
            metadata and as a table.
        eval_metric: the metric of those scores.
        eval_source: where the scores come from (e.g. "reported in the paper, Table 2"), stated under the table.
        description: a paragraph about this checkpoint, placed under the title.
        question: the question of the usage snippet.
        remote_code: whether the folder carries the model code (`save_pretrained` copies it); without it the
            card tells users to register the classes from the `modeling_mlmamba` package.
        embedded: the folder is the package's `DEFAULT_MODEL`: the snippet finds it through the installed package
            (from any directory), or at `repo_id` when given.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder; save the model there first (model.save_pretrained)")
    model_name = model_name or folder.resolve().name
    base_models = [base_model] if isinstance(base_model, str) else list(base_model or [])
    results = [
        EvalResult(
            task_type="visual-question-answering", dataset_type=name, dataset_name=name, metric_type=eval_metric,
            metric_value=float(score),
        )
        for name, score in (eval_results or {}).items()
    ]
    data = ModelCardData(
        license=license,
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        base_model=base_models or None,
        datasets=list(datasets) if datasets else None,
        tags=list(dict.fromkeys([*DEFAULT_TAGS, *tags])),
        model_name=model_name if results else None,
        eval_results=results or None,
    )
    sections = [
        f"# {model_name}",
        description or f"An [ML-Mamba]({PAPER_URL}) multimodal model: two vision towers, the Mamba-2 Scan "
        "Connector and a Mamba-2 language model that answers in linear time.",
        "## Usage",
        "The model code travels with the weights, so `trust_remote_code=True` is needed." if remote_code else
        "The model code comes from the `modeling_mlmamba` package: `modeling_mlmamba.register_auto_classes()` "
        "registers it with the Auto classes.",
        USAGE.format(
            repo_line=_repo_line(repo_id or (None if embedded else folder.as_posix()), embedded),
            size=config.dino_config.image_size, question=question,
            package_import="" if remote_code else "\nimport modeling_mlmamba\n\nmodeling_mlmamba.register_auto_classes()\n",
            remote_code=", trust_remote_code=True" if remote_code else "",
        ),
        "## Architecture",
        architecture_summary(config),
    ]
    if results:
        sections += ["## Evaluation", _results_table(eval_results, eval_metric, eval_source)]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n")
    card.save(folder / "README.md")
    return card


def _repo_line(repo_id: str | None, embedded: bool) -> str:
    package_folder = "from modeling_mlmamba import DEFAULT_MODEL as repo"
    if repo_id is None:
        return f"{package_folder}  # this folder, inside the installed modeling_mlmamba package"
    return f'repo = "{repo_id}"' + (f"  # or the copy in the modeling_mlmamba package: {package_folder}" if embedded else "")


def write_model_code(folder) -> list[str]:
    """Copy the package's model code into `folder` as `save_pretrained` does (the module of each class registered
    for an Auto class, and every sibling module it imports), and remove copies of modules the code no longer
    imports. Returns the file names. Re-run it on a saved folder whenever the package's code changes."""
    from . import MLMambaConfig, MLMambaForConditionalGeneration, MLMambaImageProcessor, MLMambaProcessor

    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder; save the model there first (model.save_pretrained)")
    classes = (MLMambaConfig, MLMambaForConditionalGeneration, MLMambaImageProcessor, MLMambaProcessor)
    written = sorted({Path(path).name for cls in classes for path in custom_object_save(cls, folder)})
    for stale in folder.glob("*.py"):
        if stale.name not in written:
            stale.unlink()
    return written


def architecture_summary(config) -> str:
    """A short bullet list of the data path, read from an `MLMambaConfig`."""
    dino, siglip, text = config.dino_config, config.siglip_config, config.text_config
    rows, cols = config.image_grid
    if config.connector_type == "msc":
        connector = (
            f"Mamba-2 Scan Connector: {config.connector_num_layers} {config.connector_scan} scan block(s)"
            f"{' with SwiGLU' if config.connector_use_swiglu else ''}, width {config.connector_hidden_size}"
        )
    else:
        connector = f"MLP connector, width {config.connector_hidden_size}"
    layer = config.vision_feature_layer
    features = "second-to-last block" if layer == -2 else f"hidden state {layer}"
    question = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "{question}"}]}]
    prompt = render_chat(question, add_generation_prompt=True).replace("\n", "\\n")
    return "\n".join([
        f"- Image: {dino.image_size} px, resized without cropping, {rows}x{cols} patches = "
        f"{config.image_seq_length} image tokens placed first in the prompt",
        f"- Vision: DINOv2 with registers ({dino.num_hidden_layers} layers, width {dino.hidden_size}) and SigLIP "
        f"({siglip.num_hidden_layers} layers, width {siglip.hidden_size}); patch features of the {features}, "
        f"concatenated ({config.vision_feature_size} channels)",
        f"- Connector: {connector}",
        f"- Projector: {config.projector_type}",
        f"- Language model: Mamba-2, {text.num_hidden_layers} layers, width {text.hidden_size}, state size "
        f"{text.state_size}, vocabulary {text.vocab_size}",
        f"- Prompt format: `{prompt}` (the processor's chat template; a system message goes after the image tokens)",
    ])


def _results_table(eval_results: Mapping[str, float], metric: str, source: str | None) -> str:
    lines = [f"| Benchmark | {metric} |", "|---|---|"]
    lines += [f"| {name} | {score:g} |" for name, score in eval_results.items()]
    if source:
        lines.append(f"\nSource: {source}.")
    return "\n".join(lines)


__all__ = ["architecture_summary", "write_model_card", "write_model_code"]
