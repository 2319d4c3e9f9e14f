"""Score a shapes-vqa model on the held-out split and write it as the package's embedded default model.

    python scripts/export_default_model.py runs/shapes --output modeling_mlmamba/default_model

The folder gets the weights, processor, tokenizer and a model card with the per-question-type accuracy, but no
copy of the model code: the package it ships in provides the classes.
"""

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch

from modeling_mlmamba import MLMambaForConditionalGeneration, MLMambaProcessor, write_model_card
from modeling_mlmamba.shapes_vqa import EVAL_IMAGES, EVAL_SEED, evaluate


def without_auto_map(settings):
    """A JSON value with every `auto_map` entry removed, at any depth (sub-processors carry their own)."""
    if isinstance(settings, dict):
        return {key: without_auto_map(value) for key, value in settings.items() if key != "auto_map"}
    return settings


def strip_model_code(folder: Path) -> None:
    """Remove the copied model code and the `auto_map` entries pointing at it: the package provides the classes
    (its Auto registration resolves `model_type: mlmamba`), so the embedded folder holds no second copy."""
    for code_file in folder.glob("*.py"):
        code_file.unlink()
    for json_file in [folder / "config.json", *folder.glob("*_config.json")]:
        json_file.write_text(json.dumps(without_auto_map(json.loads(json_file.read_text())), indent=2) + "\n")


def export(run_folder: str, output: str, num_images: int, seed: int, device: str) -> dict[str, float]:
    model = MLMambaForConditionalGeneration.from_pretrained(run_folder).to(device).eval()
    processor = MLMambaProcessor.from_pretrained(run_folder)
    scores = evaluate(model, processor, num_images=num_images, seed=seed)
    model.to("cpu")
    staging = Path(tempfile.mkdtemp(dir=Path(output).resolve().parent, prefix=".export-"))
    staging.chmod(0o755)  # mkdtemp makes it private; the result is a package folder everyone reads
    try:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        strip_model_code(staging)
        write_model_card(
            staging, model.config, model_name="mlmamba-shapes-vqa-tiny", repo_id=Path(output).as_posix(),
            datasets=["shapes-vqa"],
            eval_results={f"shapes-vqa {kind}": round(100 * score, 2) for kind, score in scores.items()},
            eval_metric="exact match (%)",
            eval_source=f"greedy answers to every question of {num_images} held-out scenes (seed {seed})",
            description="A tiny ML-Mamba trained from scratch on the synthetic shapes-vqa task (colours, shapes, "
                        "counts and positions of up to three objects): the package's embedded default model, "
                        "small enough to answer on any CPU.",
            question="What color is the circle?", remote_code=False,
        )
    except BaseException:
        shutil.rmtree(staging)
        raise
    shutil.rmtree(output, ignore_errors=True)
    staging.rename(output)
    return scores


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_folder", help="the output folder of examples/finetune.py")
    parser.add_argument("--output", required=True, help="where to write the embedded model folder")
    parser.add_argument("--num-images", type=int, default=EVAL_IMAGES, help="held-out scenes to score")
    parser.add_argument("--seed", type=int, default=EVAL_SEED)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    scores = export(args.run_folder, args.output, args.num_images, args.seed, args.device)
    print(json.dumps({kind: round(score, 4) for kind, score in scores.items()}))


if __name__ == "__main__":
    main()
