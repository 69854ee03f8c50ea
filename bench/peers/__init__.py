"""The peers: small servers doing tokenfan's job with the libraries a user would otherwise pick.

Each peer, run as ``python -m bench.peers.NAME``, listens on free loopback ports and prints
``peer listening WS_PORT EMIT_PORT`` once it accepts connections. Every peer speaks the same
minimal contract, so one swarm and one emitter measure them all:

- subscribers connect (WebSocket at ``/ws``, or SSE at ``/sse?ch=NAME``) and, over WebSocket,
  send a tokenfan ``sub`` frame; the peer answers ``{"t": "ok", "o": TOP, ...}``;
- ``POST /api/emit`` with ``{"channel", "event", "data"}`` gives the event the channel's next
  offset, encodes it once (msgpack ``ev`` frame, or one SSE ``data:`` line of JSON) and sends
  it to every subscriber of the channel, the way that library is meant to broadcast;
- SIGTERM stops the peer.
"""
