"""benchmarks/benchmark.py end to end at toy size on the CPU (`--tiny`): every measurement and the profile run, so
the script keeps up with the model's generation code (the GPU numbers in docs/benchmarks.md come from it)."""

import json
import math

import pytest

from conftest import load_example
from modeling_mlmamba import MLMambaConfig


@pytest.fixture(scope="module")
def benchmark():
    return load_example("benchmark", "benchmarks")


def test_tiny_run_measures_everything_and_writes_the_json(benchmark, tmp_path, capsys):
    results = benchmark.main(["--tiny", "--json", str(tmp_path / "benchmark.json")])
    assert json.loads((tmp_path / "benchmark.json").read_text()) == json.loads(json.dumps(results))
    sizes = benchmark.TINY
    assert results["tiny"] is True
    assert results["paper_metric"]["generated_tokens"] == sizes.new_tokens
    assert list(results["decode"]) == [f"batch{batch}" for batch in sizes.batches]
    assert all(entry["generated_per_sequence"] == sizes.new_tokens for entry in results["decode"].values())
    assert list(results["peak_memory_gib_by_new_tokens_batch1"]) == list(sizes.memory_new_tokens)
    assert results["decode_long_context"]["prompt_tokens"] == sizes.long_context
    assert set(results["prefill_breakdown_ms"]) == {"vision towers", "connector+projector", "LM prefill"}
    assert list(results["llava"]) == ["parameters_billion"] + [f"context{n}" for n in sizes.llava_contexts]
    rates = [results["ttft_ms"], results["decode_eager_batch1_tokens_per_s"],
             results["transformers_mamba2_decode_batch1_tokens_per_s"],
             *(entry["tokens_per_s"] for entry in results["decode"].values())]
    assert all(math.isfinite(rate) for rate in rates)
    assert "LLaVA" in capsys.readouterr().out  # the table, printed last


def test_tiny_profile_times_the_decode_graph_of_the_model(benchmark, tmp_path):
    results = benchmark.main(["--tiny", "--profile", "--json", str(tmp_path / "profile.json")])
    config = MLMambaConfig.tiny()
    assert results["profile_prompt_tokens"] == config.image_seq_length + benchmark.TINY.paper_text_tokens
    assert results["profile_graph_replay_ms"] > 0 and results["profile_generate_step_ms"] > 0
    assert "Name" in results["profile_decode_step_kernels"] and "Name" in results["profile_lm_prefill_top_ops"]
    saved = json.loads((tmp_path / "profile.json").read_text())
    assert saved["profile_lm_prefill_ms"] == results["profile_lm_prefill_ms"]


def test_full_size_run_needs_a_gpu(benchmark, monkeypatch, capsys):
    monkeypatch.setattr(benchmark.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        benchmark.main(["--json", "unused.json"])
    assert "needs a CUDA GPU; --tiny" in capsys.readouterr().err
