"""Build the optional compiled kernels; everything else is in pyproject.toml.

``optional=True``: where no C compiler is found, ``pip install .`` still succeeds and the
package runs its numpy code instead (``ksm_analyze.kernels.native`` is None).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "ksm_analyze._kernels",
            sources=["ksm_analyze/_kernels.c"],
            include_dirs=["ksm_analyze/_vendor/xxhash"],
            depends=["ksm_analyze/_vendor/xxhash/xxhash.h"],
            extra_compile_args=["-O3"],
            optional=True,
        )
    ]
)
