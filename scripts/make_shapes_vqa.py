"""Write a shapes-vqa dataset: LLaVA-format conversations, their images and the task's tokenizer.

    python scripts/make_shapes_vqa.py --output data/shapes --num-images 20000 --seed 0

writes `train.json` (or `test.json` with `--split test`), `images/*.png` and `tokenizer/`, the inputs of
`examples/finetune.py --data_file data/shapes/train.json --tokenizer data/shapes/tokenizer`.
"""

import argparse
from pathlib import Path

from modeling_mlmamba.shapes_vqa import SPLITS, build_tokenizer, write_dataset


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, required=True, help="folder for {split}.json, images/ and tokenizer/")
    parser.add_argument("--num-images", type=int, required=True, help="number of scenes (one image each)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", choices=SPLITS, default="train")
    parser.add_argument("--max-turns", type=int, default=4, help="questions per conversation, at most")
    parser.add_argument("--workers", type=int, default=1, help="processes that render the images")
    args = parser.parse_args(argv)
    for flag, value in (("--num-images", args.num_images), ("--max-turns", args.max_turns),
                        ("--workers", args.workers)):
        if value < 1:
            parser.error(f"{flag} must be at least 1, got {value}")
    path = write_dataset(args.output, args.num_images, args.seed, args.split, args.max_turns, args.workers)
    build_tokenizer().save_pretrained(args.output / "tokenizer")
    print(path)


if __name__ == "__main__":
    main()
