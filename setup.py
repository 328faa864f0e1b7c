"""The optional compiled part: built when a C compiler is there, skipped (with a
warning) when not; octopus then runs on its pure-Python path.

- ``OCTOPUS_NO_EXTENSIONS=1`` skips it (the aio-libs packages' convention);
- ``OCTOPUS_REQUIRE_EXTENSIONS=1`` makes a failed compile fail the build (CI).
"""

import os

from setuptools import Extension, setup

ext_modules = [] if os.environ.get("OCTOPUS_NO_EXTENSIONS") else [
    Extension("octopus.core._fastio", ["octopus/core/_fastio.c", "octopus/core/_hotpath.c"],
              depends=["octopus/core/_fastio.h"],
              optional=not os.environ.get("OCTOPUS_REQUIRE_EXTENSIONS")),
]

setup(ext_modules=ext_modules)
