"""The texture stack at texture resolution: cheap (full-resolution pixels are read once, by the box filter), the
same math as a per-patch gather, and features that keep their meaning (colour, edges, contrast, place, entropy)."""

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import arrcoc
from arrcoc.models.toy_vit import toy_vit
from arrcoc.relevance.texture import (
    CHANNELS,
    NUM_FEATURES,
    POSITION_CHANNELS,
    image_channels,
    patch_entropy,
    pooled_moments,
    position_features,
    rgb_to_lab,
    texture_features,
    texture_image,
    texture_stride,
)

ZERO, ONE = torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)


def per_patch(channels: torch.Tensor, patch: tuple[int, int]) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, h, w, pixels per patch): a gather of each patch's pixels."""
    return channels.unfold(2, patch[0], patch[0]).unfold(3, patch[1], patch[1]).flatten(-2)


def smooth_images(n: int, size: int, g: torch.Generator) -> torch.Tensor:
    """Colour fields that vary over tens of pixels, as photographs mostly do at the scale of a pixel."""
    coarse = torch.rand(n, 3, size // 32, size // 32, generator=g)
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=True).clamp(0, 1)


@pytest.mark.parametrize(("patch", "stride"), [((16, 16), (4, 4)), ((8, 8), (2, 2)), ((14, 14), (2, 2)),
                                               ((32, 32), (8, 8)), ((4, 4), (1, 1)), ((3, 3), (1, 1)),
                                               ((16, 8), (4, 2))])
def test_each_patch_keeps_at_least_four_samples_a_side(patch, stride):
    assert texture_stride(patch) == stride


def test_pooled_moments_are_the_mean_and_std_of_each_patchs_pixels():
    channels = torch.rand(2, 5, 32, 24)
    mean, std = pooled_moments(channels, (8, 4))
    pixels = per_patch(channels, (8, 4))
    torch.testing.assert_close(mean, pixels.mean(-1), atol=1e-6, rtol=0)
    torch.testing.assert_close(std, pixels.std(-1, correction=0), atol=1e-3, rtol=0)


def test_pooled_entropy_is_the_entropy_of_each_patchs_soft_histogram():
    lightness, bins, width = torch.rand(2, 1, 32, 32), 8, 0.5
    pixels = per_patch(lightness, (8, 8))[:, 0]  # (B, h, w, P)
    centres = torch.linspace(0, 1, bins)
    histogram = torch.exp(-0.5 * ((pixels[..., None] - centres) * (bins - 1) / width) ** 2).sum(-2)
    p = histogram / histogram.sum(-1, keepdim=True)
    expected = -(p * p.log2()).sum(-1).flatten(1)
    torch.testing.assert_close(patch_entropy(lightness, (8, 8), bins, width), expected, atol=1e-5, rtol=0)


