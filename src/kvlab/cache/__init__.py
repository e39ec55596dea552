"""The paged KV store."""

from kvlab.cache.store import KVStore, LayerStore

__all__ = ["KVStore", "LayerStore"]
