"""Connector mini-ablation on shapes-vqa, like the paper's connector study: the `mlp` baseline against the Mamba-2
Scan Connector with bidirectional and with cross scans, same data, same budget, several seeds.

As in the paper, the connectors are trained between a vision encoder and a language model that already exist:
each run takes the vision towers and the LM of a trained shapes-vqa model (`--base`, e.g. the embedded default
model), gives it a freshly initialised connector and projector of the variant, and trains only those (the `align`
stage) with `examples/finetune.py`.

    python scripts/make_shapes_vqa.py --output data/shapes --num-images 30000 --seed 0
    python benchmarks/ablation.py --data data/shapes --base modeling_mlmamba/default_model --output runs/ablation \\
        --seeds 0 1 2 -- --max_steps 1200 --per_device_train_batch_size 32 --learning_rate 1e-3

Everything after `--` goes to `examples/finetune.py` unchanged, for every run. Prints a Markdown table of
per-question-type accuracy (mean and spread over seeds) and writes `results.json` in the output folder.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from modeling_mlmamba import MLMambaConfig, MLMambaForConditionalGeneration, MLMambaProcessor
from modeling_mlmamba.shapes_vqa import EVAL_IMAGES, EVAL_SEED, QUESTION_TYPES, evaluate

FINETUNE = Path(__file__).resolve().parent.parent / "examples" / "finetune.py"
VARIANTS = {
    "mlp": {"connector_type": "mlp"},
    "msc-bidirectional": {"connector_type": "msc", "connector_scan": "bidirectional"},
    "msc-cross": {"connector_type": "msc", "connector_scan": "cross"},
}
# What each run trains from scratch; everything else comes from the base model.
TRAINED_PREFIXES = ("model.connector.", "model.projector.")


def starting_point(base: Path, variant: str, seed: int, folder: Path) -> Path:
    """The base model with a fresh connector and projector of `variant` (initialised from `seed`), saved."""
    base_model = MLMambaForConditionalGeneration.from_pretrained(base)
    config = MLMambaConfig.from_dict({**base_model.config.to_dict(), **VARIANTS[variant]})
    torch.manual_seed(seed)
    model = MLMambaForConditionalGeneration(config)
    kept = {key: value for key, value in base_model.state_dict().items() if not key.startswith(TRAINED_PREFIXES)}
    missing, unexpected = model.load_state_dict(kept, strict=False)
    if unexpected or any(not key.startswith(TRAINED_PREFIXES) for key in missing):
        raise ValueError(f"{base} does not fit the {variant} model: unexpected {unexpected}, missing {missing}")
    model.save_pretrained(folder)
    MLMambaProcessor.from_pretrained(base).save_pretrained(folder)
    return folder


def train(variant: str, seed: int, start: Path, gpu: int | None, args: argparse.Namespace, finetune_args: list[str]):
    """One align-stage run of finetune.py from `start` (on GPU `gpu` when given); returns its output folder."""
    run_folder = args.output / f"{variant}-seed{seed}"
    command = [
        sys.executable, str(FINETUNE), "--model_name_or_path", str(start), "--stage", "align",
        "--data_file", str(args.data / "train.json"), "--output_dir", str(run_folder), "--seed", str(seed),
        "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true", *finetune_args,
    ]
    environment = {**os.environ, **({"CUDA_VISIBLE_DEVICES": str(gpu)} if gpu is not None else {})}
    with open(args.output / f"{variant}-seed{seed}.log", "w") as log:
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT, env=environment)
    return run_folder


def score(run_folder: Path, num_images: int, device: str) -> dict[str, float]:
    model = MLMambaForConditionalGeneration.from_pretrained(run_folder).to(device).eval()
    return evaluate(model, MLMambaProcessor.from_pretrained(run_folder), num_images=num_images, seed=EVAL_SEED)


def markdown_table(results: dict[str, dict[int, dict[str, float]]]) -> str:
    """Mean ± spread over seeds per question type and of the per-seed means; `n/a` for a type that no run's held-out
    questions contained (a few scenes need not ask every kind)."""
    columns = [*QUESTION_TYPES, "mean"]
    lines = ["| connector | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for variant, by_seed in results.items():
        cells = []
        for column in columns:
            values = [
                100 * (statistics.mean(scores.values()) if column == "mean" else scores[column])
                for scores in by_seed.values() if column == "mean" or column in scores
            ]
            if not values:
                cells.append("n/a")
                continue
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.1f} ± {spread:.1f}")
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    own, finetune_args = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="folder written by scripts/make_shapes_vqa.py")
    parser.add_argument("--base", type=Path, required=True, help="trained shapes-vqa model: towers and LM to keep")
    parser.add_argument("--output", type=Path, required=True, help="folder for the runs, logs and results.json")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--eval-images", type=int, default=EVAL_IMAGES, help="held-out scenes to score each run on")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--parallel", type=int, default=1, help="runs trained at once (a tiny model leaves a GPU "
                        "mostly idle); with several GPUs visible, runs go to them in turn")
    args = parser.parse_args(own)
    if not (args.data / "train.json").is_file():
        parser.error(f"{args.data} has no train.json; write it with `python scripts/make_shapes_vqa.py`")
    if not (args.base / "config.json").is_file():
        parser.error(f"--base {args.base} is not a saved model folder (no config.json)")
    args.output.mkdir(parents=True, exist_ok=True)

    runs = [(variant, seed) for variant in args.variants for seed in args.seeds]
    # Starting points first, one after the other: each seeds the global RNG for its fresh connector.
    starts = [starting_point(args.base, variant, seed, args.output / f"{variant}-seed{seed}-start")
              for variant, seed in runs]
    gpus = torch.cuda.device_count()
    with ThreadPoolExecutor(args.parallel) as pool:
        folders = list(pool.map(
            lambda index: train(*runs[index], starts[index], index % gpus if gpus > 1 else None, args, finetune_args),
            range(len(runs)),
        ))
    results = {}
    for (variant, seed), run_folder in zip(runs, folders):
        results.setdefault(variant, {})[seed] = score(run_folder, args.eval_images, args.device)
    (args.output / "results.json").write_text(json.dumps(
        {"finetune_args": finetune_args, "eval_images": args.eval_images, "results": results}, indent=1
    ))
    print(markdown_table(results))


if __name__ == "__main__":
    main()
