"""CUDA graphs for generation: the prefill forward per prompt shape and the one-token decode step per batch size.

Launched op by op from Python, a 2.7B Mamba-2 spends most of its time on the host: ~20 small kernels per
layer and Triton's per-launch overhead (a 760-token LM prefill measured ~100 ms of CPU time for ~10 ms of
GPU work). Captured graphs replay all of it in one launch.

Decode: each decode graph owns state buffers for one batch size; at the first decode step of a
`generate()` call the cache's states are copied into them and the cache is pointed at them, so the cache stays
the live state. Prefill: a prompt shape is captured the second time it is seen (a one-off shape runs eagerly
and pays no capture); the graph records the model's own eager `forward`, and the final states it produces are
handed to the caller's cache. Replays run exactly the kernels of the eager path, so results are bit-identical with
and without graphs.

The model's `forward` asks `GenerationGraphs.replay` once per call; everything about when a graph serves a call
(which inputs, which devices, training or not, weights offloaded or not) is decided here, in `route`.

Graphs hold raw pointers to the weights: they are dropped when any weight is replaced, moved or cast (peft's
`merge_and_unload`, `.to(dtype)`, a device move; `load_state_dict` copies in place and keeps them valid). A capture
that fails is ended cleanly, and that shape runs eagerly from then on.
"""

import weakref
from collections import OrderedDict

import torch
from transformers import DynamicCache
from transformers.utils import logging

from .gemv import DENSE_TYPES
from .quantization import capturable_kinds, layer_capturable

logger = logging.get_logger(__name__)

MAX_PREFILL_GRAPHS = 8
MAX_DECODE_GRAPHS = 4
# Device types whose calls are captured as CUDA graphs; elsewhere a "graph" runs its function eagerly on the same
# static buffers, so everything around the capture is exercised there too.
CAPTURE_DEVICE_TYPES = ("cuda",)


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


# Arguments whose neutral values differ from "unset or off": `generate()` passes them switched on.
NEUTRAL_VALUES = {"use_cache": (None, True), "return_dict": (None, True)}


def is_neutral(name: str, value) -> bool:
    """Whether a forward argument leaves the call a plain generation step."""
    return any(value is neutral for neutral in NEUTRAL_VALUES.get(name, (None, False)))


def weights_state(model: torch.nn.Module) -> tuple[tuple, bool]:
    """(fingerprint, capturable) of `model`'s weights, in one pass over its modules' own tensors.

    The fingerprint changes when any module, weight or buffer is replaced, moved or cast (new module, new storage, new
    dtype), which stales a captured graph. Capturable means a graph may record the model: every layer's kernels can be
    captured (`quantization.layer_capturable`) and no module is run by accelerate's hooks (a `device_map` over several
    devices, "cpu" or "disk" offloading, `cpu_offload` of any part), which bring weights to the device only around
    that module's `forward`, where a replayed graph would not call them.

    It runs once per `generate()` call, before the prefill, so its host time is part of the time to first token: the
    walk reads the modules' dicts directly (`modules()`, `parameters()` and `hasattr` on ~1200 modules cost
    milliseconds), and asks `layer_capturable` only about the modules that are not plainly capturable (a weight that
    is not a dense float tensor, a bitsandbytes layer, an accelerate hook).
    """
    kinds = capturable_kinds()
    bnb_layers = kinds[0]
    fingerprint, capturable, modules = [], True, [model]
    for module in modules:  # grows as children are found: breadth first
        if module is None:  # a child slot registered as None
            continue
        attributes = module.__dict__  # where nn.Module keeps its dicts, and accelerate its `_hf_hook`
        fingerprint.append(id(module))
        children = attributes["_modules"]
        if children:
            modules.extend(children.values())
        dense = True  # `gemv.is_dense_weight` of every weight, inline: this walk is on the time to first token
        for weight in attributes["_parameters"].values():
            if weight is not None:
                fingerprint.append((weight.data_ptr(), weight.dtype, weight.device))
                dense = dense and type(weight) in DENSE_TYPES and weight.is_floating_point()
        for buffer in attributes["_buffers"].values():
            if buffer is not None:
                fingerprint.append((buffer.data_ptr(), buffer.dtype, buffer.device))
        hooked = "_hf_hook" in attributes
        if capturable and (not dense or hooked or (bnb_layers is not None and isinstance(module, bnb_layers))):
            capturable = not hooked and layer_capturable(module, kinds)
    return tuple(fingerprint), capturable


class GraphCaptureError(RuntimeError):
    """A CUDA graph capture failed; the capture has been ended and discarded."""


