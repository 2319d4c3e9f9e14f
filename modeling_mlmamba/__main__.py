"""Answer a question about an image: `python -m modeling_mlmamba --image PATH --question TEXT` (or `mlmamba ...`).

Without `--model` it runs the embedded default model (a tiny ML-Mamba trained on shapes-vqa) on the CPU, offline.
Only the answer is printed.
"""

import argparse
import sys
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from transformers import AutoModelForImageTextToText, AutoProcessor
from transformers.utils import logging as transformers_logging

from . import DEFAULT_MODEL
from .answering import answer_questions


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mlmamba", description="Answer a question about an image with ML-Mamba.")
    parser.add_argument("--image", required=True, help="path of the image file")
    parser.add_argument("--question", required=True, help="the question, e.g. 'What color is the circle?'")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="a converted or saved ML-Mamba folder or Hub id (default: the embedded shapes-vqa model)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default: cpu)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="longest answer in tokens (default: 64)")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if not args.question.strip():
        parser.error("--question is empty")
    return args


def load_image(path: str) -> Image.Image:
    if not Path(path).is_file():
        raise SystemExit(f"mlmamba: error: image file {path} does not exist")
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except (UnidentifiedImageError, OSError) as error:
        raise SystemExit(f"mlmamba: error: {path} is not an image file that PIL can read ({error})") from error


def main(argv=None) -> None:
    args = parse_args(argv)
    image = load_image(args.image)
    try:
        device = torch.device(args.device)
    except RuntimeError as error:
        raise SystemExit(f"mlmamba: error: unknown --device {args.device!r} ({error})") from error
    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    processor = AutoProcessor.from_pretrained(args.model)
    model = AutoModelForImageTextToText.from_pretrained(args.model).to(device).eval()
    (answer,) = answer_questions(model, processor, [image], [args.question], max_new_tokens=args.max_new_tokens)
    sys.stdout.write(answer + "\n")


if __name__ == "__main__":
    main()
