"""The command line, `python -m modeling_mlmamba` or `mlmamba`.

    mlmamba --image PATH --question TEXT [--model FOLDER_OR_HUB_ID] [--device cpu] [--max-new-tokens 64]
    mlmamba serve [MODEL] [transformers serve options]

The first answers a question about an image and prints only the answer; without `--model` it runs the embedded
default model (a tiny ML-Mamba trained on shapes-vqa) on the CPU, offline. The second runs transformers' own
OpenAI-compatible server (`transformers serve`) with ML-Mamba registered where the server looks for model classes.

Arguments are checked before torch is imported, and every error is one line on stderr: exit status 2 for a bad
argument, 1 for a failure while running.
"""

import argparse
import logging
import os
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

from . import DEFAULT_MODEL_FOLDER

PROG = "mlmamba"
USAGE_ERROR, RUNTIME_ERROR = 2, 1


class CommandLineError(Exception):
    """An error to report as one line, with the exit status it deserves."""

    def __init__(self, message: str, status: int = USAGE_ERROR):
        super().__init__(message)
        self.status = status


class OneLineParser(argparse.ArgumentParser):
    """argparse, with its errors raised as one line (no usage block) for `main` to report."""

    def error(self, message: str):
        raise CommandLineError(f"{message} (see {self.prog} --help)")


