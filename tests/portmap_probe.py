"""A port-mapping probe for the netns tests, run inside a home namespace.

usage: python3 -m tests.portmap_probe METHOD INTERNAL_PORT WAIT_SECONDS
Binds UDP INTERNAL_PORT, asks the default gateway for a mapping with METHOD (pcp, natpmp or upnp,
meshguard's own clients), prints ``GRANT <json>``, prints ``RECEIVED <text> FROM <host:port>`` for
each datagram that arrives within WAIT_SECONDS, then removes the mapping and prints ``RELEASED``.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import deferLater

from meshguard.adapters.portmap.methods import Method, NatPmpMethod, PcpMethod
from meshguard.adapters.portmap.service import default_gateway
from meshguard.adapters.portmap.upnp import UpnpMethod, reactor_threads

reactor: Any = _reactor


class Listener(DatagramProtocol):
    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        print(f"RECEIVED {datagram.decode(errors='replace')} FROM {addr[0]}:{addr[1]}", flush=True)


def method_named(name: str) -> Method:
    def listen(protocol: DatagramProtocol) -> Any:
        return reactor.listenUDP(0, protocol)

    if name == "pcp":
        return PcpMethod(reactor, listen, default_gateway, os.urandom)
    if name == "natpmp":
        return NatPmpMethod(reactor, listen, default_gateway)
    return UpnpMethod(reactor_threads(reactor))


@inlineCallbacks
def main(name: str, port: int, wait: float) -> Any:
    reactor.listenUDP(port, Listener())
    method = method_named(name)
    try:
        grant = yield method.request(port, port, 600)
    except Exception as e:
        print(f"FAILED {e}", flush=True)
        reactor.stop()
        return
    print("GRANT " + json.dumps(grant.__dict__), flush=True)
    yield deferLater(reactor, wait, lambda: None)
    try:
        yield method.release(port, grant.external_port)
        print("RELEASED", flush=True)
    except Exception as e:
        print(f"RELEASE FAILED {e}", flush=True)
    reactor.stop()


if __name__ == "__main__":
    reactor.callWhenRunning(main, sys.argv[1], int(sys.argv[2]), float(sys.argv[3]))
    reactor.run()
