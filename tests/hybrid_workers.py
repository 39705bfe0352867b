"""Body of the hybrid-model context-parallel test, run in spawned processes (one per rank, gloo on CPU;
see `cp_workers`): a `LocalTransformer` with global layers (`layer_windows`) sharded over the ranks gives
every rank the single-process loss, its slice of the logits, and gradients that sum to the single-process
ones."""

from __future__ import annotations

import torch
import torch.distributed as dist

from cp_workers import close, close_enough, init, summed
from windowed_attention import LocalTransformer
from windowed_attention.parallel import shard

# (layer_windows, extra LocalTransformer keywords, shard length, causal)
HYBRID_CASES = [
    ([3, None], dict(num_residual_streams=1), 4, True),
    ([2, (3, 0), None], dict(num_residual_streams=3, kv_heads=1, attn_sinks=True, sink_tokens=2, softcap=3.0), 5, True),
    ([None, 4], dict(num_residual_streams=2, look_backward=2, use_abs_pos_emb=False), 3, True),
    ([2, None], dict(num_residual_streams=1, look_forward=1), 3, False),
]


def hybrid_cases(rank: int, world: int, init_file: str, seed: int) -> None:
    init(rank, world, init_file)
    group = dist.group.WORLD
    for case, (windows, extra, n_s, causal) in enumerate(HYBRID_CASES):
        torch.manual_seed(seed + case)
        model = LocalTransformer(num_tokens=11, max_seq_len=n_s * world, dim=16, depth=3, heads=2, dim_head=8,
                                 causal=causal, layer_windows=windows, **extra).double()
        if extra.get("attn_sinks"):
            for layer in model.layers:
                torch.nn.init.normal_(layer[0].branch.sinks)
        tokens = torch.randint(0, 11, (2, n_s * world))
        documents = None
        if case == 1:  # packed documents crossing the shards
            documents = torch.tensor([[0] * (n_s + 1) + [1] * (n_s * world - n_s - 1), [0] * (n_s * world)])
        loss = model(tokens, documents=documents, return_loss=True)
        loss.backward()
        want = {name: p.grad.clone() for name, p in model.named_parameters()}
        model.zero_grad()
        described = dict(extra, layer_windows=windows, causal=causal, n_s=n_s, world=world, case=case)
        part_documents = None if documents is None else shard(documents, group)
        part_loss = model(shard(tokens, group), documents=part_documents, return_loss=True, group=group)
        part_loss.backward()
        close_enough("loss", part_loss, loss, torch.float64, described)
        for name, p in model.named_parameters():
            close_enough(f"grad {name} (summed)", summed(p.grad), want[name], torch.float64, described)
        with torch.no_grad():
            logits = model(tokens, documents=documents)
            part_logits = model(shard(tokens, group), documents=part_documents, group=group)
        close_enough("logits", part_logits, shard(logits, group), torch.float64, described)
    close(rank)
