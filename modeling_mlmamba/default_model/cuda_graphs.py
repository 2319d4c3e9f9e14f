"""CUDA graphs for generation: the prefill forward per prompt shape and the one-token decode step per batch size.

Launched op by op from Python, a 2.7B Mamba-2 spends most of its time on the host: ~20 small kernels per
layer and Triton's per-launch overhead (a 760-token LM prefill measured ~100 ms of CPU time for ~10 ms of
GPU work). Captured graphs replay all of it in one launch.

Decode: each decode graph owns state buffers for one batch size; at the first decode step of a
`generate()` call the cache's states are copied into them and the cache is pointed at them, so the cache stays
the live state. Prefill: a prompt shape is captured the second time it is seen (a one-off shape runs eagerly
and pays no capture), and the final states the graph produces are handed to the caller's cache. Replays run
exactly the kernels of the eager path, so results are bit-identical with and without graphs.
"""

import weakref
from collections import OrderedDict

import torch

MAX_PREFILL_GRAPHS = 8
MAX_DECODE_GRAPHS = 4


def cache_states(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's (conv_state, ssm_state) of a transformers recurrent cache."""
    return [(layer.conv_states[0], layer.recurrent_states[0]) for layer in cache.layers]


def set_cache_states(cache, states) -> None:
    for layer, (conv_state, ssm_state) in zip(cache.layers, states):
        layer.conv_states[0] = conv_state
        layer.recurrent_states[0] = ssm_state


def fill_cache(cache, states, conv_kernel: int) -> None:
    """Store freshly computed per-layer states in an empty cache through its public update methods."""
    for layer_idx, (conv_state, ssm_state) in enumerate(states):
        cache.update_conv_state(conv_state, layer_idx, conv_kernel_size=conv_kernel)
        cache.update_recurrent_state(ssm_state, layer_idx)


def weights_fingerprint(module: torch.nn.Module) -> tuple:
    """Changes when any weight is replaced or moved (new module, new storage), which stales a captured graph."""
    return tuple((id(m), tuple(p.data_ptr() for p in m.parameters(recurse=False))) for m in module.modules())


class GraphedCall:
    """fn(*inputs) captured once with static input buffers; calls copy new inputs in and replay.

    On devices without graphs (CPU tests) the same buffers are used and fn runs eagerly, so everything
    around the capture is exercised there too.
    """

    def __init__(self, fn, example_inputs, capture: bool, pool=None):
        self.fn = fn
        self.inputs = [None if x is None else x.clone() for x in example_inputs]
        self.graph = None
        self.outputs = None
        if capture:
            # Warm-up on a side stream compiles Triton kernels and creates library handles outside the capture.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    fn(*self.inputs)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=pool):
                self.outputs = fn(*self.inputs)

    def __call__(self, *inputs):
        for static, new in zip(self.inputs, inputs):
            if static is not None:
                static.copy_(new)
        if self.graph is None:
            return self.fn(*self.inputs)
        self.graph.replay()
        return self.outputs


class DecodeGraph:
    """The decode step for one batch size, with state buffers that a cache is bound to."""

    def __init__(self, decode_step, decay_rates, input_ids, template_states, capture: bool, pool=None):
        self.states = [(torch.zeros_like(conv), torch.zeros_like(ssm)) for conv, ssm in template_states]
        self.decay_rates = decay_rates
        self.rates = [rate.clone() for rate in decay_rates()]
        self.call = GraphedCall(
            lambda ids: decode_step(ids, self.states, self.rates), [input_ids[:, 0]], capture, pool
        )
        self.bound_cache = None

    def is_bound_to(self, cache) -> bool:
        return cache.layers[0].conv_states[0] is self.states[0][0]

    def release(self) -> None:
        """Give the bound cache, if it is still alive and bound, its own copy of the states."""
        cache = self.bound_cache() if self.bound_cache is not None else None
        if cache is not None and self.is_bound_to(cache):
            set_cache_states(cache, [(conv.clone(), ssm.clone()) for conv, ssm in self.states])
        self.bound_cache = None

    def bind(self, cache) -> None:
        """Make `cache` use this graph's buffers; a previously bound cache keeps a copy of its states."""
        self.release()
        for (conv_buffer, ssm_buffer), (conv, ssm) in zip(self.states, cache_states(cache)):
            conv_buffer.copy_(conv)
            ssm_buffer.copy_(ssm)
        for buffer, rate in zip(self.rates, self.decay_rates()):
            buffer.copy_(rate)
        set_cache_states(cache, self.states)
        self.bound_cache = weakref.ref(cache)

    def step(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.call(input_ids[:, 0]).clone()


class GenerationGraphs:
    """The prefill and decode graphs of one model, sharing one memory pool, dropped when its weights change.

    The weights are checked (a walk over all modules) once per new cache, i.e. once per `generate()` call.
    Graphs in the pool run one at a time and their outputs are consumed right after each replay, so one graph's
    temporaries may reuse another's memory. A copied or pickled model starts with no graphs (they are a cache).
    """

    def __init__(self):
        self.prefill_graphs: OrderedDict[tuple, GraphedCall] = OrderedDict()
        self.decode_graphs: OrderedDict[tuple, DecodeGraph] = OrderedDict()
        self.seen_prompts: OrderedDict[tuple, None] = OrderedDict()
        self.fingerprint = None
        self.checked_cache = None
        self.pool = None

    def __reduce__(self):
        return type(self), ()

    def _check_weights(self, model: torch.nn.Module, cache, device: torch.device) -> None:
        if self.checked_cache is not None and self.checked_cache() is cache:
            return
        fingerprint = weights_fingerprint(model)
        if fingerprint != self.fingerprint:
            self.prefill_graphs.clear()
            self.decode_graphs.clear()
            self.fingerprint = fingerprint
        self.checked_cache = weakref.ref(cache)
        if device.type == "cuda" and self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()

    def prefill(self, model, cache, input_ids, attention_mask, pixel_values):
        """Last-position logits (batch, 1, vocab) of a prompt, its final states stored in the empty `cache`; or None
        the first time a prompt shape is seen (the caller then runs eagerly).

        `model` provides `prefill_logits(input_ids, attention_mask, pixel_values, cache)` and `new_cache()`."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        pixels = None if pixel_values is None else (tuple(pixel_values.shape), pixel_values.dtype)
        key = (tuple(input_ids.shape), input_ids.device, attention_mask.dtype, pixels)
        if key not in self.prefill_graphs and key not in self.seen_prompts:
            self.seen_prompts[key] = None
            if len(self.seen_prompts) > 4 * MAX_PREFILL_GRAPHS:
                self.seen_prompts.popitem(last=False)
            return None
        self._check_weights(model, cache, input_ids.device)
        call = self.prefill_graphs.get(key)
        if call is None:
            def prefill(ids, mask, pixels):
                graph_cache = model.new_cache()
                return model.prefill_logits(ids, mask, pixels, graph_cache), cache_states(graph_cache)

            call = GraphedCall(prefill, [input_ids, attention_mask, pixel_values], input_ids.is_cuda, self.pool)
            self.prefill_graphs[key] = call
            if len(self.prefill_graphs) > MAX_PREFILL_GRAPHS:
                self.prefill_graphs.popitem(last=False)
        self.prefill_graphs.move_to_end(key)
        logits, states = call(input_ids, attention_mask, pixel_values)
        fill_cache(cache, states, model.config.text_config.conv_kernel)
        return logits.clone()

    def decode(self, model, input_ids: torch.Tensor, cache) -> torch.Tensor:
        """Next-token logits (batch, vocab) for one new token per sequence, advancing `cache` in place.

        `model` provides `decode_step(input_ids, states, decay_rates)` and `decay_rates()`."""
        conv, ssm = cache.layers[0].conv_states[0], cache.layers[0].recurrent_states[0]
        key = (input_ids.shape[0], input_ids.device, conv.dtype, ssm.dtype)
        graph = self.decode_graphs.get(key)
        if graph is None or not graph.is_bound_to(cache):
            self._check_weights(model, cache, input_ids.device)
            if key not in self.decode_graphs:
                self.decode_graphs[key] = DecodeGraph(
                    model.decode_step, model.decay_rates, input_ids, cache_states(cache), input_ids.is_cuda, self.pool
                )
                if len(self.decode_graphs) > MAX_DECODE_GRAPHS:
                    self.decode_graphs.popitem(last=False)[1].release()
            graph = self.decode_graphs[key]
            self.decode_graphs.move_to_end(key)
            graph.bind(cache)
        return graph.step(input_ids)
