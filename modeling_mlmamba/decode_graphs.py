"""CUDA-graph decoding: the language model's one-token step captured once per batch size and replayed.

A Mamba-2 decode step has fixed-size state, so it can run as one CUDA graph instead of ~20 kernel launches
per layer from Python. Each `DecodeGraph` owns state buffers for one batch size; at the first decode step
of a `generate()` call the cache's states are copied into those buffers and the cache is pointed at them,
so the cache stays the live state and the graph updates it in place.
"""

import weakref

import torch


def cache_states(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's (conv_state, ssm_state) of a transformers recurrent cache."""
    return [(layer.conv_states[0], layer.recurrent_states[0]) for layer in cache.layers]


def set_cache_states(cache, states) -> None:
    for layer, (conv_state, ssm_state) in zip(cache.layers, states):
        layer.conv_states[0] = conv_state
        layer.recurrent_states[0] = ssm_state


def weights_fingerprint(module: torch.nn.Module) -> tuple:
    """Changes when any weight is replaced or moved (new module, new storage), which stales a captured graph."""
    return tuple((id(m), tuple(p.data_ptr() for p in m.parameters(recurse=False))) for m in module.modules())


class DecodeGraph:
    """One decode step for one batch size: static token input, static states, static logits output."""

    def __init__(self, decode_step, input_ids: torch.Tensor, template_states, capture: bool, pool=None):
        self.decode_step = decode_step
        self.input_ids = torch.zeros_like(input_ids[:, 0])
        self.states = [(torch.zeros_like(conv), torch.zeros_like(ssm)) for conv, ssm in template_states]
        self.bound_cache = None
        self.graph = None
        self.logits = None
        if capture:
            self._capture(pool)

    def _run(self):
        self.logits = self.decode_step(self.input_ids, self.states)

    def _capture(self, pool):
        # Warm-up on a side stream compiles Triton kernels and creates library handles outside the capture;
        # it scribbles on the zero state buffers, which `bind` overwrites anyway.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._run()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self._run()

    def is_bound_to(self, cache) -> bool:
        return cache.layers[0].conv_states[0] is self.states[0][0]

    def bind(self, cache) -> None:
        """Make `cache` use this graph's buffers. A previously bound cache that is still alive keeps a copy."""
        previous = self.bound_cache() if self.bound_cache is not None else None
        if previous is not None and previous is not cache and self.is_bound_to(previous):
            set_cache_states(previous, [(conv.clone(), ssm.clone()) for conv, ssm in self.states])
        for (conv_buffer, ssm_buffer), (conv, ssm) in zip(self.states, cache_states(cache)):
            conv_buffer.copy_(conv)
            ssm_buffer.copy_(ssm)
        set_cache_states(cache, self.states)
        self.bound_cache = weakref.ref(cache)

    def step(self, input_ids: torch.Tensor) -> torch.Tensor:
        self.input_ids.copy_(input_ids[:, 0])
        if self.graph is not None:
            self.graph.replay()
        else:
            self._run()
        return self.logits.clone()


class DecodeGraphs:
    """The graphs of one model, keyed by batch size and state dtypes; rebuilt when the weights change."""

    def __init__(self, decode_step, module: torch.nn.Module):
        self.decode_step = decode_step
        self.module = module
        self.graphs: dict[tuple, DecodeGraph] = {}
        self.fingerprint = None
        self.pool = None

    def step(self, input_ids: torch.Tensor, cache) -> torch.Tensor:
        """Next-token logits (batch, vocab) for one new token per sequence, advancing `cache` in place."""
        conv, ssm = cache.layers[0].conv_states[0], cache.layers[0].recurrent_states[0]
        key = (input_ids.shape[0], input_ids.device, conv.dtype, ssm.dtype)
        graph = self.graphs.get(key)
        if graph is None or not graph.is_bound_to(cache):
            graph = self._graph_for(key, input_ids, cache)
            graph.bind(cache)
        return graph.step(input_ids)

    def _graph_for(self, key, input_ids, cache) -> DecodeGraph:
        fingerprint = weights_fingerprint(self.module)
        if fingerprint != self.fingerprint:
            self.graphs.clear()
            self.fingerprint = fingerprint
        if key not in self.graphs:
            capture = input_ids.is_cuda
            if capture and self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            self.graphs[key] = DecodeGraph(self.decode_step, input_ids, cache_states(cache), capture, self.pool)
        return self.graphs[key]
