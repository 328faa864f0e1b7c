"""The asyncio Protocol echo server on uvloop's event loop.

    python bench/peers/uvloop_echo.py --bind 127.0.0.1:9876 --workers 2
"""

from __future__ import annotations

import uvloop
from asyncio_echo import main

if __name__ == "__main__":
    main(uvloop.run, "uvloop Protocol echo server")
