"""Reproducible symmetry-breaking noise: depends only on (seed, tensor name, shape)."""
from __future__ import annotations

import hashlib
import math

import torch

CHUNK = 1 << 20  # elements drawn from one generator; fixed, so chunked producers give the same bytes
CONVENTION = "mupscale-noise-v1"


def chunk_seed(seed: int, name: str, shape: tuple[int, ...], chunk: int) -> int:
    key = f"{CONVENTION}|{seed}|{name}|{tuple(shape)}|{chunk}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1


def noise_chunk(seed: int, name: str, shape: tuple[int, ...], chunk: int) -> torch.Tensor:
    """Standard normal float32 values for flat elements [chunk*CHUNK, (chunk+1)*CHUNK)."""
    n = min(CHUNK, math.prod(shape) - chunk * CHUNK)
    g = torch.Generator().manual_seed(chunk_seed(seed, name, shape, chunk))
    return torch.randn(n, generator=g, dtype=torch.float32)


def noise(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Standard normal float32 noise of `shape` (CPU generator, chunk by chunk)."""
    n = math.prod(shape)
    if n == 0:
        return torch.zeros(shape)
    parts = [noise_chunk(seed, name, shape, c) for c in range(math.ceil(n / CHUNK))]
    return torch.cat(parts).reshape(shape)
