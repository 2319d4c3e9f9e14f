"""The shapes-vqa generator against the task's definition: scenes, pixels, questions, splits, scoring, tokenizer and
the command line that writes a dataset.

Every rule is checked against geometry and text computed here from the definition written out below, not from the
generator's helpers.
"""

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from transformers import AutoTokenizer

from conftest import load_example

from modeling_mlmamba import shapes_vqa
from modeling_mlmamba.shapes_vqa import (
    IMAGE_TOKEN_ID,
    Question,
    ShapeObject,
    accuracy_by_type,
    build_tokenizer,
    render,
    sample_scenes,
    scene_questions,
    scene_split,
    write_dataset,
)

# The task's definition, written out again: colours, shapes, canvas, answers and the exact question texts.
RGB = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
SHAPE_NAMES = ("circle", "square", "triangle")
WHITE = (255, 255, 255)
CANVAS = 128
COUNTS = {1: "one", 2: "two", 3: "three"}
QUESTION_PATTERNS = {
    "color": r"What color is the (?P<a>circle|square|triangle)\?",
    "shape": r"What shape is the (?P<color>red|green|blue|yellow) object\?",
    "count": r"How many objects are there\?",
    "left": r"Is the (?P<a>circle|square|triangle) to the left of the (?P<b>circle|square|triangle)\?",
    "above": r"Is the (?P<a>circle|square|triangle) above the (?P<b>circle|square|triangle)\?",
    "exists": r"Is there a (?P<a>circle|square|triangle) in the image\?",
}


@pytest.fixture(scope="module")
def scenes():
    """Train and test scenes of a few seeds: enough to meet every shape, colour, count and question kind."""
    return [scene for seed in range(3) for split in ("train", "test") for scene in sample_scenes(60, seed, split)]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def centre(obj: ShapeObject) -> tuple[float, float]:
    left, top, right, bottom = obj.box
    return (left + right - 1) / 2, (top + bottom - 1) / 2  # centre of the pixel range [left, right)


def separated(a, b, gap: int = 4) -> bool:
    """At least `gap` empty pixel rows or columns between two boxes (right/bottom exclusive)."""
    return (
        b[0] - a[2] >= gap or a[0] - b[2] >= gap  # side by side
        or b[1] - a[3] >= gap or a[1] - b[3] >= gap  # one above the other
    )


def in_box(obj: ShapeObject, height: int = CANVAS, width: int = CANVAS) -> np.ndarray:
    left, top, right, bottom = obj.box
    mask = np.zeros((height, width), dtype=bool)
    mask[top:bottom, left:right] = True
    return mask


# --- determinism --------------------------------------------------------------------------------------------


def test_same_seed_gives_identical_scenes_questions_and_png_bytes():
    first, again = sample_scenes(20, 7, "train"), sample_scenes(20, 7, "train")
    assert first == again
    assert [scene_questions(s) for s in first] == [scene_questions(s) for s in again]
    assert [png_bytes(render(s)) for s in first] == [png_bytes(render(s)) for s in again]
    assert sample_scenes(20, 8, "train") != first


def test_write_dataset_is_identical_for_one_and_two_workers(tmp_path):
    one = write_dataset(tmp_path / "one", num_images=12, seed=3, max_turns=3, workers=1)
    two = write_dataset(tmp_path / "two", num_images=12, seed=3, max_turns=3, workers=2)
    assert one.read_text() == two.read_text()
    names = sorted(p.name for p in (tmp_path / "one" / "images").iterdir())
    assert len(names) == 12
    assert names == sorted(p.name for p in (tmp_path / "two" / "images").iterdir())
    for name in names:
        assert (tmp_path / "one" / "images" / name).read_bytes() == (tmp_path / "two" / "images" / name).read_bytes()


# --- splits -------------------------------------------------------------------------------------------------


def test_train_and_test_splits_never_share_a_scene():
    train = {scene for seed in range(4) for scene in sample_scenes(150, seed, "train")}
    test = {scene for seed in range(4) for scene in sample_scenes(60, seed, "test")}
    assert not train & test
    assert {scene_split(s) for s in train} == {"train"} and {scene_split(s) for s in test} == {"test"}
    train_images = {png_bytes(render(s)) for s in train}
    assert not train_images & {png_bytes(render(s)) for s in test}


def test_sample_scenes_rejects_an_unknown_split():
    with pytest.raises(ValueError, match="split must be one of"):
        sample_scenes(1, 0, "validation")


# --- scenes and pixels --------------------------------------------------------------------------------------


