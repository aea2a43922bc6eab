"""Loading the optional compiled extension (csrc/, module tubevit_fast._C)."""
from __future__ import annotations

import functools
import importlib


@functools.lru_cache(maxsize=1)
def _load():
    try:
        return importlib.import_module("tubevit_fast._C"), None
    except ImportError as err:
        return None, (f"the CUDA extension tubevit_fast._C is not available ({err}); "
                      f"build it with TUBEVIT_FAST_BUILD_CUDA=1 pip install -e .")


def unavailable_reason() -> str | None:
    return _load()[1]
