"""The command line's contract: arguments checked before torch is imported, every bad argument one line on stderr
with exit status 2, every failure while running one line with status 1, never a traceback."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
EXAMPLE_IMAGE = str(REPO / "examples" / "images" / "shapes.png")


def run_cli(*args: str, cwd=REPO, **env) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", **env}
    return subprocess.run([sys.executable, "-m", "modeling_mlmamba", *args], capture_output=True, text=True,
                          timeout=300, env=environment, cwd=cwd)


def assert_one_line_error(result: subprocess.CompletedProcess, status: int, message: str) -> None:
    assert result.returncode == status, result.stderr
    assert result.stdout == ""
    assert result.stderr.startswith("mlmamba: error: ") and result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr, result.stderr


def test_help_answers_within_two_seconds_without_importing_torch():
    start = time.perf_counter()
    result = run_cli("--help")
    elapsed = time.perf_counter() - start
    assert result.returncode == 0 and "--image" in result.stdout and "mlmamba serve" in result.stdout
    assert elapsed < 2.0, f"--help took {elapsed:.1f} s"
    probe = "import sys, modeling_mlmamba; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    imported = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert imported.stdout.strip() == "[]"


@pytest.fixture
def folder_without_config(tmp_path):
    (tmp_path / "weights").mkdir()
    return tmp_path / "weights"


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "the following arguments are required: --image, --question"),
        (["--image", EXAMPLE_IMAGE, "--question"], "argument --question: expected one argument"),
        (["--image", "no-such-file.png", "--question", "What?"], "--image no-such-file.png: no such file"),
        (["--image", str(REPO / "examples"), "--question", "What?"], "is a folder, not an image file"),
        (["--image", str(REPO / "README.md"), "--question", "What?"], "is not an image file that PIL can read"),
        (["--image", EXAMPLE_IMAGE, "--question", "  "], "--question is empty"),
        (["--image", EXAMPLE_IMAGE, "--question", "What?", "--max-new-tokens", "0"], "at least 1, got 0"),
        (["--image", EXAMPLE_IMAGE, "--question", "What?", "--model", "./missing"], "--model ./missing: no such folder"),
        (["--image", EXAMPLE_IMAGE, "--question", "What?", "--model", "~/no/such/model"], "no such folder"),
        (["--image", EXAMPLE_IMAGE, "--question", "What?", "--model", EXAMPLE_IMAGE], "is a file; give the folder"),
        (["--image", EXAMPLE_IMAGE, "--question", "What?", "--model", "bad name!"], "neither a local folder nor a Hub"),
        (["--image", EXAMPLE_IMAGE, "--question", "What?", "--model", "someone/missing-model"],
         "offline (HF_HUB_OFFLINE) with no cached copy"),
        (["--image", EXAMPLE_IMAGE, "--question", "What?", "--device", "nonsense"], "is not a torch device"),
    ],
)
def test_bad_arguments_are_one_line_with_status_2(args, message):
    assert_one_line_error(run_cli(*args), 2, message)


def test_a_local_folder_without_config_is_named(folder_without_config):
    result = run_cli("--image", EXAMPLE_IMAGE, "--question", "What?", "--model", str(folder_without_config))
    assert_one_line_error(result, 2, f"--model {folder_without_config} has no config.json")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_one_line():
    result = run_cli("--image", EXAMPLE_IMAGE, "--question", "What?", "--device", "cuda")
    assert_one_line_error(result, 2, "--device cuda: CUDA is not available on this machine; use --device cpu")


def test_a_folder_that_fails_to_load_is_one_line_with_status_1(folder_without_config):
    (folder_without_config / "config.json").write_text('{"model_type": "no-such-architecture"}')
    result = run_cli("--image", EXAMPLE_IMAGE, "--question", "What?", "--model", str(folder_without_config))
    assert_one_line_error(result, 1, f"cannot load --model {folder_without_config}")


def test_the_default_model_answers_from_any_directory(tmp_path):
    result = run_cli("--image", EXAMPLE_IMAGE, "--question", "What color is the circle?", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "" and result.stdout.strip() in {"red", "green", "blue", "yellow"}
