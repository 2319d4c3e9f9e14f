import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's interpreter, so the suite checks them on CPU tensors. The switch is
# read when the kernels are defined, i.e. before `modeling_mlmamba` is imported; with a GPU they compile as usual.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from modeling_mlmamba import MLMambaConfig, MLMambaForConditionalGeneration  # noqa: E402


def tiny_model(seed: int = 0, **config_overrides) -> MLMambaForConditionalGeneration:
    """A randomly initialised few-layer ML-Mamba in eval mode, deterministic for a given seed."""
    torch.manual_seed(seed)
    return MLMambaForConditionalGeneration(MLMambaConfig.tiny(**config_overrides)).eval()


def random_pixels(num_images: int, config: MLMambaConfig, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    size = config.dino_config.image_size
    return torch.randn(num_images, 2, 3, size, size, generator=generator)


def image_prompt(config: MLMambaConfig, text_ids: list[int]) -> list[int]:
    """The released layout: the image's placeholder positions first, then the prompt tokens."""
    return [config.image_token_id] * config.image_seq_length + text_ids


@pytest.fixture
def model():
    return tiny_model()


TINY_WORDS = (
    "what color is the circle square triangle shape object objects how many are there to left of above in image a "
    "red green blue yellow yes no one two three describe this picture ? . ,"
).split()


def tiny_tokenizer(vocab_size: int = 128, image_token_id: int = 127, model_max_length: int = 256):
    """A word-level tokenizer laid out like the released one: `<|endoftext|>` is id 0 and both end-of-text and
    padding, no BOS; `<|user|>`, `<|assistant|>` and `<image>` are single tokens. Filler words `w<id>` make every
    id up to `vocab_size` decodable, so whatever a random tiny model generates decodes."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|user|>", "<|assistant|>", "[UNK]"]
    tokens = specials + TINY_WORDS
    tokens += [f"w{index}" for index in range(len(tokens), vocab_size)]
    tokens[image_token_id] = "<image>"
    backend = Tokenizer(models.WordLevel({token: index for index, token in enumerate(tokens)}, unk_token="[UNK]"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(["<|endoftext|>", "<|user|>", "<|assistant|>", "<image>"])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token="[UNK]",
        model_max_length=model_max_length,
    )


def tiny_processor(config: MLMambaConfig | None = None, **tokenizer_kwargs):
    """The processor matching a (default: tiny) config, over `tiny_tokenizer`."""
    from modeling_mlmamba import MLMambaProcessor

    config = config or MLMambaConfig.tiny()
    tokenizer = tiny_tokenizer(config.text_config.vocab_size, config.image_token_id, **tokenizer_kwargs)
    return MLMambaProcessor.from_model_config(config, tokenizer)


REPOSITORY = Path(__file__).resolve().parent.parent


def load_example(name: str, folder: str = "examples"):
    """FOLDER/NAME.py as a module (`examples/` for user scripts, `benchmarks/` and `scripts/` for maintainer
    tools), with its folder importable the way running the script makes it."""
    directory = REPOSITORY / folder
    if not (directory / f"{name}.py").is_file():
        raise FileNotFoundError(f"no script {folder}/{name}.py in {REPOSITORY}; folder is one of examples, "
                                f"benchmarks, scripts")
    if str(directory) not in sys.path:
        sys.path.insert(0, str(directory))
    spec = importlib.util.spec_from_file_location(f"{folder}_{name}", directory / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and pickling look their module up by name
    spec.loader.exec_module(module)
    return module
