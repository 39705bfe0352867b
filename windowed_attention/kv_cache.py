"""`KVCache`: the keys and values a causal local-attention layer still needs for decoding.

A query sees at most `capacity` earlier keys (`look_backward * w` with exact windows, else
`look_backward * w + w - 1`), so the cache keeps only those: memory is O(window) per layer, however long
generation runs.

Rows of a batch may hold different numbers of positions (prompts of different lengths). Every row
advances one *column* per step; row `r`'s position `p` sits in column `p + start[r]`, so a step writes
the same slot in every row. Storage is a preallocated ring of `slots = capacity + 1` columns, written
twice (at `c % slots` and `c % slots + slots`), so the last `slots` columns, oldest first, are always one
contiguous slice: a step is a few small copies and hands back views. Slots that hold no key yet (before a
row's first position) are marked by `key_bias` (-inf; not needed once every visible slot holds a key).

Sink tokens (`sink_tokens=S`, StreamingLLM): the keys and values of each row's first `S` positions are also
kept, forever, in buffers of their own `(b, h, S, d)` beside the ring (`sink_buffers`); the entry of
position `j` is written at prefill or by the step that writes position `j` (so for every row, however
long its prompt). Which of them a query sees is the owning layer's rule (`ops.decode.sink_row`).

Autograd: a step writes the buffers in place only where no graph can hold them. `update` in grad mode
writes into copies, so every earlier step's saved window stays as it was and a loss over any number of
steps backpropagates; so does any step on buffers that require grad (a recorded step's, which some graph
may still hold) or on inference tensors outside inference mode (after that one copy, the steps under
`torch.no_grad()` or `torch.inference_mode()` are in place again). The copies chain each step's graph
onto the last: the cache holds its whole history until `detach()` cuts it.

Weights: the module whose forward built a cache ties it to its parameters (`Weights`), and each step
checks that it is that module and its parameters are unchanged since (`check_weights`): keys computed
with other weights would give a wrong result without a word.

Traced code (torch.compile: the compiled decode step, `generation.engine.CompiledStep`) runs the same
`update`/`advance` with no branch on the column, the one value that moves: it writes the buffers through
`narrow` (the column stays symbolic), writes the key bias and the sink-token buffers at every step, and
leaves the checks on Python state (`check_weights`, `_claim`, inference tensors) to the compiled step,
which makes them before the graph.
"""

from __future__ import annotations

import operator
import weakref

import torch

_version = operator.attrgetter("_version")


