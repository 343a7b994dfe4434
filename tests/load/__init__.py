"""``python -m tests.load``: a load generator for nuclide's async invocation paths (issue 5).

It sends invoke messages to a nuclide stack on this machine, waits for them to
finish, and prints one screen of numbers: accepted, completed (DONE), failed
(FAILED or DEAD), lost (accepted but never found, or not final by the end),
end-to-end throughput and p50/p99 latency (queued -> finished, from the call
records the stack keeps).

Modes (``--mode``):

- ``push`` (default): ZeroMQ PUSH to the gateway's ingress (``gateway_pull``)
  with :class:`shared.ingress.Producer`. Each message carries a call id the
  generator chose, so every one is looked up with ``GET /calls/{id}``.
  "accepted" means handed to ZeroMQ: a PUSH socket has no acknowledgement, so a
  message the gateway never stored shows up as lost.
- ``pub``: ZeroMQ PUB on a topic to the gateway's SUB ingress (``gateway_sub``).
  Topic delivery is best effort (like core NATS): a message published before the
  subscription is up, or beyond a high-water mark, is gone, so lost > 0 does not
  fail the run in this mode. Topic calls get ids the gateway chooses, so they are
  found by listing ``GET /calls?function=F&limit=1000`` (calls with source
  "topic" queued since the run started); the listing cannot page, so a pub run is
  capped at 1000 calls and the function should be otherwise idle. Each payload
  is tagged ``{"load": RUN, "seq": N}``.
- ``http``: ``POST /{function}`` with ``X-Nuclide-Async: true``; "accepted" is a
  202 with a call id.

Bounds: ``--count`` (at most 200000) and ``--duration`` (seconds of sending; the
first one reached ends sending), ``--rate`` calls/s (0 = as fast as possible),
``--wait`` (seconds to wait for completion) and ``--stall`` (stop waiting once
no call finished for that long). Only loopback targets are accepted.

Targets: ``--self-contained`` starts a throwaway stack (``tests/stack.py``) in a
temporary directory, deploys a no-op function (and one with a topic trigger for
pub), runs, prints and tears it all down. Otherwise it uses a running stack:
``--url``/``--token`` resolved like the CLI (flags, ``NUCLIDE_URL``/
``NUCLIDE_TOKEN``, then the stacks the CLI recorded), ``--pull``/``--sub`` (default: the
gateway's configured ``gateway_pull``/``gateway_sub``) and ``--function NAME``.

Exit status: 0 when the run completed with nothing lost (pub: always 0 once it
ran), 1 when accepted calls were lost, 2 on bad usage or an unreachable or
unusable target, 130 when interrupted.
"""
