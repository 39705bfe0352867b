"""`windowed_attention.compat`: code written for local-attention 1.11.2 runs on ours after `install()`.

- every module path and every name local-attention defines resolves to ours, with signatures that accept
  the same arguments (in-process, the real modules saved and put back around each test);
- `install()` is explicit and idempotent, warns when it shadows an installed local-attention, refuses an
  imported one unless `replace=True`, and `uninstall()` restores what was there;
- the helpers behave as local-attention's (compared with the real package);
- a third-party model written for local-attention (`tests/local_attention_style/model.py`) trains and
  generates through the route, and our rewrite of local-attention's test file
  (`tests/local_attention_style/suite.py`) passes through it unchanged (each in a fresh interpreter).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import os
import re
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch

import windowed_attention
import windowed_attention.compat as compat
from windowed_attention.compat import ShadowWarning

ROOT = Path(__file__).resolve().parent.parent
STYLE = Path(__file__).resolve().parent / "local_attention_style"


def _is_local_attention(name: str) -> bool:
    return name == "local_attention" or name.startswith("local_attention.")


@pytest.fixture
def modules():
    """Take every `local_attention*` module out of `sys.modules` for the test; put them back after (and
    undo any route the test left installed)."""
    saved = {name: module for name, module in sys.modules.items() if _is_local_attention(name)}
    for name in saved:
        del sys.modules[name]
    yield saved
    compat.uninstall()
    for name in [name for name in sys.modules if _is_local_attention(name)]:
        del sys.modules[name]
    sys.modules.update(saved)


@pytest.fixture
def real(modules):
    """local-attention 1.11.2 itself, imported (a test dependency)."""
    la = pytest.importorskip("local_attention")
    importlib.import_module("local_attention.transformer")
    return la


def _defined_by_local_attention(value) -> bool:
    """A name local-attention defines (not one it imports from torch, einops, hyper-connections, ...)."""
    if isinstance(value, types.ModuleType):
        return _is_local_attention(value.__name__)
    if isinstance(value, (int, float, str)):
        return True
    return (getattr(value, "__module__", None) or "").startswith("local_attention")


def _undecorated(fn):
    """local-attention's `generate` under `torch.no_grad()` and `eval_decorator` (no functools.wraps): the
    function itself, from the decorator's closure."""
    fn = inspect.unwrap(fn)
    for cell in fn.__closure__ or ():
        if inspect.isfunction(cell.cell_contents):
            return cell.cell_contents
    return fn


# Where our signature differs from local-attention's on purpose: (callable, parameter): why.
POSITIONAL_ORDER = {
    ("LocalTransformer.forward", "cache"): "ours: (x, mask, return_loss, cache, ...); a misplaced cache is refused",
    ("LocalTransformer.forward", "return_loss"): "idem",
}


def _check_accepts(ours, theirs, where: str) -> None:
    """Every call `theirs` accepts, `ours` accepts with the same meaning: each parameter by name, kind,
    default and position; ours' extra parameters optional."""
    mine, their = inspect.signature(ours), inspect.signature(theirs)
    mine_list = list(mine.parameters.values())
    their_list = list(their.parameters.values())
    for index, p in enumerate(their_list):
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            assert any(q.kind == p.kind for q in mine_list), f"{where}: no {p}"
            continue
        q = mine.parameters.get(p.name)
        assert q is not None, f"{where}: no parameter {p.name}"
        assert q.kind == p.kind, f"{where}: {p.name} is {q.kind}, theirs {p.kind}"
        assert (q.default is q.empty) == (p.default is p.empty), f"{where}: default of {p.name}"
        if p.default is not p.empty:
            assert q.default == p.default, f"{where}: default of {p.name} is {q.default!r}, theirs {p.default!r}"
        if p.kind == p.POSITIONAL_OR_KEYWORD and (where, p.name) not in POSITIONAL_ORDER:
            assert mine_list.index(q) == index, f"{where}: {p.name} at position {mine_list.index(q)}, theirs {index}"
    for q in mine_list:
        if q.name not in their.parameters and q.kind not in (q.VAR_POSITIONAL, q.VAR_KEYWORD):
            assert q.default is not q.empty, f"{where}: our extra parameter {q.name} must be optional"


