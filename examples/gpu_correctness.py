"""The CUDA fast path against the CPU reference path on the same weights.

Checks, for a mid-size ML-Mamba (real 27x27 patch grid, chunk 256, state 128, small widths):
  * connector output and LM logits of a 760-token prompt against the CPU reference path on the same weights
    in the same dtype: fp32 (rel. err <= 1e-3) and bf16 (<= 1e-2), with and without causal-conv1d; plus, for
    information, how far the CPU path in bf16 is from float32;
  * training gradients of the LM: the one-call conv + scan + norm kernel path (mamba_ssm's
    `mamba_split_conv1d_scan_combined`) against the CPU reference in fp32 (<= 1e-3), and against the unfused
    kernel path under bf16 autocast, as Trainer runs it (<= 1e-2);
  * greedy tokens identical with and without CUDA graphs (batch 1 and a padded batch of 4).
Prints each check as it completes and exits non-zero if any fails.

    python examples/gpu_correctness.py --json correctness.json
"""

import argparse
import json
import sys

import torch

from modeling_mlmamba import MLMambaConfig, MLMambaForConditionalGeneration, mamba2
from modeling_mlmamba.gemv import decode_linear


def mid_size_config() -> MLMambaConfig:
    tower = dict(num_hidden_layers=2, num_attention_heads=4, image_size=384, patch_size=14)
    return MLMambaConfig(
        dino_config=dict(hidden_size=128, **tower),
        siglip_config=dict(hidden_size=128, intermediate_size=256, **tower),
        text_config=dict(hidden_size=256, num_hidden_layers=4, num_heads=8, head_dim=64, vocab_size=1024),
        image_token_id=1000,
    )


def relative_error(actual, expected):
    actual, expected = actual.double().cpu(), expected.double().cpu()
    return ((actual - expected).norm() / expected.norm()).item()


def outputs(model, ids, pixels):
    with torch.no_grad():
        features = model.model.vision_tower(pixels).last_hidden_state.to(model.dtype)
        connector = model.model.connector(features)
        logits = model(input_ids=ids, pixel_values=pixels).logits
    return connector, logits


