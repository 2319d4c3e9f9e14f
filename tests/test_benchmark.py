"""benchmarks/benchmark.py end to end with tiny models on the CPU (`--tiny`): every row and the profile, so the script
keeps up with the model's generation code (the GPU numbers in docs/benchmarks.md come from it)."""

import json
import math

import pytest
from conftest import load_example


def test_tiny_benchmark_measures_every_row_and_checks_greedy_tokens(tmp_path, capsys):
    benchmark = load_example("benchmark", "benchmarks")
    results = benchmark.main(["--tiny", "--json", str(tmp_path / "results.json")])
    assert json.loads((tmp_path / "results.json").read_text())["decode"] == results["decode"]
    plan = benchmark.Plan.tiny()
    assert set(results["decode"]) == {"batch1_fused", "batch1_per_op"} | {
        f"batch{b}_{kind}" for b in plan.batches[1:] for kind in ("streaming", "per_op")}
    # Tiny timings are noise (a decode rate is a difference of two short calls): only their presence is checked.
    assert all(math.isfinite(entry["tokens_per_s"]) for entry in results["decode"].values())
    assert set(results["bandwidth"]["bound_tokens_per_s"]) == {f"batch{b}" for b in plan.batches}
    assert results["ttft_ms"] > 0 and results["paper_metric"]["generated_tokens"] == plan.new_tokens
    assert set(results["prefill_breakdown_ms"]) == {"vision towers", "connector+projector", "LM prefill"}
    # No "prefill_graph_replay" on the CPU, where nothing is captured.
    assert set(results["ttft_split_ms"]) == {
        "generate_1_token", "forward", "graphed towers", "graphed connector+projector", "graphed LM prefill"}
    assert set(results["many_images"]) == set(results["llava"]) - {"parameters_billion", "images1"} == {
        f"images{n}" for n in plan.image_counts}
    seq = plan.config.image_seq_length
    assert results["many_images"]["images3"]["prompt_tokens"] == 3 * seq + benchmark.PROMPT_TEXT_TOKENS
    assert results["released"] == {"skipped": "needs a CUDA GPU and mamba_ssm"}
    for check in results["greedy_checks"]:
        assert check["fused_identical_with_and_without_graphs"] and check["per_op_identical_with_and_without_graphs"]
        assert check["fused_vs_per_op_identical_tokens"]  # on the CPU both take the reference step
    printed = capsys.readouterr().out
    assert "ratio to the released path" in printed and "decode batch3, per-op step + streaming state update" in printed


def test_tiny_profile_lists_the_kernels_of_prefill_and_both_decode_steps(tmp_path):
    benchmark = load_example("benchmark", "benchmarks")
    results = benchmark.main(["--tiny", "--profile", "--json", str(tmp_path / "profile.json")])
    for name in ("profile_lm_prefill_top_ops", "profile_decode_step_fused_kernels",
                 "profile_decode_step_per_op_kernels", "profile_first_token_host_ops"):
        assert "Name" in results[name]
    for name in ("profile_first_token_host_functions", "profile_eager_decode_host_functions"):
        assert "cumulative" in results[name] and "(generate)" in results[name]
    assert json.loads((tmp_path / "profile.json").read_text()) == json.loads(json.dumps(results))


def test_full_size_run_needs_a_gpu(monkeypatch):
    benchmark = load_example("benchmark", "benchmarks")
    monkeypatch.setattr(benchmark.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        benchmark.main(["--json", "unused.json"])


def test_host_overhead_measures_the_graph_seams_host_work_and_restores_the_decode_step(tmp_path):
    from modeling_mlmamba import cuda_graphs

    step = cuda_graphs.DecodeGraph.step
    host_overhead = load_example("host_overhead", "benchmarks")
    results = host_overhead.main(["--repeats", "1", "--json", str(tmp_path / "host.json")])
    assert cuda_graphs.DecodeGraph.step is step
    assert results["modules"] > 1000  # the full-size module tree
    assert all(results[name] > 0 for name in
               ("prefill_forward_host_ms", "generate_1_token_host_ms", "generate_host_ms_before_prefill",
                "decode_host_ms_per_token"))
    assert json.loads((tmp_path / "host.json").read_text()) == results


def test_decode_step_kernel_benchmark_needs_a_gpu(monkeypatch):
    decode_step_kernels = load_example("decode_step_kernels", "benchmarks")
    monkeypatch.setattr(decode_step_kernels.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="needs a CUDA GPU and triton"):
        decode_step_kernels.main(["--json", "unused.json"])
