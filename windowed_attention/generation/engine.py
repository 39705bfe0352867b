"""Generation kept apart from the model: prefill the prompts once, then decode one token per row per step.

`prefill` runs one forward over the prompts (right-padded, with their key padding mask when their lengths
differ) and keeps, per layer, a `KVCache` of only the keys the next token can see. `decode_step` feeds
the next token of every row through the model's own forward against those caches: O(window) time and
memory per token, whatever the length so far. With `use_abs_pos_emb=False` (rotary only) the model has
no maximum length, and `stream` can run indefinitely in constant memory. With `compile=True` each decode
step is that same forward compiled into one graph (`CompiledStep`), the eager step its fallback and reference.

Works with any causal token model whose `forward(x, mask=None, cache=None, return_cache=False)` follows
`LocalTransformer`'s (that class's `generate` calls this module; this module does not import it).

Prompts of different lengths: each row generates what its prompt alone generates. Greedy decoding gives
the same tokens; sampling with a `generator` draws every step's tokens for all rows at once, so a row's
samples follow the distribution of its prompt alone but equal those of a run of that prompt alone only
for a batch of one (a batch is reproducible for the same seed and prompts).
"""

from __future__ import annotations

import contextlib
import sys
import time
import types
import weakref
from typing import Callable, Iterator, Sequence

import torch

from ..compiling import inductor_options
from ..kv_cache import KVCache
from ..sampling import check_sampling, sample


def _check_model(model) -> torch.nn.Module:
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "max_seq_len") or not hasattr(model, "causal"):
        raise TypeError(f"model must be a windowed_attention.LocalTransformer, got {type(model).__name__}")
    if not model.causal:
        raise ValueError("model must be causal (causal=True) to generate")
    return model


def batch_prompts(prompt, name: str = "prompt") -> tuple[torch.Tensor, torch.Tensor | None]:
    """`(b, n)` or `(n,)` integer tensor, or a list of 1-D integer tensors of different lengths ->
    right-padded tokens `(b, n_max)` (long) and the lengths `(b,)`, or None when all rows are full."""
    if isinstance(prompt, torch.Tensor):
        if prompt.dtype.is_floating_point or prompt.dtype.is_complex or prompt.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor of token ids, got {prompt.dtype}")
        prompt = prompt[None] if prompt.ndim == 1 else prompt
        if prompt.ndim != 2 or prompt.shape[1] < 1:
            raise ValueError(f"{name} must have shape (b, n) with n >= 1, got {tuple(prompt.shape)}")
        return prompt.long(), None
    if not isinstance(prompt, Sequence) or isinstance(prompt, (str, bytes)) or not prompt:
        raise TypeError(f"{name} must be a (b, n) tensor or a non-empty list of 1-D tensors, got {type(prompt).__name__}")
    for index, row in enumerate(prompt):
        if not isinstance(row, torch.Tensor) or row.dtype.is_floating_point or row.dtype.is_complex or row.dtype == torch.bool:
            raise TypeError(f"{name}[{index}] must be an integer tensor of token ids, got {getattr(row, 'dtype', type(row).__name__)}")
        if row.ndim != 1 or row.numel() < 1:
            raise ValueError(f"{name}[{index}] must be 1-D with at least one token, got shape {tuple(row.shape)}")
        if row.device != prompt[0].device:
            raise ValueError(f"{name}[{index}] is on {row.device}, {name}[0] on {prompt[0].device}")
    lengths = torch.tensor([row.numel() for row in prompt], device=prompt[0].device)
    tokens = torch.nn.utils.rnn.pad_sequence([row.long() for row in prompt], batch_first=True)
    return tokens, lengths


def _check_count(max_new_tokens) -> int:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    return max_new_tokens


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module):
    """The model in eval mode inside the block only, so a suspended `stream` leaves it as it found it.

    A model already in eval mode is left alone: `train()` walks every submodule, which cost a sixth of a
    decoding step."""
    if not model.training:
        yield
        return
    model.eval()
    try:
        yield
    finally:
        model.train(True)


