"""GPU + CPU offloading: weights kept on the CPU and brought to the GPU by accelerate's hooks for each module's
forward give the logits and greedy tokens of the model held whole on the GPU (which replays CUDA graphs)."""

import pytest
import torch
from conftest import image_prompt, random_pixels, tiny_model

from modeling_mlmamba import MLMambaForConditionalGeneration

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU offloading needs a CUDA GPU")


def logits_and_greedy_tokens(model):
    config = model.config
    ids = torch.tensor([image_prompt(config, [5, 6, 7])], device="cuda")
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=random_pixels(1, config).cuda())
    with torch.no_grad():
        logits = model(**batch).logits
    tokens = [model.generate(**batch, max_new_tokens=6, do_sample=False, eos_token_id=None) for _ in range(3)]
    assert all(torch.equal(later, tokens[0]) for later in tokens[1:])
    return logits, tokens[0]


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 5e-2)])
def test_cpu_offloaded_layers_give_the_whole_gpu_models_outputs(tmp_path, dtype, tolerance):
    """In bfloat16 the whole model's one-row projections take the Triton decode kernel, while an offloaded one runs
    its module (cuBLAS): logits agree to bfloat16 precision there, and to float32 precision with equal tokens in
    float32, where both run the same kernels."""
    tiny_model().save_pretrained(tmp_path)
    whole = MLMambaForConditionalGeneration.from_pretrained(tmp_path, dtype=dtype).to("cuda").eval()
    size = sum(parameter.numel() * parameter.element_size() for parameter in whole.parameters())
    offloaded = MLMambaForConditionalGeneration.from_pretrained(
        tmp_path, dtype=dtype, device_map="auto", max_memory={0: size // 3, "cpu": 10 * size}
    ).eval()
    assert "cpu" in offloaded.hf_device_map.values() and 0 in offloaded.hf_device_map.values()

    expected_logits, expected_tokens = logits_and_greedy_tokens(whole)
    logits, tokens = logits_and_greedy_tokens(offloaded)
    torch.testing.assert_close(logits, expected_logits, rtol=tolerance, atol=tolerance)
    if dtype == torch.float32:
        assert torch.equal(tokens, expected_tokens)
    assert not offloaded.cuda_graphs.prefill_graphs and not offloaded.cuda_graphs.decode_graphs
