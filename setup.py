"""The one thing pyproject.toml cannot say without an experimental table: the C
extension. ``statecast._speedups`` holds C versions of the publish hot path
(statecast.core.accel). It is optional: without a compiler the package installs
without it and runs the same code in Python."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "statecast._speedups",
            ["src/statecast/_speedups.c"],
            extra_compile_args=["-Wall", "-Wextra", "-Wno-unused-parameter"],
            optional=True,
        )
    ]
)
