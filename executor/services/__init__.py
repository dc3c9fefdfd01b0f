"""The run's services: one process that serves the shared store and the events to every
task (`server.py`), the client side tasks use (`store.py`, `events.py`), the socket wire
between them (`wire.py`, its typed messages `protocol.py`, a connection's reply
bookkeeping `replies.py`), and the shared-memory fast paths (`counters.py`, `board.py`,
`memfd_values.py`, `value_cache.py`, over `sharedmem.py`). EXECUTOR_FASTPATHS=off turns
off all but the read cache (`value_cache.py`; see executor.settings.fastpaths)."""