def test_every_scene_obeys_the_layout_rules(scenes):
    for scene in scenes:
        assert 1 <= len(scene) <= 3
        assert len({obj.shape for obj in scene}) == len(scene), scene
        for obj in scene:
            assert obj.shape in SHAPE_NAMES and obj.color in RGB
            left, top, right, bottom = obj.box
            assert right - left == bottom - top, obj  # square boxes
            assert 24 <= right - left <= 40, obj
            assert 0 <= left and 0 <= top and right <= CANVAS and bottom <= CANVAS, obj
        for index, a in enumerate(scene):
            for b in scene[index + 1 :]:
                assert separated(a.box, b.box), (a, b)


def test_scenes_cover_every_count_shape_and_colour(scenes):
    assert {len(scene) for scene in scenes} == {1, 2, 3}
    assert {obj.shape for scene in scenes for obj in scene} == set(SHAPE_NAMES)
    assert {obj.color for scene in scenes for obj in scene} == set(RGB)


def test_rendered_pixels_follow_the_shapes(scenes):
    for scene in scenes:
        image = render(scene)
        assert image.mode == "RGB" and image.size == (CANVAS, CANVAS)
        pixels = np.asarray(image)
        covered = np.zeros((CANVAS, CANVAS), dtype=bool)
        for obj in scene:
            left, top, right, bottom = obj.box
            side, colour = right - left, RGB[obj.color]
            box_pixels = pixels[top:bottom, left:right].reshape(-1, 3)
            # filled, no outline, no anti-aliasing: a box holds only the object's colour and white
            assert {tuple(p) for p in box_pixels} <= {colour, WHITE}, obj
            covered |= in_box(obj)
            middle = tuple(pixels[top + side // 2, left + side // 2])
            if obj.shape == "square":
                assert {tuple(p) for p in box_pixels} == {colour}, obj
            elif obj.shape == "circle":
                assert middle == colour, obj
                for y, x in ((top, left), (top, right - 1), (bottom - 1, left), (bottom - 1, right - 1)):
                    assert tuple(pixels[y, x]) == WHITE, obj
            else:
                assert tuple(pixels[top, left]) == WHITE and tuple(pixels[top, right - 1]) == WHITE, obj
                assert tuple(pixels[bottom - 1, left + side // 2]) == colour, obj
                assert tuple(pixels[top + side // 4, left + side // 2]) == colour, obj  # apex at the top centre
        assert (pixels[~covered] == 255).all()  # white background outside every box


def test_square_and_circle_centres_and_background_corner_have_exact_colours():
    scene = (
        ShapeObject("square", "green", (10, 10, 40, 40)),
        ShapeObject("circle", "blue", (60, 12, 97, 49)),
        ShapeObject("triangle", "yellow", (20, 70, 52, 102)),
    )
    pixels = np.asarray(render(scene))
    assert tuple(pixels[25, 25]) == RGB["green"]
    assert tuple(pixels[30, 78]) == RGB["blue"]
    assert tuple(pixels[127, 127]) == WHITE and tuple(pixels[0, 0]) == WHITE
    assert tuple(pixels[70, 20]) == WHITE and tuple(pixels[70, 51]) == WHITE
    assert tuple(pixels[101, 36]) == RGB["yellow"]


# --- questions ----------------------------------------------------------------------------------------------


def test_questions_use_the_exact_spec_texts_and_one_word_answers(scenes):
    answers = {
        "color": set(RGB), "shape": set(SHAPE_NAMES), "count": set(COUNTS.values()),
        "left": {"yes", "no"}, "above": {"yes", "no"}, "exists": {"yes", "no"},
    }
    seen = set()
    for scene in scenes:
        for question in scene_questions(scene):
            assert re.fullmatch(QUESTION_PATTERNS[question.kind], question.text), question
            assert question.answer in answers[question.kind], question
            seen.add(question.kind)
    assert seen == set(QUESTION_PATTERNS)


def answer_from_geometry(scene, kind: str, match: re.Match) -> str | None:
    """The defined answer to a question about `scene`, or None when the definition forbids asking it (a colour
    that is not unique, centres closer than 16 px on the asked axis, a shape not in the scene)."""
    by_shape = {obj.shape: obj for obj in scene}
    if kind == "color":
        return by_shape[match["a"]].color if match["a"] in by_shape else None
    if kind == "shape":
        owners = [obj for obj in scene if obj.color == match["color"]]
        return owners[0].shape if len(owners) == 1 else None
    if kind == "count":
        return COUNTS[len(scene)]
    if kind == "exists":
        return "yes" if match["a"] in by_shape else "no"
    if match["a"] == match["b"] or match["a"] not in by_shape or match["b"] not in by_shape:
        return None
    axis = 0 if kind == "left" else 1
    a, b = centre(by_shape[match["a"]])[axis], centre(by_shape[match["b"]])[axis]
    if abs(a - b) < 16:
        return None
    return "yes" if a < b else "no"


def test_every_question_is_allowed_and_answered_by_the_geometry(scenes):
    for scene in scenes:
        for question in scene_questions(scene):
            match = re.fullmatch(QUESTION_PATTERNS[question.kind], question.text)
            assert answer_from_geometry(scene, question.kind, match) == question.answer, (scene, question)


def test_every_allowed_question_is_asked(scenes):
    for scene in scenes:
        asked = {(q.kind, q.text) for q in scene_questions(scene)}
        colours = [obj.color for obj in scene]
        for obj in scene:
            assert ("color", f"What color is the {obj.shape}?") in asked
            assert (("shape", f"What shape is the {obj.color} object?") in asked) == (colours.count(obj.color) == 1)
        assert ("count", "How many objects are there?") in asked
        for shape in SHAPE_NAMES:
            assert ("exists", f"Is there a {shape} in the image?") in asked
        for a in scene:
            for b in scene:
                if a is b:
                    continue
                (ax, ay), (bx, by) = centre(a), centre(b)
                left = ("left", f"Is the {a.shape} to the left of the {b.shape}?")
                above = ("above", f"Is the {a.shape} above the {b.shape}?")
                assert (left in asked) == (abs(ax - bx) >= 16), (scene, left)
                assert (above in asked) == (abs(ay - by) >= 16), (scene, above)


def test_relation_questions_near_the_threshold():
    square, circle = ShapeObject("square", "red", (0, 0, 30, 30)), ShapeObject("circle", "red", (46, 15, 76, 45))
    questions = {q.text: q for q in scene_questions((square, circle))}
    # centres 46 px apart horizontally, 15 px vertically: left/right asked, above/below not; red is not unique
    assert questions["Is the square to the left of the circle?"].answer == "yes"
    assert questions["Is the circle to the left of the square?"].answer == "no"
    assert not any(q.kind in ("above", "shape") for q in questions.values())
    assert questions["How many objects are there?"].answer == "two"
    assert questions["Is there a triangle in the image?"].answer == "no"
    moved = ShapeObject("circle", "blue", (46, 16, 76, 46))  # now exactly 16 px lower
    questions = {q.text: q for q in scene_questions((square, moved))}
    assert questions["Is the square above the circle?"].answer == "yes"
    assert questions["Is the circle above the square?"].answer == "no"
    assert questions["What shape is the blue object?"].answer == "circle"


def test_written_conversations_ask_the_scene_questions_about_the_written_image(tmp_path):
    json_path = write_dataset(tmp_path, num_images=10, seed=5, split="test", max_turns=3)
    assert json_path == tmp_path / "test.json"
    records = json.loads(json_path.read_text())
    scenes = sample_scenes(10, 5, "test")
    assert len(records) == 10 and len({r["id"] for r in records}) == 10
    for record, scene in zip(records, scenes):
        with Image.open(tmp_path / record["image"]) as file:
            assert file.mode == "RGB"
            assert np.array_equal(np.asarray(file), np.asarray(render(scene)))
        turns = record["conversations"]
        assert 2 <= len(turns) <= 6 and len(turns) % 2 == 0
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        assert turns[0]["value"].startswith("<image>\n")
        assert all("<image>" not in t["value"] for t in turns[1:])
        expected = {q.text: q.answer for q in scene_questions(scene)}
        asked = [t["value"].removeprefix("<image>\n") for t in turns[::2]]
        assert len(set(asked)) == len(asked)
        for question, answer in zip(asked, turns[1::2]):
            assert expected[question] == answer["value"]


# --- scoring ------------------------------------------------------------------------------------------------


def test_accuracy_is_exact_match_of_stripped_lowercase_text_per_type():
    questions = [
        Question("color", "What color is the circle?", "red"),
        Question("color", "What color is the square?", "blue"),
        Question("count", "How many objects are there?", "two"),
        Question("exists", "Is there a circle in the image?", "yes"),
        Question("exists", "Is there a square in the image?", "no"),
        Question("exists", "Is there a triangle in the image?", "no"),
    ]
    predictions = ["  Red\n", "blue.", "TWO", "yes", "no ", "yes"]
    scores = accuracy_by_type(questions, predictions)
    assert scores == {"color": 0.5, "count": 1.0, "exists": pytest.approx(2 / 3)}


def test_accuracy_rejects_mismatched_lengths():
    question = Question("count", "How many objects are there?", "one")
    with pytest.raises(ValueError, match="1 predictions for 2 questions"):
        accuracy_by_type([question, question], ["one"])


# --- tokenizer ----------------------------------------------------------------------------------------------


def task_words() -> tuple[list[str], list[str]]:
    """Words that start a question or an answer (after a newline), and words that follow a space."""
    starts = ["What", "How", "Is", *RGB, *SHAPE_NAMES, *COUNTS.values(), "yes", "no"]
    middles = [
        "color", "is", "the", "shape", "object", "many", "objects", "are", "there", "to", "left", "of", "above",
        "a", "in", "image", *RGB, *SHAPE_NAMES,
    ]
    return starts, [" " + word for word in middles]


def test_every_task_word_and_answer_is_one_token(tokenizer):
    starts, middles = task_words()
    for word in [*starts, *middles, "?"]:
        assert len(tokenizer.encode(word, add_special_tokens=False)) == 1, word
    question = "What shape is the yellow object?"
    assert len(tokenizer.encode(question, add_special_tokens=False)) == 7


def test_tokenizer_special_tokens_sit_at_fixed_ids_without_bos(tokenizer):
    ids = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|user|>", "<|assistant|>", "<image>"])
    assert ids == [0, 1, 2, IMAGE_TOKEN_ID]
    assert IMAGE_TOKEN_ID == 3
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == 0
    assert tokenizer.bos_token is None
    assert tokenizer.encode("yes", add_special_tokens=True) == tokenizer.encode("yes", add_special_tokens=False)
    assert len(tokenizer.encode("yes")) == 1
    assert len(tokenizer) <= shapes_vqa.TOKENIZER_VOCAB_SIZE
    for special in ("<|endoftext|>", "<|user|>", "<|assistant|>", "<image>"):
        assert tokenizer.encode(special, add_special_tokens=False) == [tokenizer.convert_tokens_to_ids(special)]


@pytest.mark.parametrize(
    "text",
    [
        "<image><|user|>\nWhat color is the circle?<|endoftext|>\n<|assistant|>\nred<|endoftext|>",
        "<image><|user|>\nIs the square above the triangle?<|endoftext|>\n<|assistant|>\nno<|endoftext|>"
        "\n<|user|>\nHow many objects are there?<|endoftext|>\n<|assistant|>\nthree<|endoftext|>",
        "<|user|>\nDescribe the zebra, ünïcode & 42 spaces  ok?<|endoftext|>\n<|assistant|>\n",
    ],
)
def test_tokenizer_round_trips_chat_formatted_text(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.unk_token_id is None or tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text


def test_shapes_config_fits_the_tokenizer(tokenizer):
    settings = json.loads((Path(__file__).parent.parent / "examples" / "configs" / "shapes-vqa.json").read_text())
    assert settings["image_token_id"] == IMAGE_TOKEN_ID
    assert len(tokenizer) <= settings["text_config"]["vocab_size"]


# --- command line (scripts/make_shapes_vqa.py) ------------------------------------------------------------------


@pytest.fixture(scope="module")
def make_shapes_vqa():
    return load_example("make_shapes_vqa", "scripts")


def test_cli_writes_conversations_images_and_tokenizer(make_shapes_vqa, tmp_path, capsys):
    make_shapes_vqa.main(["--output", str(tmp_path), "--num-images", "3", "--seed", "2", "--max-turns", "2"])
    assert capsys.readouterr().out.strip() == str(tmp_path / "train.json")
    records = json.loads((tmp_path / "train.json").read_text())
    assert len(records) == 3
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == sorted(Path(r["image"]).name for r in records)
    assert all(len(r["conversations"]) <= 4 for r in records)
    loaded = AutoTokenizer.from_pretrained(tmp_path / "tokenizer")
    assert loaded.get_vocab() == build_tokenizer().get_vocab()
    assert loaded.convert_tokens_to_ids("<image>") == IMAGE_TOKEN_ID and loaded.pad_token_id == 0


def test_cli_writes_the_same_data_as_the_library(make_shapes_vqa, tmp_path):
    make_shapes_vqa.main(["--output", str(tmp_path / "cli"), "--num-images", "3", "--seed", "4", "--split", "test"])
    write_dataset(tmp_path / "library", num_images=3, seed=4, split="test")
    assert (tmp_path / "cli" / "test.json").read_text() == (tmp_path / "library" / "test.json").read_text()


@pytest.mark.parametrize("flag", ["--num-images", "--max-turns", "--workers"])
def test_cli_refuses_counts_below_one_before_writing(make_shapes_vqa, tmp_path, capsys, flag):
    arguments = {"--output": str(tmp_path / "out"), "--num-images": "3", flag: "0"}
    with pytest.raises(SystemExit):
        make_shapes_vqa.main([item for pair in arguments.items() for item in pair])
    assert f"{flag} must be at least 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
