"""Sample grids as PNG files, with nothing but zlib (no imaging library needed)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import torch


def grid(pixels: torch.Tensor, rows: int) -> torch.Tensor:
    """[N, C, H, W] pixels in [0, 1] -> one [C, rows*H, cols*W] image (values outside clamped, not rescaled)."""
    n, c, h, w = pixels.shape
    cols = -(-n // rows)
    x = pixels.detach().float().cpu().clamp(0, 1)
    canvas = torch.zeros(c, rows * h, cols * w)
    for i in range(n):
        r, q = divmod(i, cols)
        canvas[:, r * h:(r + 1) * h, q * w:(q + 1) * w] = x[i]
    return canvas


def save_png(image: torch.Tensor, path: str | Path) -> Path:
    """Write a [1 or 3, H, W] image in [0, 1] as an 8-bit grey or RGB PNG."""
    c, h, w = image.shape
    if c not in (1, 3):
        raise ValueError(f"PNG needs 1 or 3 channels, got {c}")
    pixels = (image.clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    raw = b"".join(b"\x00" + pixels[y].tobytes() for y in range(h))  # filter type 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 8, 0 if c == 1 else 2, 0, 0, 0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6))
                     + chunk(b"IEND", b""))
    return path
