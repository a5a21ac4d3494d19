"""The composition: the node wired from cores and adapters, its Twisted service, the
``twistd meshguard`` options and the command-line tools. Nothing imports this package
but itself, the twistd plugin and the console scripts.
"""
