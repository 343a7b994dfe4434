"""Liveness constants shared by the gateway, the instances, the store and the deployer."""

# How often an idle instance and the gateway say HEARTBEAT to each other.
# Sane range 0.2-5 s: lower costs CPU on idle instances, higher slows failure detection.
HEARTBEAT_INTERVAL_S = 1.0

# A peer is dead after this many intervals without a message (an instance with calls
# in flight is judged by its calls' deadlines instead, since a busy handler blocks it).
# Sane range 3-10.
HEARTBEAT_LIVENESS = 3

# Reconnect backoff for sockets that lost their peer. Sane range 0.05-30 s.
RECONNECT_MIN_S = 0.1
RECONNECT_MAX_S = 5.0

# How long a stopping instance waits for the gateway to acknowledge its BYE and for
# in-flight calls to finish before it exits anyway. Sane range 1-60 s.
DRAIN_TIMEOUT_S = 10.0

# The deployer reports to the store this often; the store calls it down after
# HEARTBEAT_LIVENESS missed reports. Sane range 0.5-10 s.
DEPLOYER_REPORT_INTERVAL_S = 1.0

# How long a stopping instance with nothing in flight waits for the gateway's BYE
# acknowledgement (which tells it no INVOKE is still on the wire). Sane range 0.5-5 s.
BYE_ACK_TIMEOUT_S = 2.0

# RPC calls between services give up after this long (the socket stays usable).
RPC_TIMEOUT_S = 10.0
