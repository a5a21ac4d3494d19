"""The TLS relay's Twisted side: client, server, the connection both share, and the
service that follows a node's lifecycle. The sans-I/O half is :mod:`meshguard.relay`.
"""
