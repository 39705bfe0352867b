"""`LocalTransformer`: a token language model of pre-norm [LocalMHA, FeedForward] residual blocks."""

from __future__ import annotations

import numbers
from copy import deepcopy

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .feedforward import FeedForward
from .kv_cache import KVCache, Weights
from .linear import Linear
from .mha import LocalMHA
from .ops.decode import decode_window
from .ops.api import make_spec
from .ops.call import document_bounds
from .ops.validation import check_bool, check_documents, check_int, check_positive_real
from .parallel import agree, cross_entropy, gather, group_info, next_tokens
from .position_bias import DynamicPositionBias
from .generation import engine
from .residual import HYPER_CONNECTION_PARAMETERS, expand_streams, reduce_streams, wrap
from .sampling import check_sampling

INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _check_global_layers(layers, depth: int) -> set[int]:
    """`layers_insert_global_attn`: 1-indexed layers (None: all of them)."""
    if layers is None:
        return set(range(1, depth + 1))
    try:
        chosen = list(layers)
    except TypeError:
        raise TypeError(f"layers_insert_global_attn must be a tuple of layer numbers in [1, depth], got {layers!r}") from None
    for layer in chosen:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 1 <= layer <= depth:
            raise ValueError(f"layers_insert_global_attn must hold layer numbers in [1, depth = {depth}] (1-indexed), got {layers!r}")
    return set(chosen)


# LocalMHA keywords that shape window blocks: with `layer_windows` they go to the int (block) layers only
BLOCK_KEYWORDS = ("look_backward", "look_forward", "exact_windowsize")


def _check_layer_windows(layer_windows, depth: int, causal: bool) -> tuple[list, list]:
    """`layer_windows` -> each layer's entry and `window_size` (`depth` of each, the list cycled): an int block
    window, a `(left, right)` token window, or None for a global layer, whose window is the token window
    `(-1, 0)` (`(-1, -1)` when not causal): full attention through the same op, cache and sharded path."""
    if isinstance(layer_windows, (str, bytes, dict)) or not hasattr(layer_windows, "__iter__"):
        raise TypeError(f"layer_windows must be a list of per-layer windows (int, (left, right) or None), got {layer_windows!r}")
    entries = list(layer_windows)
    if not 1 <= len(entries) <= depth:
        raise ValueError(f"layer_windows must hold 1 to depth = {depth} entries (cycled over the layers), got {len(entries)}")
    windows, given = [], []
    for index, entry in enumerate(entries):
        if entry is None:
            window = (-1, 0) if causal else (-1, -1)
        elif isinstance(entry, (tuple, list)):
            window = tuple(entry)
        elif isinstance(entry, numbers.Integral) and not isinstance(entry, bool):
            window = int(entry)
        else:
            raise TypeError(f"layer_windows[{index}] must be an int (block window), a (left, right) token window or "
                            f"None (a global layer), got {entry!r}")
        try:
            make_spec(window, causal, 1, None, False)
        except (TypeError, ValueError) as error:
            raise type(error)(f"layer_windows[{index}]: {error}") from None
        windows.append(window)
        given.append(None if entry is None else window)
    cycle = [layer % len(windows) for layer in range(depth)]
    return [given[i] for i in cycle], [windows[i] for i in cycle]


def _upgrade_state_dict(model, state_dict, prefix, *args):
    """Before loading: accept checkpoints of this package saved before blocks were wrapped (keys
    `layers.i.j.<param>`, now `layers.i.j.branch.<param>`), and say plainly when the checkpoint has another
    number of residual streams than the model (instead of a list of unexpected keys)."""
    head = prefix + "layers."
    found = state_dict.get(head + "0.0.static_alpha")
    streams = 1 if found is None else found.shape[0]
    if streams != model.num_residual_streams and any(key.startswith(head + "0.0.") for key in state_dict):
        raise ValueError(
            f"the state dict has {streams} residual stream(s); build the model with num_residual_streams={streams} "
            f"(it has {model.num_residual_streams})"
        )
    for key in [key for key in state_dict if key.startswith(head)]:
        layer, block, rest = key[len(head):].split(".", 2)
        if not rest.startswith("branch.") and rest not in HYPER_CONNECTION_PARAMETERS:
            state_dict[f"{head}{layer}.{block}.branch.{rest}"] = state_dict.pop(key)


