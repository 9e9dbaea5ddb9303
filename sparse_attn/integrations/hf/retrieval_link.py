"""How the attention function finds the retrieval cache layer of the current call.

transformers calls, inside one attention module's forward and in this order, ``cache.update(key, value,
layer_idx)`` and then the registered attention function, but passes the cache object to only the first.  So
`decode_cache.RetrievalLayer.update` notes itself here (per thread, weakly) with the shape of the key it returns,
and the attention function takes that note (`take_updated_layer`) before anything else.  This survives what a
tensor attribute did not: a cast or copy of the key between the two calls, or a model that re-wraps its keys.
The note is consumed by the next attention call in the thread, and used only when the key has the noted shape.
"""
from __future__ import annotations

import threading
import weakref

# thread id -> (weak reference to the layer, shape of the key its update returned); empty unless a retrieval cache
# is in use, so the common path is one emptiness test (which torch.compile folds into a guard).
_updated: dict = {}


def note_updated_layer(layer, key) -> None:
    """Called by a retrieval cache layer's ``update`` with the key tensor it returns."""
    _updated[threading.get_ident()] = (weakref.ref(layer), tuple(key.shape))


def take_updated_layer(key):
    """The retrieval cache layer updated for this attention call (its key has ``key``'s shape), or None."""
    if not _updated:
        return None
    note = _updated.pop(threading.get_ident(), None)
    if note is None or note[1] != tuple(key.shape):
        return None
    return note[0]()
