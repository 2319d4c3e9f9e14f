"""Score a shapes-vqa model on the held-out split and write it as the package's embedded default model.

    python scripts/export_default_model.py runs/shapes --output modeling_mlmamba/default_model

The folder gets the weights, processor, tokenizer, the model code with its `auto_map` (like any saved folder, so it
loads with `trust_remote_code=True` where the package is not installed) and a model card with the per-question-type
accuracy. The code is a copy of the package's: after the package's model code changes, refresh it with

    python scripts/export_default_model.py --refresh-code
"""

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch

from modeling_mlmamba import DEFAULT_MODEL, MLMambaForConditionalGeneration, MLMambaProcessor, write_model_card
from modeling_mlmamba.model_card import write_model_code
from modeling_mlmamba.shapes_vqa import EVAL_IMAGES, EVAL_SEED, evaluate


def export(run_folder: str, output: str, num_images: int, seed: int, device: str,
           repo_id: str | None = None) -> dict[str, float]:
    model = MLMambaForConditionalGeneration.from_pretrained(run_folder).to(device).eval()
    processor = MLMambaProcessor.from_pretrained(run_folder)
    scores = evaluate(model, processor, num_images=num_images, seed=seed)
    model.to("cpu")
    staging = Path(tempfile.mkdtemp(dir=Path(output).resolve().parent, prefix=".export-"))
    staging.chmod(0o755)  # mkdtemp makes it private; the result is a package folder everyone reads
    try:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        write_model_card(
            staging, model.config, model_name="mlmamba-shapes-vqa-tiny", repo_id=repo_id, embedded=True,
            datasets=["shapes-vqa"],
            eval_results={f"shapes-vqa {kind}": round(100 * score, 2) for kind, score in scores.items()},
            eval_metric="exact match (%)",
            eval_source=f"greedy answers to every question of {num_images} held-out scenes (seed {seed})",
            description="A tiny ML-Mamba trained from scratch on the synthetic shapes-vqa task (colours, shapes, "
                        "counts and positions of up to three objects): the package's embedded default model, "
                        "small enough to answer on any CPU.",
            question="What color is the circle?",
        )
    except BaseException:
        shutil.rmtree(staging)
        raise
    shutil.rmtree(output, ignore_errors=True)
    staging.rename(output)
    return scores


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_folder", nargs="?", help="the output folder of examples/finetune.py")
    parser.add_argument("--output", default=DEFAULT_MODEL,
                        help="where to write the embedded model folder (default: the package's DEFAULT_MODEL)")
    parser.add_argument("--refresh-code", action="store_true",
                        help="only replace the model code in --output with the package's current code")
    parser.add_argument("--repo-id", help="the Hub id of the folder's copy, for the model card's usage snippet")
    parser.add_argument("--num-images", type=int, default=EVAL_IMAGES, help="held-out scenes to score")
    parser.add_argument("--seed", type=int, default=EVAL_SEED)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.refresh_code:
        if args.run_folder is not None:
            parser.error("--refresh-code takes no run folder: it only copies the package's code into --output")
        print("\n".join(write_model_code(args.output)))
        return
    if args.run_folder is None:
        parser.error("give the run folder to export (or --refresh-code)")
    scores = export(args.run_folder, args.output, args.num_images, args.seed, args.device, args.repo_id)
    print(json.dumps({kind: round(score, 4) for kind, score in scores.items()}))


if __name__ == "__main__":
    main()
