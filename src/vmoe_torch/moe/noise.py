"""Counter-based router noise: standard-normal draws that are a pure
function of (seed, global routing group, position in the group).

Why counter-based: group g's noise must not depend on which process routes
g, nor on how many groups a process holds (expert and data parallelism), and
drawing it must stay on the device and inside one compiled graph (no Python
loop of generators, no host sync, no recompilation when the seed changes
every step). JAX gets this from threefry with `fold_in`; here the same shape
of computation is built from a 32-bit integer hash in int64 tensor ops:

  key   = H(H(seed_lo) ^ seed_hi)                   per layer and step
  gkey  = H(key ^ H(g))                             per global group g
  u1, u2 = H(gkey ^ H(2i)), H(gkey ^ H(2i + 1))      per element i
  z     = sqrt(-2 ln u1) * cos(2 pi u2)              Box-Muller

H is the "triple32" integer hash (xor-shift / multiply, full avalanche).
Every intermediate stays below 2^49, so int64 arithmetic is exact on every
backend. The seed lives in a (2,) int64 tensor so that a new seed each step
is new data, not a new graph.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch
from torch import Tensor, nn

MASK32 = 0xFFFFFFFF
_TRIPLE32 = ((17, 0xED5AD4BB), (11, 0xAC4C1B51), (15, 0x31848BAB))


def _mul32(x: Tensor, c: int) -> Tensor:
    """x * c mod 2^32 for x in [0, 2^32), exact in int64 (16-bit halves of c)."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & MASK32


def hash32(x: Tensor) -> Tensor:
    """The triple32 hash of 32-bit values held in int64 (any shape)."""
    for shift, mult in _TRIPLE32:
        x = _mul32(x ^ (x >> shift), mult)
    return x ^ (x >> 14)


def seed_words(seed: int) -> Tensor:
    """A Python seed (any int, reduced mod 2^64) as (2,) int64 32-bit words."""
    seed %= 1 << 64
    return torch.tensor([seed & MASK32, seed >> 32], dtype=torch.int64)


def _uniform(bits: Tensor) -> Tensor:
    """32-bit hashes -> float32 in (0, 1): the top 24 bits, centred."""
    return ((bits >> 8).to(torch.float32) + 0.5) * (2.0 ** -24)


def _counter_hashes(n: int, device: torch.device) -> Tensor:
    """(1, 2n) int64: H(2i) for i < n, then H(2i + 1): the per-element half
    of the hash, the same for every seed, group and step."""
    i = torch.arange(n, device=device, dtype=torch.int64)
    return hash32(torch.cat([2 * i, 2 * i + 1]) & MASK32).unsqueeze(0)


@functools.lru_cache(maxsize=32)
def _cached_counter_hashes(n: int, device: torch.device) -> Tensor:
    return _counter_hashes(n, device)


def group_normal(seed: Tensor, first_group: int, groups: int, shape: tuple[int, ...]) -> Tensor:
    """(groups, *shape) float32 standard normals; row r is global group
    `first_group + r`, and it is the same whichever call produces it.

    The per-element hashes H(2i), H(2i + 1) do not depend on the seed or the
    group, so eager calls reuse them (a small cache per element count and
    device); u1 and u2 are hashed in one pass. The values are the same
    integers as hashing them every call.

    Args:
      seed: (2,) int64 words (`seed_words`), on the device to draw on.
      first_group: global index of the first group (< 2^32).
    """
    n = math.prod(shape)
    device = seed.device
    key = hash32(hash32(seed[0]) ^ seed[1])
    g = torch.arange(groups, device=device, dtype=torch.int64) + first_group
    gkey = hash32(key ^ hash32(g & MASK32)).unsqueeze(1)                 # (groups, 1)
    if torch.compiler.is_compiling() or device.type == "meta":
        counters = _counter_hashes(n, device)  # traced: the compiler folds or fuses it
    else:
        counters = _cached_counter_hashes(n, device)                     # (1, 2n)
    u = _uniform(hash32(gkey ^ counters))                                # (groups, 2n)
    u1, u2 = u[:, :n], u[:, n:]
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * math.pi) * u2)
    return z.view(groups, *shape)


class GroupNoise(nn.Module):
    """The router noise source of one MoE layer in training.

    With a seed set (`seed`), routing group g's draw is `group_normal` of
    (seed, global index of g): the same whichever process routes g. With
    data or expert parallelism a process routes the `shard`-th share of the
    groups, so its groups' global indices start at shard * (groups it
    routes). The seed is data (a non-persistent buffer): a new seed every
    step neither syncs nor recompiles a compiled model. Without a seed the
    router draws from torch's global RNG.
    """

    seed_words: Tensor  # (2,) int64 words of `seed`

    def __init__(self, shard: int = 0) -> None:
        super().__init__()
        self.register_buffer("seed_words", seed_words(0), persistent=False)
        self._seed: Optional[int] = None
        self.seeded = False  # what forward reads: a compiled graph guards on it, not on the seed
        self.shard = shard

    @property
    def seed(self) -> Optional[int]:
        return self._seed

    @seed.setter
    def seed(self, seed: Optional[int]) -> None:
        self._seed, self.seeded = seed, seed is not None
        if seed is not None:
            self.seed_words.copy_(seed_words(seed))

    def draw(self, first_group: int, groups: int, shape: tuple[int, ...]) -> Tensor:
        """(groups, *shape) standard normals for global groups first_group..."""
        return group_normal(self.seed_words, first_group, groups, shape)