def _last(logits: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """Logits `(b, n, vocab)` -> those of each row's last real position `(b, vocab)`."""
    if lengths is None:
        return logits[:, -1]
    return logits[torch.arange(logits.shape[0], device=logits.device), lengths - 1]


@torch.no_grad()
def prefill(model, prompt: torch.Tensor, lengths: torch.Tensor | None = None,
            cache_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, list[KVCache]]:
    """One forward over `prompt` `(b, n)` (right-padded to `lengths` `(b,)` when given): the logits of
    each row's last position `(b, vocab)` and the per-layer caches (in `cache_dtype`: see the model's
    `forward`)."""
    mask = None
    if lengths is not None:
        mask = torch.arange(prompt.shape[1], device=prompt.device) < lengths[:, None]
    extra = {} if cache_dtype is None else {"cache_dtype": cache_dtype}  # a model without the option still works
    logits, caches = model(prompt, mask=mask, return_cache=True, **extra)
    return _last(logits, lengths), caches


def _step(model, token: torch.Tensor, caches: list[KVCache]) -> tuple[torch.Tensor, list[KVCache]]:
    """The decode step: the model's own forward with its caches (what `torch.compile` traces)."""
    logits, caches = model(token, cache=caches, return_cache=True)
    return logits[:, -1], caches


@torch.no_grad()
def decode_step(model, token: torch.Tensor, caches: list[KVCache],
                compile: bool = False) -> tuple[torch.Tensor, list[KVCache]]:
    """The next token of every row `(b, 1)` through the model against `caches`: its logits `(b, vocab)`
    and the new caches. `compile=True` runs the step as one compiled graph (`CompiledStep`)."""
    if compile:
        return CompiledStep.of(model)(token, caches)
    return _step(model, token, caches)


# the source names under which dynamo sees each cache's column in `_step`: symbolic from the first trace
_PENDING = object()  # a configuration whose first (eager) step ran: the next compiles
_COLUMNS = r"L\['caches'\]\[\d+\]\.column"


class CompiledStep:
    """The decode step of one model (`model(token, cache=caches, return_cache=True)`, the same forward) as one
    graph compiled by `torch.compile`: the embedding, every layer's projections, cache update and attention
    (our kernels as custom ops), the logits; gpt-fast's recipe. On CPU the graph runs from inductor's C++
    wrapper and calls our kernels' own ops (registered in C++ for CPU tensors: `ops.decode`, `ops.small_linear`,
    `ops.hyper`), so no Python runs between its kernels. What makes it one graph: the caches' buffers
    are static (a ring written in place), the one thing that moves, each cache's `column`, is a symbolic int
    of the graph, and the step takes no branch on it (traced code writes the key bias and the sink-token
    buffers at every step, computes the rotation of the position in the graph); the Python checks of an eager
    step (the weights, the claim on the buffers) run here before the graph.

    The graph is compiled once per model and static configuration (`_key`: the batch shape, autocast, the
    weights' dtype, the caches' shapes and dtypes, each row's start, the layers that own them), announced on stderr with the seconds it
    took. Its guards are left out (they cost a fifth of a step): `_key` is what they would check. Steps the
    graph does not take run eagerly, as the reference: a cache whose window grows (`ops.decode.decode_window`)
    or was detached, buffers that are inference tensors outside inference mode, a text past `max_seq_len`
    (the eager step raises), and the first step of every configuration (it checks what the graph will take
    on trust). Sampling stays outside the graph (a `torch.Generator` cannot enter it, and seeded sampling
    then draws as the eager step does).
    """

    _models: "weakref.WeakKeyDictionary[torch.nn.Module, CompiledStep]" = weakref.WeakKeyDictionary()

    def __init__(self, model: torch.nn.Module):
        self.model = weakref.ref(model)
        self.graphs: dict[tuple, Callable] = {}  # `_key` -> compiled step
        self.compile_seconds: list[float] = []  # of each compilation, in order
        self.eager_steps = 0  # steps this object handed to the eager step

    @classmethod
    def of(cls, model: torch.nn.Module) -> "CompiledStep":
        """The compiled step of `model` (one per model, kept while the model lives)."""
        step = cls._models.get(model)
        if step is None:
            step = cls._models[model] = cls(model)
        return step

    @staticmethod
    def _key(model, token: torch.Tensor, caches) -> tuple | None:
        """What the graph of a step specializes on, or None when the step is not the graph's to take."""
        if not isinstance(caches, (list, tuple)) or not caches or not all(isinstance(c, KVCache) for c in caches):
            return None
        grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()
        pos_emb = getattr(model, "pos_emb", None)
        if grad or model.training or (pos_emb is not None and caches[0].length + 1 > model.max_seq_len):
            return None
        device_type = token.device.type
        autocast = torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type)
        weights = next(model.parameters(), None)
        key = [tuple(token.shape), token.dtype, token.device, inference, torch.get_num_threads(), autocast,
               None if weights is None else weights.dtype]
        for cache in caches:
            constants = cache.constants
            if constants is None or cache.length >= constants.limit or (cache._k.is_inference() and not inference):
                return None
            owner = cache.weights[0].owner() if cache.weights else None
            key += [cache.signature, cache._k.shape, cache._k.dtype, cache._v.shape, cache._start_range,
                    cache.capacity, cache._held_from, cache.sink_tokens, constants.limit, constants.table.shape,
                    None if cache.attn_bias is None else cache.attn_bias.shape, id(owner)]
        return tuple(key)

    def __call__(self, token: torch.Tensor, caches: list[KVCache]) -> tuple[torch.Tensor, list[KVCache]]:
        """`decode_step(model, token, caches)`: logits `(b, vocab)` and the new caches."""
        model = self.model()
        key = self._key(model, token, caches)
        graph = None if key is None else self.graphs.get(key)
        if graph is None:
            if key is not None:  # the eager step checks what the graph will take on trust, then compile
                self.graphs[key] = _PENDING
            self.eager_steps += 1
            return _step(model, token, caches)
        caches[0].check_weights(model)
        for cache in caches:
            cache._claim()
        if graph is _PENDING:
            return self._compile(key, token, caches)
        return graph(model, token, caches)  # no guards: it never traces again

    def _compile(self, key: tuple, token: torch.Tensor, caches: list[KVCache]):
        """Compile the graph of `key` on this step (announced, timed); the eager step if compiling fails."""
        model = self.model()
        b = token.shape[0]
        print(f"windowed-attention: compiling the decode step (batch {b}, {len(caches)} layers; once per model and "
              f"batch shape; torch.compile, tens of seconds on a small CPU)", file=sys.stderr, flush=True)
        # `_step` under a code object of its own: dynamo keeps graphs by code object, and a graph without guards
        # must be reached by its own configuration alone
        step = types.FunctionType(_step.__code__.replace(), _step.__globals__, _step.__name__)
        # on CPU inductor's C++ wrapper launches the graph's kernels: no Python between them (docs/generation.md
        # has the figures; untried on CUDA, where it stays off); the vector width in the options keeps inductor's
        # on-disk cache from handing back code written for another width (`compiling`)
        options = {"guard_filter_fn": torch.compiler.skip_all_guards_unsafe,
                   "cpp_wrapper": token.device.type == "cpu", **inductor_options()}
        graph = torch.compile(step, fullgraph=True, dynamic=False, options=options)
        started = time.perf_counter()
        try:
            with torch.compiler.config.patch(dynamic_sources=_COLUMNS):
                out = graph(model, token, caches)
        except Exception as error:  # noqa: BLE001 - no compiler, an op dynamo cannot trace: decode eagerly
            print(f"windowed-attention: compiling the decode step failed ({type(error).__name__}: "
                  f"{str(error).splitlines()[0] if str(error) else ''}); decoding eagerly", file=sys.stderr, flush=True)
            self.graphs[key] = _step
            self.eager_steps += 1
            return _step(model, token, caches)
        seconds = time.perf_counter() - started
        self.compile_seconds.append(seconds)
        self.graphs[key] = _without_dynamo_entry(step, graph)
        print(f"windowed-attention: compiled the decode step in {seconds:.1f} s", file=sys.stderr, flush=True)
        return out


