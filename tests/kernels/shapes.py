"""The shape grid both attention kernels (Triton and CUDA C) are tested on: (B, H, Hk, Hv, Lq, Lk, Dk, Dv)."""

SHAPES = [
    # B, H, Hk, Hv, Lq, Lk, Dk, Dv
    (1, 1, 1, 1, 1, 1, 1, 1),
    (2, 2, 1, 2, 3, 17, 8, 8),
    (1, 3, 3, 3, 17, 3, 24, 24),
    (2, 1, 1, 1, 113, 130, 64, 64),
    (1, 2, 2, 1, 130, 113, 100, 100),
    (1, 2, 1, 2, 17, 33, 1280, 1280),
    (2, 3, 1, 3, 64, 64, 64, 64),  # every EVEN_* fast path
    (1, 2, 1, 2, 64, 64, 24, 40),  # whole tiles of queries and keys, heads narrower than their blocks
    (1, 1, 1, 1, 5, 7, 24, 100),  # Dk != Dv
    (1, 2, 1, 2, 33, 70, 256, 256),  # the widest single chunk (16-bit)
]

# With a mask (a fully masked row included) and ragged key lengths (one of length 1); the last has
# whole tiles of keys, whose key lengths still end inside a tile.
MASKED_SHAPES = [(2, 2, 1, 2, 17, 113, 24, 24), (3, 1, 1, 1, 130, 17, 100, 100), (2, 2, 1, 2, 17, 65, 200, 200),
                 (2, 2, 1, 2, 3, 40, 1280, 1280), (3, 2, 1, 2, 17, 64, 32, 32)]
