"""Build the optional compiled kernels; everything else is in pyproject.toml.

``optional=True``: where no C compiler is found, ``pip install .`` still succeeds and the
package runs its numpy code instead (``ksm_analyze.hashing.compiled.native`` is None).

A tree built before holds the extension of that build (``build/lib.*/``, and in place after
an editable install): setuptools would call it up to date and package it even where this
build cannot compile. So the old one is removed first, and the extension in a wheel is
always the one this build compiled, or none.
"""

import os

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class FreshBuildExt(build_ext):
    def build_extension(self, ext: Extension) -> None:
        target = self.get_ext_fullpath(ext.name)
        if os.path.exists(target):
            os.remove(target)  # never "up to date": compile now, or ship no extension
        super().build_extension(ext)


setup(
    cmdclass={"build_ext": FreshBuildExt},
    ext_modules=[
        Extension(
            "ksm_analyze.hashing._compiled",
            sources=["ksm_analyze/hashing/_compiled.c"],
            include_dirs=["ksm_analyze/hashing/_vendor/xxhash"],
            depends=["ksm_analyze/hashing/_vendor/xxhash/xxhash.h"],
            extra_compile_args=["-O3"],
            optional=True,
        )
    ],
)