def capture_graph(fn, inputs, pool):
    """(graph, outputs) of fn(*inputs) captured on a side stream, after two warm-up calls there (they compile
    Triton kernels and create library handles outside the capture; their errors are the model's and propagate).

    A failed capture (an operation a graph cannot record, such as a host sync) leaves CUDA capturing, the RNG in
    capture mode and the side stream current unless it is ended: it is ended and discarded here, the caller's
    stream restored, and GraphCaptureError raised.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(side):
        for _ in range(2):
            fn(*inputs)
        torch.cuda.synchronize()
        try:
            graph.capture_begin(pool=pool)
            try:
                outputs = fn(*inputs)
            finally:
                graph.capture_end()
        except Exception as error:
            graph.reset()
            end_rng_capture_mode()
            raise GraphCaptureError(f"CUDA graph capture failed: {error}") from error
    torch.cuda.current_stream().wait_stream(side)
    return graph, outputs


def end_rng_capture_mode() -> None:
    """A failed capture can leave the CUDA RNG in capture mode (PyTorch 2.11 ends it only in a successful capture's
    epilogue), and the next random number then raises; a trivial capture that succeeds ends it."""
    scratch = torch.zeros(1, device="cuda")
    with torch.cuda.graph(torch.cuda.CUDAGraph()):
        scratch.add_(1)


class GraphedCall:
    """fn(*inputs) captured once with static input buffers; calls copy new inputs in and replay.

    On devices outside CAPTURE_DEVICE_TYPES (CPU tests) the same buffers are used and fn runs eagerly.
    """

    def __init__(self, fn, example_inputs, pool=None):
        self.fn = fn
        self.inputs = [None if x is None else x.clone() for x in example_inputs]
        self.graph = self.outputs = None
        if self.inputs[0].device.type in CAPTURE_DEVICE_TYPES:
            self.graph, self.outputs = capture_graph(fn, self.inputs, pool)

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

    def __init__(self, decode_step, decay_rates, input_ids, template_states, pool=None):
        self.states = [(torch.zeros_like(conv), torch.zeros_like(ssm)) for conv, ssm in template_states]
        self.decay_rates = decay_rates
        self.rates = [rate.clone() for rate in decay_rates()]
        self.call = GraphedCall(lambda ids: decode_step(ids, self.states, self.rates), [input_ids[:, 0]], pool)
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
        """Make `cache` use this graph's buffers; a previously bound cache keeps a copy of its states.

        Once per `generate()` call, at its first decode step: each group of same-dtype copies is one `_foreach_copy_`
        (a few kernel launches on CUDA instead of one per tensor, ~200 at full size)."""
        self.release()
        states = cache_states(cache)
        for pick in (0, 1):  # the conv states, then the SSM states
            torch._foreach_copy_([pair[pick] for pair in self.states], [pair[pick] for pair in states])
        torch._foreach_copy_(self.rates, self.decay_rates())
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
        self.running = False
        self.prefill_graphs: OrderedDict[tuple, GraphedCall] = OrderedDict()
        self.decode_graphs: OrderedDict[tuple, DecodeGraph] = OrderedDict()
        self.seen_prompts: OrderedDict[tuple, None] = OrderedDict()
        self.failed_captures: set[tuple] = set()
        self.fingerprint = None
        self.checked_cache = None
        self.pool = None
        self.capturable = None

    def __reduce__(self):
        return type(self), ()

    def _check_weights(self, model: torch.nn.Module, cache) -> bool:
        """Whether a graph may record the model (`weights_state`); every graph is dropped when the weights
        changed. Walked once per cache, i.e. once per `generate()` call, not per token."""
        if self.checked_cache is None or self.checked_cache() is not cache:
            fingerprint, self.capturable = weights_state(model)
            if fingerprint != self.fingerprint:
                self.prefill_graphs.clear()
                self.decode_graphs.clear()
                self.failed_captures.clear()
                self.fingerprint = fingerprint
            self.checked_cache = weakref.ref(cache)
        return self.capturable

    def _shared_pool(self):
        """The memory pool of the live graphs, or a fresh one when none is alive: PyTorch releases a pool with its
        last graph, and capturing into a released pool fails."""
        if not self.prefill_graphs and not self.decode_graphs:
            self.pool = torch.cuda.graph_pool_handle()
        return self.pool

    def _build(self, kind: str, key: tuple, device: torch.device, make):
        """make(pool) -> the graph for `key`; None when its capture fails now (with a warning) or failed before."""
        if (kind, key) in self.failed_captures:
            return None
        try:
            return make(self._shared_pool() if device.type in CAPTURE_DEVICE_TYPES else None)
        except GraphCaptureError as error:
            self.failed_captures.add((kind, key))
            logger.warning(f"{error}; {kind} calls of this shape run eagerly from now on")
            return None

    def route(self, model, cache, input_ids=None, logits_to_keep=0, attention_mask=None, pixel_values=None,
              **other_inputs) -> str | None:
        """"decode" or "prefill" when a graph can serve this forward call, else None (it runs eagerly).

        Graphs serve inference of input ids (batch, length) with a cache on a graph device (other inputs run eagerly,
        where the model's checks refuse them clearly), asking for nothing beyond the logits, with all weights in place
        (not dispatched or offloaded by accelerate) and kernels that can be captured: any other argument that is set
        declines, so a new forward argument can never slip past. A decode step is one token continuing the cache,
        without images; a prefill is `generate()`'s first call (empty cache, last logits only).
        """
        if (
            self.running
            or not model.config.use_cuda_graphs
            or not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2
            or input_ids.device.type not in model.cuda_graph_devices
            or cache is None
            or model.training
            or torch.is_grad_enabled()
            or getattr(cache.layers[0], "record_past", False)
            or not all(is_neutral(name, value) for name, value in other_inputs.items())
            or not self._check_weights(model, cache)
        ):
            return None
        if cache.has_previous_state(0):
            return "decode" if input_ids.shape[1] == 1 and pixel_values is None else None
        return "prefill" if isinstance(logits_to_keep, int) and logits_to_keep == 1 else None

    def replay(self, model, cache, input_ids=None, attention_mask=None, pixel_values=None, **other_inputs):
        """Logits (batch, 1, vocab) from a captured graph, advancing `cache`; None when the call must run eagerly."""
        route = self.route(model, cache, input_ids=input_ids, attention_mask=attention_mask,
                           pixel_values=pixel_values, **other_inputs)
        if route == "decode":
            logits = self.decode(model, input_ids, cache)
            return None if logits is None else logits[:, None]
        if route == "prefill":
            return self.prefill(model, cache, input_ids, attention_mask, pixel_values)
        return None

    def prefill(self, model, cache, input_ids, attention_mask, pixel_values):
        """Last-position logits (batch, 1, vocab) of a prompt, its final states stored in the empty `cache`; or None
        the first time a prompt shape is seen, or when its capture failed (the caller then runs eagerly).

        The graph records `model(...)` itself with a fresh cache; the inputs are checked here, before any replay, since
        the checks of their values (a host sync) are skipped inside a capture. Those checks also say whether the mask
        pads at all: an unpadded prompt (generate() drops a mask of ones) replays a graph captured without a mask, so
        it skips the mask's two full-width products per layer that a graph replayed with other masks must keep."""
        padding = model.model.check_inputs(input_ids=input_ids, pixel_values=pixel_values,
                                           attention_mask=attention_mask, cache=cache)
        mask = None if padding == "none" else attention_mask
        pixels = None if pixel_values is None else (tuple(pixel_values.shape), pixel_values.dtype)
        key = (tuple(input_ids.shape), input_ids.device, None if mask is None else mask.dtype, pixels)
        if key not in self.prefill_graphs and key not in self.seen_prompts:
            self.seen_prompts[key] = None
            if len(self.seen_prompts) > 4 * MAX_PREFILL_GRAPHS:
                self.seen_prompts.popitem(last=False)
            return None
        call = self.prefill_graphs.get(key)
        if call is None:
            def prefill(ids, mask, pixels):
                graph_cache = DynamicCache(config=model.config.text_config)
                logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, cache=graph_cache,
                               logits_to_keep=1).logits
                return logits, cache_states(graph_cache)

            call = self._build("prefill", key, input_ids.device, lambda pool: GraphedCall(
                self._exclusive(prefill), [input_ids, mask, pixel_values], pool
            ))
            if call is None:
                return None
            self.prefill_graphs[key] = call
            if len(self.prefill_graphs) > MAX_PREFILL_GRAPHS:
                self.prefill_graphs.popitem(last=False)
        self.prefill_graphs.move_to_end(key)
        logits, states = call(input_ids, mask, pixel_values)
        fill_cache(cache, states, model.config.text_config.conv_kernel)
        return logits.clone()

    def _exclusive(self, fn):
        """fn with `route` declining meanwhile, so the model's forward inside a capture runs eagerly."""
        def call(*inputs):
            self.running = True
            try:
                return fn(*inputs)
            finally:
                self.running = False

        return call

    def decode(self, model, input_ids: torch.Tensor, cache) -> torch.Tensor | None:
        """Next-token logits (batch, vocab) for one new token per sequence, advancing `cache` in place; None when this
        batch size's capture failed (the caller then runs eagerly).

        The step runs the language model's `step` (explicit state tensors, no cache object) and the model's head."""
        conv, ssm = cache.layers[0].conv_states[0], cache.layers[0].recurrent_states[0]
        fused = model.config.use_fused_decode_step
        key = (input_ids.shape[0], input_ids.device, conv.dtype, ssm.dtype, fused)
        graph = self.decode_graphs.get(key)
        if graph is None or not graph.is_bound_to(cache):
            if key not in self.decode_graphs:
                language_model = model.model.language_model

                def decode_step(ids, states, rates):
                    return model.compute_logits(language_model.step(ids, states, rates, fused))

                graph = self._build("decode", key, input_ids.device, lambda pool: DecodeGraph(
                    decode_step, language_model.decay_rates, input_ids, cache_states(cache), pool
                ))
                if graph is None:
                    return None
                self.decode_graphs[key] = graph
                if len(self.decode_graphs) > MAX_DECODE_GRAPHS:
                    self.decode_graphs.popitem(last=False)[1].release()
            graph = self.decode_graphs[key]
            self.decode_graphs.move_to_end(key)
            graph.bind(cache)
        return graph.step(input_ids)
