"""The asyncio Protocol echo server on uvloop's event loop, over TLS.

    python bench/peers/uvloop_tls_echo.py --bind 127.0.0.1:9443 --tls-cert C --tls-key K

``loop.create_server(..., ssl=context)`` with an ``ssl.SSLContext`` holding
the certificate and key (``--cert``/``--key`` are the same options).
"""

from __future__ import annotations

import uvloop
from asyncio_echo import main

if __name__ == "__main__":
    main(uvloop.run, "uvloop Protocol echo server over TLS", tls="required")
