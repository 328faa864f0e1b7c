"""The asyncio line broadcast server on uvloop's event loop (one process).

    python bench/peers/uvloop_broadcast.py --bind 127.0.0.1:9876
"""

from __future__ import annotations

import uvloop
from asyncio_broadcast import main

if __name__ == "__main__":
    main(uvloop.run, "uvloop line broadcast server (one process)")