# the objects local-attention's classes and main functions resolve to
EXPECTED = {
    "local_attention.LocalAttention": windowed_attention.LocalAttention,
    "local_attention.LocalMHA": windowed_attention.LocalMHA,
    "local_attention.LocalTransformer": windowed_attention.LocalTransformer,
    "local_attention.DynamicPositionBias": windowed_attention.DynamicPositionBias,
    "local_attention.local_attention.LocalAttention": windowed_attention.LocalAttention,
    "local_attention.local_attention.SinusoidalEmbeddings": windowed_attention.SinusoidalEmbeddings,
    "local_attention.rotary.SinusoidalEmbeddings": windowed_attention.SinusoidalEmbeddings,
    "local_attention.rotary.apply_rotary_pos_emb": windowed_attention.apply_rotary_pos_emb,
    "local_attention.transformer.FeedForward": windowed_attention.FeedForward,
    "local_attention.transformer.GEGLU": windowed_attention.GEGLU,
    "local_attention.transformer.LocalMHA": windowed_attention.LocalMHA,
    "local_attention.transformer.LocalTransformer": windowed_attention.LocalTransformer,
}


def test_every_path_and_name_of_local_attention_resolves_to_ours(real):
    theirs = {name: sys.modules[name] for name in compat.MODULE_NAMES}
    compat.install(replace=True)
    assert compat.installed()
    import local_attention

    checked = 0
    for name, their_module in theirs.items():
        module = importlib.import_module(name)
        assert module is sys.modules[name] and module is not their_module
        assert module.__name__.startswith("windowed_attention.compat.")
        for attr, value in vars(their_module).items():
            if attr.startswith("_") or not _defined_by_local_attention(value):
                continue
            assert hasattr(module, attr), f"{name}.{attr} is missing"
            ours = getattr(module, attr)
            if isinstance(value, types.ModuleType):
                assert ours is sys.modules[value.__name__]  # local_attention.rotary is the routed submodule
            elif attr == "Cache":
                assert ours._fields == value._fields
            elif isinstance(value, type):
                for method in ("__init__", "forward", "generate"):
                    if method in vars(value):
                        _check_accepts(getattr(ours, method), _undecorated(getattr(value, method)), f"{attr}.{method}")
            elif callable(value):
                _check_accepts(ours, value, f"{name}.{attr}")
            else:
                assert ours == value, f"{name}.{attr}"
            if not isinstance(value, types.ModuleType) and attr != "Cache":
                assert (getattr(ours, "__module__", None) or "windowed_attention").startswith("windowed_attention")
            checked += 1
    assert checked == 35  # local-attention 1.11.2: 7 + 11 + 4 + 13 names in its four modules
    for path, expected in EXPECTED.items():
        module, attr = path.rsplit(".", 1)
        assert getattr(importlib.import_module(module), attr) is expected, path
    assert local_attention.transformer is sys.modules["local_attention.transformer"]
    from local_attention.local_attention import look_around, pad_to_multiple  # noqa: F401  (the import itself)
    from local_attention.transformer import eval_decorator, top_k  # noqa: F401
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("local_attention.pykeops")  # not a module of local-attention 1.11.2


def test_importing_windowed_attention_installs_nothing():
    out = _python("""
        import sys
        import windowed_attention
        assert not [name for name in sys.modules if name.split(".")[0] == "local_attention"]
        assert "windowed_attention.compat" not in sys.modules
        import windowed_attention.compat as compat
        assert not compat.installed() and "local_attention" not in sys.modules
        try:
            import local_attention
        except ImportError:
            print("no local-attention")
        else:
            assert local_attention.LocalAttention is not windowed_attention.LocalAttention
            print(local_attention.LocalAttention.__module__)
    """)
    assert out.strip() in ("no local-attention", "local_attention.local_attention")


