"""Content refs: a slice's name, the sha256 of its content.

Equal content has equal refs in any process on any machine, so a worker's
cache is keyed by them (runtime/cache.py). Arrays hash their dtype, shape
and bytes; a text matrix's rows hash their bytes (parsing is a pure
function of them); anything else hashes its pickle. Each kind is tagged,
so two kinds never share a ref. An array's ref over 8 MiB is made of the
digests of its 8 MiB blocks, and `block_digests` keeps them for the refs
hashed last: they are the digests a host's cache seals the slice's array
buffer with (runtime/sealed.py), so the host need not hash it again.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
import threading
import types
import zlib
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from qjamfab import protocol
from qjamfab.errors import BadDataSet

_HASH_BLOCK = protocol.HASH_BLOCK  # arrays over this hash their blocks in parallel
_DIGESTS_KEPT = 4096  # refs whose block digests block_digests keeps
_ARRAY_TAG = b"qjamfab-ndarray\0"
_PICKLE_TAG = b"qjamfab-pickle4\0"
_TEXT_TAG = b"qjamfab-textrows\0"
_PAYLOAD_TAG = b"qjamfab-payload5\0"
_digests: OrderedDict[str, tuple[bytes, ...]] = OrderedDict()
_digests_lock = threading.Lock()


def content_ref(obj: Any) -> str:
    """Hex sha256 of a slice's content, equal for equal content anywhere.

    Arrays hash dtype, shape and C-order bytes (no copy when contiguous),
    over 8 MiB as the digests of their 8 MiB blocks, hashed in parallel;
    anything else hashes its protocol-4 pickle.
    """
    h = hashlib.sha256()
    if isinstance(obj, np.ndarray) and not obj.dtype.hasobject:
        # Object arrays hold pointers, so they go through pickle instead.
        h.update(_ARRAY_TAG)
        # dtype_to_descr is dtype.str for plain dtypes and keeps field names
        # for structured ones (where dtype.str is just '|V<n>').
        descr = np.lib.format.dtype_to_descr(obj.dtype)
        h.update(f"{descr!r}{obj.shape!r}\0".encode())
        data = np.ascontiguousarray(obj).reshape(-1).view(np.uint8)
        if len(data) <= _HASH_BLOCK:
            h.update(data.data)  # its memoryview: numpy's stubs for 3.11 lack Buffer
        else:
            # A tree: the digests of its blocks, hashed on every core.
            h.update(b"blocks\0")
            blocks = [
                data[i : i + _HASH_BLOCK] for i in range(0, len(data), _HASH_BLOCK)
            ]
            digests = tuple(_hash_pool().map(_block_digest, blocks))
            for digest in digests:
                h.update(digest)
            ref = h.hexdigest()
            with _digests_lock:
                _digests[ref] = digests
                _digests.move_to_end(ref)
                while len(_digests) > _DIGESTS_KEPT:
                    _digests.popitem(last=False)
            return ref
        return h.hexdigest()
    h.update(_PICKLE_TAG)
    try:
        _pickle_into(h, obj, fast=True)
    except ValueError:
        # Fast mode refuses cyclic objects; the ordinary pickle is still
        # deterministic, only sensitive to which equal objects are shared.
        h = hashlib.sha256(_PICKLE_TAG)
        _pickle_into(h, obj, fast=False)
    return h.hexdigest()


def block_digests(ref: str) -> tuple[bytes, ...] | None:
    """The sha256 digests of the 8 MiB blocks of the array whose ref is
    `ref` (its C-order bytes), when this process hashed it as one over
    8 MiB lately; else None."""
    with _digests_lock:
        return _digests.get(ref)


def text_rows_ref(data: bytes) -> str:
    """Hex sha256 of a text matrix's rows, from their bytes."""
    h = hashlib.sha256(_TEXT_TAG)
    h.update(data)
    return h.hexdigest()


def payload_ref(parts: list) -> str:
    """Hex sha256 of an encoded payload (protocol.encode's parts): its
    part lengths and the digests of its 8 MiB blocks, hashed on every
    core. A Broadcast's ref: what is hashed is exactly what is sent."""
    h = hashlib.sha256(_PAYLOAD_TAG)
    h.update(repr([memoryview(p).nbytes for p in parts]).encode())
    for digest in _map(_view_digest, _blocks(parts)):
        h.update(digest)
    return h.hexdigest()


def checksums(parts: list) -> tuple[int, ...]:
    """crc32 of every 8 MiB block of `parts`, on every core: a check that
    the bytes are still the ones a payload_ref was made of, at less than
    half sha256's cost (25 ms against 58 ms per 100 MiB on one core)."""
    return tuple(_map(zlib.crc32, _blocks(parts)))


def _map(func: Any, blocks: list[memoryview]) -> Any:
    """func over the blocks: on every core when one is a full block, else
    here (many small buffers would cost more in handing over)."""
    if any(len(b) == _HASH_BLOCK for b in blocks):
        return _hash_pool().map(func, blocks)
    return map(func, blocks)


def _blocks(parts: list) -> list[memoryview]:
    views = [memoryview(p).cast("B") for p in parts]
    return [
        v[i : i + _HASH_BLOCK] for v in views for i in range(0, len(v), _HASH_BLOCK)
    ]


def _block_digest(block: np.ndarray) -> bytes:
    return _view_digest(block.data)


def _view_digest(view: memoryview) -> bytes:
    return hashlib.sha256(view).digest()  # releases the GIL


@functools.lru_cache(maxsize=1)
def _hash_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(
        max_workers=os.cpu_count() or 1, thread_name_prefix="qjamfab-hash"
    )


def _pickle_into(h: Any, obj: Any, *, fast: bool) -> None:
    """Stream obj's pickle into hash h without building the bytes.

    Fast mode turns off the memo, so two equal objects pickle the same
    whether or not they share sub-objects.
    """
    pickler = pickle.Pickler(types.SimpleNamespace(write=h.update), protocol=4)
    pickler.fast = fast
    try:
        pickler.dump(obj)
    except (pickle.PicklingError, TypeError, AttributeError) as exc:
        raise BadDataSet(
            f"a {type(obj).__name__} slice cannot be pickled ({exc}): keep "
            "slices to plain data (numbers, str, lists, numpy arrays)"
        ) from exc
