"""Between the socket and the connection: listeners, TLS (MemoryBIO), the PROXY protocol."""
