"""A hand-driven relay client for netns tests, run inside a namespace with ``python3 -m``.

    python3 -m tests.relayprobe HOST PORT CA PRIVATE_B64 PUBLIC_B64 SECONDS [flood]

Connects once with the node's own client code (TLS verified against HOST with the CA file),
answers the challenge with the given keys (the public key need not match the private one: that
is how a test claims a member's key it cannot prove), and, with ``flood``, once accepted sends
junk frames to every member present for SECONDS as fast as the connection takes them. Prints
one JSON line: whether TLS verification failed, whether the relay accepted us, the ERROR code it
sent, and how many junk frames went out.
"""

from __future__ import annotations

import base64
import json
import os
import sys
from typing import Any

from twisted.internet import task
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol, wrapClientTLS
from twisted.python.failure import Failure

from meshguard.adapters.relay.client import RelayClientLink, RelayClientProtocol, tls_creator
from meshguard.relay import frames

#: Junk frames written per reactor turn while flooding.
BATCH = 64


class ProbeProtocol(RelayClientProtocol):
    """The node's client protocol, recording what happened instead of just logging it."""

    def __init__(self, link: RelayClientLink, clock: Any, result: dict[str, Any]) -> None:
        super().__init__(link, clock)
        self.result = result

    def frame_received(self, kind: int, payload: bytes) -> None:
        if kind == frames.ERROR and payload:
            self.result["error"] = payload[0]
        super().frame_received(kind, payload)
        self.result["accepted"] = self.authenticated

    def connectionLost(self, reason: Failure | None = None) -> None:  # type: ignore[override]
        if not self.authenticated and reason is not None:
            from OpenSSL import SSL
            from service_identity import VerificationError

            if reason.check(SSL.Error, VerificationError) is not None:  # type: ignore[no-untyped-call]
                self.result["tls_failed"] = True
        self.result["closed"] = True
        super().connectionLost(reason)


def flood(proto: ProbeProtocol, link: RelayClientLink, result: dict[str, Any]) -> None:
    """Junk of every size to every member present (and to made-up keys), as fast as it goes."""
    if not proto.authenticated or proto.closed:
        return
    targets = [k for k in link.members if k != link.relay_key] + [os.urandom(32)]
    for i in range(BATCH):
        payload = targets[i % len(targets)] + os.urandom(32 + (i * 97) % 1400)
        if proto.write_frame(frames.SEND, payload):
            result["sent"] += 1


def main(reactor: Any, argv: list[str]) -> Any:
    host, port, ca, private_b64, public_b64, seconds = argv[:6]
    flooding = argv[6:] == ["flood"]
    private, public = base64.b64decode(private_b64), base64.b64decode(public_b64)
    result: dict[str, Any] = {"tls_failed": False, "accepted": False, "error": None, "sent": 0}
    link = RelayClientLink(
        host,
        int(port),
        private_key=lambda: private,
        public_key=lambda: public,
        deliver=lambda source, datagram: None,
        clock=reactor,
    )
    endpoint = wrapClientTLS(
        tls_creator(host, ca_path=ca), HostnameEndpoint(reactor, host, int(port), timeout=5)
    )
    proto = ProbeProtocol(link, reactor, result)
    done = task.deferLater(reactor, float(seconds), lambda: None)

    def connected(_: object) -> None:
        if flooding:
            task.LoopingCall(flood, proto, link, result).start(0.0)

    def failed(reason: Failure) -> None:
        result["connect_error"] = str(reason.value)[:200]

    connectProtocol(endpoint, proto).addCallbacks(connected, failed)  # type: ignore[no-untyped-call]

    def report(_: object) -> None:
        result["accepted"] = result["accepted"] or proto.authenticated
        print(json.dumps(result), flush=True)
        proto.abort()

    return done.addCallback(report)


if __name__ == "__main__":
    task.react(main, (sys.argv[1:],))
