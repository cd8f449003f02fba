"""A cheap texture stack pooled to the patch grid, and the information content of each patch.

Per pixel: RGB, CIE-Lab (lightness and two colour opponents), Sobel x / y / magnitude of lightness,
position (y, x), eccentricity (distance from the centre) and local contrast (std of lightness in a
3x3 window). Per patch: mean and std of each channel over the patch's pixels, and a coarse code of
the patch's place: the responses of 4 x 4 Gaussian place fields tiling the image. Cheap (no learning,
a few convolutions) and it carries what the backbone's early tokens blur: colour and local contrast,
which a query such as "the red digit" needs, and place, which "the digit in the top left" needs: a
linear read-out of (y, x) can only rank patches along a ramp, place fields can single out a region.

The image's pixels enter at texture resolution (:func:`texture_image`): box-filtered so that each patch
keeps at least ``MIN_SAMPLES_PER_PATCH`` samples a side. Everything is pooled per patch anyway, and at full
resolution this stack cost several times the rest of the relevance module (docs/decisions.md). Position
features do not depend on the image: they are computed at full resolution on one image's grid, exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .constants import shape_constant

CHANNELS = ("r", "g", "b", "lightness", "green_red", "blue_yellow", "sobel_x", "sobel_y", "sobel_magnitude",
            "pos_y", "pos_x", "eccentricity", "local_contrast")
POSITION_CHANNELS = ("pos_y", "pos_x", "eccentricity")  # the same for every image
PLACE_FIELDS = 4  # per axis: centres at -0.75, -0.25, 0.25, 0.75 of the image's [-1, 1] extent
NUM_FEATURES = 2 * len(CHANNELS) + PLACE_FIELDS**2  # mean and std per channel, then the place code
# per side: a 16-px patch is seen as 4 x 4 samples of 4 x 4 pixels, an 8-px one as 4 x 4 samples of 2 x 2
MIN_SAMPLES_PER_PATCH = 4

# sRGB (D65) -> XYZ, rows X, Y, Z, each divided by the white point so that white maps to (1, 1, 1)
_RGB_TO_XYZ = torch.tensor([
    [0.4124, 0.3576, 0.1805],
    [0.2126, 0.7152, 0.0722],
    [0.0193, 0.1192, 0.9505],
]) / torch.tensor([[0.9505], [1.0], [1.089]])
# f(X), f(Y), f(Z) -> L = 1.16 f(Y) - 0.16, a = 5 (f(X) - f(Y)), b = 2 (f(Y) - f(Z)), scaled as rgb_to_lab says
_F_TO_LAB = torch.tensor([[0.0, 1.16, 0.0], [5.0, -5.0, 0.0], [0.0, 2.0, -2.0]])
_LAB_OFFSET = torch.tensor([-0.16, 0.0, 0.0])


def rgb_to_lab(rgb: Tensor) -> Tensor:
    """(B, 3, H, W) sRGB in [0, 1] -> CIE-Lab scaled to about [0, 1] (L) and [-1, 1] (a, b). The two 3 x 3 colour
    maps are matrix products over the flattened pixels: many times faster on a CPU than an einsum or a 1 x 1
    convolution, and one kernel each on a GPU."""
    to_xyz, to_lab, offset = _lab_constants(rgb.device, rgb.dtype)
    pixels = rgb.flatten(2)  # (B, 3, H W)
    linear = torch.where(pixels > 0.04045, ((pixels + 0.055) / 1.055).pow(2.4), pixels / 12.92)
    xyz = torch.bmm(to_xyz.expand(len(linear), 3, 3), linear)
    eps = (6 / 29) ** 3
    f = torch.where(xyz > eps, xyz.clamp_min(eps).pow(1 / 3), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return torch.baddbmm(offset, to_lab.expand(len(f), 3, 3), f).view_as(rgb)


@shape_constant
def _lab_constants(device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """The colour maps and the offset (3, 1) on ``device`` in ``dtype``."""
    return _RGB_TO_XYZ.to(device, dtype), _F_TO_LAB.to(device, dtype), _LAB_OFFSET.to(device, dtype)[:, None]


def texture_stride(patch_size: tuple[int, int]) -> tuple[int, int]:
    """Image pixels per texture sample along (height, width): the largest divisor of each patch side that
    leaves at least ``MIN_SAMPLES_PER_PATCH`` samples a side (1 for patches smaller than that)."""
    return tuple(max((d for d in range(1, side + 1) if side % d == 0 and side // d >= MIN_SAMPLES_PER_PATCH),
                     default=1) for side in patch_size)


@dataclass(frozen=True)
class TextureImage:
    """A batch of images at texture resolution (:func:`texture_image`)."""

    rgb: Tensor  # (B, 3, h, w) in [0, 1], each sample the mean of `stride` image pixels
    lab: Tensor  # (B, 3, h, w) rgb_to_lab(rgb)
    patch_size: tuple[int, int]  # in image pixels
    stride: tuple[int, int]  # image pixels per sample
    image_size: tuple[int, int]  # (H, W) in image pixels

    @property
    def samples_per_patch(self) -> tuple[int, int]:
        return self.patch_size[0] // self.stride[0], self.patch_size[1] // self.stride[1]


def texture_image(images: Tensor, patch_size: tuple[int, int], pixel_mean: Tensor, pixel_std: Tensor,
                  stride: tuple[int, int] | None = None) -> TextureImage:
    """(B, 3, H, W) images as the backbone takes them, ``(rgb - pixel_mean) / pixel_std`` -> the images at
    texture resolution, ``stride`` image pixels per sample (default :func:`texture_stride`; (1, 1) keeps every
    pixel). Box-filtered before un-normalising: the filter is linear, so only the clamp to [0, 1] (a guard
    against out-of-range inputs) comes after the mean instead of before."""
    stride = texture_stride(patch_size) if stride is None else stride
    if patch_size[0] % stride[0] or patch_size[1] % stride[1]:
        raise ValueError(f"the texture stride {stride} must divide the patch size {patch_size}")
    if images.shape[-2] % stride[0] or images.shape[-1] % stride[1]:
        raise ValueError(f"the image size {tuple(images.shape[-2:])} must be a multiple of the window {stride}")
    pooled = images if stride == (1, 1) else F.avg_pool2d(images, stride)
    rgb = torch.addcmul(pixel_mean, pooled, pixel_std).clamp_(0, 1)
    return TextureImage(rgb, rgb_to_lab(rgb), patch_size, stride, (images.shape[-2], images.shape[-1]))


def image_channels(image: TextureImage) -> Tensor:
    """(B, C, h, w): the C channels of ``CHANNELS`` that depend on the image (all but ``POSITION_CHANNELS``),
    per texture sample. Sobel responses and local contrast (the std of lightness over 3 x 3 samples) are
    divided by the stride, i.e. per image pixel: on smooth images they keep their full-resolution values."""
    lightness = F.pad(image.lab[:, :1], (1, 1, 1, 1), mode="replicate")
    # Sobel x / y of L and the 3 x 3 means of L and L^2 in one convolution, the strides folded into its weights
    responses = F.conv2d(torch.cat([lightness, lightness * lightness], 1),
                         _edge_and_moment_filters(image.stride, lightness.device, lightness.dtype))
    sobel, local_mean, local_square = responses.split([2, 1, 1], 1)
    magnitude = torch.hypot(sobel[:, :1], sobel[:, 1:])
    local_contrast = torch.addcmul(local_square, local_mean, local_mean, value=-1).clamp_min_(0).sqrt_()
    return torch.cat([image.rgb, image.lab, sobel, magnitude, local_contrast], dim=1)


@shape_constant
def _edge_and_moment_filters(stride: tuple[int, int], device: torch.device, dtype: torch.dtype) -> Tensor:
    """(4, 2, 3, 3) filters over (L, L^2): Sobel x and y of L per image pixel, and the 3 x 3 means of L and L^2
    scaled so that their variance is per image pixel (the std over samples divided by sqrt of the sample area)."""
    smooth, difference = torch.tensor([1.0, 2.0, 1.0]), torch.tensor([-1.0, 0.0, 1.0])
    filters = torch.zeros(4, 2, 3, 3)
    filters[0, 0] = torch.outer(smooth, difference) / (8 * stride[1])
    filters[1, 0] = torch.outer(difference, smooth) / (8 * stride[0])
    area = stride[0] * stride[1]
    filters[2, 0] = 1 / (9 * math.sqrt(area))
    filters[3, 1] = 1 / (9 * area)
    return filters.to(device, dtype)


def position_channels(height: int, width: int, device: torch.device | None = None,
                      dtype: torch.dtype | None = None) -> Tensor:
    """(1, 3, H, W) pos_y, pos_x in [-1, 1] and eccentricity (distance from the centre, 1 at the corners)."""
    ys = torch.linspace(-1.0, 1.0, height, device=device, dtype=dtype)
    xs = torch.linspace(-1.0, 1.0, width, device=device, dtype=dtype)
    pos_y, pos_x = torch.meshgrid(ys, xs, indexing="ij")
    eccentricity = (pos_y.pow(2) + pos_x.pow(2)).sqrt() / math.sqrt(2)
    return torch.stack([pos_y, pos_x, eccentricity])[None]


def pooled_moments(channels: Tensor, patch_size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """(B, C, H, W) -> per-patch mean and std (B, C, h, w). Pooled moments (E[x], E[x^2]) instead of a gather
    into patches: a few times faster on a CPU."""
    mean = F.avg_pool2d(channels, patch_size)
    std = torch.addcmul(F.avg_pool2d(channels * channels, patch_size), mean, mean, value=-1).clamp_min_(0).sqrt_()
    return mean, std


def texture_features(image: TextureImage) -> Tensor:
    """Images at texture resolution -> (B, N, NUM_FEATURES): per-patch mean and std of every channel of
    ``CHANNELS`` (in that order), then the patch's place code."""
    mean, std = pooled_moments(image_channels(image), image.samples_per_patch)
    fixed, order = position_features(image.image_size, image.patch_size, mean.device, mean.dtype)
    stacked = torch.cat([mean, std, fixed.expand(len(mean), -1, -1, -1)], dim=1).index_select(1, order)
    return stacked.flatten(2).transpose(1, 2)


