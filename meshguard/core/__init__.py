"""The sans-I/O protocol core: bytes and ``now`` in, actions out; no reactor, sockets or clocks."""
