"""Block bookkeeping for the paged KV cache: reference counts and prefix reuse over full blocks.

A full block is known by a chain key: (key of the block before it, its tokens). Two sequences whose
first n blocks hold the same tokens share those blocks' KV, and a finished request leaves its blocks
behind as a cache: a free block keeps its contents until it is handed out again, least recently
freed first, so the next chat turn (or a second request with the same system prompt) computes only
its new tokens.
"""

from __future__ import annotations

from collections import OrderedDict

BlockKey = tuple[int, tuple[int, ...]]  # (hash of the previous block's key, or 0; this block's tokens)


def block_keys(token_ids: list[int], block_size: int, start: int = 0, parent: int = 0) -> list[BlockKey]:
    """Chain keys of the full blocks from block index `start` on; `parent`: hash of the key before it."""
    keys = []
    for i in range(start, len(token_ids) // block_size):
        key = (parent, tuple(token_ids[i * block_size : (i + 1) * block_size]))
        keys.append(key)
        parent = hash(key)
    return keys


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True) -> None:
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        self.ref = [0] * num_blocks
        self.key: list[BlockKey | None] = [None] * num_blocks
        self.cached: dict[BlockKey, int] = {}  # full blocks by content, in use or free
        self._plain = list(range(num_blocks - 1, -1, -1))  # free, holding nothing reusable (pop: low ids first)
        self._evictable: OrderedDict[int, None] = OrderedDict()  # free but reusable, least recently freed first

    @property
    def num_free(self) -> int:
        return len(self._plain) + len(self._evictable)

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise RuntimeError(f"KV cache: {n} blocks asked for, {self.num_free} free")
        out = []
        for _ in range(n):
            if self._plain:
                b = self._plain.pop()
            else:  # evict the least recently freed cached block
                b, _ = self._evictable.popitem(last=False)
                del self.cached[self.key[b]]  # type: ignore[index]
                self.key[b] = None
            self.ref[b] = 1
            out.append(b)
        return out

    def free(self, blocks: list[int]) -> None:
        """Drop one reference to each block; tail blocks first, so a sequence's prefix is evicted last."""
        for b in reversed(blocks):
            self.ref[b] -= 1
            if self.ref[b] == 0:
                if self.key[b] is not None:
                    self._evictable[b] = None
                else:
                    self._plain.append(b)
        blocks.clear()

    def match(self, keys: list[BlockKey]) -> list[int]:
        """Take a reference to the cached blocks of the longest cached prefix of `keys`."""
        out = []
        if not self.prefix_caching:
            return out
        for key in keys:
            b = self.cached.get(key)
            if b is None:
                break
            if self.ref[b] == 0:
                del self._evictable[b]
            self.ref[b] += 1
            out.append(b)
        return out

    def register(self, block: int, key: BlockKey) -> None:
        """A block became full with computed KV: make it findable (unless identical content already is)."""
        if self.prefix_caching and key not in self.cached and self.key[block] is None:
            self.cached[key] = block
            self.key[block] = key

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (free blocks become plain again)."""
        for b in list(self._evictable):
            self._plain.append(b)
        self._evictable.clear()
        for b, key in enumerate(self.key):
            if key is not None and self.ref[b] == 0:
                self.key[b] = None
        self.cached = {k: b for k, b in self.cached.items() if self.ref[b] > 0}