@shape_constant
def position_features(image_size: tuple[int, int], patch_size: tuple[int, int], device: torch.device,
                      dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(1, C, h, w) per-patch mean and std of the position channels and the place code, the same for every image of
    a size; and the order that puts [image channels' means, their stds, these] in the order of
    :func:`texture_features`; made once per size (:func:`~arrcoc.relevance.constants.shape_constant`)."""
    mean, std = pooled_moments(position_channels(*image_size, device=device, dtype=dtype), patch_size)
    fixed = torch.cat([mean, std, place_code(mean[:, :2])], dim=1)
    image, position = len(CHANNELS) - len(POSITION_CHANNELS), len(POSITION_CHANNELS)
    first = CHANNELS.index(POSITION_CHANNELS[0])  # where the position channels sit among CHANNELS
    means = [*range(first), *range(2 * image, 2 * image + position), *range(first, image)]
    stds = [image + i if i < 2 * image else i + position for i in means]
    places = range(2 * image + 2 * position, 2 * image + 2 * position + PLACE_FIELDS**2)
    return fixed, torch.tensor([*means, *stds, *places], device=device)


def place_code(centre: Tensor) -> Tensor:
    """(B, 2, h, w) patch centres (y, x) in [-1, 1] -> (B, PLACE_FIELDS**2, h, w) Gaussian place-field
    responses; the fields' width is half their spacing, so neighbouring fields overlap a little."""
    spacing = 2.0 / PLACE_FIELDS
    centres = torch.linspace(-1 + spacing / 2, 1 - spacing / 2, PLACE_FIELDS, device=centre.device, dtype=centre.dtype)
    distance_y = (centre[:, 0, None] - centres[:, None, None]).pow(2)  # (B, fields, h, w)
    distance_x = (centre[:, 1, None] - centres[:, None, None]).pow(2)
    distance2 = distance_y[:, :, None] + distance_x[:, None, :]  # (B, fields_y, fields_x, h, w)
    return torch.exp(-distance2 / (2 * (spacing / 2) ** 2)).flatten(1, 2)


def soft_bins(values: Tensor, bins: int, width: float) -> Tensor:
    """(..., H, W) values in about [0, 1] -> (..., bins, H, W): each value's Gaussian weight at ``bins`` evenly
    spaced centres (``width`` in bin spacings; not normalised). Soft binning keeps histograms smooth in the pixels."""
    centres = _bin_centres(bins, values.device, values.dtype)
    return torch.square(values.unsqueeze(-3) - centres).mul_(-0.5 * ((bins - 1) / width) ** 2).exp_()


@shape_constant
def _bin_centres(bins: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    return torch.linspace(0.0, 1.0, bins, device=device, dtype=dtype).view(bins, 1, 1)


def patch_entropy(lightness: Tensor, patch_size: tuple[int, int], bins: int = 8, width: float = 0.5) -> Tensor:
    """(B, 1, H, W) CIE lightness (channel 0 of :func:`rgb_to_lab`), ``patch_size`` in its pixels -> (B, N)
    information content of each patch: entropy (bits) of its soft lightness histogram.

    Propositional knowing needs no learning: a flat patch has ~0 bits, a patch of strokes, edges or
    texture spreads its lightness over many bins.
    """
    weights = soft_bins(lightness[:, 0], bins, width)  # (B, bins, H, W)
    histogram = F.avg_pool2d(weights, patch_size)  # the mean, not the sum: the normalisation below cancels it
    p = histogram / histogram.sum(1, keepdim=True).clamp_min(1e-12)
    return torch.special.entr(p).sum(1).flatten(1) * (1 / math.log(2))
