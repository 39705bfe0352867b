"""Optional dependencies: the core needs only torch, einops and safetensors; what only training, the
benchmark or an integration uses is an extra of the package (`pyproject.toml`), and its absence is one line
naming that extra (`MissingExtra`), which the command line prints as its error (exit code 2).

    train         tqdm (the progress bar), matplotlib (loss.png)
    bench         tqdm, matplotlib (the plots), local-attention (the implementation compared against)
    transformers  transformers (the Hugging Face route)
    all           all of the above; test: all, plus what the test suite needs

Imports nothing heavy: the command line loads it before it handles Ctrl-C.
"""

from __future__ import annotations

import importlib


class MissingExtra(ImportError):
    """An optional package is not installed; `str(error)` is one line naming the extra that brings it."""


def require(module: str, extra: str, purpose: str):
    """`module` imported (e.g. "matplotlib.pyplot"), or `MissingExtra` when its package is not installed:
    "<purpose> needs <package>: pip install 'windowed-attention[<extra>]'". An installed package that fails
    to import for another reason (a broken dependency of its own) raises that error unchanged."""
    package = module.partition(".")[0]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        if not (error.name and (module == error.name or module.startswith(error.name + "."))):
            raise  # not `module` or a package above it: a dependency of an installed package
        raise MissingExtra(f"{purpose} needs {package.replace('_', '-')}: "
                           f"pip install 'windowed-attention[{extra}]'", name=package) from None