def test_texture_resolution_is_the_box_filtered_image():
    g = torch.Generator().manual_seed(0)
    mean, std = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1), torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    rgb = torch.rand(2, 3, 64, 64, generator=g)
    image = texture_image((rgb - mean) / std, (16, 16), mean, std)
    assert image.stride == (4, 4) and image.samples_per_patch == (4, 4) and image.rgb.shape == (2, 3, 16, 16)
    torch.testing.assert_close(image.rgb, F.avg_pool2d(rgb, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(image.lab, rgb_to_lab(image.rgb))


def test_colour_and_place_features_do_not_depend_on_the_texture_resolution():
    """Patch means of RGB are exact at any resolution (a mean of means); position and place are computed on the
    full-resolution grid."""
    rgb = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    coarse = texture_features(texture_image(rgb, (16, 16), ZERO, ONE))
    full = texture_features(texture_image(rgb, (16, 16), ZERO, ONE, stride=(1, 1)))
    assert coarse.shape == full.shape == (2, 16, NUM_FEATURES)
    colour_means = [CHANNELS.index(c) for c in ("r", "g", "b")]
    position = [CHANNELS.index(c) + offset for c in ("pos_y", "pos_x", "eccentricity") for offset in (0, len(CHANNELS))]
    place = list(range(2 * len(CHANNELS), NUM_FEATURES))
    for columns in (colour_means, position, place):
        torch.testing.assert_close(coarse[..., columns], full[..., columns], atol=1e-5, rtol=0)


def test_on_smooth_images_texture_resolution_changes_every_feature_little():
    """Where images vary slowly (most of a photograph) the samples see what the pixels see: every channel's patch
    mean within a small fraction of its spread over patches, Sobel and local contrast included (they are per image
    pixel). The border ring is left out: replicate padding weighs a sample there as much as 4 pixels."""
    images = smooth_images(4, 128, torch.Generator().manual_seed(2))
    coarse = texture_features(texture_image(images, (16, 16), ZERO, ONE))
    full = texture_features(texture_image(images, (16, 16), ZERO, ONE, stride=(1, 1)))
    interior = torch.zeros(8, 8, dtype=torch.bool)
    interior[1:-1, 1:-1] = True
    coarse, full = coarse[:, interior.flatten(), : len(CHANNELS)], full[:, interior.flatten(), : len(CHANNELS)]
    spread = full.flatten(0, 1).std(0).clamp_min(1e-3)
    error = (coarse - full).abs().flatten(0, 1).amax(0) / spread
    assert bool((error < 0.1).all()), dict(zip(CHANNELS, error.tolist()))


def test_features_keep_their_meaning_at_texture_resolution():
    """On a 64 x 64 image of 4 x 4 patches of 16 px (4 x 4 samples each): a red patch reads red, the sides of a
    bright vertical band as horizontal gradients of opposite sign, a fine checkerboard as contrast and information,
    flat gray as neither, and positions grow down and right."""
    image = torch.full((1, 3, 64, 64), 0.5)
    image[:, :, :16, :16] = torch.tensor([0.9, 0.1, 0.1]).view(3, 1, 1)  # patch 0: red
    image[:, :, :, 24:40] = 0.9  # a band: its left edge in the second column of patches, its right in the third
    check = ((torch.arange(16)[:, None] // 4 + torch.arange(16)[None] // 4) % 2).float()  # 4-px checks
    image[:, :, 48:, 48:] = 0.2 + 0.6 * check  # patch 15
    textured = texture_image(image, (16, 16), ZERO, ONE)
    features = texture_features(textured)[0]  # (16 patches, F)

    def mean(channel: str) -> torch.Tensor:
        return features[:, CHANNELS.index(channel)].view(4, 4)  # the patch grid

    flat = (2, 0)
    assert mean("green_red").argmax() == 0 and mean("green_red")[0, 0] > 0.5
    assert bool((mean("sobel_x")[:, 1] > 0.01).all() and (mean("sobel_x")[:, 2] < -0.01).all())
    assert bool((mean("sobel_y")[:, 1:3].abs() < 0.1 * mean("sobel_x")[:, 1:3].abs()).all())
    assert mean("local_contrast").argmax() == 15 and mean("sobel_magnitude")[3, 3] > 100 * mean("sobel_magnitude")[flat]
    # flat: no contrast but the square root of float32 rounding in E[L^2] - E[L]^2
    assert mean("local_contrast")[flat] < 1e-4 and mean("sobel_magnitude")[flat] < 1e-5
    assert bool((mean("pos_y").diff(dim=0) > 0).all() and (mean("pos_x").diff(dim=1) > 0).all())
    entropy = patch_entropy(textured.lab[:, :1], textured.samples_per_patch)[0].view(4, 4)
    assert entropy.argmax() == 15 and entropy[3, 3] > entropy[flat] + 0.5


def test_full_resolution_pixels_are_read_once_by_the_box_filter():
    """The per-pixel work runs at texture resolution: of the relevance module's operations only the box filter, one
    average pooling, sees the batch at full resolution (the position features are computed on one image's grid)."""
    model = arrcoc.attach(toy_vit(), budget=0.25).eval()
    images = torch.rand(2, 3, 32, 32)  # 8-px patches: 4 x 4 samples of 2 x 2 pixels
    with torch.no_grad():
        tokens = model.adapter.tokens(images).patches
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as trace:
            model.relevance(images, tokens, (4, 4))
    full_resolution = {event.name for event in trace.events()
                       if any(len(s) == 4 and s[0] == 2 and tuple(s[-2:]) == (32, 32) for s in event.input_shapes)}
    assert full_resolution == {"aten::avg_pool2d"}, full_resolution


def test_image_channels_are_the_image_dependent_channels_in_order():
    image = texture_image(torch.rand(1, 3, 32, 32), (8, 8), ZERO, ONE)
    channels = image_channels(image)
    assert channels.shape == (1, len(CHANNELS) - 3, 16, 16)
    torch.testing.assert_close(channels[:, :3], image.rgb)
    torch.testing.assert_close(channels[:, 3:6], image.lab)


def test_edges_and_local_contrast_are_the_sobel_responses_and_3x3_std_of_lightness():
    """The one convolution over (L, L^2) gives what its definitions say: Sobel x / y of lightness (per image pixel),
    their magnitude and the std of lightness over each sample's 3 x 3 neighbourhood (edges replicated)."""
    image = texture_image(torch.rand(2, 3, 32, 32), (8, 8), ZERO, ONE)  # stride 2
    channels = image_channels(image)
    lightness = F.pad(image.lab[:, :1], (1, 1, 1, 1), mode="replicate")
    windows = lightness.unfold(2, 3, 1).unfold(3, 3, 1).flatten(-2)  # (2, 1, 16, 16, 9)
    sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 8.0
    gradient_x = (windows * sobel.flatten()).sum(-1) / 2
    gradient_y = (windows * sobel.T.flatten()).sum(-1) / 2
    names = [name for name in CHANNELS if name not in POSITION_CHANNELS]
    torch.testing.assert_close(channels[:, [names.index("sobel_x")]], gradient_x, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(channels[:, [names.index("sobel_y")]], gradient_y, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(channels[:, [names.index("sobel_magnitude")]],
                               (gradient_x**2 + gradient_y**2).sqrt(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(channels[:, [names.index("local_contrast")]],
                               windows.std(-1, correction=0) / 2, atol=2e-4, rtol=1e-3)


def test_position_features_made_in_inference_mode_serve_training():
    """The position features are made once per image and patch size; made first under inference_mode, they are
    still ordinary tensors (an inference tensor cannot be saved for backward), and a later pass with autograd gets
    the same features."""
    images = torch.rand(2, 3, 40, 24)  # a size no other test uses: the cache is empty for it
    with torch.inference_mode():
        first = texture_features(texture_image(images, (8, 8), ZERO, ONE))
    assert not any(part.is_inference() for part in position_features((40, 24), (8, 8), images.device, images.dtype))
    weight = torch.ones(NUM_FEATURES, requires_grad=True)
    second = texture_features(texture_image(images, (8, 8), ZERO, ONE))
    (second * weight).sum().backward()
    torch.testing.assert_close(first, second)
    assert weight.grad is not None


def test_texture_resolution_refuses_a_window_that_does_not_tile_the_image():
    with pytest.raises(ValueError, match="multiple of the window"):
        texture_image(torch.zeros(1, 3, 30, 32), (16, 16), ZERO, ONE)
