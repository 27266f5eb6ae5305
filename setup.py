"""Build the one compiled module, ``segment._estep`` (the E-step and MRF-sweep kernels, C).

Everything else about the package is in pyproject.toml.

The module is optional: when it cannot be compiled (no C compiler, an unsupported flag) the
package installs without it and runs every kernel on its numpy twin (same results, several
times slower; ``segment`` says so once at run time). ``SEGMENT_NO_COMPILED=1`` at install
time skips the build.
"""

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CCompilerError, ExecError, PlatformError

#: Optimise, let ``#pragma omp simd`` vectorise the kernels' sums, let loops with a comparison
#: vectorise (without -fno-trapping-math gcc keeps them scalar, to keep floating-point exception
#: flags exact; no result changes), and keep each floating-point operation rounded as written
#: (no fused multiply-add), as the numpy twins compute them.
FLAGS = ["-O3", "-fopenmp-simd", "-std=c99", "-fno-trapping-math", "-ffp-contract=off"]

BUILD_ERRORS = (CCompilerError, ExecError, PlatformError, OSError)


class OptionalBuildExt(build_ext):
    """Build the kernels if a C compiler can; otherwise say why and install without them."""

    def run(self):
        if os.environ.get("SEGMENT_NO_COMPILED", "") not in ("", "0"):
            _notice("SEGMENT_NO_COMPILED is set")
            return
        try:
            super().run()
        except BUILD_ERRORS as error:  # e.g. no compiler found at all
            _notice(error)

    def build_extension(self, extension):
        base = list(extension.extra_compile_args)
        # the flags are those of gcc and clang; any other compiler, or one that refuses a flag,
        # gets a second try without them
        attempts = [FLAGS, []] if self.compiler.compiler_type == "unix" else [[]]
        for number, flags in enumerate(attempts):
            extension.extra_compile_args = base + flags
            try:
                return super().build_extension(extension)
            except BUILD_ERRORS as error:
                if number == len(attempts) - 1:
                    _notice(error)


def _notice(reason):
    print(
        f"segment: the compiled kernels (segment._estep) are not built ({reason}); the package "
        "runs on their numpy twins, with the same results but several times slower. Install "
        "a C compiler (gcc or clang) and reinstall to build them.",
        file=sys.stderr,
    )


setup(
    ext_modules=[Extension("segment._estep", ["segment/_estep.c"], optional=True)],
    cmdclass={"build_ext": OptionalBuildExt},
)
