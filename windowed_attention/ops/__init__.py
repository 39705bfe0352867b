"""The local attention op and its backends (the reference first)."""

from .api import attend, local_attention, make_spec
from .spec import WindowSpec

__all__ = ["local_attention", "attend", "make_spec", "WindowSpec"]
