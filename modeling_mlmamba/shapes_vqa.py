"""shapes-vqa: a synthetic visual question answering task, small enough to train an ML-Mamba in minutes.

Scenes of one to three filled shapes (circle, square, triangle; distinct per scene) in red, green, blue or yellow on a
white 128x128 canvas, six kinds of questions with one-word answers. Everything is drawn from a seeded
`random.Random`, so a seed gives the same scenes, images and questions on every machine. Each scene belongs to one
split by a hash of its objects (in drawing order), so whatever seeds and sizes are used, a test scene can only appear
in training data if the same boxes are drawn to the pixel in the same order.

`write_dataset` writes LLaVA-format conversations and their images, `build_tokenizer` a byte-level BPE built for the
task's text (laid out like the released GPT-NeoX tokenizer), `evaluate` scores a model on the held-out split;
`scripts/make_shapes_vqa.py` is their command line.
"""

import hashlib
import json
import multiprocessing
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from .answering import answer_questions
from .processing_mlmamba import render_chat

CANVAS_SIZE = 128
SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
COUNT_WORDS = ("one", "two", "three")
QUESTION_TYPES = ("color", "shape", "count", "left", "above", "exists")
MIN_SIDE, MAX_SIDE, MIN_GAP, MIN_OFFSET = 24, 40, 4, 16
SPLITS = ("train", "test")
TEST_FRACTION = 10  # one scene in ten is a test scene

# The tokenizer's special tokens, at fixed ids: end-of-text (also padding, as released), the two chat roles and
# the image placeholder, so a model config can name `image_token_id` before the tokenizer is built.
RESERVED_TOKENS = ("<|endoftext|>", "<|user|>", "<|assistant|>", "<image>")
IMAGE_TOKEN_ID = RESERVED_TOKENS.index("<image>")
TOKENIZER_VOCAB_SIZE = 384
# The held-out set every shapes-vqa model is scored on: all questions of these test-split scenes.
EVAL_SEED = 1234
EVAL_IMAGES = 100


@dataclass(frozen=True)
class ShapeObject:
    shape: str
    color: str
    box: tuple[int, int, int, int]  # left, top, right, bottom (exclusive)

    @property
    def center(self) -> tuple[float, float]:
        left, top, right, bottom = self.box
        return (left + right) / 2, (top + bottom) / 2


@dataclass(frozen=True)
class Question:
    kind: str  # one of QUESTION_TYPES
    text: str
    answer: str


Scene = tuple[ShapeObject, ...]


def scene_split(scene: Scene) -> str:
    """The split a scene belongs to, from a hash of its objects in drawing order."""
    digest = hashlib.sha256(repr(scene).encode()).digest()
    return "test" if int.from_bytes(digest[:4], "big") % TEST_FRACTION == 0 else "train"


def _boxes_apart(a, b) -> bool:
    horizontal_gap = max(a[0], b[0]) - min(a[2], b[2])
    vertical_gap = max(a[1], b[1]) - min(a[3], b[3])
    return max(horizontal_gap, vertical_gap) >= MIN_GAP


def sample_scene(rng: random.Random) -> Scene:
    """One to three objects of distinct shapes, any colours, boxes inside the canvas and at least 4 px apart."""
    while True:
        count = rng.randint(1, 3)
        objects = []
        for shape in rng.sample(SHAPES, count):
            for _ in range(100):
                side = rng.randint(MIN_SIDE, MAX_SIDE)
                left, top = rng.randint(0, CANVAS_SIZE - side), rng.randint(0, CANVAS_SIZE - side)
                box = (left, top, left + side, top + side)
                if all(_boxes_apart(box, other.box) for other in objects):
                    objects.append(ShapeObject(shape, rng.choice(sorted(COLORS)), box))
                    break
        if len(objects) == count:
            return tuple(objects)


def sample_scenes(num_scenes: int, seed: int, split: str) -> list[Scene]:
    """`num_scenes` scenes of one split, deterministic for a seed."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng, scenes = random.Random(seed), []
    while len(scenes) < num_scenes:
        scene = sample_scene(rng)
        if scene_split(scene) == split:
            scenes.append(scene)
    return scenes


def render(scene: Scene) -> Image.Image:
    image = Image.new("RGB", (CANVAS_SIZE, CANVAS_SIZE), "white")
    draw = ImageDraw.Draw(image)
    for obj in scene:
        left, top, right, bottom = obj.box
        fill = COLORS[obj.color]
        if obj.shape == "circle":
            draw.ellipse((left, top, right - 1, bottom - 1), fill=fill)
        elif obj.shape == "square":
            draw.rectangle((left, top, right - 1, bottom - 1), fill=fill)
        else:
            draw.polygon([((left + right - 1) / 2, top), (left, bottom - 1), (right - 1, bottom - 1)], fill=fill)
    return image


def scene_questions(scene: Scene) -> list[Question]:
    """Every question the task asks about a scene, in a fixed order: a colour per object, a shape per unique colour,
    the count, left / above for each ordered pair whose box centres are at least 16 px apart on that axis, and
    whether each shape is present."""
    questions = [Question("color", f"What color is the {obj.shape}?", obj.color) for obj in scene]
    colors = [obj.color for obj in scene]
    questions += [
        Question("shape", f"What shape is the {obj.color} object?", obj.shape)
        for obj in scene if colors.count(obj.color) == 1
    ]
    questions.append(Question("count", "How many objects are there?", COUNT_WORDS[len(scene) - 1]))
    for a in scene:
        for b in scene:
            if a is b:
                continue
            (ax, ay), (bx, by) = a.center, b.center
            if abs(ax - bx) >= MIN_OFFSET:
                answer = "yes" if ax < bx else "no"
                questions.append(Question("left", f"Is the {a.shape} to the left of the {b.shape}?", answer))
            if abs(ay - by) >= MIN_OFFSET:
                answer = "yes" if ay < by else "no"
                questions.append(Question("above", f"Is the {a.shape} above the {b.shape}?", answer))
    present = {obj.shape for obj in scene}
    questions += [
        Question("exists", f"Is there a {shape} in the image?", "yes" if shape in present else "no") for shape in SHAPES
    ]
    return questions


def conversation_record(scene: Scene, image_path: str, rng: random.Random, max_turns: int) -> dict:
    """A LLaVA-format sample: up to `max_turns` of the scene's questions, shuffled, as one conversation."""
    questions = scene_questions(scene)
    rng.shuffle(questions)
    turns = []
    for index, question in enumerate(questions[: rng.randint(1, max_turns)]):
        prefix = "<image>\n" if index == 0 else ""
        turns += [{"from": "human", "value": prefix + question.text}, {"from": "gpt", "value": question.answer}]
    return {"image": image_path, "conversations": turns}


