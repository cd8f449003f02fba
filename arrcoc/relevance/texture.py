"""A cheap texture stack pooled to the patch grid, and the information content of each patch.

Per pixel: RGB, CIE-Lab (lightness and two colour opponents), Sobel x / y / magnitude of lightness,
position (y, x), eccentricity (distance from the centre) and local contrast (std of lightness in a
3x3 window). Per patch: mean and std of each channel over the patch's pixels, and a coarse code of
the patch's place: the responses of 4 x 4 Gaussian place fields tiling the image. Cheap (no learning,
a few convolutions) and it carries what the backbone's early tokens blur: colour and local contrast,
which a query such as "the red digit" needs, and place, which "the digit in the top left" needs: a
linear read-out of (y, x) can only rank patches along a ramp, place fields can single out a region.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

CHANNELS = ("r", "g", "b", "lightness", "green_red", "blue_yellow", "sobel_x", "sobel_y", "sobel_magnitude",
            "pos_y", "pos_x", "eccentricity", "local_contrast")
PLACE_FIELDS = 4  # per axis: centres at -0.75, -0.25, 0.25, 0.75 of the image's [-1, 1] extent
NUM_FEATURES = 2 * len(CHANNELS) + PLACE_FIELDS**2  # mean and std per channel, then the place code

_SOBEL = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 8.0
# sRGB (D65) -> XYZ, rows X, Y, Z, each divided by the white point so that white maps to (1, 1, 1)
_RGB_TO_XYZ = torch.tensor([
    [0.4124, 0.3576, 0.1805],
    [0.2126, 0.7152, 0.0722],
    [0.0193, 0.1192, 0.9505],
]) / torch.tensor([[0.9505], [1.0], [1.089]])


def rgb_to_lab(rgb: Tensor) -> Tensor:
    """(B, 3, H, W) sRGB in [0, 1] -> CIE-Lab scaled to about [0, 1] (L) and [-1, 1] (a, b)."""
    linear = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055).pow(2.4), rgb / 12.92)
    xyz = torch.einsum("ij,bjhw->bihw", _RGB_TO_XYZ.to(rgb), linear)
    eps = (6 / 29) ** 3
    f = torch.where(xyz > eps, xyz.clamp_min(eps).pow(1 / 3), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    lightness = 1.16 * f[:, 1] - 0.16
    green_red = 5.0 * (f[:, 0] - f[:, 1])
    blue_yellow = 2.0 * (f[:, 1] - f[:, 2])
    return torch.stack([lightness, green_red, blue_yellow], dim=1)


def pixel_channels(rgb: Tensor, lab: Tensor) -> Tensor:
    """(B, 3, H, W) in [0, 1] and its :func:`rgb_to_lab` -> (B, len(CHANNELS), H, W)."""
    b, _, h, w = rgb.shape
    lightness = lab[:, :1]
    kernel = torch.stack([_SOBEL, _SOBEL.T])[:, None].to(rgb)
    sobel = F.conv2d(F.pad(lightness, (1, 1, 1, 1), mode="replicate"), kernel)
    magnitude = sobel.pow(2).sum(1, keepdim=True).add(1e-12).sqrt()
    ys = torch.linspace(-1.0, 1.0, h, device=rgb.device, dtype=rgb.dtype)
    xs = torch.linspace(-1.0, 1.0, w, device=rgb.device, dtype=rgb.dtype)
    pos_y, pos_x = torch.meshgrid(ys, xs, indexing="ij")
    eccentricity = (pos_y.pow(2) + pos_x.pow(2)).sqrt() / math.sqrt(2)
    position = torch.stack([pos_y, pos_x, eccentricity])[None].expand(b, -1, -1, -1)
    padded = F.pad(lightness, (1, 1, 1, 1), mode="replicate")
    local_mean = F.avg_pool2d(padded, 3, stride=1)
    local_contrast = (F.avg_pool2d(padded.pow(2), 3, stride=1) - local_mean.pow(2)).clamp_min(0).sqrt()
    return torch.cat([rgb, lab, sobel, magnitude, position, local_contrast], dim=1)


def patch_pixels(channels: Tensor, patch_size: tuple[int, int]) -> Tensor:
    """(B, C, H, W) -> (B, N, C, pixels per patch), patches in row-major grid order."""
    return rearrange(channels, "b c (h p1) (w p2) -> b (h w) c (p1 p2)", p1=patch_size[0], p2=patch_size[1])


def texture_features(rgb: Tensor, lab: Tensor, patch_size: tuple[int, int]) -> Tensor:
    """(B, 3, H, W) in [0, 1] and its :func:`rgb_to_lab` -> (B, N, NUM_FEATURES): per-patch mean and std of
    every channel. Pooled moments (E[x], E[x^2]) instead of a gather into patches: a few times faster on a CPU."""
    channels = pixel_channels(rgb, lab)
    mean = F.avg_pool2d(channels, patch_size)
    std = (F.avg_pool2d(channels * channels, patch_size) - mean * mean).clamp_min(0).sqrt()
    position = CHANNELS.index("pos_y")
    return rearrange(torch.cat([mean, std, place_code(mean[:, position:position + 2])], dim=1),
                     "b c h w -> b (h w) c")


def place_code(centre: Tensor) -> Tensor:
    """(B, 2, h, w) patch centres (y, x) in [-1, 1] -> (B, PLACE_FIELDS**2, h, w) Gaussian place-field
    responses; the fields' width is half their spacing, so neighbouring fields overlap a little."""
    spacing = 2.0 / PLACE_FIELDS
    centres = torch.linspace(-1 + spacing / 2, 1 - spacing / 2, PLACE_FIELDS, device=centre.device, dtype=centre.dtype)
    distance_y = (centre[:, 0, None] - centres[:, None, None]).pow(2)  # (B, fields, h, w)
    distance_x = (centre[:, 1, None] - centres[:, None, None]).pow(2)
    distance2 = distance_y[:, :, None] + distance_x[:, None, :]  # (B, fields_y, fields_x, h, w)
    return torch.exp(-distance2 / (2 * (spacing / 2) ** 2)).flatten(1, 2)


def patch_entropy(lightness: Tensor, patch_size: tuple[int, int], bins: int = 8, width: float = 0.5) -> Tensor:
    """(B, 1, H, W) CIE lightness (channel 0 of :func:`rgb_to_lab`) -> (B, N) information content of each
    patch: entropy (bits) of its soft lightness histogram.

    Propositional knowing needs no learning: a flat patch has ~0 bits, a patch of strokes, edges or
    texture spreads its lightness over many bins. Soft (Gaussian) binning keeps it smooth in the pixels.
    """
    lightness = patch_pixels(lightness, patch_size)[:, :, 0]  # (B, N, P)
    centres = torch.linspace(0.0, 1.0, bins, device=lightness.device, dtype=lightness.dtype)
    weights = torch.exp(-0.5 * ((lightness[..., None] - centres) * (bins - 1) / width).pow(2))
    histogram = weights.sum(-2)
    p = histogram / histogram.sum(-1, keepdim=True).clamp_min(1e-12)
    return -(p * p.clamp_min(1e-12).log2()).sum(-1)
