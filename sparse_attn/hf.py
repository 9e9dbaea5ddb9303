"""Hugging Face transformers integration, the import path users type: ``import sparse_attn.hf as sah;
sah.patch(model)``.

Importing it registers ``"sparse_attn"`` in transformers' attention registries (so
``from_pretrained(..., attn_implementation="sparse_attn")`` works), which imports transformers; without transformers
installed the import still succeeds and `patch` says what to install.  ``import sparse_attn`` alone never imports
transformers."""
from .integrations.hf import (DEFAULT_OPTIONS, IMPLEMENTATION, ONLINE_DENSE_ABOVE, is_patched, patch, register,
                              retrieval_cache, unpatch)
from .integrations.hf.context_reuse import (RestoredContext, model_identity, restore_context, reuse_context,
                                            save_context)
from .integrations.hf.modality import current_spans, modality

try:
    register()
except ImportError:         # transformers is the hf extra; patch() raises the install hint
    pass

__all__ = ["DEFAULT_OPTIONS", "IMPLEMENTATION", "ONLINE_DENSE_ABOVE", "RestoredContext", "current_spans",
           "is_patched", "model_identity", "modality", "patch", "register", "restore_context", "retrieval_cache",
           "reuse_context", "save_context", "unpatch"]