class LocalTransformer(nn.Module):
    """Token embedding (+ learned absolute positions), `depth` x [LocalMHA, FeedForward] residual blocks
    (pre-norm), final LayerNorm and logits: drop-in for local-attention 1.11's class.

    `num_residual_streams` (default 4, as local-attention) runs the blocks on hyper-connection residual
    streams (`residual.py`); 1 is a plain residual. `global_attn_layer` (any module on `(b, n, dim)`) is
    deep-copied before the attention of each layer in `layers_insert_global_attn` (1-indexed, default
    all) and wrapped like the other blocks. `num_tokens=None` is the backbone: features `(b, n, dim)` in,
    features out (no embeddings, no logits). `use_dynamic_pos_bias` replaces rotary embeddings by a
    learned bias of the distance. `use_abs_pos_emb=False` drops the absolute position embedding (rotary
    only), which lets the model run and generate past `max_seq_len`. Extra keywords (`look_backward`,
    `qk_rmsnorm`, `kv_heads`, `attn_sinks`, `sink_tokens`, `softcap`, ...) go to every `LocalMHA`.

    Hybrid models: `layer_windows` (instead of `local_attn_window_size`) gives each layer its window, a list
    cycled over `depth`: an int (a block window, as `local_attn_window_size`), a `(left, right)` token window,
    or None: a global layer, full causal attention (the token window `(-1, 0)`) through the same op and
    `LocalMHA`, so it trains, shards (its keys gathered: exact) and decodes like the others; its cache grows
    with the text while the local layers keep their rings. The block keywords (`look_backward`,
    `look_forward`, `exact_windowsize`) shape the int layers only; the options that need one block window
    for every layer (`use_dynamic_pos_bias`, `use_xpos`) are refused with token or global entries.
    """

    def __init__(
        self,
        *,
        num_tokens: int | None,
        max_seq_len: int,
        dim: int,
        depth: int,
        causal: bool = True,
        local_attn_window_size: int = 512,
        dim_head: int = 64,
        heads: int = 8,
        ff_mult: float = 4,
        attn_dropout: float = 0.0,
        ff_dropout: float = 0.0,
        ignore_index: int = -1,
        use_xpos: bool = False,
        xpos_scale_base=None,
        use_dynamic_pos_bias: bool = False,
        global_attn_layer: nn.Module | None = None,
        layers_insert_global_attn=None,
        num_residual_streams: int = 4,
        use_abs_pos_emb: bool = True,
        layer_windows=None,
        **kwargs,
    ):
        super().__init__()
        self.num_tokens = None if num_tokens is None else check_int("num_tokens", num_tokens, 1)
        self.max_seq_len = check_int("max_seq_len", max_seq_len, 1)
        dim, depth = check_int("dim", dim, 1), check_int("depth", depth, 1)
        ff_mult = check_positive_real("ff_mult", ff_mult)
        self.dim = dim
        self.causal = check_bool("causal", causal)
        self.use_abs_pos_emb = check_bool("use_abs_pos_emb", use_abs_pos_emb)
        use_dynamic_pos_bias = check_bool("use_dynamic_pos_bias", use_dynamic_pos_bias)
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
        self.num_residual_streams = streams = check_int("num_residual_streams", num_residual_streams, 1)
        if global_attn_layer is not None and not isinstance(global_attn_layer, nn.Module):
            raise TypeError(f"global_attn_layer must be a torch.nn.Module or None, got {type(global_attn_layer).__name__}")
        global_at = _check_global_layers(layers_insert_global_attn, depth)
        if use_dynamic_pos_bias and isinstance(local_attn_window_size, (tuple, list)):
            raise ValueError("local_attn_window_size: a (left, right) token window takes no dynamic position bias "
                             "(its bias is laid out by window blocks); use an int window or rotary positions")
        # each layer's window as given (None: a global layer), or None without layer_windows
        self.layer_windows, windows = None, [local_attn_window_size] * depth
        if layer_windows is not None:
            self.layer_windows, windows = _check_layer_windows(layer_windows, depth, self.causal)
            blocks_only = all(isinstance(window, int) for window in windows)
            if use_dynamic_pos_bias and not (blocks_only and len(set(windows)) == 1):
                raise ValueError("layer_windows: use_dynamic_pos_bias needs one int block window for every layer (its "
                                 f"bias is laid out by window blocks, shared by the layers), got {list(layer_windows)!r}")
            if use_xpos and not blocks_only:
                raise ValueError("layer_windows: use_xpos needs int block windows (xpos measures its decay from window "
                                 f"blocks); token and global layers take rotary without xpos, got {list(layer_windows)!r}")
        self.ignore_index = ignore_index
        self.local_attn_window_size = local_attn_window_size

        has_tokens = self.num_tokens is not None
        self.token_emb = nn.Embedding(num_tokens, dim) if has_tokens else None
        self.pos_emb = nn.Embedding(max_seq_len, dim) if has_tokens and self.use_abs_pos_emb else None
        blocks = iter(range(3 * depth))  # block index: which stream a hyper-connection starts reading
        self.global_layers = nn.ModuleList()
        self.layers = nn.ModuleList()
        for layer, window in zip(range(1, depth + 1), windows):
            has_global = global_attn_layer is not None and layer in global_at
            self.global_layers.append(wrap(deepcopy(global_attn_layer), streams, dim, next(blocks)) if has_global else None)
            options = kwargs
            if layer_windows is not None and not isinstance(window, int):
                options = {key: value for key, value in kwargs.items() if key not in BLOCK_KEYWORDS}
            attn = LocalMHA(
                dim=dim, dim_head=dim_head, heads=heads, dropout=attn_dropout, causal=causal,
                window_size=window, use_xpos=use_xpos, xpos_scale_base=xpos_scale_base,
                use_rotary_pos_emb=not use_dynamic_pos_bias, prenorm=True, **options,
            )
            ff = FeedForward(dim=dim, mult=ff_mult, dropout=ff_dropout)
            self.layers.append(nn.ModuleList([wrap(attn, streams, dim, next(blocks)), wrap(ff, streams, dim, next(blocks))]))
        self.has_global_layers = any(layer is not None for layer in self.global_layers)
        self.dynamic_pos_bias = DynamicPositionBias(dim=dim // 2 or 1, heads=heads) if use_dynamic_pos_bias else None
        self.to_logits = nn.Sequential(nn.LayerNorm(dim), Linear(dim, num_tokens, bias=False)) if has_tokens else None
        self.register_load_state_dict_pre_hook(_upgrade_state_dict)

    @property
    def spec(self):
        return self.layers[0][0].branch.attn_fn.spec

    def _check_tokens(self, x, name: str = "x") -> None:
        if not isinstance(x, torch.Tensor) or x.dtype not in INT_DTYPES:
            raise TypeError(f"{name} must be an integer tensor of token ids (dtype torch.long), got {getattr(x, 'dtype', type(x).__name__)}")
        if x.ndim != 2:
            raise ValueError(f"{name} must have shape (b, n), got {tuple(x.shape)}")
        if torch.compiler.is_compiling():  # traced code: no data-dependent branch, an assertion in the graph
            torch._assert_async(((x >= 0) & (x < self.num_tokens)).all(),
                                f"{name} must hold token ids in [0, num_tokens = {self.num_tokens})")
        elif x.numel() and (int(x.min()) < 0 or int(x.max()) >= self.num_tokens):
            raise ValueError(f"{name} must hold token ids in [0, num_tokens = {self.num_tokens}), got range [{int(x.min())}, {int(x.max())}]")

    def _attn_bias(self, spec):
        """The dynamic position bias `(heads, w, span * w)` of `spec`, the layers' rule cut to a length (the
        op takes the bias of any cut that covers the sequence), so its cost never follows a longer window."""
        if self.dynamic_pos_bias is None:
            return None
        w = spec.window_size
        return self.dynamic_pos_bias(w, spec.span * w, offset=spec.look_backward * w)

    def _decode_bias(self, n: int, cache):
        """The bias for decoding a text of `n` positions: that of the caches while its cut covers `n`
        (computed once per generation, or once more each time the cut grows: `ops.decode.decode_window`)."""
        if self.dynamic_pos_bias is None:
            return None
        spec = decode_window(self.spec, n)[0]
        bias = None if cache is None else cache[0].attn_bias
        if (bias is None or tuple(bias.shape[-2:]) != (spec.window_size, spec.span * spec.window_size)
                or (torch.is_grad_enabled() and not bias.requires_grad
                    and any(p.requires_grad for p in self.dynamic_pos_bias.parameters()))):
            bias = self._attn_bias(spec)  # (a step autograd records computes it with grad, once)
        return bias

    def _check_features(self, x) -> None:
        if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
            raise TypeError(f"x must be a float tensor of features (b, n, dim) when num_tokens=None, got {getattr(x, 'dtype', type(x).__name__)}")
        if x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape (b, n, dim = {self.dim}) when num_tokens=None, got {tuple(x.shape)}")

    def forward(self, x, mask=None, return_loss: bool = False, cache: list[KVCache] | None = None,
                return_cache: bool = False, group=None, cache_dtype=None, documents=None):
        """`x` `(b, n)` token ids -> logits `(b, n, num_tokens)`, or the mean next-token cross-entropy
        (ignoring `ignore_index`) with `return_loss`. `mask` `(b, n)` bool marks real tokens. With
        `num_tokens=None` (the backbone), `x` `(b, n, dim)` features -> features `(b, n, dim)`.

        Decoding: with `return_cache=True` the per-layer caches come back too (`mask` may then mark right
        padding: prompts of different lengths); pass them as `cache` with `x` holding only the next token
        of every row `(b, 1)` to get its logits in O(window) work. `cache_dtype` (with `return_cache`):
        what the caches store keys and values in: None (the model's dtype, exact) or, for a float32 model,
        `torch.bfloat16` (half the memory and the bytes a step reads; not exact: the keys and values are
        rounded to bfloat16, see `kv_cache.storage_dtype`). The caches belong to this model and its
        weights as they were (another model, or this one after a parameter changed, refuses them:
        `KVCache.check_weights`). Decode steps in grad mode are differentiable (a loss over any number of
        them backpropagates into the weights and the prefill) and keep that history reachable from the
        caches: `caches = [c.detach() for c in caches]` cuts it (and lets the caches continue after an
        optimizer step). Training, prefill and decode run this same block loop. The global layers of
        `layer_windows` decode through their cache too (it holds the whole text); not with
        `global_attn_layer`: a general module's output at the new position depends on every earlier position
        (`generate` then recomputes the sequence at each step).

        Packed documents: `documents` `(b, n)` non-decreasing integer ids (each document one contiguous run of
        a row) computes every document as if it were alone: attention never crosses a document, positions
        (rotary, absolute, the dynamic bias) restart at each document's start, and with `return_loss` no
        target crosses a document boundary (the last token of a document predicts nothing), so the loss is
        the documents' losses weighted by their target counts. Not with a cache (decoding is one document
        per row).

        Context parallelism: with a process `group`, `x` (and `mask`) is this rank's shard of the tokens
        (rank `r` holds positions `r * n .. (r + 1) * n - 1`, which the position embeddings see); the logits
        are this rank's slice, and the loss is the single-process loss of the whole sequence, on every
        rank (its gradients summed over the group are the single-process ones). The global layers of
        `layer_windows` gather the keys and values before the shard (exact); not with `global_attn_layer` (a
        general module would see only this rank's shard).
        """
        # local-attention's forward takes (x, mask, cache, return_loss, return_cache): a positional cache lands
        # here in return_loss, and must not be taken for True
        return_loss, return_cache = check_bool("return_loss", return_loss), check_bool("return_cache", return_cache)
        if self.token_emb is None:
            self._check_features(x)
            if return_loss:
                raise ValueError("return_loss needs token ids and logits: the model was built with num_tokens=None (a backbone)")
        else:
            self._check_tokens(x)
        if (cache is not None or return_cache) and self.has_global_layers:
            raise ValueError(
                "cache and return_cache cannot be used with global_attn_layer: a general module's output at a new "
                "position depends on all earlier ones (generate recomputes the sequence instead)"
            )
        if documents is not None:
            if cache is not None or return_cache:
                raise ValueError("documents cannot be combined with cache or return_cache (decoding is one document per row)")
            check_documents(documents, x.shape[0], x.shape[1], x.device)
        rank, world = (0, 1) if group is None else group_info(group)
        if group is not None:
            if self.has_global_layers:
                raise ValueError("group cannot be combined with global_attn_layer: a general module would see only this rank's shard")
            if cache is not None or return_cache:
                raise ValueError("group cannot be combined with cache or return_cache (decoding runs in one process)")
            agree(group, {"the shard length n_s (x.shape[1])": ("x", x.shape[1]), "the batch size": ("x", x.shape[0]),
                          "return_loss": ("return_loss", int(bool(return_loss))),
                          "whether a mask is given": ("mask", int(mask is not None)),
                          "whether documents are given": ("documents", int(documents is not None))}, x.device)
        # with a group: every rank's documents, for the targets at shard ends and the positions' document starts
        all_documents = gather(documents, group) if group is not None and documents is not None else None
        if return_loss:
            if cache is not None or return_cache:
                raise ValueError("return_loss cannot be combined with cache or return_cache")
            if x.shape[1] * world < 2:
                raise ValueError(f"x must hold at least 2 tokens with return_loss=True, got {x.shape[1] * world}")
            if group is None:
                x, labels = x[:, :-1], x[:, 1:]
                if mask is not None:
                    mask = mask[:, :-1]
                if documents is not None:  # a document's last token predicts nothing
                    labels = labels.masked_fill(documents[:, 1:] != documents[:, :-1], self.ignore_index)
                    documents = documents[:, :-1]
            else:
                labels, mask = self._shard_targets(x, mask, group, rank, world)
                if documents is not None:
                    n_s = x.shape[1]
                    after = F.pad(all_documents[:, 1:], (0, 1), value=-1)[:, rank * n_s : (rank + 1) * n_s]
                    labels = labels.masked_fill(after != documents, self.ignore_index)

        n = x.shape[1]
        if cache is not None:
            if not isinstance(cache, (list, tuple)):
                raise TypeError(f"cache must be the list of per-layer KVCaches returned with return_cache=True, got {type(cache).__name__}")
            if len(cache) != len(self.layers):
                raise ValueError(f"cache must be the list of {len(self.layers)} per-layer caches returned with return_cache=True")
            if not all(isinstance(layer_cache, KVCache) for layer_cache in cache):
                raise TypeError(f"cache must hold KVCache objects, got {sorted({type(c).__name__ for c in cache})}")
            if n != 1:
                raise ValueError(f"with cache, x must hold exactly one new token per row (b, 1), got {tuple(x.shape)}")
            if cache[0].batch != x.shape[0]:
                raise ValueError(f"cache holds {cache[0].batch} rows, x has {x.shape[0]}")
            cache[0].check_weights(self)  # the whole model's parameters (each layer checks the cache is its own)
        start = rank * n
        # the whole sequence's length (with group and return_loss the last token is no input, as x[:, :-1]);
        # decoding: the positions the longest row will have seen
        end = (n if group is None else world * n - int(return_loss)) if cache is None else cache[0].length + 1
        if self.pos_emb is not None and end > self.max_seq_len:
            raise ValueError(
                f"sequence of {end} tokens exceeds max_seq_len = {self.max_seq_len} "
                "(build the model with use_abs_pos_emb=False to run past it)"
            )

        h = x if self.token_emb is None else self.token_emb(x)
        if self.pos_emb is not None:
            if documents is not None:  # positions restart at each document's start
                whole = documents if group is None else all_documents
                positions = torch.arange(whole.shape[1], device=x.device) - document_bounds(whole)[0]
                h = h + self.pos_emb(positions[:, start : start + n].clamp_max(self.max_seq_len - 1))
            elif cache is None:
                # clamped for that last token alone: its output is dropped (and it is masked as a key)
                h = h + self.pos_emb(torch.arange(start, start + n, device=x.device).clamp_max(self.max_seq_len - 1))
            else:  # each row at its own position
                h = h + self.pos_emb(cache[0].positions)[:, None]

        # decoding reuses the bias its caches were built with; a plain forward takes the bias of the window
        # cut to the whole sequence (`fit_window`: cost follows it)
        if cache is not None or return_cache:
            attn_bias = self._decode_bias(end if cache is not None else end + 1, cache)
        else:
            attn_bias = self._attn_bias(self.spec.for_length(world * n))
        new_caches = []
        h = expand_streams(h, self.num_residual_streams)
        for index, ((attn, ff), global_layer) in enumerate(zip(self.layers, self.global_layers)):
            if global_layer is not None:
                h = global_layer(h)
            extra = {} if documents is None else {"documents": documents}
            h = attn(h, mask=mask, attn_bias=attn_bias, cache=None if cache is None else cache[index],
                     return_cache=return_cache, group=group, cache_dtype=cache_dtype, **extra)
            if return_cache:
                h, layer_cache = h
                new_caches.append(layer_cache)
            h = ff(h)
        h = reduce_streams(h, self.num_residual_streams)
        out = h if self.to_logits is None else self.to_logits(h)
        if return_cache and cache is None:  # every layer's keys depend on the weights of the layers below
            record = Weights(self)
            new_caches = [layer_cache.tie(record) for layer_cache in new_caches]

        if return_loss and group is not None:
            return cross_entropy(out, labels, group, ignore_index=self.ignore_index)
        if return_loss:
            return F.cross_entropy(rearrange(out, "b n c -> b c n"), labels.long(), ignore_index=self.ignore_index)
        return (out, new_caches) if return_cache else out

    def _shard_targets(self, x, mask, group, rank: int, world: int):
        """Targets `(b, n)` of this rank's shard `x` (the next token, across shard boundaries; none for the
        whole sequence's last token) and the key mask that leaves that last token out when not causal
        (the single-process model never sees it: it runs on `x[:, :-1]`)."""
        labels = next_tokens(x, group, rank, world, fill=self.ignore_index)
        if not self.causal:
            mask = torch.ones_like(x, dtype=torch.bool) if mask is None else mask.clone()
            if rank == world - 1:
                mask[:, -1] = False
        return labels, mask

    @torch.no_grad()
    def generate(self, prime, seq_len: int, temperature: float = 1.0, filter_thres: float = 0.9,
                 use_kv_cache: bool = True, top_p: float | None = None, generator: torch.Generator | None = None,
                 cache_dtype=None, compile: bool = False, **kwargs):
        """Sample `seq_len` tokens after `prime`; returns only the new tokens `(b, seq_len)`.

        `prime` is a `(b, n)` tensor or a list of 1-D prompts of different lengths (each row generates
        what its prompt alone generates; see `windowed_attention.generation` for sampling with a
        `generator`). `temperature=0` is greedy; `filter_thres` keeps the top `1 - filter_thres` of the
        vocabulary; `top_p` adds nucleus filtering. Cached and uncached generation compute the same logits
        up to float rounding: in float32 and float64 models about 1e-6 of the logits' scale, and they give
        the same tokens (tested, greedy and seeded sampling); in bfloat16 (float16) models each route rounds
        activations at other places, so the logits agree to within 2% (0.4%) of the largest, and a greedy
        or sampled token can differ where two logits are that close: generate in float32 where tokens
        must be reproducible across the two routes.
        The tokens come back as `torch.long`, whatever the prompt's integer dtype.
        `cache_dtype=torch.bfloat16` (float32 models) halves the cache and a step's reads, not exactly
        (see `forward`). `compile=True` runs each decode step as one graph compiled by `torch.compile` (once per
        model and batch shape, announced on stderr; the same tokens; `generation.engine.CompiledStep`).
        """
        if self.token_emb is None:
            raise ValueError("generate needs token ids and logits: the model was built with num_tokens=None (a backbone)")
        if kwargs:  # local-attention forwards these to every step's forward; no step here takes any
            raise TypeError(f"generate got unsupported keyword arguments {sorted(kwargs)} (a key mask cannot be used with the KV cache)")
        tokens, lengths = engine.batch_prompts(prime, "prime")
        self._check_tokens(tokens, "prime")
        seq_len = check_int("seq_len", seq_len, 0)
        check_sampling(temperature, filter_thres, top_p)
        use_kv_cache = check_bool("use_kv_cache", use_kv_cache)
        compile = check_bool("compile", compile)
        if cache_dtype is not None and not use_kv_cache:
            raise ValueError("cache_dtype needs use_kv_cache=True")
        if not self.causal:
            raise ValueError("generate needs a causal model (causal=True)")
        if self.pos_emb is not None and tokens.shape[1] + seq_len - 1 > self.max_seq_len:
            raise ValueError(
                f"prime length {tokens.shape[1]} + seq_len {seq_len} - 1 exceeds max_seq_len = {self.max_seq_len}"
            )
        # global layers: no cache (see forward); every step recomputes the sequence
        out = engine.generate(self, prime, seq_len, temperature=temperature, filter_thres=filter_thres,
                              top_p=top_p, generator=generator, use_cache=use_kv_cache and not self.has_global_layers,
                              cache_dtype=cache_dtype, compile=compile)
        return out  # torch.long: a narrow prompt dtype (int8, uint8, int16) would wrap the ids
