"""Hugging Face transformers integration, the import path users type: ``import sparse_attn.hf as sah;
sah.patch(model)``.  Imports transformers only when a model is patched."""
from .integrations.hf import (DEFAULT_OPTIONS, IMPLEMENTATION, ONLINE_DENSE_ABOVE, is_patched, patch,
                              retrieval_cache, unpatch)
from .integrations.hf.context_reuse import (RestoredContext, model_identity, restore_context, reuse_context,
                                            save_context)
from .integrations.hf.modality import current_spans, modality

__all__ = ["DEFAULT_OPTIONS", "IMPLEMENTATION", "ONLINE_DENSE_ABOVE", "RestoredContext", "current_spans",
           "is_patched", "model_identity", "modality", "patch", "restore_context", "retrieval_cache", "reuse_context",
           "save_context", "unpatch"]
