"""`mlmamba serve`: transformers' own OpenAI-compatible server, answering for ML-Mamba exactly what `generate()`
answers, on a real server on 127.0.0.1."""

import base64
import os
import queue
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from PIL import Image

from modeling_mlmamba import DEFAULT_MODEL, MLMambaForConditionalGeneration, MLMambaProcessor

REPO = Path(__file__).resolve().parent.parent
EXAMPLE_IMAGE = REPO / "examples" / "images" / "shapes.png"
MAX_TOKENS = 6
STARTUP_TIMEOUT_SECONDS = 240


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def client():
    """An OpenAI client of `python -m modeling_mlmamba serve DEFAULT_MODEL` on a free port, once uvicorn says it
    listens."""
    openai = pytest.importorskip("openai", reason="serving needs the serving extra: pip install -e '.[serving]'")
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(
        [sys.executable, "-m", "modeling_mlmamba", "serve", DEFAULT_MODEL, "--host", "127.0.0.1", "--port", str(port),
         "--device", "cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO,
    )
    lines = queue.Queue()

    def read_output():
        for line in process.stdout:
            lines.put(line)
        lines.put(None)  # the server exited

    threading.Thread(target=read_output, daemon=True).start()
    log = []
    try:
        while not any("Uvicorn running on" in line for line in log):
            try:
                line = lines.get(timeout=STARTUP_TIMEOUT_SECONDS)
            except queue.Empty:
                pytest.fail("the server did not start in time:\n" + "".join(log[-30:]))
            if line is None:
                pytest.fail(f"the server exited with status {process.wait()}:\n" + "".join(log[-30:]))
            log.append(line)
        with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0) as client:
            yield client
    finally:
        process.terminate()
        process.wait(timeout=60)


@pytest.fixture(scope="module")
def default_model():
    return MLMambaForConditionalGeneration.from_pretrained(DEFAULT_MODEL).eval(), MLMambaProcessor.from_pretrained(
        DEFAULT_MODEL
    )


def image_url() -> str:
    return "data:image/png;base64," + base64.b64encode(EXAMPLE_IMAGE.read_bytes()).decode()


def openai_messages(system: str | None = None) -> list[dict]:
    """A multi-turn chat with the image in its first user turn, as an OpenAI client sends it."""
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url()}},
                                     {"type": "text", "text": "What color is the circle?"}]},
        {"role": "assistant", "content": "green"},
        {"role": "user", "content": "How many objects are there?"},
    ]


def generate_answer(default_model, messages: list[dict]) -> str:
    """The same chat through the processor and `generate()` in this process: the reference answer."""
    model, processor = default_model
    chat = []
    for message in messages:
        content = message["content"]
        if isinstance(content, list):
            content = [{"type": "image", "image": Image.open(EXAMPLE_IMAGE)} if part["type"] == "image_url" else part
                       for part in content]
        chat.append({"role": message["role"], "content": content})
    inputs = processor.apply_chat_template(
        chat, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
    return processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.mark.parametrize("system", [None, "Answer in one word."])
def test_chat_completion_with_an_image_matches_generate(client, default_model, system):
    messages = openai_messages(system)
    completion = client.chat.completions.create(
        model=DEFAULT_MODEL, messages=messages, max_tokens=MAX_TOKENS, temperature=0, timeout=120
    )
    [choice] = completion.choices
    expected = generate_answer(default_model, messages)
    assert choice.message.content == expected
    assert expected.strip()


def test_streamed_chat_completion_matches_generate(client, default_model):
    messages = openai_messages("Answer in one word.")
    stream = client.chat.completions.create(
        model=DEFAULT_MODEL, messages=messages, max_tokens=MAX_TOKENS, stream=True, timeout=120
    )
    chunks = [chunk for chunk in stream if chunk.choices]
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == generate_answer(default_model, messages)
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_serve_without_the_serving_extra_is_one_line(tmp_path):
    """Without fastapi (a module of that name that refuses to import), `mlmamba serve` names the extra."""
    (tmp_path / "fastapi.py").write_text("raise ImportError('no fastapi here')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)]), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "modeling_mlmamba", "serve", DEFAULT_MODEL], capture_output=True,
                            text=True, env=env, timeout=300, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "modeling-mlmamba[serving]" in result.stderr, result.stderr
