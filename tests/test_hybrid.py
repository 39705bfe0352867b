"""Hybrid local/global models: `LocalTransformer(layer_windows=...)`, cached generation, context
parallelism, and the command line's `--layer-windows`, `--attn-sinks`, `--sink-tokens`, `--softcap`."""

from __future__ import annotations

import json

import pytest
import torch
import torch.multiprocessing as mp

import hybrid_workers
from test_cli import as_older_run
from windowed_attention import LocalTransformer
from windowed_attention.generation import cli as generate_cli
from windowed_attention.ops import fused_cpu
from windowed_attention.training import cli as train_cli

KERNEL = fused_cpu.available()


def _model(layer_windows, **options) -> LocalTransformer:
    torch.manual_seed(0)
    options = dict(dict(num_tokens=17, max_seq_len=64, dim=16, depth=3, heads=4, dim_head=8), **options)
    model = LocalTransformer(layer_windows=layer_windows, **options).double().eval()
    for layer in model.layers:
        if layer[0].branch.sinks is not None:
            torch.nn.init.normal_(layer[0].branch.sinks, std=2.0)
    return model


def test_layer_windows_are_cycled_over_depth_and_none_is_full_causal_attention():
    model = _model([4, None], depth=5)
    assert model.layer_windows == [4, None, 4, None, 4]
    assert [layer[0].branch.window_size for layer in model.layers] == [4, (-1, 0), 4, (-1, 0), 4]
    assert [layer[0].branch.cache_capacity for layer in model.layers][:2] == [4, None]  # a global cache grows
    # a global layer is full causal attention: the same logits as a window longer than the text
    tokens = torch.randint(0, 17, (2, 30))
    torch.testing.assert_close(_model([None])(tokens), _model([64])(tokens), rtol=1e-9, atol=1e-9)
    # the same parameters as a local model: state dicts load across
    _model([4, None]).load_state_dict(_model(None).state_dict(), strict=True)


CASES = [
    ([3, None], {}),
    ([(5, 0), None, 2], dict(num_residual_streams=4)),
    ([2, None], dict(kv_heads=2, num_residual_streams=2)),
    ([None, (4, 0)], dict(kv_heads=1, attn_sinks=True, sink_tokens=2, softcap=2.0)),
    ([3, 3, None], dict(look_backward=2, exact_windowsize=False, qk_rmsnorm=True, use_abs_pos_emb=False)),
    ([4, None], dict(use_abs_pos_emb=True, gate_values_per_head=True)),
]


@pytest.mark.parametrize("path", ["torch", "kernel"])
@pytest.mark.parametrize("windows,options", CASES)
def test_hybrid_cached_logits_and_generation_equal_uncached(windows, options, path):
    """Block, token and global windows, residual streams, grouped-query heads, sinks: every cached step's
    logits equal the full forward's (prompts of different lengths; `torch`: the torch step under autograd,
    `kernel`: the C++ step), and cached generation gives the uncached tokens (greedy and sampled). The
    global layer's cache holds the whole text while the local ones keep their rings."""
    if path == "kernel" and not KERNEL:
        pytest.skip("the fused CPU kernel is not built here")
    model = _model(windows, **options)
    n, lengths = 26, [7, 2, 5]
    x = torch.randint(0, 17, (3, n))
    prefix = max(lengths)
    rows = [torch.cat((x[r, :lengths[r]], x[r, prefix:])) for r in range(3)]
    fulls = [model(row[None])[0] for row in rows]
    mask = torch.arange(prefix) < torch.tensor(lengths)[:, None]
    with torch.set_grad_enabled(path == "torch"):
        out, cache = model(x[:, :prefix], mask=mask, return_cache=True)
        for r in range(3):
            torch.testing.assert_close(out[r, :lengths[r]], fulls[r][:lengths[r]], rtol=1e-9, atol=1e-9)
        for t in range(prefix, n):
            step, cache = model(x[:, t:t + 1], cache=cache, return_cache=True)
            for r in range(3):
                torch.testing.assert_close(step[r, 0], fulls[r][t - prefix + lengths[r]], rtol=1e-9, atol=1e-9)
    for window, layer_cache in zip(model.layer_windows, cache):
        if window is None:
            assert layer_cache.capacity >= n  # the whole text: nothing is recomputed, nothing dropped
        else:
            assert layer_cache.capacity <= 2 * 3 + 2  # a ring as long as the window

    prime = [torch.randint(0, 17, (length,)) for length in (6, 1, 4)]
    for temperature in (0.0, 1.0):
        cached = model.generate(prime, 20, temperature=temperature, generator=torch.Generator().manual_seed(3))
        uncached = model.generate(prime, 20, temperature=temperature, generator=torch.Generator().manual_seed(3),
                                  use_kv_cache=False)
        assert torch.equal(cached, uncached)


def test_hybrid_generation_is_cached_not_recomputed():
    """`generate` runs a hybrid model through its cache: one forward of one token per new token."""
    model = _model([3, None])
    seen = []
    forward = model.forward

    def spy(x, *args, **kwargs):
        seen.append(x.shape[1])
        return forward(x, *args, **kwargs)

    model.forward = spy
    model.generate(torch.randint(0, 17, (1, 9)), 12, temperature=0.0)
    assert seen == [9] + [1] * 11


