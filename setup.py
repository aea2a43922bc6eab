"""Install tubevit_fast.

A plain `pip install .` is pure Python. The CUDA extension in csrc/ is built with ninja
only when asked (TUBEVIT_FAST_BUILD_CUDA=1) or when a GPU is visible.
"""
from setuptools import setup

setup(
    packages=["tubevit_fast", "tubevit_fast.reference", "tubevit_fast.ops", "tubevit_fast.kernels"],
    # kernels/ is shipped inside the package: a top-level `kernels` module would clash
    # with an unrelated PyPI package of that name.
    package_dir={"tubevit_fast.kernels": "kernels"},
)
