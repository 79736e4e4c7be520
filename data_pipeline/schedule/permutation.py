"""Keyed pseudo-random permutation of [0, n) evaluated one index at a time.

The schedule needs "the i-th element of a shuffled pass over a source" for sources of any size and
runs of any length, without ever materialising a permutation array (a billion-sample source would
need 8 GB for one). A balanced Feistel network is a bijection on [0, 4^h) for any round function;
cycle-walking (re-encrypting until the value falls back into [0, n)) restricts it to a bijection on
[0, n). The domain is chosen as the smallest power of four >= n, so it is < 4n and the expected
number of walks is < 4: O(1) time and memory per index.
"""

from __future__ import annotations

import hashlib

_MASK64 = (1 << 64) - 1
ROUNDS = 4
"""Feistel rounds: four give a pseudo-random permutation (Luby-Rackoff); the round function is the
cost of every schedule lookup, so no more than that."""


def derive_key(*parts: int | str) -> int:
    """A 64-bit key from an ordered tuple of ints/strings (seed, purpose, source, pass, ...).

    A cryptographic hash keeps keys for neighbouring (source, pass) pairs unrelated, so passes are
    independent shuffles rather than shifted copies of each other."""
    text = "\x1f".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


def _mix64(x: int) -> int:
    """splitmix64 finaliser: a fast, well-avalanching 64-bit mixing function."""
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _MASK64
    return x ^ (x >> 31)


class FeistelPermutation:
    """perm(i) for i in [0, n): a bijection of [0, n) fixed by (n, key)."""

    __slots__ = ("n", "_half_bits", "_half_mask", "_round_keys")

    def __init__(self, n: int, key: int) -> None:
        if n < 1:
            raise ValueError(f"FeistelPermutation: n must be >= 1, got {n}")
        self.n = n
        total_bits = max(2, (n - 1).bit_length())
        self._half_bits = (total_bits + 1) // 2
        self._half_mask = (1 << self._half_bits) - 1
        self._round_keys = tuple(_mix64((key + r * 0x9E3779B97F4A7C15) & _MASK64) for r in range(ROUNDS))

    def _encrypt(self, x: int) -> int:
        left, right = x >> self._half_bits, x & self._half_mask
        for round_key in self._round_keys:
            left, right = right, left ^ (_mix64(right ^ round_key) & self._half_mask)
        return (left << self._half_bits) | right

    def __call__(self, index: int) -> int:
        if not 0 <= index < self.n:
            raise IndexError(f"FeistelPermutation: index {index} outside [0, {self.n})")
        if self.n == 1:
            return 0
        x = self._encrypt(index)
        while x >= self.n:  # cycle-walk back into [0, n); terminates because _encrypt is a bijection
            x = self._encrypt(x)
        return x
