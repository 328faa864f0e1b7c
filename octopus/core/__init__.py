"""Below everything: the event loop, connections, framing, addresses and descriptor I/O."""
