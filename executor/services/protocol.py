"""The messages of the services wire: one small typed class per kind.

A client sends requests (`Get`, `Publish`, ...); the services process answers each with
one reply (`Ok`, `Got`, `Counted`, `Tables`, `Err`, or first `Pending` for a wait that
parks, then `Ok` or `Timeout`), and between replies may send asides (`Event`: a
subscription's payload; `Spare`: memfds to write into, see memfd_values.py).

Every class is a NamedTuple whose last field, `tag`, names its kind. A message travels
as a plain tuple and `typed()` rebuilds its class from the tag, because pickling a
NamedTuple as such writes and looks up its class on every message, several times the
cost of the tuple. (A `MemfdRef` inside a message is pickled as it is: it comes with
64 KiB or more to copy.)
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple


class MemfdRef(NamedTuple):
    """A value that travels in a memfd (the descriptor comes with the frame)."""

    kind: str
    """"bytes" or "bytearray" (written as is), or "pickle"."""
    size: int
    """The value's bytes in the memfd, after its header (memfd_values.HEADER)."""
    layout: tuple[int, ...]
    """For a pickle: its length, then the length of each out-of-band buffer after it."""
    generation: int
    """What the memfd's header holds for this value; 0: sealed (memfd_values.py)."""


Enc = bytes | MemfdRef
"""An encoded value: its inline pickle, or a value in a memfd."""


# --- requests: a client to the services --------------------------------------------


class Ping(NamedTuple):
    """Answered `Ok(pid)` once every request sent before it was applied."""

    tag: Literal["ping"] = "ping"


class ShareTables(NamedTuple):
    """Answered `Tables`, with the memfds of the store's shared tables."""

    tag: Literal["tables?"] = "tables?"


class Get(NamedTuple):
    """Answered `Got`, with the value's memfd if it has one."""

    key: str
    tag: Literal["get"] = "get"


class Set(NamedTuple):
    """Store a value; answered `Ok(None)`."""

    key: str
    enc: Enc
    tag: Literal["set"] = "set"


class Put(NamedTuple):
    """Store a value without an answer; a failure drops the sender's connection."""

    key: str
    enc: Enc
    tag: Literal["put"] = "put"


class Delete(NamedTuple):
    """Answered `Ok(None)`, or `Err` KeyError."""

    key: str
    tag: Literal["del"] = "del"


class Has(NamedTuple):
    """Answered `Ok(bool)`."""

    key: str
    tag: Literal["has"] = "has"


class Keys(NamedTuple):
    """Answered `Ok(list of keys)`, in insertion order."""

    tag: Literal["keys"] = "keys"


class Incr(NamedTuple):
    """Answered `Counted`."""

    key: str
    n: int
    tag: Literal["incr"] = "incr"


class Cas(NamedTuple):
    """Answered `Ok(bool)`: whether `new` was stored."""

    key: str
    expected: Enc | None
    new: Enc
    tag: Literal["cas"] = "cas"


class Publish(NamedTuple):
    """Answered `Ok(None)` if `ack`, else not at all."""

    topic: str
    enc: Enc
    ack: bool
    tag: Literal["pub"] = "pub"


class Wait(NamedTuple):
    """Answered `Ok(payload)` or `Timeout`, after a `Pending` if it parks."""

    topic: str
    timeout: float | None
    tag: Literal["wait"] = "wait"


class Unwait(NamedTuple):
    """End this connection's parked wait (answered `Timeout`); nothing if none is parked."""

    tag: Literal["unwait"] = "unwait"


class Subscribe(NamedTuple):
    """Answered `Ok(sid)`; the topic's later payloads follow as `Event`s."""

    topic: str
    tag: Literal["sub"] = "sub"


class Unsubscribe(NamedTuple):
    """Answered with the subscription's last `Event` (`enc` None), if the sender owns it."""

    sid: int
    tag: Literal["unsub"] = "unsub"


class AskBoard(NamedTuple):
    """Answered `Ok(slot)` with the wait board's memfd, or `Ok(-1)`: no board."""

    tag: Literal["board?"] = "board?"


# --- replies: the services to a client -----------------------------------------------


class Ok(NamedTuple):
    """A request's answer; what `value` holds depends on the request."""

    value: Any = None
    tag: Literal["ok"] = "ok"


class Got(NamedTuple):
    """The answer to `Get`: the value (None: missing) at its bucket's `version`."""

    enc: Enc | None
    version: int
    cacheable: bool
    """False for a counter: its value changes without a version bump."""
    tag: Literal["got"] = "got"


class Counted(NamedTuple):
    """The answer to `Incr`: the new value, and the key's counter entry (-1: none)."""

    value: int
    entry: int
    tag: Literal["counted"] = "counted"


class Tables(NamedTuple):
    """The answer to `ShareTables`: the sizes of the tables whose memfds come with it."""

    versions_size: int
    counters_size: int
    """0: no counter table (and no memfd for it)."""
    recycling: bool
    """Whether the services recycle big store values (spares) for this run."""
    tag: Literal["tables"] = "tables"


class Err(NamedTuple):
    """A failed request: the exception's class name and its argument."""

    error: str
    message: Any
    tag: Literal["err"] = "err"


class Pending(NamedTuple):
    """The wait parked: its answer comes later."""

    tag: Literal["pending"] = "pending"


class Timeout(NamedTuple):
    """A parked wait ended without a payload."""

    tag: Literal["timeout"] = "timeout"


# --- asides: the services to a client, between replies ----------------------------------


class Event(NamedTuple):
    """A payload of subscription `sid`; `enc` None: the subscription ended."""

    sid: int
    enc: Enc | None
    tag: Literal["ev"] = "ev"


class Spare(NamedTuple):
    """Memfds of store values the sender's requests replaced (they come with it)."""

    tag: Literal["spare"] = "spare"


Request = (
    Ping
    | ShareTables
    | Get
    | Set
    | Put
    | Delete
    | Has
    | Keys
    | Incr
    | Cas
    | Publish
    | Wait
    | Unwait
    | Subscribe
    | Unsubscribe
    | AskBoard
)
Reply = Ok | Got | Counted | Tables | Err | Pending | Timeout
Aside = Event | Spare
Message = Request | Reply | Aside

# The messages without fields (and the commonest answer), made once.
PING, SHARE_TABLES, KEYS, UNWAIT, ASK_BOARD = Ping(), ShareTables(), Keys(), Unwait(), AskBoard()
DONE, PENDING, TIMEOUT, SPARE = Ok(), Pending(), Timeout(), Spare()

_KINDS: dict[str, tuple[type[Message], int]] = {
    kind._field_defaults["tag"]: (kind, len(kind._fields))
    for kind in (
        *(Ping, ShareTables, Get, Set, Put, Delete, Has, Keys, Incr, Cas),
        *(Publish, Wait, Unwait, Subscribe, Unsubscribe, AskBoard),
        *(Ok, Got, Counted, Tables, Err, Pending, Timeout, Event, Spare),
    )
}
_new = tuple.__new__


def typed(raw: tuple[Any, ...]) -> Message:
    """The message a plain tuple from the wire stands for (ValueError if none)."""
    try:
        kind, size = _KINDS[raw[-1]]
    except (KeyError, IndexError, TypeError):
        raise ValueError(f"not a services message: {raw!r:.80}") from None
    if len(raw) != size:
        raise ValueError(f"a {kind.__name__} of {len(raw)} fields instead of {size}")
    message: Message = _new(kind, raw)
    return message