def answer_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog=PROG, description="Answer a question about an image with ML-Mamba.",
        epilog=f"`{PROG} serve --help`: serve a model with transformers' OpenAI-compatible server.",
    )
    parser.add_argument("--image", required=True, help="path of the image file")
    parser.add_argument("--question", required=True, help="the question, e.g. 'What color is the circle?'")
    parser.add_argument("--model", default=DEFAULT_MODEL_FOLDER,
                        help="a converted or saved ML-Mamba folder or Hub id (default: the embedded shapes-vqa model)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default: cpu)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="longest answer in tokens (default: 64)")
    return parser


def parse_answer_args(argv) -> argparse.Namespace:
    args = answer_parser().parse_args(argv)
    if args.max_new_tokens < 1:
        raise CommandLineError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if not args.question.strip():
        raise CommandLineError("--question is empty")
    return args


def read_image(path: str):
    """The image at `path`, read completely (so that a broken file fails here, not in the model)."""
    from PIL import Image, UnidentifiedImageError

    file = Path(path).expanduser()
    if file.is_dir():
        raise CommandLineError(f"--image {path} is a folder, not an image file")
    if not file.is_file():
        raise CommandLineError(f"--image {path}: no such file")
    try:
        with Image.open(file) as image:
            image.load()
            return image.copy()
    except (UnidentifiedImageError, OSError) as error:
        raise CommandLineError(f"--image {path} is not an image file that PIL can read ({error})") from error


def is_path_like(name: str) -> bool:
    """A `--model` that can only mean a local folder: it starts like a path, or exists on disk."""
    return name.startswith(("./", "../", "/", "~", ".\\", "..\\")) or name in (".", "..") or os.path.lexists(name)


def resolve_model(name: str) -> tuple[str, bool]:
    """`--model` -> (what from_pretrained takes, whether to read only the local cache). Local folders are checked
    here; a Hub id is looked up once, without retries, unless offline (HF_HUB_OFFLINE) or already cached."""
    if is_path_like(name):
        folder = Path(name).expanduser()
        if not folder.exists():
            raise CommandLineError(f"--model {name}: no such folder")
        if not folder.is_dir():
            raise CommandLineError(f"--model {name} is a file; give the folder the model was saved to")
        if not (folder / "config.json").is_file():
            raise CommandLineError(f"--model {name} has no config.json: not a saved or converted ML-Mamba folder")
        return str(folder), True
    from huggingface_hub import is_offline_mode, model_info, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError as error:
        raise CommandLineError(f"--model {name} is neither a local folder nor a Hub id ({error})") from error
    cached = isinstance(try_to_load_from_cache(name, "config.json"), str)
    if is_offline_mode():
        if not cached:
            raise CommandLineError(f"--model {name}: no such local folder, and offline (HF_HUB_OFFLINE) with no "
                                   "cached copy of that Hub model")
        return name, True
    try:
        model_info(name, timeout=10)
    except RepositoryNotFoundError as error:
        raise CommandLineError(f"--model {name}: no such local folder or Hub model") from error
    except Exception as error:
        if cached:
            return name, True
        raise CommandLineError(
            f"--model {name}: no such local folder, and the Hub cannot be reached ({type(error).__name__})",
            RUNTIME_ERROR,
        ) from error
    return name, False


def torch_device(name: str):
    import torch

    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise CommandLineError(f"--device {name!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from error
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CommandLineError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CommandLineError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise CommandLineError(f"--device {name}: MPS is not available on this machine; use --device cpu")
    elif device.type != "cpu":
        try:
            torch.empty(0, device=device)
        except (RuntimeError, AssertionError) as error:
            raise CommandLineError(f"--device {name} cannot be used here ({error})") from error
    return device


@contextmanager
def library_warnings_silenced():
    """Packages that transformers imports when they are installed (torchao, bitsandbytes, ...) may log warnings or
    warn on import; the command line answers with its own output only."""
    logging.disable(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            logging.disable(logging.NOTSET)


def answer(argv) -> None:
    args = parse_answer_args(argv)
    image = read_image(args.image)
    with library_warnings_silenced():
        answer_image(args, image)


def answer_image(args: argparse.Namespace, image) -> None:
    model_name, local_only = resolve_model(args.model)
    device = torch_device(args.device)

    from transformers import AutoModelForImageTextToText, AutoProcessor
    from transformers.utils import logging as transformers_logging

    from . import register_auto_classes
    from .answering import answer_questions

    register_auto_classes()
    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    try:
        processor = AutoProcessor.from_pretrained(model_name, local_files_only=local_only)
        model = AutoModelForImageTextToText.from_pretrained(model_name, local_files_only=local_only)
    except (OSError, ValueError) as error:
        raise CommandLineError(f"cannot load --model {args.model}: {first_line(error)}", RUNTIME_ERROR) from error
    model = model.to(device).eval()
    (text,) = answer_questions(model, processor, [image], [args.question], max_new_tokens=args.max_new_tokens)
    sys.stdout.write(text + "\n")


def serve(argv) -> None:
    """transformers' `serve` command, after registering ML-Mamba where its model loader looks: the transformers
    namespace (the loader calls `getattr(transformers, config.architectures[0])` for models outside its own
    mappings) and the image-text-to-text model names (how it tells a vision-language model from a text one)."""
    try:
        with library_warnings_silenced():
            import transformers.processing_utils
            from transformers.cli.transformers import app
            from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

            from . import MLMambaConfig, MLMambaForConditionalGeneration

        # transformers.processing_utils re-creates the `transformers` module object when first imported (done
        # above): register on the one the server's loader will import.
        setattr(sys.modules["transformers"], MLMambaForConditionalGeneration.__name__, MLMambaForConditionalGeneration)
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES[MLMambaConfig.model_type] = MLMambaForConditionalGeneration.__name__
        app(["serve", *argv], prog_name=PROG)
    except ImportError as error:
        raise CommandLineError(
            f"{first_line(error)}; serving needs the serving extra: pip install 'modeling-mlmamba[serving]'",
            RUNTIME_ERROR,
        ) from error


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["serve"]:
            serve(argv[1:])
        else:
            answer(argv)
    except CommandLineError as error:
        sys.stderr.write(f"{PROG}: error: {error}\n")
        raise SystemExit(error.status) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    except Exception as error:
        sys.stderr.write(f"{PROG}: error: {type(error).__name__}: {first_line(error)}\n")
        raise SystemExit(RUNTIME_ERROR) from None


if __name__ == "__main__":
    main()
