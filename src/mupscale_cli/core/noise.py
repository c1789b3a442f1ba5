"""Reproducible symmetry-breaking noise: depends only on (seed, tensor name, shape) and the noise device."""
from __future__ import annotations

import hashlib
import math

import torch

from mupscale_cli.errors import MupscaleError

CHUNK = 1 << 20  # elements drawn from one generator; fixed, so chunked producers give the same bytes
CONVENTION = "mupscale-noise-v1"
DEVICES = ("cpu", "cuda")
CUDA_PIECE = 1 << 16  # elements per CUDA randn call: small enough that no GPU caps its launch grid


def chunk_seed(seed: int, name: str, shape: tuple[int, ...], chunk: int) -> int:
    key = f"{CONVENTION}|{seed}|{name}|{tuple(shape)}|{chunk}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1


def check_device(device: str) -> None:
    if device not in DEVICES:
        raise MupscaleError(f"--noise-device {device!r}: choose cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise MupscaleError("--noise-device cuda: no CUDA device is available to this PyTorch "
                            f"({torch.__version__}); use --noise-device cpu")


def noise_chunk(seed: int, name: str, shape: tuple[int, ...], chunk: int, device: str = "cpu",
                out: torch.Tensor | None = None) -> torch.Tensor:
    """Standard normal float32 values for flat elements [chunk*CHUNK, (chunk+1)*CHUNK) (on the CPU).

    device "cpu": torch's CPU generator (mt19937), the default and what every machine reproduces.
    device "cuda": torch's CUDA generator (Philox), drawn in pieces of CUDA_PIECE elements so the values
    do not depend on the GPU's size; they differ from the CPU values and are reproduced only with
    `--noise-device cuda` (and the same PyTorch CUDA generator).
    `out`: a float32 buffer of at least CHUNK elements at a 64-byte aligned address, filled and returned
    (PyTorch's CPU normal sampler gives other values at other alignments)."""
    n = min(CHUNK, math.prod(shape) - chunk * CHUNK)
    s = chunk_seed(seed, name, shape, chunk)
    if device == "cpu":
        g = torch.Generator().manual_seed(s)
        if out is not None and out.data_ptr() % 64 == 0:
            return torch.randn(n, generator=g, dtype=torch.float32, out=out[:n])
        return torch.randn(n, generator=g, dtype=torch.float32)
    g = torch.Generator(device="cuda").manual_seed(s)
    out = torch.empty(n, dtype=torch.float32, device="cuda")
    for a in range(0, n, CUDA_PIECE):
        out[a:a + CUDA_PIECE].normal_(generator=g)
    return out.cpu()


def noise_pieces(name: str, shape: tuple[int, ...], seed: int, start: int, stop: int, device: str = "cpu",
                 out: torch.Tensor | None = None):
    """(offset from `start`, float32 values) covering flat elements [start, stop) of the tensor's noise,
    one generator chunk at a time: the same values as noise(...).reshape(-1)[start:stop]. With `out`
    (see noise_chunk) every chunk is drawn into it: use each piece before taking the next."""
    for c in range(start // CHUNK, -(-stop // CHUNK)):
        z = noise_chunk(seed, name, shape, c, device, out)
        a, b = max(start, c * CHUNK), min(stop, (c + 1) * CHUNK)
        yield a - start, z[a - c * CHUNK:b - c * CHUNK]


def noise(name: str, shape: tuple[int, ...], seed: int, device: str = "cpu") -> torch.Tensor:
    """Standard normal float32 noise of `shape` (on the CPU), generated chunk by chunk."""
    n = math.prod(shape)
    if n == 0:
        return torch.zeros(shape)
    parts = [noise_chunk(seed, name, shape, c, device) for c in range(math.ceil(n / CHUNK))]
    return torch.cat(parts).reshape(shape)
