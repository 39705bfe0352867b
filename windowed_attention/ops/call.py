"""One attention call as one value: the window rule and every per-call input, read by every backend.

`AttentionCall` is built once per call (validated at the public boundary, `ops.api`) and handed to the
backend `auto` chose; `features()` names the options it uses, and each backend declares the ones it
computes (`FEATURES` in its module), so dispatch and the test matrices read the same declarations.

Shapes (leading dims packed, `ops.api.pack_leading`): `q (P, n_q, d)`, `k, v (P_kv, n, d)`; the queries are
the last `n_q` of the `n` positions (`query_offset = n - n_q`); `mask (B, n)` bool and `documents (B, n)`
int64 with `B | P` (row `p` uses row `p // (P // B)`); `attn_bias (H, w, span * w)` with `H | P` (row `p`
uses `p % H`); `sinks (h,)` with `h | P` (row `p` uses `sinks[p % h]`); `key_scale (span, d)`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch

from .spec import WindowSpec

# Every option a call may use, by the name backends declare them under.
ALL_FEATURES = frozenset({
    "mask", "attn_bias", "shared_qk", "xpos", "dropout",  # the options of local-attention
    "block_window",  # window blocks that cut more than token bounds (a plain, non-exact block window)
    "token_window", "documents", "sinks", "sink_tokens", "softcap", "short_queries",
})


@dataclass(frozen=True, eq=False)
class AttentionCall:
    """The window rule `spec` and the per-call inputs of one attention call (see the module docstring)."""

    spec: WindowSpec
    scale: float
    mask: torch.Tensor | None = None
    attn_bias: torch.Tensor | None = None
    mask_self: bool = False
    key_scale: torch.Tensor | None = None
    dropout_p: float = 0.0
    documents: torch.Tensor | None = None
    sinks: torch.Tensor | None = None
    query_offset: int = 0

    def features(self) -> frozenset[str]:
        """The options this call uses (a subset of `ALL_FEATURES`); computed once per call value (`with_` makes
        a new one)."""
        used = self.__dict__.get("_features")
        if used is None:
            # traced code calls the function itself (dynamo would warn that it skips the cache)
            features = _features.__wrapped__ if torch.compiler.is_compiling() else _features
            used = features(self.spec, self.mask is not None, self.attn_bias is not None, bool(self.mask_self),
                            self.key_scale is not None, self.dropout_p > 0.0, self.documents is not None,
                            self.sinks is not None, self.query_offset > 0)
            object.__setattr__(self, "_features", used)
        return used

    def require(self, backend: str, features: frozenset[str]) -> None:
        """ValueError naming `backend` and the options of this call it does not compute (its `features`)."""
        lacking = sorted(self.features() - features)
        if lacking:
            raise ValueError(f"backend {backend!r} does not compute {', '.join(lacking)}; use backend='auto' "
                             "(or 'reference')")

    def with_(self, **changes) -> "AttentionCall":
        """A copy with some fields replaced."""
        return replace(self, **changes)


@functools.lru_cache(maxsize=256)
def _features(spec: WindowSpec, mask: bool, attn_bias: bool, shared_qk: bool, xpos: bool, dropout: bool,
              documents: bool, sinks: bool, short_queries: bool) -> frozenset[str]:
    """`AttentionCall.features` from the rule and which options are on (a pure function of them, remembered)."""
    used = {
        "mask": mask, "attn_bias": attn_bias, "shared_qk": shared_qk, "xpos": xpos, "dropout": dropout,
        "block_window": spec.has_block_condition(),
        "token_window": spec.tokens is not None,
        "documents": documents, "sinks": sinks,
        "sink_tokens": spec.sink_tokens > 0,
        "softcap": spec.softcap is not None,
        "short_queries": short_queries,
    }
    return frozenset(name for name, on in used.items() if on)


def document_bounds(documents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(starts, ends)` `(B, n)` int64: the first position of each position's document and one past its last
    (documents: `(B, n)` non-decreasing ids)."""
    B, n = documents.shape
    positions = torch.arange(n, device=documents.device).expand(B, n)
    new = torch.ones_like(documents, dtype=torch.bool)
    new[:, 1:] = documents[:, 1:] != documents[:, :-1]
    starts = torch.cummax(torch.where(new, positions, 0), dim=1).values
    last = torch.ones_like(new)
    last[:, :-1] = new[:, 1:]
    ends = torch.cummin(torch.where(last, positions + 1, n).flip(1), dim=1).values.flip(1)
    return starts, ends


def segments(documents_row: torch.Tensor) -> list[tuple[int, int]]:
    """The documents of one row `(n,)` as `[(start, end), ...]` (contiguous runs of equal ids)."""
    n = documents_row.shape[0]
    if n == 0:
        return []
    cuts = (torch.nonzero(documents_row[1:] != documents_row[:-1]).flatten() + 1).tolist()
    edges = [0, *cuts, n]
    return list(zip(edges[:-1], edges[1:]))
