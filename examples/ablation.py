"""Connector mini-ablation on shapes-vqa, like the paper's connector study: the `mlp` baseline against the Mamba-2
Scan Connector with bidirectional and with cross scans, same data, same budget, several seeds.

    python -m modeling_mlmamba.shapes_vqa --output data/shapes --num-images 30000 --seed 0
    python examples/ablation.py --data data/shapes --output runs/ablation --seeds 0 1 2 -- \\
        --max_steps 400 --per_device_train_batch_size 32 --learning_rate 1e-3

Everything after `--` goes to `examples/finetune.py` unchanged, for every run. Prints a Markdown table of
per-question-type accuracy (mean and spread over seeds) and writes `results.json` in the output folder.
"""

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from modeling_mlmamba import MLMambaForConditionalGeneration, MLMambaProcessor
from modeling_mlmamba.shapes_vqa import EVAL_IMAGES, EVAL_SEED, QUESTION_TYPES, evaluate

CONFIG_FILE = Path(__file__).resolve().parent / "configs" / "shapes-vqa.json"
FINETUNE = Path(__file__).resolve().parent / "finetune.py"
VARIANTS = {
    "mlp": {"connector_type": "mlp"},
    "msc-bidirectional": {"connector_type": "msc", "connector_scan": "bidirectional"},
    "msc-cross": {"connector_type": "msc", "connector_scan": "cross"},
}


def train(variant: str, seed: int, data: Path, output: Path, finetune_args: list[str]) -> Path:
    run_folder = output / f"{variant}-seed{seed}"
    command = [
        sys.executable, str(FINETUNE), "--config_file", str(CONFIG_FILE),
        "--config_overrides", json.dumps(VARIANTS[variant]), "--tokenizer", str(data / "tokenizer"),
        "--data_file", str(data / "train.json"), "--stage", "full", "--output_dir", str(run_folder),
        "--seed", str(seed), "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true",
        *finetune_args,
    ]
    with open(output / f"{variant}-seed{seed}.log", "w") as log:
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT)
    return run_folder


def score(run_folder: Path, num_images: int, device: str) -> dict[str, float]:
    model = MLMambaForConditionalGeneration.from_pretrained(run_folder).to(device).eval()
    return evaluate(model, MLMambaProcessor.from_pretrained(run_folder), num_images=num_images, seed=EVAL_SEED)


def markdown_table(results: dict[str, dict[int, dict[str, float]]]) -> str:
    columns = [*QUESTION_TYPES, "mean"]
    lines = ["| connector | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for variant, by_seed in results.items():
        cells = []
        for column in columns:
            values = [
                100 * (statistics.mean(scores.values()) if column == "mean" else scores[column])
                for scores in by_seed.values()
            ]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.1f} ± {spread:.1f}")
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    own, finetune_args = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="folder written by modeling_mlmamba.shapes_vqa")
    parser.add_argument("--output", type=Path, required=True, help="folder for the runs, logs and results.json")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--eval-images", type=int, default=EVAL_IMAGES, help="held-out scenes to score each run on")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(own)
    for required in ("train.json", "tokenizer"):
        if not (args.data / required).exists():
            parser.error(f"{args.data} has no {required}; write it with `python -m modeling_mlmamba.shapes_vqa`")
    args.output.mkdir(parents=True, exist_ok=True)

    results = {}
    for variant in args.variants:
        for seed in args.seeds:
            run_folder = train(variant, seed, args.data, args.output, finetune_args)
            results.setdefault(variant, {})[seed] = score(run_folder, args.eval_images, args.device)
            (args.output / "results.json").write_text(json.dumps(
                {"finetune_args": finetune_args, "eval_images": args.eval_images, "results": results}, indent=1
            ))
    print(markdown_table(results))


if __name__ == "__main__":
    main()
