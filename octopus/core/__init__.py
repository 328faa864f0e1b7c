"""The worker's core: the loop, connections, framing, hand-off.

``OCTOPUS_PURE_PYTHON=1`` in the environment makes it ignore the optional
compiled module (``_fastio``), as if no compiler had been there to build it.
"""

import os

PURE_PYTHON = bool(os.environ.get("OCTOPUS_PURE_PYTHON"))
