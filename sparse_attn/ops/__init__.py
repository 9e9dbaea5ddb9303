"""Execution of a SparseLayout: reference (dense oracle), torch (any device), merge, and estimator helpers."""
