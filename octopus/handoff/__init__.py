"""Hand-off on reload: a retiring worker moves its open connections (descriptor,
buffers, the application's ``suspend()`` state) to a worker of the new generation.

- ``handoff``: both sides in one worker: the listener for incoming links, and
  the retire that starts an evacuation;
- ``evacuation``: the sending side, one batch of connections per link;
- ``link``: the framed Unix stream between two workers of one master.
"""
