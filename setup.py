"""Build the optional compiled kernels; everything else is in pyproject.toml.

``optional=True``: where no C compiler is found, ``pip install .`` still succeeds and the
package runs its numpy code instead (``ksm_analyze.hashing.compiled.native`` is None).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "ksm_analyze.hashing._compiled",
            sources=["ksm_analyze/hashing/_compiled.c"],
            include_dirs=["ksm_analyze/hashing/_vendor/xxhash"],
            depends=["ksm_analyze/hashing/_vendor/xxhash/xxhash.h"],
            extra_compile_args=["-O3"],
            optional=True,
        )
    ]
)