def _without_dynamo_entry(step: types.FunctionType, graph: Callable) -> Callable:
    """What `graph` (`torch.compile` of `step`, compiled) runs, without dynamo's entry: the code dynamo made of
    `step` (it gathers the weights and caches' tensors, calls the compiled graph, builds the new caches) as a
    plain function. The graph has no guards, so that code is all a call of `graph` runs past dynamo's entry,
    which costs a tenth of a README model's step (0.04 ms). `graph` itself where dynamo keeps not exactly one
    such code (its private record, `_debug_get_cache_entry_list`, may change between torch versions)."""
    try:
        entries = torch._C._dynamo.eval_frame._debug_get_cache_entry_list(step.__code__)
        code = entries[0].code if len(entries) == 1 else None
    except (AttributeError, RuntimeError, TypeError):
        return graph
    if not isinstance(code, types.CodeType) or code.co_argcount != step.__code__.co_argcount or \
            code.co_varnames[:code.co_argcount] != step.__code__.co_varnames[:code.co_argcount]:
        return graph
    # the globals the code reads, as they are now: among them the compiled graph dynamo installed for it
    # (`torch._dynamo.reset()` may remove that from the module, not from here), and no other model's graph
    names = step.__globals__
    scope = {name: names[name] for name in code.co_names if name in names}
    scope["__builtins__"] = names["__builtins__"]
    return types.FunctionType(code, scope, step.__name__)


