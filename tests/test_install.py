"""Where `tubevit_fast.kernels` comes from (tubevit_fast/_checkout.py): the kernels/ folder of the
checkout the package is imported from, whichever clone an editable install points at, so a change
to kernels/ is never tested against another clone's code; an installed wheel keeps the kernels
inside its package. Each case imports a copy of the package in a fresh interpreter."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Prints where tubevit_fast.kernels and one of its kernel modules were found, and the copy's marker.
SHOW_KERNELS = ("import importlib.util, tubevit_fast.kernels as k; print(k.__file__); "
                "print(importlib.util.find_spec('tubevit_fast.kernels.attention').origin); "
                "print(getattr(k, 'MARKER', None))")


def copy_tree(src: str, dst, marker: str | None = None) -> None:
    shutil.copytree(os.path.join(ROOT, src), dst, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    if marker is not None:
        with open(dst / "__init__.py", "a") as f:
            f.write(f"\nMARKER = {marker!r}\n")


def import_kernels(pythonpath, cwd) -> list[str]:
    """[kernels/__init__.py, kernels/attention.py, the marker] as a fresh interpreter finds them."""
    proc = subprocess.run([sys.executable, "-c", SHOW_KERNELS], cwd=cwd, capture_output=True, text=True,
                          timeout=180, env={**os.environ, "PYTHONPATH": str(pythonpath)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.splitlines()


def test_a_second_clone_on_pythonpath_imports_its_own_kernels(tmp_path):
    clone = tmp_path / "clone"
    copy_tree("tubevit_fast", clone / "tubevit_fast")
    copy_tree("kernels", clone / "kernels", marker="second clone")
    (clone / "setup.py").write_text("# a source checkout\n")
    assert import_kernels(clone, cwd=tmp_path) == [str(clone / "kernels" / "__init__.py"),
                                                   str(clone / "kernels" / "attention.py"), "second clone"]


def test_an_installed_wheel_keeps_the_kernels_inside_its_package(tmp_path):
    """No setup.py beside the package: a folder called kernels there (site-packages may hold the
    unrelated PyPI package of that name) is not ours."""
    site = tmp_path / "site-packages"
    copy_tree("tubevit_fast", site / "tubevit_fast")
    copy_tree("kernels", site / "tubevit_fast" / "kernels", marker="wheel")
    (site / "kernels").mkdir()
    (site / "kernels" / "__init__.py").write_text("MARKER = 'another project'\n")
    kernels = site / "tubevit_fast" / "kernels"
    assert import_kernels(site, cwd=tmp_path) == [str(kernels / "__init__.py"), str(kernels / "attention.py"),
                                                  "wheel"]