def test_a_global_layer_decodes_past_the_first_ring_size():
    """A text longer than the global cache's first size (`ops.decode.FIRST_DECODE_LIMIT`): the cache grows and
    stays exact."""
    from windowed_attention.ops.decode import FIRST_DECODE_LIMIT

    model = _model([2, None], dim=8, heads=2, depth=2, max_seq_len=2048, use_abs_pos_emb=False)
    n = FIRST_DECODE_LIMIT + 6
    x = torch.randint(0, 17, (1, n))
    full = model(x)
    with torch.no_grad():
        out, cache = model(x[:, :FIRST_DECODE_LIMIT - 3], return_cache=True)
        for t in range(FIRST_DECODE_LIMIT - 3, n):
            step, cache = model(x[:, t:t + 1], cache=cache, return_cache=True)
            torch.testing.assert_close(step[0, 0], full[0, t], rtol=1e-9, atol=1e-9)
    assert cache[1].capacity >= n and cache[0].capacity == 2


@pytest.mark.parametrize("windows,options,name", [
    ("64,full", {}, "layer_windows"),
    ([], {}, "layer_windows"),
    ([4, 4, 4, 4], {}, "layer_windows"),  # longer than depth
    ([4, 2.5], {}, r"layer_windows\[1\]"),
    ([4, (3, 1)], {}, r"layer_windows\[1\]"),  # causal cannot look ahead
    ([0], {}, r"layer_windows\[0\]"),
    ([4, None], dict(use_dynamic_pos_bias=True), "layer_windows"),
    ([4, 8], dict(use_dynamic_pos_bias=True), "layer_windows"),
    ([4, (3, 0)], dict(use_xpos=True), "layer_windows"),
])
def test_bad_layer_windows_raise_naming_them(windows, options, name):
    with pytest.raises((ValueError, TypeError), match=name):
        LocalTransformer(num_tokens=8, max_seq_len=16, dim=8, depth=3, heads=2, dim_head=4, layer_windows=windows,
                         **options)


def test_one_block_window_for_every_layer_keeps_the_dynamic_position_bias():
    tokens = torch.randint(0, 17, (1, 12))
    torch.testing.assert_close(_model([4], use_dynamic_pos_bias=True)(tokens),
                               _model(None, local_attn_window_size=4, use_dynamic_pos_bias=True)(tokens))


def test_hybrid_model_under_context_parallelism_equals_the_single_process(tmp_path):
    """Global layers gather the keys and values before each shard: loss, summed gradients and logits equal
    the single process (spawned gloo ranks; with residual streams, grouped heads, sinks, documents)."""
    mp.spawn(hybrid_workers.hybrid_cases, args=(2, str(tmp_path / "init"), 5), nprocs=2, join=True)


TINY = ["--dim", "32", "--depth", "4", "--heads", "2", "--dim-head", "16", "--seq-len", "32", "--batch-size", "4",
        "--eval-batches", "2", "--sample-length", "16", "--no-progress", "--lr-decay-steps", "3"]


def test_cli_flags_round_trip_through_config_json(tmp_path, capsys):
    """`--layer-windows`, `--attn-sinks`, `--sink-tokens`, `--softcap` are saved in config.json, rebuild the
    model for generate and --resume (which refuses another value by its flag), and a config.json written
    before they existed still loads, meaning their defaults."""
    from windowed_attention.training.checkpoint import load_config, load_model

    data = tmp_path / "data.txt"
    data.write_text("local and global layers, " * 400)
    out = tmp_path / "run"
    flags = ["--layer-windows", "8,3:0,full", "--attn-sinks", "--sink-tokens", "2", "--softcap", "20"]
    assert train_cli.main(["--out", str(out), "--data", str(data), "--steps", "2", *flags, *TINY]) == 0
    saved = json.loads((out / "config.json").read_text())["model"]
    assert saved["layer_windows"] == [8, [3, 0], None]
    assert (saved["attn_sinks"], saved["sink_tokens"], saved["softcap"]) == (True, 2, 20.0)
    model = load_model(out)[0]
    assert [layer[0].branch.window_size for layer in model.layers] == [8, (3, 0), (-1, 0), 8]
    assert model.layer_windows == [8, (3, 0), None, 8]  # depth 4: the list cycled
    mha = model.layers[0][0].branch
    assert mha.sinks is not None and mha.attn_fn.sink_tokens == 2 and mha.attn_fn.softcap == 20.0
    assert generate_cli.main(["--checkpoint", str(out), "--prime", "local", "--length", "8", "--seed", "0"]) == 0
    assert train_cli.main(["--out", str(out), "--data", str(data), "--steps", "3", "--resume", *flags, *TINY]) == 0
    capsys.readouterr()
    assert train_cli.main(["--out", str(out), "--steps", "4", "--resume", "--layer-windows", "8,full",
                           "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--layer-windows" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1

    as_older_run(out, ("layer_windows", "attn_sinks", "sink_tokens", "softcap"))
    model_config, _, _ = load_config(out)
    assert (model_config.layer_windows, model_config.attn_sinks, model_config.sink_tokens,
            model_config.softcap) == (None, False, 0, None)


@pytest.mark.parametrize("flags,name", [
    (["--layer-windows", "64,fll"], "--layer-windows"),
    (["--layer-windows", "0,full"], "--layer-windows"),
    (["--layer-windows", "3:-2"], "--layer-windows"),
    (["--layer-windows", "3:1"], "layer_windows"),  # causal: a token window cannot look ahead
    (["--layer-windows", "64,full", "--window-size", "32"], "--window-size"),
    (["--sink-tokens", "-1"], "--sink-tokens"),
    (["--softcap", "0"], "--softcap"),
])
def test_bad_flags_are_one_line_and_exit_2(tmp_path, capsys, flags, name):
    assert train_cli.main(["--out", str(tmp_path / "run"), "--steps", "1", "--no-progress", *flags]) == 2
    err = capsys.readouterr().err
    assert name in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
