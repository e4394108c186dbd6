"""Threefry-2x32 written out in jnp ops, so XLA fuses the whole hash into one elementwise pass.

Threefry-2x32 with 20 rounds (Salmon, Moraes, Dror & Shaw 2011, "Parallel random numbers: as
easy as 1, 2, 3", SC'11, Table 4's rotation constants) is the hash behind ``jax.random``'s
default generator: a pure function ``(key pair, counter pair) -> two 32-bit words``. jax lowers
it on CPU as a rolled five-iteration ``while`` loop (to keep compile times short), and each
iteration is a separate pass that reads and writes both word arrays: for dropout masks in a
training step that is memory traffic, not arithmetic. Unrolled, it is ~80 integer ops per
counter that XLA keeps in registers.

``threefry2x32`` returns exactly the bits of ``jax.extend.random.threefry2x32_p`` (the test
compares them); ``uniform_bits16`` splits the 64 output bits of one hash into four 16-bit draws.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# Rotation constants R_{2x32} of Threefry-2x32, alternating every four rounds.
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
# Key-schedule parity constant C240 of Threefish / Threefry.
_PARITY = np.uint32(0x1BD11BDA)


# lax, not jnp: the hash is ~100 integer ops per call and a model traces it at every dropout
# site; each jnp operator is a small jitted function of its own (dtype promotion, weak types),
# which made tracing one hash ~27 ms under cProfile, a fifth of tracing a tiny BERT's train
# step. The lax primitives bind directly (16 ms); the program and its bits are the same.
def _rotl(x: jax.Array, r: int) -> jax.Array:
    return lax.bitwise_or(lax.shift_left(x, np.uint32(r)), lax.shift_right_logical(x, np.uint32(32 - r)))


def threefry2x32(k1: jax.Array, k2: jax.Array, x1: jax.Array,
                 x2: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Threefry-2x32-20 of counters ``(x1, x2)`` (uint32, any shape) under key ``(k1, k2)``.

    Five groups of four rounds (add, rotate, xor), a key injection after each group with the
    schedule ``(k1, k2, k1 ^ k2 ^ C240)`` and the injection number added to the second word.
    """
    k1, k2, x1, x2 = (jnp.asarray(v, jnp.uint32) for v in (k1, k2, x1, x2))
    ks = (k1, k2, lax.bitwise_xor(lax.bitwise_xor(k1, k2), _PARITY))
    x1, x2 = lax.add(x1, ks[0]), lax.add(x2, ks[1])
    for group in range(5):
        for r in _ROTATIONS[group % 2]:
            x1 = lax.add(x1, x2)
            x2 = lax.bitwise_xor(x1, _rotl(x2, r))
        x1 = lax.add(x1, ks[(group + 1) % 3])
        x2 = lax.add(lax.add(x2, ks[(group + 2) % 3]), np.uint32(group + 1))
    return x1, x2


def key_words(rng: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The two uint32 words of a threefry key (raw ``uint32[2]`` or a typed ``jax.random.key``)."""
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        impl = jax.random.key_impl(rng)
        if "threefry" not in str(impl):
            raise ValueError(f"dropout masks need a threefry key, got the {impl} implementation")
        rng = jax.random.key_data(rng)
    if rng.shape != (2,) or rng.dtype != jnp.uint32:
        raise ValueError(f"expected a threefry key (uint32[2]), got {rng.dtype}{list(rng.shape)}")
    return rng[0], rng[1]


def uniform_bits16(rng: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Independent uniform 16-bit draws (uint16) of ``shape``, four per threefry evaluation.

    Element ``(..., i)`` takes quarter ``i % 4`` of the 64-bit hash of counter
    ``(0, j)``, where ``j`` is the row-major index of ``(..., i // 4)`` in
    ``shape[:-1] + (ceil(last / 4),)``. The draw is a pure function of the key and the element's
    position, so it does not depend on how the array is sharded (like jax's
    ``jax_threefry_partitionable`` bits). XLA:CPU fuses the stacking of the two words into the
    hash and evaluates the hash once per stored word, so a draw costs half an evaluation, as
    splitting ``jax.random.bits``' 32-bit values in two did; the saving is the rolled loop's
    memory passes.
    """
    if not shape:
        return uniform_bits16(rng, (1,))[0]
    *lead, last = shape
    quarters = -(-last // 4)
    count = int(np.prod(lead, dtype=np.int64)) * quarters
    if count >= 2 ** 32:
        raise ValueError(f"uniform_bits16: {count} counters exceed the 32-bit counter word")
    k1, k2 = key_words(rng)
    counter = jax.lax.iota(jnp.uint32, count).reshape(*lead, quarters)
    # The barrier keeps the hash out of the mask consumers (the forward's and the backward's
    # select would otherwise each re-evaluate it); the words are stored, 2 bytes per draw.
    w1, w2 = jax.lax.optimization_barrier(threefry2x32(k1, k2, jnp.zeros_like(counter), counter))
    words = jnp.stack([w1, w2], axis=-1)                       # (..., quarters, 2) uint32
    halves = jax.lax.bitcast_convert_type(words, jnp.uint16)   # (..., quarters, 2, 2)
    return halves.reshape(*lead, quarters * 4)[..., :last]
