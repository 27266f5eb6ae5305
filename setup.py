"""Build the one compiled module, ``segment._estep`` (the E-step kernels, C).

Everything else about the package is in pyproject.toml.
"""

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class BuildExt(build_ext):
    """Optimise, and let ``#pragma omp simd`` vectorise the kernels' sums, on gcc and clang."""

    def build_extensions(self):
        if self.compiler.compiler_type == "unix":
            for extension in self.extensions:
                extension.extra_compile_args += ["-O3", "-fopenmp-simd", "-std=c99"]
        super().build_extensions()


setup(
    ext_modules=[Extension("segment._estep", ["segment/_estep.c"])],
    cmdclass={"build_ext": BuildExt},
)
