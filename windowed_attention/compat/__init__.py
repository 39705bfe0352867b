"""Run code written for local-attention 1.11.2 on windowed-attention, unchanged: one explicit `install()`.

    import windowed_attention.compat
    windowed_attention.compat.install()

    from local_attention import LocalAttention          # now windowed_attention's class
    import performer_pytorch                             # third-party code importing local_attention

After `install()` the module paths of local-attention 1.11.2 (`local_attention`,
`local_attention.local_attention`, `local_attention.rotary`, `local_attention.transformer`) are the
modules of `windowed_attention.compat.local_attention` (registered in `sys.modules` under both names),
with every class, function, helper and constant local-attention defines there. Names it merely imports
from other libraries (`torch`, `nn`, `F`, `rearrange`, `get_init_and_expand_reduce_stream_functions`, ...)
are not part of the route. `import windowed_attention` never installs anything; `uninstall()` undoes it.

A real local-attention is never shadowed silently:

- installed but not yet imported: `install()` shadows it with a `ShadowWarning` naming it (its version and
  place); `install(replace=True)` says you mean it and warns of nothing;
- already imported: `install()` raises `ValueError` (modules imported before would keep the real classes
  beside ours); `install(replace=True)` takes its modules out of `sys.modules`, and `uninstall()` puts
  them back.

The route holds in this process only (a spawned worker calls `install()` itself). See docs/compat.md.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import sys
import warnings

__all__ = ["install", "uninstall", "installed", "ShadowWarning", "MODULE_NAMES"]

# local-attention's module paths -> ours (relative to this package)
_ROUTES = {
    "local_attention": ".local_attention",
    "local_attention.local_attention": ".local_attention.local_attention",
    "local_attention.rotary": ".local_attention.rotary",
    "local_attention.transformer": ".local_attention.transformer",
}
MODULE_NAMES = tuple(_ROUTES)

_shadowed: dict | None = None  # the real modules taken out of sys.modules by the installed route


class ShadowWarning(UserWarning):
    """`install()` made `import local_attention` mean windowed-attention although the real package is installed."""


def _ours() -> dict:
    return {name: importlib.import_module(target, __name__) for name, target in _ROUTES.items()}


def _is_local_attention(name: str) -> bool:
    return name == "local_attention" or name.startswith("local_attention.")


def _describe_real(spec=None, module=None) -> str:
    """'local-attention 1.11.2 at /path/local_attention/__init__.py' (what is known of it)."""
    try:
        version = importlib.metadata.version("local-attention")
    except importlib.metadata.PackageNotFoundError:
        version = "(version unknown)"
    origin = getattr(module, "__file__", None) if module is not None else getattr(spec, "origin", None)
    return f"local-attention {version}" + (f" at {origin}" if origin else "")


def installed() -> bool:
    """Whether `local_attention` and its submodules are windowed-attention's now."""
    if _shadowed is None:
        return False
    ours = _ours()
    return all(sys.modules.get(name) is module for name, module in ours.items())


def install(*, replace: bool = False) -> None:
    """Make `import local_attention` (and its submodules) resolve to windowed-attention; idempotent.

    Call it before importing the code written for local-attention. `replace=True`: shadow a real
    local-attention without a warning, even one already imported (its modules come back with
    `uninstall()`). Without it, an installed local-attention is shadowed with a `ShadowWarning`, and an
    imported one is a `ValueError`.
    """
    global _shadowed
    if not isinstance(replace, bool):
        raise TypeError(f"replace must be a bool, got {type(replace).__name__} {replace!r}")
    if installed():
        return
    ours = _ours()
    owned = {id(module) for module in ours.values()}
    loaded = {name: module for name, module in sys.modules.items()
              if _is_local_attention(name) and id(module) not in owned}
    if loaded and not replace:
        raise ValueError(
            f"replace: {_describe_real(module=loaded.get('local_attention'))} is already imported, so modules that "
            "imported it keep its classes; call windowed_attention.compat.install() before anything imports "
            "local_attention, or pass replace=True to route every later import to windowed-attention"
        )
    if not loaded and not replace:
        spec = importlib.util.find_spec("local_attention")
        if spec is not None:
            warnings.warn(
                f"windowed_attention.compat.install(): `import local_attention` now gives windowed-attention, not the "
                f"installed {_describe_real(spec=spec)}; pass replace=True to say so and silence this warning",
                ShadowWarning, stacklevel=2,
            )
    for name in loaded:
        del sys.modules[name]
    sys.modules.update(ours)
    # a second install() after the user removed some entries keeps the real modules saved the first time
    _shadowed = {**loaded, **(_shadowed or {})}


def uninstall() -> None:
    """Undo `install()`: `local_attention` is again whatever it was before (the real modules it took out of
    `sys.modules` come back). Objects already imported through the route stay windowed-attention's."""
    global _shadowed
    if _shadowed is None:
        return
    for name, module in _ours().items():
        if sys.modules.get(name) is module:
            del sys.modules[name]
    for name, module in _shadowed.items():
        sys.modules.setdefault(name, module)
    _shadowed = None
    importlib.invalidate_caches()
