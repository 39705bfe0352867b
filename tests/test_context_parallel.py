"""Context parallelism (`group=`): sharded results against single-process ones, in spawned gloo processes.

The halo geometry is checked here directly; the collective cases run in `cp_workers` (one process per
rank), each comparing every rank's slice with the single-process result it computes itself.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.multiprocessing as mp

import cp_workers
from windowed_attention import LocalTransformer, local_attention
from windowed_attention.ops import make_spec
from windowed_attention.parallel import gather, shard
from windowed_attention.parallel.plan import frame, pieces


def spawn(fn, world: int, tmp_path, *args) -> None:
    mp.spawn(fn, args=(world, str(tmp_path / "init"), *args), nprocs=world, join=True)


def test_sharded_op_matches_single_process_on_random_configurations(tmp_path):
    spawn(cp_workers.op_cases, 3, tmp_path, 7, 60)


def test_sharded_modules_and_transformer_match_single_process(tmp_path):
    spawn(cp_workers.module_cases, 2, tmp_path, 3)


def test_ranks_that_disagree_raise_value_error_naming_the_argument(tmp_path):
    spawn(cp_workers.disagreement_cases, 2, tmp_path)


@pytest.mark.parametrize("causal, exact, lb, lf", [(True, False, 1, 0), (True, True, 2, 0), (False, False, 1, 1),
                                                   (False, True, 3, 2), (False, False, 0, 0)])
def test_halo_plan_covers_exactly_what_the_shard_sees(causal, exact, lb, lf):
    """Each rank receives exactly the keys outside its shard that its queries can see (up to whole
    windows when not exact) and nothing from itself."""
    for w, n_s, world in itertools.product([1, 3, 4], [1, 2, 5, 8], [1, 2, 4]):
        spec = make_spec(w, causal, lb, lf, exact)
        n = n_s * world
        plan = pieces(spec, n_s, world)
        for rank in range(world):
            f = frame(spec, n_s, world, rank)
            assert 0 <= f.need_lo <= f.start and f.stop <= f.end <= n
            i = torch.arange(f.start, f.stop)[:, None]
            j = torch.arange(n)[None, :]
            seen = spec.visible(i, j, n).any(dim=0).nonzero().flatten()
            received = sorted(p for piece in plan if piece.dst == rank for p in range(piece.lo, piece.hi))
            halo = [int(p) for p in seen if not f.start <= p < f.stop]
            assert set(halo) <= set(received)
            assert all(f.need_lo <= p < f.end and not f.start <= p < f.stop for p in received)
            assert all(piece.src != piece.dst for piece in plan)
            # bounded by the look-around whatever n
            assert len(received) <= (lb + 1) * w + (lf + 1) * w


def test_group_without_a_process_group_is_a_value_error():
    q = torch.randn(1, 8, 4)
    with pytest.raises(ValueError, match="^group"):
        local_attention(q, q, q, window_size=4, group=object())
    with pytest.raises(ValueError, match="^group"):
        shard(q, object())
    with pytest.raises(ValueError, match="^group"):
        gather(q, object())
    model = LocalTransformer(num_tokens=8, max_seq_len=16, dim=8, depth=1, heads=1, dim_head=8,
                             local_attn_window_size=4)
    with pytest.raises(ValueError, match="^group"):
        model(torch.zeros(1, 8, dtype=torch.long), group=object())


@pytest.mark.parametrize("world, seed", [(2, 11), (3, 12), (4, 13)])
def test_sharded_modern_options_match_single_process(tmp_path, world, seed):
    """Documents crossing shards, sink tokens (with and without documents), learned sinks, softcap, token
    windows, grouped-query heads: forward and backward against one process."""
    spawn(cp_workers.modern_cases, world, tmp_path, seed, 24 if world < 4 else 12)


def test_sharded_nonfinite_keys_and_values_match_single_process(tmp_path):
    """NaN and infinities in k and v (some behind the mask) land where the single process puts them."""
    spawn(cp_workers.nonfinite_cases, 3, tmp_path, 21, 16)


def test_ranks_that_disagree_on_modern_options_raise_value_error(tmp_path):
    spawn(cp_workers.modern_refusals, 2, tmp_path)
