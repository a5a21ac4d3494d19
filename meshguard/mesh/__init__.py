"""The mesh core (sans-I/O): what meshguard nodes say to each other inside their tunnels.

Like :mod:`meshguard.core`, nothing here imports the reactor, sockets or clocks: features take
``now`` and say what to send and when to wake next.
"""