def language_model_gradients(model, ids, pixels, autocast_dtype=None):
    """All LM parameter gradients of the next-token loss, flattened, in training mode as Trainer runs it."""
    model.train()
    model.zero_grad()
    with torch.autocast(ids.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        loss = model(input_ids=ids, pixel_values=pixels, labels=ids).loss
    loss.backward()
    model.eval()
    return torch.cat([param.grad.flatten() for param in model.model.language_model.parameters()])


def copy_of(reference, device, dtype=None):
    """A new model with the reference's weights on `device` (and in `dtype`), in eval mode."""
    model = MLMambaForConditionalGeneration(reference.config).eval()
    model.load_state_dict(reference.state_dict())
    return model.to(device, dtype)


def record(checks, check):
    """Keep a check and print its line at once, so a run cut short still shows what it got through."""
    checks.append(check)
    detail = f"rel err {check['rel_err']:.2e} (<= {check['bound']:.0e})" if "rel_err" in check else ""
    print(f"{'PASS' if check['ok'] else 'FAIL'}  {check['check']:<55} {detail.replace(' (<= inf)', '')}", flush=True)


def greedy(model, ids, mask, pixels, use_graphs):
    model.config.use_cuda_graphs = use_graphs
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=64,
                              do_sample=False, eos_token_id=None, pad_token_id=0)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default="correctness.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    config = mid_size_config()
    reference = MLMambaForConditionalGeneration(config).eval()
    ids = torch.cat([torch.full((1, 729), config.image_token_id), torch.randint(1, 999, (1, 31))], dim=1)
    pixels = torch.randn(1, 2, 3, 384, 384)
    checks = []
    conv_kernels = {"with causal-conv1d": (mamba2.causal_conv1d_fn, mamba2.causal_conv1d_update),
                    "without causal-conv1d": (None, None)}
    # bf16 is checked against the reference path run in bf16 too (same weights, same precision): the gap
    # between any bf16 run and float32 is the format's, and is reported for the CPU path alongside.
    for dtype, bound in ((torch.float32, 1e-3), (torch.bfloat16, 1e-2)):
        ref_connector, ref_logits = outputs(copy_of(reference, "cpu", dtype), ids, pixels.to(dtype))
        gpu = copy_of(reference, "cuda", dtype)
        for label, (conv_fn, conv_update) in conv_kernels.items():
            mamba2.causal_conv1d_fn, mamba2.causal_conv1d_update = conv_fn, conv_update
            connector, logits = outputs(gpu, ids.cuda(), pixels.cuda().to(dtype))
            for name, actual, expected in (("connector", connector, ref_connector), ("logits", logits, ref_logits)):
                error = relative_error(actual, expected)
                record(checks, {"check": f"{name} {str(dtype)[6:]} {label}", "rel_err": error, "bound": bound,
                                "ok": error <= bound})
        mamba2.causal_conv1d_fn, mamba2.causal_conv1d_update = conv_kernels["with causal-conv1d"]
        if dtype == torch.bfloat16:
            fp32_connector, fp32_logits = outputs(reference, ids, pixels)
            for name, actual, expected in (("connector", ref_connector, fp32_connector),
                                           ("logits", ref_logits, fp32_logits)):
                record(checks, {"check": f"(info) CPU bf16 vs CPU fp32 {name}",
                                "rel_err": relative_error(actual, expected), "bound": float("inf"), "ok": True})

    for out_features, in_features in ((10576, 2560), (2560, 5120), (50288, 2560)):
        linear = torch.nn.Linear(in_features, out_features, bias=False, device="cuda", dtype=torch.bfloat16)
        row = torch.randn(1, in_features, device="cuda", dtype=torch.bfloat16)
        error = relative_error(decode_linear(linear, row), row.double() @ linear.weight.double().t())
        record(checks, {"check": f"batch-1 GEMV kernel {in_features}->{out_features} vs float64", "rel_err": error,
                        "bound": 1e-2, "ok": error <= 1e-2})

    gpu = copy_of(reference, "cuda")
    gpu_ids, gpu_pixels = ids.cuda(), pixels.cuda()
    fused_fp32 = language_model_gradients(gpu, gpu_ids, gpu_pixels)
    fused_bf16 = language_model_gradients(gpu, gpu_ids, gpu_pixels, torch.bfloat16)
    fused_kernel, mamba2.mamba_split_conv1d_scan_combined = mamba2.mamba_split_conv1d_scan_combined, None
    unfused_bf16 = language_model_gradients(gpu, gpu_ids, gpu_pixels, torch.bfloat16)
    mamba2.mamba_split_conv1d_scan_combined = fused_kernel
    for label, actual, expected, bound in (
        ("fp32, vs CPU reference", fused_fp32, language_model_gradients(reference, ids, pixels), 1e-3),
        ("bf16 autocast, vs unfused kernels", fused_bf16, unfused_bf16, 1e-2),
    ):
        error = relative_error(actual, expected)
        record(checks, {"check": f"LM gradients, fused conv+scan+norm, {label}", "rel_err": error, "bound": bound,
                        "ok": error <= bound and fused_kernel is not None})

    gpu = reference.to("cuda", torch.bfloat16)
    batch_ids = torch.cat([ids, ids, ids, ids]).cuda()
    batch_ids[2, -5:] = torch.randint(1, 999, (5,))
    mask = torch.ones_like(batch_ids)
    mask[1, :3] = 0  # a left-padded row
    batch_pixels = torch.randn(4, 2, 3, 384, 384, device="cuda", dtype=torch.bfloat16)
    for name, (b_ids, b_mask, b_pixels) in {
        "batch 1": (batch_ids[:1], mask[:1], batch_pixels[:1]),
        "batch 4 (one left-padded)": (batch_ids, mask, batch_pixels),
    }.items():
        eager = greedy(gpu, b_ids, b_mask, b_pixels, False)
        # Twice with graphs: the first call captures the decode graph, the second also the prefill graph.
        same = all(torch.equal(greedy(gpu, b_ids, b_mask, b_pixels, True), eager) for _ in range(2))
        record(checks, {"check": f"greedy tokens with == without CUDA graphs, {name}", "ok": same})

    with open(args.json, "w") as handle:
        json.dump({"device": torch.cuda.get_device_name(), "checks": checks}, handle, indent=2)
    sys.exit(0 if all(check["ok"] for check in checks) else 1)


if __name__ == "__main__":
    main()
