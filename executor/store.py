"""The run's shared store: `Store` (client, `ctx.store`) and `StoreTable` (its data).

One `StoreTable` lives in the run's services process and holds every key of the run,
so values written by earlier tasks are visible to later ones. Each worker process talks
to it through its own `Store`. Every operation is one request answered after it was
applied, and the services process applies requests one at a time: `incr` and `cas` are
atomic across all workers, and a value is visible to everyone once `store[k] = v` has
returned. Values are kept encoded (the services process unpickles only for `incr`
and `cas`); big ones stay in sealed shared memory (see `executor._wire`).
"""

from __future__ import annotations

import pickle
from collections import deque
from collections.abc import Callable
from typing import Any

from executor._wire import Blob, Connection, Message, decode, encode, load, same_value, take

Reply = tuple[Message, list[Blob]]

STORE_OPS = frozenset({"get", "set", "del", "has", "keys", "incr", "cas"})
"""The requests a StoreTable applies."""


def _check_key(key: object) -> str:
    if type(key) is not str:
        raise TypeError(f"store keys must be str, not {type(key).__name__}")
    return key


class Store:
    """Dict-like access to the run's store (`ctx.store`); one per worker process.

    Raises KeyError for a missing key, TypeError for a non-str key or an `incr` on a
    value that is not an int. Values are any picklable object; reading one returns a
    fresh copy, so mutate-then-assign (`d = store[k]; d[x] = y; store[k] = d`).
    """

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def __reduce__(self) -> Any:
        raise TypeError("a Store cannot be pickled: give workers the services address")

    def __getitem__(self, key: str) -> Any:
        reply, fds = self._conn.call(("get", _check_key(key), False))
        return load(reply[1], fds)

    def __setitem__(self, key: str, value: Any) -> None:
        blob = encode(value)
        self._conn.call(("set", _check_key(key), blob.enc), [blob])

    def __delitem__(self, key: str) -> None:
        self._conn.call(("del", _check_key(key)))

    def __contains__(self, key: object) -> bool:
        reply, _ = self._conn.call(("has", _check_key(key)))
        return bool(reply[1])

    def get(self, key: str, default: Any = None) -> Any:
        reply, fds = self._conn.call(("get", _check_key(key), True))
        return default if reply[1] is None else load(reply[1], fds)

    def keys(self) -> list[str]:
        """A snapshot of the keys, in insertion order."""
        reply, _ = self._conn.call(("keys",))
        return list(reply[1])

    def incr(self, key: str, n: int = 1) -> int:
        """Atomically add `n` to the int at `key` (a missing key counts as 0); the new value."""
        if type(n) is not int:
            raise TypeError(f"store.incr: n must be int, not {type(n).__name__}")
        reply, _ = self._conn.call(("incr", _check_key(key), n))
        return int(reply[1])

    def cas(self, key: str, expected: Any, new: Any) -> bool:
        """Atomically set `key` to `new` if it holds a value equal to `expected`.

        `expected=None` matches only a missing key. Returns whether `new` was stored.
        """
        key = _check_key(key)
        old = None if expected is None else encode(expected)
        blob = encode(new)
        blobs = [blob] if old is None else [old, blob]
        reply, _ = self._conn.call(("cas", key, old and old.enc, blob.enc), blobs)
        return bool(reply[1])

    def close(self) -> None:
        """Close the connection (shared with this process's Events)."""
        self._conn.close()


class StoreTable:
    """The data of one run's store, inside the services process."""

    def __init__(self) -> None:
        self._data: dict[str, Blob] = {}
        self._ops: dict[str, Callable[..., Reply]] = {
            "get": self._get,
            "set": self._set,
            "del": self._del,
            "has": self._has,
            "keys": self._keys,
            "incr": self._incr,
            "cas": self._cas,
        }

    def apply(self, msg: Message, fds: deque[int]) -> Reply:
        """Apply one request; the reply and the stored values it sends back."""
        op, *args = msg
        if args:
            _check_key(args[0])
        return self._ops[op](fds, *args)

    def close(self) -> None:
        for blob in self._data.values():
            blob.close()
        self._data.clear()

    def _put(self, key: str, blob: Blob) -> None:
        old = self._data.pop(key, None)
        if old is not None:
            old.close()
        self._data[key] = blob

    def _get(self, fds: deque[int], key: str, missing_ok: bool) -> Reply:
        blob = self._data.get(key)
        if blob is not None:
            return ("ok", blob.enc), [blob]
        if missing_ok:
            return ("ok", None), []
        raise KeyError(key)

    def _set(self, fds: deque[int], key: str, enc: Any) -> Reply:
        self._put(key, take(enc, fds))
        return ("ok", None), []

    def _del(self, fds: deque[int], key: str) -> Reply:
        self._data.pop(key).close()
        return ("ok", None), []

    def _has(self, fds: deque[int], key: str) -> Reply:
        return ("ok", key in self._data), []

    def _keys(self, fds: deque[int]) -> Reply:
        return ("ok", list(self._data)), []

    def _incr(self, fds: deque[int], key: str, n: int) -> Reply:
        old = self._data.get(key)
        current = 0 if old is None else decode(old)
        if type(current) is not int:
            raise TypeError(f"store.incr: {key!r} holds {type(current).__name__}, not int")
        value = current + n
        self._put(key, Blob(pickle.dumps(value, protocol=5)))
        return ("ok", value), []

    def _cas(self, fds: deque[int], key: str, expected: Any, new: Any) -> Reply:
        old = self._data.get(key)
        want = None if expected is None else take(expected, fds)
        blob = take(new, fds)
        if want is None:
            swap = old is None
        else:
            swap = old is not None and same_value(old, want)
            want.close()
        if swap:
            self._put(key, blob)
        else:
            blob.close()
        return ("ok", swap), []
