#!/usr/bin/env python3
"""Builds testdata/quant/dequant_fixture.bin: random GGUF weight blocks and their values as
dequantized by llama.cpp's numpy reference (gguf-py, `gguf.quants.dequantize`).

petrel-quant's `blocks::tests::dequantize_matches_gguf_py` compares `dequantize_row`
against it bit for bit.

File layout (little-endian), one record per format:
    name: 8 bytes, ASCII, NUL-padded (llama.cpp's type name, e.g. "Q4_K")
    blocks: u32
    block_bytes: u32
    block_len: u32
    data: blocks * block_bytes bytes
    values: blocks * block_len f32
The block bytes are uniformly random except for the f16 scale fields, which are random
finite values (normal, subnormal, zero, either sign); the codes include every extreme.

Usage: python3 scripts/make_kquant_fixture.py   (writes the file; deterministic seed)
"""
import os
import struct

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize

# name, type, block bytes, block length, byte offsets of the f16 scale fields
FORMATS = [
    ("Q4_0", T.Q4_0, 18, 32, [0]),
    ("Q4_1", T.Q4_1, 20, 32, [0, 2]),
    ("Q8_0", T.Q8_0, 34, 32, [0]),
    ("Q5_0", T.Q5_0, 22, 32, [0]),
    ("Q5_1", T.Q5_1, 24, 32, [0, 2]),
    ("Q4_K", T.Q4_K, 144, 256, [0, 2]),
    ("Q5_K", T.Q5_K, 176, 256, [0, 2]),
    ("Q6_K", T.Q6_K, 210, 256, [208]),
]


def random_f16(rng, n):
    kind = rng.integers(0, 8, n)
    normal = (rng.standard_normal(n) * 10.0 ** rng.uniform(-4, 1, n)).astype(np.float16)
    subnormal = (rng.uniform(-1, 1, n) * 6e-5).astype(np.float16)
    out = np.where(kind == 0, subnormal, normal)
    out = np.where(kind == 1, np.float16(0.0), out)
    out = np.where(kind == 2, np.float16(-0.0), out)
    assert np.all(np.isfinite(out))
    return out.astype(np.float16)


def main():
    rng = np.random.default_rng(20260503)
    out = bytearray()
    for name, ty, bb, bl, fields in FORMATS:
        blocks = 24 if bl == 32 else 6
        data = rng.integers(0, 256, (blocks, bb), dtype=np.uint8)
        data[0, :] = 0xFF  # every code at its maximum (scales rewritten below)
        data[1, :] = 0x00
        for at in fields:
            data[:, at:at + 2] = random_f16(rng, blocks).view(np.uint8).reshape(blocks, 2)
        values = dequantize(data.reshape(-1), ty).astype(np.float32).reshape(-1)
        assert values.size == blocks * bl
        out += name.encode().ljust(8, b"\0")
        out += struct.pack("<III", blocks, bb, bl)
        out += data.tobytes()
        out += values.astype("<f4").tobytes()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(root, "testdata", "quant", "dequant_fixture.bin")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(out)
    print(f"wrote {path}: {len(out)} bytes")


if __name__ == "__main__":
    main()