def _lay_out(columns: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, empty: torch.Tensor, slots: int,
             bias_dtype: torch.dtype, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """New ring buffers of `slots` columns `(b, h, 2 * slots, d)` in `dtype` holding `keys` and `values`
    `(b, h, m, d)` at `columns` `(m,)` (each written twice, see the module docstring), and the key bias
    `(b, 1, 2 * slots)`: -inf everywhere but where a row holds a key (not `empty` `(b, m)`)."""
    slot = columns % slots
    buffers = []
    for source in (keys.to(dtype), values.to(dtype)):
        buffer = source.new_zeros(*source.shape[:-2], 2 * slots, source.shape[-1])
        buffer[..., slot, :] = source
        buffer[..., slot + slots, :] = source
        buffers.append(buffer)
    key_bias = torch.full((keys.shape[0], 1, 2 * slots), float("-inf"), dtype=bias_dtype, device=keys.device)
    bias = torch.zeros(empty.shape, dtype=bias_dtype, device=keys.device).masked_fill(empty, float("-inf"))
    key_bias[:, 0, slot] = bias
    key_bias[:, 0, slot + slots] = bias
    return buffers[0], buffers[1], key_bias


class Weights:
    """The parameters of the module that built a cache, and their versions then (`Tensor._version`: every
    in-place change bumps it, an optimizer step's or `load_state_dict`'s `copy_`).

    A check reads one version per parameter (what it costs: `examples/decode_speed.py --weights-check`). It
    does not see writes through `.data` (outside autograd's counters) nor parameters replaced by new
    objects (`load_state_dict(assign=True)`, assigning a new `Parameter`); parameters that are inference
    tensors (a model built under `torch.inference_mode()`) keep no version, and only the module is checked.
    """

    __slots__ = ("owner", "params", "versions")

    def __init__(self, owner: torch.nn.Module):
        self.owner = weakref.ref(owner)  # the module itself (a dead reference is no module)
        params = tuple(owner.parameters())
        self.params = () if any(p.is_inference() for p in params) else params
        self.versions = tuple(map(_version, self.params))

    def renewed(self) -> "Weights":
        """The same module's parameters at their versions now."""
        record = object.__new__(Weights)
        record.owner, record.params = self.owner, self.params
        record.versions = tuple(map(_version, self.params))
        return record

    def changed(self) -> bool:
        """Whether a parameter was changed in place since the record."""
        return tuple(map(_version, self.params)) != self.versions


def storage_dtype(dtype: torch.dtype, cache_dtype) -> torch.dtype:
    """The dtype a cache of keys computed in `dtype` stores them in, by the `cache_dtype` asked for: None or
    `dtype` itself (exact), or, for float32 keys, `torch.bfloat16`: half the memory and half the bytes a
    decode step reads, the keys and values rounded to bfloat16 once, on the way in (the range kept;
    float16 is refused, as it would turn large keys into inf)."""
    if cache_dtype is None or cache_dtype == dtype:
        return dtype
    if not isinstance(cache_dtype, torch.dtype):
        raise TypeError(f"cache_dtype must be a torch.dtype or None, got {type(cache_dtype).__name__}")
    if dtype == torch.float32 and cache_dtype == torch.bfloat16:
        return cache_dtype
    raise ValueError(
        f"cache_dtype must be None, the model's dtype ({dtype}) or, for a float32 model, torch.bfloat16; "
        f"got {cache_dtype}"
    )


class KVCache:
    """Keys and values `(b, h, slots, d)` of the last `slots` columns and each row's next position.

    The cache stores keys as the attention uses them (the owning layer decides: ours are rotated to their
    absolute position), and carries `constants`, what the owning layer computed once for the generation
    (opaque to the cache), `signature`, the layer configuration it was built for, and `attn_bias`, the
    position bias the layer was given at prefill (decode steps that pass the same tensor reuse its table).

    The one verb is `update` (`advance` is its bookkeeping half, for a fused step that writes the
    buffers itself); it writes into the shared buffers, so after `cache.update(...)` only the returned
    cache is valid for further updates (decoding is a single line of history). `weights`: the records
    (`Weights`) of the modules that built it, innermost first (`tie`, `check_weights`). `detach()` cuts
    the autograd history (see the module docstring).
    """

    def __init__(self, k_buffer, v_buffer, key_bias, start, column: int, capacity: int,
                 start_range: tuple[int, int], constants=None, signature=None, attn_bias=None,
                 newest: list[int] | None = None, held_from: int = 0, sinks=None, weights: tuple = ()):
        self._k, self._v, self._key_bias = k_buffer, v_buffer, key_bias  # (b, h, 2 * slots, d), (b, 1, 2 * slots)
        self._start = start  # (b,) long: the column of each row's position 0
        self._start_range = start_range  # (min, max) of start, as ints
        self.column, self.capacity = column, capacity
        self.constants, self.signature, self.attn_bias = constants, signature, attn_bias
        # The column of the newest cache on these buffers, shared by all of them: an older cache's slots
        # may have been overwritten, so updating it again is refused.
        self._newest = [column] if newest is None else newest
        self._held_from = held_from  # columns before it hold no key in any row (older than a resize kept)
        self._sinks = sinks  # None, or the keys and values (b, h, S, d) of each row's first S positions
        self.weights = weights

    @property
    def sink_tokens(self) -> int:
        """How many first positions of each row the cache keeps beside the ring (0: none)."""
        return 0 if self._sinks is None else self._sinks[0].shape[-2]

    @property
    def sink_buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values `(b, h, S, d)` of each row's positions `0 .. S - 1` (an entry past what a row has
        seen holds no key yet: `ops.decode.sink_row` hides it)."""
        if self._sinks is None:
            raise ValueError("sink_tokens: this cache keeps no sink tokens")
        return self._sinks

    @property
    def slots(self) -> int:
        return self.capacity + 1

    @property
    def batch(self) -> int:
        return self._k.shape[0]

    @property
    def heads(self) -> int:
        return self._k.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the keys and values are stored in."""
        return self._k.dtype

    @property
    def device(self) -> torch.device:
        return self._k.device

    @property
    def head_dims(self) -> tuple[int, int]:
        return self._k.shape[-1], self._v.shape[-1]

    @property
    def positions(self) -> torch.Tensor:
        """`(b,)` long: the position of each row's next token (= how many positions the row has seen)."""
        return self.column - self._start

    @property
    def length(self) -> int:
        """Positions seen by the longest row (every row, when all prompts had the same length)."""
        return self.column - self._start_range[0]

    @classmethod
    def from_prefill(cls, k: torch.Tensor, v: torch.Tensor, capacity: int, lengths: torch.Tensor | None = None,
                     constants=None, signature=None, attn_bias=None,
                     compute_dtype: torch.dtype | None = None, dtype: torch.dtype | None = None,
                     sink_tokens: int = 0) -> "KVCache":
        """Cache after a forward over `k, v` `(b, h, n, d)`, keeping each row's last `capacity` positions.

        `lengths` `(b,)`: how many leading positions of each row are real (right padding; default all
        `n`). `compute_dtype`: the dtype of `key_bias` (default k's). `dtype`: the dtype the keys and
        values are stored in (default k's; a narrower one rounds them once, on the way in). `sink_tokens`:
        how many first positions of each row to keep besides the ring, forever."""
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
            raise ValueError(f"capacity must be an int >= 0, got {capacity!r}")
        if isinstance(sink_tokens, bool) or not isinstance(sink_tokens, int) or sink_tokens < 0:
            raise ValueError(f"sink_tokens must be an int >= 0, got {sink_tokens!r}")
        b, n, slots = k.shape[0], k.shape[-2], capacity + 1
        if lengths is None:
            lengths = torch.full((b,), n, dtype=torch.long, device=k.device)
        start = n - lengths.to(device=k.device, dtype=torch.long)  # row r's position p is column p + start[r]
        # the ring holds the last `slots` columns (the next query sees the last `capacity` of them; `resized`
        # carries all `slots`)
        columns = torch.arange(max(n - slots, 0), n, device=k.device)
        positions = columns[None, :] - start[:, None]  # (b, m); negative where the row has no key yet
        gather = positions.clamp(min=0)[:, None, :, None]  # empty slots get a real (masked) key
        keys, values = (t.gather(-2, gather.expand(-1, t.shape[1], -1, t.shape[-1])) for t in (k, v))
        k_buffer, v_buffer, key_bias = _lay_out(columns, keys, values, positions < 0, slots, compute_dtype or k.dtype,
                                                storage_dtype(k.dtype, dtype))
        start_range = (int(start.min()), int(start.max())) if b else (0, 0)
        sinks = None
        if sink_tokens:  # positions 0 .. S - 1 of each row (past a short row's prompt: written by its steps)
            keep = min(sink_tokens, n)
            sinks = tuple(t.new_zeros(*t.shape[:-2], sink_tokens, t.shape[-1], dtype=k_buffer.dtype) for t in (k, v))
            for buffer, t in zip(sinks, (k, v)):  # own, contiguous buffers (written in place by later steps)
                buffer[..., :keep, :] = t[..., :keep, :]
        return cls(k_buffer, v_buffer, key_bias, start, n, capacity, start_range, constants, signature, attn_bias,
                   sinks=sinks)

    def with_constants(self, constants, attn_bias) -> "KVCache":
        """The same cache (same buffers and history) carrying other `constants` for another `attn_bias`."""
        return KVCache(self._k, self._v, self._key_bias, self._start, self.column, self.capacity,
                       self._start_range, constants, self.signature, attn_bias, self._newest, self._held_from,
                       self._sinks, self.weights)

    def resized(self, capacity: int) -> "KVCache":
        """The same history in a ring of `capacity >= self.capacity` (new buffers; this cache can no longer
        be updated). The ring holds the last `slots` columns, so those carry over; older ones are empty.
        The owning layer grows its cache so when its window was cut to the text's length (`ops.decode`):
        the columns a longer cut can see and the ring no longer holds lie before every row's start."""
        if capacity == self.capacity:
            return self
        if capacity < self.capacity:
            raise ValueError(f"capacity can only grow, from {self.capacity}, got {capacity}")
        self._claim()
        self._newest[0] = -1  # these buffers are left behind
        column = self.column
        columns = torch.arange(column - self.slots, column, device=self.device)  # what the ring holds
        empty = (columns[None, :] < self._start[:, None]) | (columns[None, :] < self._held_from)
        *buffers, key_bias = _lay_out(columns, self._window(self._k, column), self._window(self._v, column), empty,
                                      capacity + 1, self._key_bias.dtype, self.dtype)
        return KVCache(*buffers, key_bias, self._start, column, capacity, self._start_range, self.constants,
                       self.signature, self.attn_bias, held_from=max(self._held_from, column - self.slots),
                       sinks=self._sinks, weights=self.weights)

    @property
    def key_bias_needed(self) -> bool:
        """Whether the window of the next step (columns `column - capacity .. column`) may hold empty slots
        (before a row's start, or older than what a resized ring carried over)."""
        return self.column - self.capacity < max(self._start_range[1], self._held_from)

    def _window(self, buffer: torch.Tensor, end: int) -> torch.Tensor:
        """The entries of the `slots` columns before `end`, oldest first (a view)."""
        first = end % self.slots
        return buffer[..., first:first + self.slots, :]

    @property
    def k(self) -> torch.Tensor:
        """Keys `(b, h, m, d)` of the last `m = min(columns seen, capacity)` columns, oldest first."""
        return self._window(self._k, self.column)[..., self.slots - min(self.column, self.capacity):, :]

    @property
    def v(self) -> torch.Tensor:
        return self._window(self._v, self.column)[..., self.slots - min(self.column, self.capacity):, :]

    def update(self, k: torch.Tensor, v: torch.Tensor):
        """Write one column's `k, v` `(b, h, 1, d)`. Returns the new cache and the keys, values
        `(b, h, slots, d)` and `key_bias` `(b, 1, 1, slots)` (or None when every slot holds a real key) of
        the last `slots` columns, ending with the new one, oldest first. A row whose new position is one
        of the first `sink_tokens` also keeps it in `sink_buffers`. In grad mode the new cache's buffers
        are copies (see the module docstring)."""
        positions, sinks_due = self.positions, self.sinks_to_write
        cache, slot, first, key_bias = self._advance(sinks_due, torch.is_grad_enabled())
        if sinks_due:
            cache.write_sinks(positions, k[:, :, 0], v[:, :, 0])
        slots, keys, values = self.slots, cache._k, cache._v
        # narrow, not indexing: traced code keeps `slot` symbolic (an index would be a guard on its value)
        for buffer, new in ((keys, k), (values, v)):
            buffer.narrow(-2, slot, 1).copy_(new)
            buffer.narrow(-2, slot + slots, 1).copy_(new)
        bias_view = None if key_bias is None else key_bias.narrow(-1, first, slots)[:, :, None]
        return cache, keys.narrow(-2, first, slots), values.narrow(-2, first, slots), bias_view

    @property
    def sinks_due(self) -> bool:
        """Whether some row's next position is one of the first `sink_tokens` (the step that writes it must also
        `write_sinks`; `update` does)."""
        return self._sinks is not None and self.column - self._start_range[1] < self.sink_tokens

    @property
    def sinks_to_write(self) -> bool:
        """Whether this step writes the sink-token buffers: when they are due (`sinks_due`), and at every step
        in traced code (`write_sinks` leaves the rows past them as they are): `sinks_due` is a branch on the
        column, which would tie the graph to the steps before or after the last sink token."""
        return self.sinks_due or (self._sinks is not None and torch.compiler.is_compiling())

    def write_sinks(self, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Keep the keys and values `(b, h, d)` of the rows whose `positions` `(b,)` (those the step wrote) are
        below `sink_tokens` in the sink buffers (for a fused step after `advance(writes_sinks=True)`)."""
        rows = torch.arange(self.batch, device=self.device)
        index = positions.clamp(max=self.sink_tokens - 1)
        keep = (positions < self.sink_tokens)[:, None, None]
        for buffer, new in zip(self._sinks, (k, v)):
            buffer[rows, :, index] = torch.where(keep, new.to(buffer.dtype), buffer[rows, :, index])

    def advance(self, *, writes_sinks: bool = False):
        """`update` for a fused step that writes the keys and values itself (into `buffers`, at ring index
        `slot` and `slot + slots`), a step autograd does not record: returns the new cache, `slot`, the ring
        index `first` of the window of `slots` columns that ends with the new one, and the `key_bias` buffer
        `(b, 1, 2 * slots)` (None when the window holds only real keys). It does not write the sink-token
        buffers: while a row's new position is one of them (`sinks_due`), the caller says it writes them
        (`writes_sinks=True`, then `write_sinks`), or `advance` raises. The new cache's buffers are copies
        when this cache's may not be written in place (see the module docstring)."""
        return self._advance(writes_sinks, False)

    def _advance(self, writes_sinks: bool, recording: bool):
        """`advance`, writing into copies of the buffers when `recording` (autograd may record the step) or
        when these may not be written in place."""
        self._claim()
        if not writes_sinks and self.sinks_due:
            raise ValueError("sink_tokens: a row's new position is a sink token; write it with update(k, v)")
        k_buf, v_buf, bias_buf, sinks = self._k, self._v, self._key_bias, self._sinks
        # (traced code cannot ask is_inference(): the compiled step hands such a cache to the eager step first)
        if recording or k_buf.requires_grad or v_buf.requires_grad or (
                not torch.compiler.is_compiling() and k_buf.is_inference() and not torch.is_inference_mode_enabled()):
            k_buf, v_buf, bias_buf = k_buf.clone(), v_buf.clone(), bias_buf.clone()
            sinks = None if sinks is None else tuple(t.clone() for t in sinks)
        slot, slots = self.column % self.slots, self.slots
        key_bias = None
        if self.key_bias_needed or torch.compiler.is_compiling():  # traced code: always (no branch to recompile)
            key_bias = bias_buf
            key_bias.narrow(-1, slot, 1).fill_(0.0)
            key_bias.narrow(-1, slot + slots, 1).fill_(0.0)
        self._newest[0] = column = self.column + 1
        cache = KVCache(k_buf, v_buf, bias_buf, self._start, column, self.capacity, self._start_range,
                        self.constants, self.signature, self.attn_bias, self._newest, self._held_from, sinks,
                        self.weights)
        return cache, slot, column % slots, key_bias

    def detach(self) -> "KVCache":
        """This cache cut from its autograd history, for the weights as they are now: its own copies of the
        buffers, with no graph (as recurrent code detaches its hidden state between chunks of a long
        sequence). Decoding with grad enabled keeps every step's graph reachable from the cache (it is what
        a loss over those steps backpropagates through); `detach()` is how that memory is dropped.

        The weights records are renewed (`Weights.renewed`): the new cache may continue after an optimizer
        step (its keys keep the values the old weights gave them: truncated backpropagation through time).
        What the owning layer computed once for the generation (`constants`, the position bias) is left out,
        and rebuilt from the current weights at the next step. This cache is left as it was."""
        self._claim()
        k_buf, v_buf, bias_buf = (t.detach().clone() for t in (self._k, self._v, self._key_bias))
        sinks = None if self._sinks is None else tuple(t.detach().clone() for t in self._sinks)
        return KVCache(k_buf, v_buf, bias_buf, self._start, self.column, self.capacity, self._start_range,
                       signature=self.signature, held_from=self._held_from, sinks=sinks,
                       weights=tuple(record.renewed() for record in self.weights))

    def tie(self, record: Weights) -> "KVCache":
        """Add the record of a module that built this cache (after those of the modules inside it); returns
        the cache."""
        self.weights = (*self.weights, record)
        return self

    def check_weights(self, module: torch.nn.Module) -> None:
        """Raise ValueError unless `module` built this cache and its parameters are unchanged since (or since
        `detach()`). Only the outermost module reads the versions (a LocalTransformer's, whose parameters
        include its layers'); a module inside it checks that the cache is its own. Traced code (torch.compile)
        skips it: the compiled decode step (`generation.engine.CompiledStep`) checks before the graph."""
        if torch.compiler.is_compiling():
            return
        for record in self.weights:
            if record.owner() is module:
                if record is self.weights[-1] and record.changed():
                    raise ValueError(
                        f"cache was built from other weights: parameters of the {type(module).__name__} that built it "
                        "changed since (an optimizer step, load_state_dict, an in-place write); prefill again, or "
                        "continue it with the weights as they are now by cache.detach()"
                    )
                return
        raise ValueError(
            f"cache was not built by this {type(module).__name__} (a cache holds keys and values computed with "
            "the weights of the module whose forward returned it); prefill with this module"
        )

    def _claim(self) -> None:
        """Refuse a cache whose buffers a later one has written (or left). Traced code skips it (reading the
        shared column there made torch.compile lose a symbol): the compiled step claims before it enters."""
        if torch.compiler.is_compiling():
            return
        if self._newest[0] != self.column:
            raise ValueError(
                "cache was already updated: its buffers now hold a later position; continue from the "
                "cache that the update returned (one cache cannot branch into two generations)"
            )

    @property
    def buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The ring buffers `(b, h, 2 * slots, d)` of keys and values."""
        return self._k, self._v

    def nbytes(self) -> int:
        """Bytes held by the buffers (constant for the life of the cache)."""
        return sum(t.numel() * t.element_size() for t in (self._k, self._v, self._key_bias, *(self._sinks or ())))

    def __repr__(self) -> str:
        return f"KVCache(length={self.length}, capacity={self.capacity}, shape={tuple(self._k.shape)})"
