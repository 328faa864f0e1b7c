"""The event loop, connections, framing and the worker: one process serving one application."""
