"""The optional compiled part: built when a C compiler is there, skipped (with a
warning) when not; octopus then runs on its pure-Python path."""

from setuptools import Extension, setup

setup(ext_modules=[
    Extension("octopus.core._fastio", ["octopus/core/_fastio.c"], optional=True),
])
