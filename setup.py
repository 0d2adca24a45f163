"""Build hook for the optional io_uring extension.

The extension needs only a C compiler and the kernel's <linux/io_uring.h>.
If either is missing the build prints why and the package installs without
it; ``llmtier.engine.open_engine("auto")`` then falls back to the
``threads`` backend and says so.
"""
from __future__ import annotations

import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """build_ext that never fails the install because of the io_uring extension."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # compiler missing entirely
            self._skip(exc)

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:  # header missing, compile error
            self._skip(exc)

    @staticmethod
    def _skip(exc: BaseException) -> None:
        print(
            f"llmtier: io_uring extension not built ({exc}); "
            "the 'uring' engine will be unavailable and 'auto' falls back to 'threads'.",
            file=sys.stderr,
        )


ext_modules = []
if sys.platform.startswith("linux"):
    ext_modules.append(
        Extension(
            "llmtier.engine._uring",
            sources=["src/llmtier/engine/_uring.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=gnu11"],
            optional=True,
        )
    )

setup(ext_modules=ext_modules, cmdclass={"build_ext": OptionalBuildExt})
