"""Control message kinds, one registry so features never collide on a number."""

from typing import Final

HELLO: Final = 1
HELLO_ACK: Final = 2

# Keepalive policy and NAT binding-lifetime measurement (10-19).
NAT_PROBE_REQUEST: Final = 10
NAT_PROBE_RESULT: Final = 11
#: The self-check of the tunnel's own mapping: "send me a late reply", and its acknowledgement.
NAT_SELF_CHECK: Final = 12
NAT_SELF_CHECK_ACK: Final = 13
#: "Answer this keepalive": the peer sends back an empty keepalive (mesh/keepalive_acks.py).
KEEPALIVE_REQUEST: Final = 14

# Path MTU discovery (20-29).
PMTU_PROBE: Final = 20
PMTU_ACK: Final = 21

# Membership, endpoint discovery and hole punching (30-49).
MEMBERS: Final = 30
CALL_ME_MAYBE: Final = 31
PATH_PING: Final = 32
PATH_PONG: Final = 33
#: "My NAT holds many mappings toward you: ping random ports of my address" (mesh/birthday.py).
BIRTHDAY: Final = 34

# Relaying through members (50-59).
RELAY_FORWARD: Final = 50
RELAY_DELIVER: Final = 51

# The TLS relay path: probing UDP while a peer is reached through a TLS relay (60-69).
TLS_UDP_PROBE: Final = 60
TLS_UDP_ACK: Final = 61
TLS_UDP_SWITCH: Final = 62

# Operator tools: ``meshguard ping`` (90-99).
OPERATOR_PING: Final = 90
OPERATOR_PONG: Final = 91