def cache_nbytes(caches: list[KVCache]) -> int:
    """Bytes held by all layers' caches."""
    return sum(cache.nbytes() for cache in caches)


@torch.no_grad()
def stream(model, prompt, max_new_tokens: int | None, *, temperature: float = 1.0, filter_thres: float = 0.9,
           top_p: float | None = None, generator: torch.Generator | None = None,
           on_caches: Callable[[int, list[KVCache]], None] | None = None,
           use_cache: bool = True, cache_dtype: torch.dtype | None = None,
           compile: bool = False) -> Iterator[torch.Tensor]:
    """Yield new tokens `(b, 1)` one by one after `prompt` (a `(b, n)` tensor or a list of 1-D prompts of
    different lengths); `max_new_tokens=None` never stops (needs a model without absolute positions to
    run past `max_seq_len`).

    `temperature=0` is greedy; `filter_thres` keeps the top `1 - filter_thres` of the vocabulary (top-k);
    `top_p` adds nucleus filtering. `on_caches(step, caches)` is called after each decode step.
    `use_cache=False` runs the whole sequence through the model at every step (same tokens, for testing).
    `cache_dtype=torch.bfloat16` (a float32 model) keeps the caches in bfloat16: half the memory and the
    bytes a step reads, but not exact (the keys and values are rounded), so not the tokens of `use_cache=False`.
    `compile=True` runs each decode step as one compiled graph (`CompiledStep`: compiled once per model and
    batch shape, announced on stderr; the same tokens as the eager step, which it falls back to).
    """
    model = _check_model(model)
    if not isinstance(compile, bool):
        raise TypeError(f"compile must be a bool, got {type(compile).__name__}")
    tokens, lengths = batch_prompts(prompt)
    check_sampling(temperature, filter_thres, top_p)
    if cache_dtype is not None and not isinstance(cache_dtype, torch.dtype):
        raise TypeError(f"cache_dtype must be a torch.dtype or None, got {type(cache_dtype).__name__}")
    longest = tokens.shape[1]
    if max_new_tokens is not None:
        _check_count(max_new_tokens)
        if model.use_abs_pos_emb and longest + max_new_tokens - 1 > model.max_seq_len:
            raise ValueError(
                f"prompt length {longest} + max_new_tokens {max_new_tokens} - 1 exceeds max_seq_len = "
                f"{model.max_seq_len} (a model with use_abs_pos_emb=False has no limit)"
            )
    if max_new_tokens == 0:
        return
    if not use_cache:
        if cache_dtype is not None:
            raise ValueError("cache_dtype needs the KV cache (use_cache=True; a model with global layers decodes without one)")
        yield from _stream_uncached(model, tokens, lengths, max_new_tokens, temperature, filter_thres, top_p, generator)
        return
    with _eval_mode(model):
        logits, caches = prefill(model, tokens, lengths, cache_dtype)
    step = 0
    while True:
        token = sample(logits, temperature, filter_thres, top_p, generator)
        yield token
        step += 1
        if max_new_tokens is not None and step >= max_new_tokens:
            return
        with _eval_mode(model):
            logits, caches = decode_step(model, token, caches, compile)
        if on_caches is not None:
            on_caches(step, caches)


