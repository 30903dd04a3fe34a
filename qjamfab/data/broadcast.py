"""`Broadcast`: a value that does not change, sent to each host once.

A Broadcast wraps a big constant (a vocabulary, a frozen embedding, a
lookup table) anywhere inside a run's params. It is pickled and hashed
once, when it is made; its ref is the sha256 of that payload
(content_refs.payload_ref). The run's params pickle carries only the ref
(pickle's persistent id), and the TASK head lists the run's broadcast refs
(`"broadcasts"`): a worker lacking one says it is blocked, as for a
slice, and the master sends the payload as a REFS frame, which the host
stores in its slice cache (runtime/cache.py), on disk, under that ref. So
it crosses to each host once, and a later Master, whose workers find it on
disk, sends none of it. The worker unpickles it once per process (the
cache keeps it in memory) and hands mapfunc the value itself in its place
(runtime/task.py's `execute`).

A Broadcast must not change: each run checks, before anything is sent,
that the value still pickles to the same main stream (unless made with
`check=False`: then that stream is the one made first) and that its
out-of-band buffers (numpy arrays' data, which are not copied) have the
same crc32 checksums; a change raises BadParams. Pickled any other way
(futures' arguments, a user's own pickle) a Broadcast travels inline and
arrives as its value.
"""

from __future__ import annotations

import operator

from .. import protocol, text
from ..errors import BadParams
from . import serialize
from .content_refs import checksums, payload_ref


class Broadcast:
    """A value that does not change, sent to each host once per session
    and kept in the hosts' caches between sessions.

    Put it anywhere inside a run's params; mapfunc receives the value in
    its place. Raises BadParams when the value cannot be pickled or holds
    another Broadcast. Each run raises BadParams when the value changed
    since: it pickles the value again and compares, and checksums its
    numpy arrays' data (not copied: only a checksum tells a change there).
    With `check=False` the value is taken as it is now, pickled once:
    later changes to its objects are not seen, by the check or by the
    workers, which saves pickling it each run (about 0.3-0.5 s for a dict
    of a million words); an array's data changed in place still fails.
    """

    __slots__ = ("value", "ref", "nbytes", "check", "_parts", "_checksums")
    made = 0  # Broadcasts made in this process: none, no params look for one

    def __init__(self, value: object, *, check: bool = True):
        # Pickled once with the hook that refuses a Broadcast inside; one
        # put there later changes the pickle, which the check sees.
        parts = serialize.encode_broadcast(value, _refuse_nested)
        self.value = value
        self.check = check
        self.ref = payload_ref(parts)
        self.nbytes = protocol.frame_size(parts)  # what one REFS frame carries
        # The main stream is bytes (a snapshot); arrays' buffers are views.
        self._parts = parts
        self._checksums = checksums(parts[1:])
        Broadcast.made += 1

    def payload(self) -> list:
        """The value's payload parts, checked unchanged since it was made."""
        parts = serialize.encode_broadcast(self.value) if self.check else self._parts
        if parts[0] != self._parts[0] or checksums(parts[1:]) != self._checksums:
            raise BadParams(
                f"a Broadcast's value (a {type(self.value).__name__}) changed "
                "since the Broadcast was made: wrap the new value in a new "
                "qjamfab.Broadcast (hosts keep a Broadcast by its hash, so it "
                "must not change)"
            )
        return parts

    def __copy__(self) -> Broadcast:
        return self  # it does not change: copies may share it

    def __deepcopy__(self, memo: dict) -> Broadcast:
        return self  # (else __reduce__ would make a copy its bare value)

    def __reduce__(self) -> tuple:
        # Outside a run's params (futures' arguments, a user's pickle) it
        # travels inline and arrives as its value, which is what mapfunc
        # sees too; itemgetter(0) is importable wherever pickle is.
        return operator.itemgetter(0), ((self.value,),)

    def __repr__(self) -> str:
        return (
            f"Broadcast({type(self.value).__name__}, "
            f"{text.format_bytes(self.nbytes)}, ref {self.ref[:12]})"
        )


def _refuse_nested(obj: object) -> None:
    """persistent_id while pickling a Broadcast's value: none inside."""
    if isinstance(obj, Broadcast):
        raise BadParams(
            "a Broadcast inside another Broadcast's value: wrap only the "
            "outer value (what it holds travels with it), or put the inner "
            "Broadcast next to it in params"
        )


def encode_params(params: object) -> tuple[list, dict[str, list]]:
    """A run's params as payload parts, each Broadcast in them as its ref;
    and the payload of each of those Broadcasts by ref, checked unchanged.
    Raises BadParams."""
    if not Broadcast.made:
        return serialize.encode_params(params), {}
    # By object: two Broadcasts of equal content share a ref, yet each is
    # checked (either may have changed since).
    found: dict[int, Broadcast] = {}

    def persistent_id(obj: object) -> str | None:
        if type(obj) is not Broadcast:
            return None
        found[id(obj)] = obj
        return obj.ref

    parts = serialize.encode_params(params, persistent_id)
    return parts, {b.ref: b.payload() for b in found.values()}
