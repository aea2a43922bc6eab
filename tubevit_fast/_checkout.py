"""Import `tubevit_fast.kernels` from the checkout this package was imported from.

setup.py maps the top-level kernels/ folder to `tubevit_fast.kernels`. An editable install records
that mapping as an absolute path, so a second clone imported through PYTHONPATH would still get the
first clone's kernels: a change to kernels/ tested against stale code. When the package sits in a
source checkout (setup.py and kernels/ beside it), this finder resolves `tubevit_fast.kernels` and its
submodules to that checkout's folder instead. An installed wheel has no such neighbours and is left
alone (its kernels are inside the package).
"""
from __future__ import annotations

import importlib.util
import os
import sys

PACKAGE = "tubevit_fast.kernels"


def checkout_kernels_folder(package_dir: str) -> str | None:
    """The kernels/ folder of the source checkout holding `package_dir`, or None if there is none."""
    root = os.path.dirname(os.path.abspath(package_dir))
    folder = os.path.join(root, "kernels")
    if os.path.isfile(os.path.join(root, "setup.py")) and os.path.isfile(os.path.join(folder, "__init__.py")):
        return folder
    return None


class CheckoutKernelsFinder:
    """A meta-path finder for `tubevit_fast.kernels` (and its submodules) in one folder."""

    def __init__(self, folder: str):
        self.folder = folder

    def find_spec(self, name, path=None, target=None):
        if name == PACKAGE:
            return importlib.util.spec_from_file_location(name, os.path.join(self.folder, "__init__.py"),
                                                          submodule_search_locations=[self.folder])
        return None  # submodules are found through the package's __path__, which is the folder


def install(package_dir: str) -> None:
    """Put the finder first on sys.meta_path when `package_dir` lies in a source checkout."""
    folder = checkout_kernels_folder(package_dir)
    if folder is None or any(isinstance(f, CheckoutKernelsFinder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, CheckoutKernelsFinder(folder))
