"""Builds weightsmith's native merge kernels; everything else is in pyproject.toml.

The extension is optional: without a C compiler the install still succeeds and the merges run on torch.
"""
import sys

from setuptools import Extension, setup

# -fno-trapping-math lets the compiler turn the kernels' float selects into vector code (no result changes);
# -ffp-contract=off forbids fused multiply-adds, so results stay bitwise equal to the torch kernels.
flags = [] if sys.platform == "win32" else ["-O3", "-fno-trapping-math", "-ffp-contract=off", "-fvisibility=hidden"]
setup(ext_modules=[Extension("weightsmith.merge.native._kernels", ["weightsmith/merge/native/_kernels.c"],
                             depends=["weightsmith/merge/native/_tie_replay.h"], extra_compile_args=flags, optional=True)])