def test_install_warns_when_it_shadows_an_installed_local_attention(modules):
    if importlib.util.find_spec("local_attention") is None:
        pytest.skip("local-attention is not installed")
    with pytest.warns(ShadowWarning, match=r"local-attention 1\.11\.2 at .*local_attention.*replace=True"):
        compat.install()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compat.install()  # idempotent: installed already, nothing to say
        compat.install(replace=True)
    import local_attention

    assert local_attention.LocalAttention is windowed_attention.LocalAttention
    compat.uninstall()
    assert not compat.installed()
    assert not [name for name in sys.modules if _is_local_attention(name)]
    compat.uninstall()  # idempotent
    import local_attention  # the real one again

    assert local_attention.LocalAttention is not windowed_attention.LocalAttention


def test_install_refuses_an_imported_local_attention_without_replace(real):
    before = {name: module for name, module in sys.modules.items() if _is_local_attention(name)}
    with pytest.raises(ValueError, match=r"replace: local-attention .* is already imported"):
        compat.install()
    assert not compat.installed()
    assert {name: module for name, module in sys.modules.items() if _is_local_attention(name)} == before


def test_replace_swaps_an_imported_local_attention_and_uninstall_puts_it_back(real):
    before = {name: module for name, module in sys.modules.items() if _is_local_attention(name)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compat.install(replace=True)
    assert sys.modules["local_attention"].LocalMHA is windowed_attention.LocalMHA
    compat.uninstall()
    after = {name: module for name, module in sys.modules.items() if _is_local_attention(name)}
    assert after.keys() == before.keys() and all(after[name] is before[name] for name in before)


def test_install_says_nothing_without_a_real_local_attention(modules, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "local_attention" else find_spec(name, *args))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compat.install()
    assert compat.installed()


def test_install_checks_replace(modules):
    with pytest.raises(TypeError, match="replace must be a bool"):
        compat.install(replace="yes")
    assert not compat.installed()


def test_positional_cache_in_local_attention_order_is_refused():
    """local-attention's forward is (x, mask, cache, return_loss, ...); ours (x, mask, return_loss, cache,
    ...). A cache passed by position lands in return_loss and is refused, not taken for True."""
    model = windowed_attention.LocalTransformer(num_tokens=16, max_seq_len=32, dim=16, depth=1, dim_head=8,
                                                heads=2, local_attn_window_size=4)
    tokens = torch.randint(0, 16, (1, 8))
    _, cache = model(tokens, return_cache=True)
    with pytest.raises(TypeError, match="return_loss must be a bool"):
        model(tokens[:, -1:], None, cache)


# ---- the helpers, against local-attention's own


def test_helpers_match_local_attention(real):
    ours = importlib.import_module("windowed_attention.compat.local_attention")
    la, lt, lr = real.local_attention, real.transformer, real.rotary
    g = torch.Generator().manual_seed(0)
    for shape, dtype, pad_value in (((2, 5, 4, 3), torch.float32, -1), ((2, 5, 4), torch.bool, False)):
        x = torch.randn(*shape, generator=g) > 0 if dtype == torch.bool else torch.randn(*shape, generator=g)
        for backward, forward in ((1, 0), (0, 1), (2, 1), (0, 0), (3, 2)):
            expected = la.look_around(x, backward=backward, forward=forward, pad_value=pad_value)
            got = ours.local_attention.look_around(x, backward=backward, forward=forward, pad_value=pad_value)
            assert torch.equal(got, expected)
    x = torch.randn(2, 7, 3, generator=g)
    for multiple, dim, value in ((4, -2, 0), (7, -2, 0), (5, -1, -2.0), (2, -3, 1.0)):
        padded, got = ours.local_attention.pad_to_multiple(x, multiple, dim=dim, value=value)
        their_padded, expected = la.pad_to_multiple(x, multiple, dim=dim, value=value)
        assert padded == their_padded and torch.equal(got, expected)
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        assert ours.local_attention.max_neg_value(torch.zeros(1, dtype=dtype)) == la.max_neg_value(torch.zeros(1, dtype=dtype))
    t = torch.randn(3, 8, generator=g, dtype=torch.float64)
    assert ours.local_attention.to(t) == la.to(t)
    for mine, theirs in ((ours.local_attention.l2norm, la.l2norm), (ours.transformer.l2norm, lt.l2norm),
                         (ours.rotary.rotate_half, lr.rotate_half)):
        assert torch.equal(mine(t), theirs(t))
    assert ours.local_attention.TOKEN_SELF_ATTN_VALUE == la.TOKEN_SELF_ATTN_VALUE
    for module, their_module in ((ours.local_attention, la), (ours.transformer, lt), (ours.rotary, lr)):
        for value in (None, 0, "", torch.zeros(0)):
            assert module.exists(value) == their_module.exists(value)
    for value in (None, 0, False, 3):
        assert ours.local_attention.default(value, 7) == la.default(value, 7)
        assert ours.transformer.default(value, 7) == lt.default(value, 7)
    logits = torch.randn(4, 50, generator=g)
    for thres in (0.5, 0.9, 0.95):  # where local-attention keeps a token (at 1.0 it keeps none: test_parity)
        assert torch.equal(ours.transformer.top_k(logits, thres=thres), lt.top_k(logits, thres=thres))

    class Probe(torch.nn.Module):
        def mode(self, *args, **kwargs):
            return self.training, args, kwargs

    for decorator in (ours.transformer.eval_decorator, lt.eval_decorator):
        probe = Probe()
        assert decorator(Probe.mode)(probe, 1, k=2) == (False, (1,), {"k": 2}) and probe.training
        probe.eval()
        decorator(Probe.mode)(probe)
        assert not probe.training


def test_helpers_refuse_what_local_attention_gets_wrong(real):
    la = real.local_attention
    ours = importlib.import_module("windowed_attention.compat.local_attention.local_attention")
    x = torch.randn(2, 7, 3)
    # a non-negative dim: local-attention pads the last dim instead; we pad the dim given
    assert la.pad_to_multiple(x, 4, dim=1)[1].shape == (2, 7, 4)
    assert ours.pad_to_multiple(x, 4, dim=1)[1].shape == (2, 8, 3)
    assert torch.equal(ours.pad_to_multiple(x, 4, dim=1)[1], ours.pad_to_multiple(x, 4, dim=-2)[1])
    with pytest.raises(ValueError, match="multiple"):
        ours.pad_to_multiple(x, 0)
    with pytest.raises(ValueError, match="dim"):
        ours.pad_to_multiple(x, 4, dim=3)
    with pytest.raises(ValueError, match="dim"):
        ours.look_around(torch.randn(2, 3, 4), dim=1)
    with pytest.raises(ValueError, match="backward"):
        ours.look_around(torch.randn(2, 3, 4), backward=-1)
    with pytest.raises(TypeError, match="tensor"):
        ours.max_neg_value(torch.zeros(1, dtype=torch.long))
    # the mode comes back even when the method raises
    ours_decorator = importlib.import_module("windowed_attention.compat.local_attention.transformer").eval_decorator
    model = torch.nn.Linear(1, 1)
    with pytest.raises(RuntimeError):
        ours_decorator(lambda m: (_ for _ in ()).throw(RuntimeError("boom")))(model)
    assert model.training


# ---- third-party code through the route, each in a fresh interpreter


def _python(code: str, timeout: float = 600) -> str:
    """Run `code` in a fresh interpreter at the repository root; its stdout (it must succeed)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}
    lines = code.strip("\n").splitlines()
    indent = min(len(line) - len(line.lstrip()) for line in lines if line.strip())
    source = "\n".join(line[indent:] for line in lines)
    done = subprocess.run([sys.executable, "-c", source], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return done.stdout


def test_third_party_model_trains_and_generates_through_the_route():
    out = _python(f"""
        import json, sys
        import torch
        import windowed_attention
        import windowed_attention.compat as compat

        compat.install(replace=True)
        sys.path.insert(0, {str(STYLE)!r})
        import model as third_party  # imports local_attention only

        torch.manual_seed(0)

        def counting(b, n):  # next token = this one + 1 (mod 16): learnt in a few dozen steps
            return (torch.randint(0, 16, (b, 1)) + torch.arange(n)) % 16

        results = {{}}
        models = {{"tiny": third_party.TinyLM(num_tokens=32),
                   "transformer": third_party.local_transformer(32, use_dynamic_pos_bias=True)}}
        for name, lm in models.items():
            optimizer = torch.optim.Adam(lm.parameters(), lr=3e-3)
            losses = []
            for _ in range(40):
                batch = counting(8, 33)
                mask = torch.ones(8, 33, dtype=torch.bool) if name == "tiny" else None
                loss = lm(batch, mask=mask, return_loss=True)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
            prime = counting(2, 10)
            greedy = lm.generate(prime, 12, temperature=0.0)
            sampled = lm.generate(prime, 12)
            result = dict(first=losses[0], last=sum(losses[-5:]) / 5, training=lm.training,
                          greedy=greedy.tolist(), expected=((prime[:, -1:] + 1 + torch.arange(12)) % 16).tolist(),
                          sampled_shape=list(sampled.shape), sampled_range=[int(sampled.min()), int(sampled.max())],
                          attention=sorted({{type(m).__module__ + "." + type(m).__name__ for m in lm.modules()
                                            if "Attention" in type(m).__name__ or "MHA" in type(m).__name__}}))
            if name == "transformer":
                result["uncached"] = lm.generate(prime, 12, temperature=0.0, use_kv_cache=False).tolist()
            results[name] = result
        results["ours"] = (third_party.LocalAttention is windowed_attention.LocalAttention
                           and third_party.LocalTransformer is windowed_attention.LocalTransformer
                           and third_party.top_k.__module__ == "windowed_attention.sampling")
        print(json.dumps(results))
    """)
    results = json.loads(out.strip().splitlines()[-1])
    assert results["ours"]
    for name in ("tiny", "transformer"):
        result = results[name]
        assert result["last"] < 0.3 * result["first"], result  # it trains
        assert result["greedy"] == result["expected"], result  # and continues the count it learnt
        assert result["sampled_shape"] == [2, 12] and 0 <= result["sampled_range"][0] <= result["sampled_range"][1] < 32
        assert result["training"]  # generate gave the mode back
    assert "windowed_attention.attention.LocalAttention" in results["tiny"]["attention"]
    assert "windowed_attention.mha.LocalMHA" in results["tiny"]["attention"]
    assert not [name for name in results["tiny"]["attention"] + results["transformer"]["attention"]
                if name.startswith("local_attention")]
    assert results["transformer"]["uncached"] == results["transformer"]["greedy"]


def test_local_attention_test_file_passes_through_the_route():
    """Our rewrite of local-attention's tests/test_local_attention.py (and more of its calls), unchanged."""
    out = _python(f"""
        import sys
        import pytest
        import windowed_attention
        import windowed_attention.compat as compat

        compat.install(replace=True)
        import local_attention.transformer
        assert local_attention.transformer.LocalMHA is windowed_attention.LocalMHA
        sys.exit(pytest.main(["-o", "addopts=", "-q", "-p", "no:cacheprovider", "-W", "error::pytest.PytestUnraisableExceptionWarning",
                              {str(STYLE / 'suite.py')!r}]))
    """)
    summary = out.strip().splitlines()[-1]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) >= 40 and not re.search(r"failed|error|skipped", summary), out[-3000:]