def _stream_uncached(model, tokens, lengths, max_new_tokens, temperature, filter_thres, top_p, generator):
    """`stream` without a cache: each step is a full forward over every row's tokens so far."""
    b = tokens.shape[0]
    lengths = torch.full((b,), tokens.shape[1], device=tokens.device) if lengths is None else lengths.clone()
    rows = torch.arange(b, device=tokens.device)
    step, prompt = 0, tokens.shape[1]
    while True:
        end = int(lengths.max()) if b else prompt + step  # an empty batch: no row to take the longest of
        if tokens.shape[1] < end + 1:  # room for this step's tokens (right padding)
            tokens = torch.cat((tokens, tokens.new_zeros(b, max(end + 1 - tokens.shape[1], 64))), dim=1)
        with _eval_mode(model):
            logits = model(tokens[:, :end])[rows, lengths - 1]
        token = sample(logits, temperature, filter_thres, top_p, generator)
        yield token
        tokens[rows, lengths] = token[:, 0]
        lengths += 1
        step += 1
        if max_new_tokens is not None and step >= max_new_tokens:
            return


@torch.no_grad()
def generate(model, prompt, max_new_tokens: int, *, temperature: float = 1.0, filter_thres: float = 0.9,
             top_p: float | None = None, generator: torch.Generator | None = None,
             use_cache: bool = True, cache_dtype: torch.dtype | None = None, compile: bool = False) -> torch.Tensor:
    """Sample `max_new_tokens` tokens after `prompt` (a `(b, n)` tensor or a list of 1-D prompts of
    different lengths) with the rolling KV cache; returns `(b, max_new_tokens)`.

    Gives the same tokens as `use_cache=False` (a full forward per token), except with a reduced
    `cache_dtype` (see `stream`). `compile=True`: each decode step is one compiled graph (see `stream`)."""
    if max_new_tokens is None:
        raise ValueError("max_new_tokens must be an int >= 0 (use stream() to generate without end)")
    _check_count(max_new_tokens)
    tokens, _ = batch_prompts(prompt)
    out = torch.empty(tokens.shape[0], max_new_tokens, dtype=torch.long, device=tokens.device)
    for index, token in enumerate(stream(model, prompt, max_new_tokens, temperature=temperature,
                                         filter_thres=filter_thres, top_p=top_p, generator=generator,
                                         use_cache=use_cache, cache_dtype=cache_dtype, compile=compile)):
        out[:, index:index + 1] = token
    return out
