"""Listening sockets and what lies under a connection: addresses, TLS, the PROXY protocol."""
