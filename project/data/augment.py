"""Batch augmentation: whole-batch tensor ops with per-sample randomness (no PIL, no per-sample loop).

Every function takes a batch ``[B, C, H, W]`` (uint8 or float) and returns a batch of the same
shape and dtype. Randomness comes from ``generator`` when given (it must live on the batch's
device), else from the global RNG, which ``lightning.seed_everything`` seeds.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _uniform(n: int, low: float, high: float, x: Tensor, generator: torch.Generator | None) -> Tensor:
    """``n`` samples of U(low, high) as float32 on ``x``'s device."""
    return torch.rand(n, device=x.device, generator=generator) * (high - low) + low


def random_crop(x: Tensor, padding: int, generator: torch.Generator | None = None) -> Tensor:
    """Zero-pad each side by ``padding`` and crop back to the original size at a random per-sample offset."""
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    if padding == 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    offsets = torch.randint(0, 2 * padding + 1, (2, b), device=x.device, generator=generator)
    rows = offsets[0, :, None] + torch.arange(h, device=x.device)  # [B, H]
    cols = offsets[1, :, None] + torch.arange(w, device=x.device)  # [B, W]
    batch = torch.arange(b, device=x.device)[:, None, None]
    # Advanced indices around a slice put the indexed dims first: the result is [B, H, W, C].
    return padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


def random_hflip(x: Tensor, p: float = 0.5, generator: torch.Generator | None = None) -> Tensor:
    """Mirror each sample left-right with probability ``p``."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")
    if p == 0.0:
        return x
    flip = torch.rand(x.shape[0], device=x.device, generator=generator) < p
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def random_affine(
    x: Tensor,
    degrees: float = 0.0,
    translate: float = 0.0,
    scale: tuple[float, float] | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Rotate by U(-degrees, degrees), shift by up to ``translate`` x size, zoom by U(*scale), per sample.

    Bilinear resampling, zeros outside the image. A uint8 batch comes back rounded to uint8.
    """
    if degrees < 0 or not 0.0 <= translate <= 1.0:
        raise ValueError(f"need degrees >= 0 and translate in [0, 1], got {degrees}, {translate}")
    if scale is not None and not 0 < scale[0] <= scale[1]:
        raise ValueError(f"scale must be (low, high) with 0 < low <= high, got {scale}")
    if degrees == 0 and translate == 0 and (scale is None or scale == (1.0, 1.0)):
        return x
    b = x.shape[0]
    angle = _uniform(b, -degrees, degrees, x, generator) * (math.pi / 180)
    # affine_grid works in [-1, 1] coordinates, so a shift of a fraction t of the size is 2t.
    shift = _uniform(2 * b, -translate, translate, x, generator).view(2, b) * 2
    zoom = _uniform(b, *scale, x, generator) if scale is not None else torch.ones(b, device=x.device)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    # theta maps output coordinates to input coordinates, hence the inverse zoom.
    theta = torch.stack([torch.stack([cos, -sin, shift[0]], 1), torch.stack([sin, cos, shift[1]], 1)], 1)
    source = x.float()
    grid = F.affine_grid(theta, list(source.shape), align_corners=False)
    out = F.grid_sample(source, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if x.dtype == torch.uint8:
        return out.round_().clamp_(0, 255).to(torch.uint8)
    return out.to(x.dtype)


def normalize(x: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """Pixels in 0..255 (uint8 or float) to float32 ``(x / 255 - mean) / std`` per channel."""
    c = x.shape[1]
    if len(mean) != c or len(std) != c:
        raise ValueError(f"mean/std have {len(mean)}/{len(std)} values for {c} channels")
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, c, 1, 1) * 255
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, c, 1, 1) * 255
    return (x.float() - m) / s
