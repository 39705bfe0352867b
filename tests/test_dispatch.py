"""The `auto` dispatch rule (`backends.decide`, a pure function) and explicit backend checks, without a GPU."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from windowed_attention import local_attention
from windowed_attention.ops import backends
from windowed_attention.ops.call import AttentionCall
from windowed_attention.ops.spec import WindowSpec

ALL = {"fused": True, "sdpa": True, "flex": True, "flash": True}
NO_FUSED = {**ALL, "fused": False}
PLAIN = WindowSpec(256, True, 1, 0, False)
EXACT = WindowSpec(256, True, 1, 0, True)


_FEATURE = {"mask": "mask", "attn_bias": "attn_bias", "mask_self": "shared_qk", "key_scale": "xpos", "dropout": "dropout"}


def decide(device, dtype, spec=PLAIN, available=ALL, head_dim=64, value_dim=None, **options):
    """`backends.decide` for a call with this rule and these options (booleans by the old keyword names)."""
    call = AttentionCall(spec, 1.0)
    used = call.features() | {_FEATURE[name] for name, on in options.items() if on}
    return backends.decide(device, dtype, frozenset(used), head_dim=head_dim, value_dim=value_dim, available=available)


def call(spec=PLAIN, **options):
    return AttentionCall(spec, 1.0, **options)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_cpu_takes_our_fused_kernel_for_every_option(dtype):
    assert decide("cpu", dtype) == "fused"
    assert decide("cpu", dtype, EXACT, mask=True) == "fused"
    assert decide("cpu", dtype, attn_bias=True, mask_self=True) == "fused"
    assert decide("cpu", dtype, EXACT, mask=True, key_scale=True) == "fused"
    assert decide("cpu", dtype, mask=True, attn_bias=True, mask_self=True, key_scale=True, dropout=True) == "fused"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cpu_xpos_without_the_built_kernel_takes_the_sdpa_path(dtype):
    assert decide("cpu", dtype, key_scale=True, available=NO_FUSED) == "sdpa"
    assert decide("cpu", dtype, EXACT, mask=True, key_scale=True, available=NO_FUSED) == "sdpa"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_without_the_built_kernel_takes_the_sdpa_path(dtype):
    assert decide("cpu", dtype, available=NO_FUSED) == "sdpa"
    assert decide("cpu", dtype, EXACT, mask=True, available=NO_FUSED) == "sdpa"


@pytest.mark.parametrize("option", ["attn_bias", "mask_self"])
def test_cpu_without_the_built_kernel_falls_back_to_reference_for_what_sdpa_lacks(option):
    assert decide("cpu", torch.float16, key_scale=True, available=NO_FUSED, **{option: True}) == "reference"
    assert decide("cpu", torch.float32, available=NO_FUSED, **{option: True}) == "reference"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_dropout_takes_the_fused_kernel_else_the_reference(dtype):
    assert decide("cpu", dtype, dropout=True) == "fused"
    assert decide("cpu", dtype, EXACT, mask=True, attn_bias=True, dropout=True) == "fused"
    assert decide("cpu", dtype, dropout=True, available=NO_FUSED) == "reference"  # sdpa has no dropout


def test_cpu_without_any_kernel_uses_reference():
    available = {"fused": False, "sdpa": False, "flex": True, "flash": True}
    assert decide("cpu", torch.float32, available=available) == "reference"


def test_cuda_prefers_flash_for_exact_half_precision_windows():
    assert decide("cuda", torch.bfloat16, EXACT) == "flash"
    assert decide("cuda", torch.float16, EXACT, dropout=True) == "flash"


@pytest.mark.parametrize(
    "dtype,spec,options",
    [
        (torch.float32, EXACT, {}),  # flash-attn has no fp32
        (torch.bfloat16, PLAIN, {}),  # window blocks are not a sliding window
        (torch.bfloat16, EXACT, {"mask": True}),
        (torch.bfloat16, EXACT, {"attn_bias": True}),
        (torch.bfloat16, EXACT, {"mask_self": True}),
    ],
)
def test_cuda_uses_flex_where_flash_cannot(dtype, spec, options):
    assert decide("cuda", dtype, spec, **options) == "flex"


@pytest.mark.parametrize("head_dim,value_dim", [(64, 32), (32, 64), (320, 320)])
def test_cuda_uses_flex_for_head_dims_flash_attn_does_not_take(head_dim, value_dim):
    assert decide("cuda", torch.bfloat16, EXACT, head_dim=head_dim, value_dim=value_dim) == "flex"
    assert decide("cuda", torch.bfloat16, EXACT, head_dim=256, value_dim=256) == "flash"


def test_choose_passes_the_value_head_dim(monkeypatch):
    """`choose` reads the head dims from the tensors (a stand-in for a CUDA tensor: no GPU here)."""
    monkeypatch.setattr(backends, "availability", lambda: ALL)
    q = SimpleNamespace(device=torch.device("cuda"), dtype=torch.bfloat16, shape=(2, 16, 64))
    assert backends.choose(q, call(EXACT)) == "flash"
    assert backends.choose(q, call(EXACT), value_dim=32) == "flex"


def test_cuda_without_flash_attn_installed_uses_flex():
    assert decide("cuda", torch.bfloat16, EXACT, available={**ALL, "flash": False}) == "flex"


@pytest.mark.parametrize("options", [{"key_scale": True}, {"dropout": True}])
def test_cuda_falls_back_to_reference_for_what_flex_lacks(options):
    assert decide("cuda", torch.float32, PLAIN, **options) == "reference"
    assert decide("cuda", torch.float32, PLAIN, available={**ALL, "flex": False, "flash": False}) == "reference"


@pytest.mark.parametrize("device", ["mps", "meta", "xpu"])
def test_other_devices_use_reference(device):
    assert decide(device, torch.float32) == "reference"


def test_choose_reads_device_dtype_and_options_from_the_call():
    q = torch.zeros(2, 8, 4)
    cpu = "fused" if backends.availability()["fused"] else "sdpa" if backends.availability()["sdpa"] else "reference"
    assert backends.choose(q, call(PLAIN)) == cpu
    fused = backends.availability()["fused"]
    assert backends.choose(q, call(PLAIN, key_scale=torch.ones(2, 4))) == cpu
    assert backends.choose(q, call(PLAIN, dropout_p=0.1)) == ("fused" if fused else "reference")
    assert backends.choose(q.half(), call(PLAIN, attn_bias=torch.zeros(1, 256, 512))) == cpu
    assert backends.choose(q.half(), call(PLAIN, mask_self=True, key_scale=torch.ones(2, 4))) == ("fused" if fused else "reference")
    assert backends.choose(torch.zeros(2, 8, 4, device="meta"), call(PLAIN)) == "reference"


def test_choose_under_cpu_autocast_decides_by_the_autocast_dtype():
    q = torch.zeros(2, 8, 4)
    fused, sdpa = backends.availability()["fused"], backends.availability()["sdpa"]
    with torch.autocast("cpu", dtype=torch.float16):
        assert backends.choose(q, call(PLAIN)) == ("fused" if fused else "sdpa" if sdpa else "reference")
        # the fused kernel takes xpos and shared_qk in float16; without it, sdpa takes xpos alone
        assert backends.choose(q, call(PLAIN, key_scale=torch.ones(2, 4))) == ("fused" if fused else "sdpa" if sdpa else "reference")
        assert backends.choose(q, call(PLAIN, key_scale=torch.ones(2, 4), mask_self=True)) == ("fused" if fused else "reference")
        assert backends.choose(q.double(), call(PLAIN, attn_bias=torch.zeros(1, 256, 512))) == ("fused" if fused else "reference")


def test_the_fused_kernel_builds_here():
    """CI machines have a C++ compiler: a build failure must show up as a failure, not as a silent fallback."""
    from windowed_attention.ops import fused_cpu

    assert fused_cpu.available(), fused_cpu._state.get("error")


def test_a_failed_build_falls_back_with_the_compiler_error(monkeypatch, tmp_path, capsys):
    """Announced on stderr, warned once with the reason, reported by `unavailable_reason` and in the error of an
    explicit `backend="fused"`; `auto` falls back to `sdpa`."""
    from windowed_attention.ops import fused_cpu

    monkeypatch.setattr(fused_cpu, "_state", {})
    monkeypatch.setattr(backends, "_AVAILABLE", dict(backends._AVAILABLE))
    monkeypatch.setenv("WINDOWED_ATTENTION_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.warns(RuntimeWarning, match="no-such-compiler") as warned:
        assert not fused_cpu.available()
        assert not fused_cpu.available()
    assert len(warned) == 1
    assert "compiling the fused CPU kernel into " + str(tmp_path / "cache") in capsys.readouterr().err
    assert "no-such-compiler" in fused_cpu.unavailable_reason()
    with pytest.raises(RuntimeError, match="no-such-compiler"):
        fused_cpu.kernel()
    q = torch.randn(1, 8, 4)
    with pytest.raises(ValueError, match="backend 'fused' is not available.*no-such-compiler"):
        local_attention(q, q, q, window_size=4, backend="fused")
    assert backends.choose(q, call(PLAIN)) == "sdpa"
    assert list((tmp_path / "cache").iterdir()) == []  # no partial library left behind


def test_disabled_build_reports_unavailable_and_explicit_choice_is_refused(monkeypatch, recwarn):
    from windowed_attention.ops import fused_cpu

    monkeypatch.setattr(fused_cpu, "_state", {})
    monkeypatch.setenv(fused_cpu.DISABLE_ENV, "1")
    assert not fused_cpu.available()
    assert fused_cpu.DISABLE_ENV in fused_cpu.unavailable_reason()
    with pytest.raises(RuntimeError, match=fused_cpu.DISABLE_ENV):
        fused_cpu.kernel()
    assert not [w for w in recwarn if "fused" in str(w.message)]  # asked for: no warning


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_auto_never_picks_a_backend_lacking_an_option(device, dtype):
    """For every subset of the modern options (and a few older ones), `decide` names a backend that declares
    them all and takes the dtype (the reference takes everything); and the first such one of the device."""
    from itertools import combinations

    from windowed_attention.ops.call import ALL_FEATURES

    names = sorted(ALL_FEATURES - {"block_window"})
    order = {"cpu": ["fused", "sdpa"], "cuda": ["flash", "flex"]}[device]
    for size in range(3):
        for used in combinations(names, size):
            used = frozenset(used)
            name = backends.decide(device, dtype, used, available=ALL)
            assert used <= backends.features(name), (used, name)
            able = [b for b in order if used <= backends.features(b) and dtype in backends._MODULES[b].DTYPES]
            assert name == (able[0] if able else "reference"), (used, name)
