"""The errors the media readers raise, and optional imports that say what to install.

Apart from tubevit_fast.io so that the decoder (tubevit_fast.app.decode), which io's float reader
calls, can raise them without importing io back."""
from __future__ import annotations

import importlib

VIDEO_EXTRA = 'pip install "tubevit_fast[video]"'


class MediaError(ValueError):
    """A video or image file that cannot be used: not media, corrupt, or too short."""


class MissingDependency(ImportError):
    """An optional package (PyAV, Pillow, Matplotlib: the `video` extra) is not installed."""


def require(module: str, purpose: str):
    """import_module(module), or MissingDependency telling the user how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        package = {"av": "av (PyAV)", "PIL": "pillow", "matplotlib": "matplotlib"}.get(module.split(".")[0], module)
        raise MissingDependency(f"{purpose} needs the {package} package, which is not installed: "
                                f"{VIDEO_EXTRA}") from err


def first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