def _render_to_file(job: tuple[Scene, Path]) -> None:
    scene, path = job
    render(scene).save(path)


def write_dataset(
    output: str | Path, num_images: int, seed: int, split: str = "train", max_turns: int = 4, workers: int = 1
) -> Path:
    """Render `num_images` scenes to `output/images/` (in `workers` processes) and write `output/{split}.json`;
    returns the JSON path. The content depends on the seed only, not on the number of workers."""
    output = Path(output)
    (output / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed + 1)
    scenes = sample_scenes(num_images, seed, split)
    paths = [f"images/{split}-{seed}-{index:06d}.png" for index in range(num_images)]
    jobs = [(scene, output / path) for scene, path in zip(scenes, paths)]
    if workers > 1:
        with multiprocessing.Pool(workers) as pool:
            pool.map(_render_to_file, jobs, chunksize=256)
    else:
        for job in jobs:
            _render_to_file(job)
    records = [
        {"id": f"{split}-{seed}-{index}", **conversation_record(scene, path, rng, max_turns)}
        for index, (scene, path) in enumerate(zip(scenes, paths))
    ]
    path = output / f"{split}.json"
    path.write_text(json.dumps(records, indent=1))
    return path


def evaluation_set(num_images: int, seed: int) -> list[tuple[Image.Image, Question]]:
    """Held-out (image, question) pairs: every question of `num_images` test-split scenes."""
    return [(render(scene), q) for scene in sample_scenes(num_images, seed, "test") for q in scene_questions(scene)]


def normalize_answer(text: str) -> str:
    return text.strip().lower()


def accuracy_by_type(questions: list[Question], predictions: list[str]) -> dict[str, float]:
    """Exact match of the stripped, lower-cased prediction, per question type (types that occur)."""
    if len(questions) != len(predictions):
        raise ValueError(f"got {len(predictions)} predictions for {len(questions)} questions")
    scores = {}
    for kind in QUESTION_TYPES:
        hits = [normalize_answer(p) == q.answer for q, p in zip(questions, predictions) if q.kind == kind]
        if hits:
            scores[kind] = sum(hits) / len(hits)
    return scores


def evaluate(model, processor, num_images: int = EVAL_IMAGES, seed: int = EVAL_SEED, batch_size: int = 64):
    """Per-type exact-match accuracy of greedy answers on every question of `num_images` held-out scenes."""
    pairs = evaluation_set(num_images, seed)
    images, questions = [image for image, _ in pairs], [question for _, question in pairs]
    predictions = answer_questions(model, processor, images, [q.text for q in questions], max_new_tokens=4,
                                   batch_size=batch_size)
    return accuracy_by_type(questions, predictions)


def task_texts() -> list[str]:
    """Every question and answer the task can produce, each wrapped in the chat format (the processor's chat
    template: a question as its prompt, an answer as what follows the generation prompt)."""
    texts = []
    for shape in SHAPES:
        texts.append(f"What color is the {shape}?")
        texts.append(f"Is there a {shape} in the image?")
        for other in SHAPES:
            texts.append(f"Is the {shape} to the left of the {other}?")
            texts.append(f"Is the {shape} above the {other}?")
    texts += [f"What shape is the {color} object?" for color in COLORS]
    texts.append("How many objects are there?")
    answers = [*COLORS, *SHAPES, *COUNT_WORDS, "yes", "no"]
    prompts = [render_chat([{"role": "user", "content": text}], add_generation_prompt=True) for text in texts]
    question = [{"role": "user", "content": texts[0]}]
    asked = render_chat(question, add_generation_prompt=True)
    return prompts + [
        render_chat(question + [{"role": "assistant", "content": answer}]).removeprefix(asked) for answer in answers
    ]


def build_tokenizer(vocab_size: int = TOKENIZER_VOCAB_SIZE, model_max_length: int = 512):
    """A byte-level BPE trained on the task's text: any string encodes (unknown words fall back to bytes), the
    task's words become single tokens. Laid out like the released tokenizer: `<|endoftext|>` (id 0) ends a turn
    and pads, no BOS; `<|user|>`, `<|assistant|>` and `<image>` are special tokens at fixed ids."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(RESERVED_TOKENS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(task_texts() * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
        additional_special_tokens=list(RESERVED_TOKENS[1:]), model_max_length=model_max_length,
    )

