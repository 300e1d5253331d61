"""TPT's test-time views, made on the images' device from a seeded ``torch.Generator``.

Official TPT (azshue/TPT ``data/datautils.py``), per raw (decoded) image:

* view 0: ``Resize(224, bicubic)`` of the shorter side + ``CenterCrop(224)``;
* views 1..V-1: ``RandomResizedCrop(224)`` (scale (0.08, 1), ratio (3/4, 4/3)) + ``RandomHorizontalFlip``
  of the raw image; for the fine-grained data sets AugMix on top: three chains of 1-3 random ops
  (``augmix_ops.augmentations``, severity 1), mixed with Dirichlet(1, 1, 1) weights, then
  ``m * view + (1 - m) * mix`` with m ~ Beta(1, 1);
* ``ToTensor`` + CLIP's normalisation.

Here every random number is drawn on the host from the caller's generator (crop boxes by
torchvision's ``RandomResizedCrop.get_params`` algorithm: ten tries, then a center-crop fallback),
and the pixels never leave the device: the crops of one image are resized in ONE
``torchvision.ops.roi_align`` call (bilinear samples averaged over ``ceil(crop / 224)`` points per
output pixel and axis: an area-style antialias close to PIL's antialiased bilinear resize), flips
are an index flip, view 0 uses torchvision's tensor bicubic resize with antialias. uint8 inputs
are rounded back to integer levels after each resampling, as PIL does.

AugMix ops, batched over all views (each view has its own parameters), on 0..255 values with
PIL's level formulas (``int_parameter``/``float_parameter`` of ``uniform(0.1, severity)``):
autocontrast (per-channel min/max stretch), equalize (PIL's histogram LUT), posterize (keep
``4 - int(level * 4 / 10)`` bits), solarize (invert values >= ``256 - int(level * 256 / 10)``),
rotate (``int(level * 3)`` degrees, random sign, about the center), shear_x / shear_y
(``level * 0.03``, random sign), translate_x / translate_y (``int(level * size / 30)`` pixels,
random sign). Geometric ops sample bilinearly with zero fill (``grid_sample``, pixel-center
convention) -- close to, not bit-equal with, PIL's affine transform.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from promptcore.kernels.backend import tracing_or_compiling

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
AUGMIX_OPS = ("autocontrast", "equalize", "posterize", "rotate", "solarize", "shear_x", "shear_y",
              "translate_x", "translate_y")


def random_resized_crop_boxes(height: int, width: int, count: int, generator: torch.Generator,
                              scale: Tuple[float, float] = (0.08, 1.0),
                              ratio: Tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """``count`` crop boxes (top, left, h, w) of an image (height, width), as ``RandomResizedCrop.get_params``
    chooses them (ten tries of area/aspect, then the center-crop fallback), vectorised on the host."""
    area = height * width
    tries = 10
    u_area = torch.rand(count, tries, generator=generator, dtype=torch.float64)
    u_ratio = torch.rand(count, tries, generator=generator, dtype=torch.float64)
    u_top = torch.rand(count, generator=generator, dtype=torch.float64)
    u_left = torch.rand(count, generator=generator, dtype=torch.float64)
    target = area * (scale[0] + (scale[1] - scale[0]) * u_area)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u_ratio)
    w = torch.round(torch.sqrt(target * aspect)).long()
    h = torch.round(torch.sqrt(target / aspect)).long()
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = ok.long().argmax(dim=1)
    any_ok = ok.any(dim=1)
    w = w.gather(1, first[:, None])[:, 0]
    h = h.gather(1, first[:, None])[:, 0]
    top = torch.floor(u_top * (height - h + 1).double()).long().clamp(min=0)
    left = torch.floor(u_left * (width - w + 1).double()).long().clamp(min=0)
    # fallback: the largest center crop within the ratio range
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fh, fw = height, int(round(height * max(ratio)))
    else:
        fw, fh = width, height
    fallback = torch.tensor([(height - fh) // 2, (width - fw) // 2, fh, fw])
    boxes = torch.stack([top, left, h, w], dim=1)
    return torch.where(any_ok[:, None], boxes, fallback)


def _crops(image: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Crops (K, 3, size, size) of one float image (3, H, W) at boxes (K, 4) = (top, left, h, w)."""
    from torchvision.ops import roi_align

    b = boxes.to(device=image.device, dtype=torch.float32)
    rois = torch.stack([torch.zeros_like(b[:, 0]), b[:, 1], b[:, 0], b[:, 1] + b[:, 3], b[:, 0] + b[:, 2]], dim=1)
    return roi_align(image.unsqueeze(0), rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=-1,
                     aligned=True)


def center_view(image: torch.Tensor, size: int) -> torch.Tensor:
    """Resize the shorter side to ``size`` (bicubic, antialias) and center-crop: the official view 0."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    out = TF.resize(image, [size], interpolation=InterpolationMode.BICUBIC, antialias=True)
    return TF.center_crop(out, [size, size])


def require_finite(images: torch.Tensor, what: str = "images") -> None:
    """Refuse NaN or Inf pixels, naming the images that hold them (leading dim = image index).

    Every method refuses them the same way rather than return NaN logits (and, in TPT, NaN entropies
    that would steer the view selection). Skipped while tracing or compiling: the check needs a
    device-to-host sync and data-dependent control flow.
    """
    if not images.is_floating_point() or images.numel() == 0 or tracing_or_compiling():
        return
    finite = torch.isfinite(images).flatten(1).all(dim=1) if images.dim() > 1 else torch.isfinite(images)
    if bool(finite.all()):
        return
    bad = (~finite).nonzero().flatten().tolist()
    shown = ", ".join(map(str, bad[:8])) + (", ..." if len(bad) > 8 else "")
    raise ValueError(f"{what}: NaN or Inf values in image {shown}; promptcore refuses non-finite input "
                     "rather than return NaN logits")


def as_image_list(images) -> List[torch.Tensor]:
    """Validate raw images, (N, 3, H, W) or a list of (3, H, W) on one device, and return them as a list."""
    if isinstance(images, torch.Tensor):
        if images.dim() == 3:
            raise ValueError(f"images must be (N, 3, H, W) or a list of (3, H, W), got one image of shape "
                             f"{tuple(images.shape)}; add a batch dimension")
        if images.dim() != 4:
            raise ValueError(f"images must be (N, 3, H, W) or a list of (3, H, W), got shape {tuple(images.shape)}")
        images = list(images.unbind(0))
    images = list(images)
    if not images:
        raise ValueError("no images given")
    for i, img in enumerate(images):
        if not isinstance(img, torch.Tensor) or img.dim() != 3 or img.shape[0] != 3:
            shape = tuple(img.shape) if isinstance(img, torch.Tensor) else type(img).__name__
            raise ValueError(f"image {i} must be a (3, H, W) tensor, got {shape}")
        if img.dtype != torch.uint8 and not img.is_floating_point():
            raise TypeError(f"image {i} must be uint8 (0..255) or floating point (0..1), got {img.dtype}")
        if img.device != images[0].device:
            raise ValueError(f"image {i} is on {img.device}, image 0 on {images[0].device}")
        require_finite(img.unsqueeze(0), f"image {i}")
    return images


def make_views(images: Union[torch.Tensor, Sequence[torch.Tensor]], n_views: int, size: int,
               generator: Optional[torch.Generator] = None, augmix: bool = False, severity: int = 1,
               mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> torch.Tensor:
    """Normalised views (N, n_views, 3, size, size) float32 of raw images, view 0 the center view.

    ``images``: (N, 3, H, W) or a list of (3, H, W) tensors (sizes may differ), uint8 0..255 or float
    0..1, all on one device; the views are made there. Random numbers come from ``generator`` (a
    CPU ``torch.Generator``; the same seed gives the same views on any device).
    """
    if n_views < 1:
        raise ValueError(f"n_views must be >= 1, got {n_views}")
    images = as_image_list(images)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    device = images[0].device
    out = []
    for img in images:
        integer = img.dtype == torch.uint8
        first = center_view(img, size).float()
        pixels = img.float()
        if n_views > 1:
            boxes = random_resized_crop_boxes(img.shape[1], img.shape[2], n_views - 1, generator)
            flips = torch.rand(n_views - 1, generator=generator) < 0.5
            crops = _crops(pixels, boxes, size)
            flip_idx = flips.nonzero()[:, 0].to(device)
            crops[flip_idx] = crops[flip_idx].flip(-1)
            if integer:
                crops = crops.round().clamp_(0, 255)
            views = torch.cat([first.unsqueeze(0), crops])
        else:
            views = first.unsqueeze(0)
        views = views / 255.0 if integer else views
        if augmix and n_views > 1:
            views[1:] = augmix_views(views[1:], generator, severity, integer_levels=True)
        out.append(views)
    stacked = torch.stack(out)
    m = torch.tensor(mean, device=device).view(1, 1, 3, 1, 1)
    s = torch.tensor(std, device=device).view(1, 1, 3, 1, 1)
    return (stacked - m) / s


# -- AugMix ---------------------------------------------------------------------------------------


def augmix_views(views: torch.Tensor, generator: torch.Generator, severity: int = 1,
                 integer_levels: bool = True, width: int = 3, ops: Sequence[str] = AUGMIX_OPS) -> torch.Tensor:
    """AugMix of views (M, 3, S, S) in 0..1: ``m * x + (1 - m) * sum_i w_i chain_i(x)`` per view, with
    ``w ~ Dirichlet(1, ..., 1)`` (``width`` chains), ``m ~ Beta(1, 1)``, chains of 1-3 random ``ops``.

    Ops run on 0..255 values (rounded to integer levels after each op when ``integer_levels``, as
    PIL's uint8 images are). Mixing the unnormalised images equals the official mixing of
    normalised ones because the weights sum to one.
    """
    for op in ops:
        if op not in AUGMIX_OPS:
            raise ValueError(f"unknown AugMix op {op!r}; choose from {', '.join(AUGMIX_OPS)}")
    M, _, H, W = views.shape
    device = views.device
    e = -torch.log(torch.rand(M, width, generator=generator, dtype=torch.float64).clamp_min(1e-300))
    weights = (e / e.sum(dim=1, keepdim=True)).float()  # Dirichlet(1, ..., 1) = normalised Exp(1)
    m = torch.rand(M, generator=generator)  # Beta(1, 1) = Uniform(0, 1)
    depth = torch.randint(1, 4, (M, width), generator=generator)
    choice = torch.randint(0, len(ops), (M, width, 3), generator=generator)
    levels = 0.1 + (severity - 0.1) * torch.rand(M, width, 3, generator=generator, dtype=torch.float64)
    signs = torch.where(torch.rand(M, width, 3, generator=generator) > 0.5, -1.0, 1.0).double()

    chains = (views * 255.0).unsqueeze(1).expand(M, width, 3, H, W).reshape(M * width, 3, H, W).clone()
    depth, choice = depth.reshape(-1), choice.reshape(M * width, 3)
    levels, signs = levels.reshape(M * width, 3), signs.reshape(M * width, 3)
    for step in range(3):
        for o, name in enumerate(ops):
            rows = ((depth > step) & (choice[:, step] == o)).nonzero()[:, 0]
            if rows.numel() == 0:
                continue
            lv, sg = levels[rows, step], signs[rows, step]
            idx = rows.to(device)
            res = _apply_op(name, chains[idx], lv, sg, H)
            if integer_levels:
                res = res.round().clamp_(0, 255)
            chains[idx] = res
    chains = chains.reshape(M, width, 3, H, W) / 255.0
    mix = (weights.to(device).view(M, width, 1, 1, 1) * chains).sum(dim=1)
    m = m.to(device).view(M, 1, 1, 1)
    return m * views + (1 - m) * mix


def _int_parameter(level: torch.Tensor, maxval: float) -> torch.Tensor:
    return torch.floor(level * maxval / 10)


def _apply_op(name: str, x: torch.Tensor, level: torch.Tensor, sign: torch.Tensor, size: int) -> torch.Tensor:
    """One AugMix op on x (B, 3, H, W) in 0..255 with per-image level/sign (B,) on the host."""
    dev = x.device
    if name == "autocontrast":
        xd = x.double()  # PIL builds the lookup table in Python floats: int(i * scale + offset)
        lo = xd.amin(dim=(2, 3), keepdim=True)
        hi = xd.amax(dim=(2, 3), keepdim=True)
        scale = 255.0 / (hi - lo).clamp_min(1e-6)
        out = torch.floor(xd * scale + (-lo * scale)).clamp(0, 255).to(x.dtype)
        return torch.where(hi > lo, out, x)
    if name == "equalize":
        return _equalize(x)
    if name == "posterize":
        bits = 4 - _int_parameter(level, 4)
        q = (2.0 ** (8 - bits)).float().to(dev).view(-1, 1, 1, 1)
        return torch.floor(x / q) * q
    if name == "solarize":
        threshold = (256 - _int_parameter(level, 256)).float().to(dev).view(-1, 1, 1, 1)
        return torch.where(x >= threshold, 255.0 - x, x)
    B = x.shape[0]
    mat = torch.zeros(B, 2, 3, dtype=torch.float64)
    mat[:, 0, 0] = mat[:, 1, 1] = 1.0
    H, W = x.shape[-2:]
    if name == "rotate":
        phi = -torch.deg2rad(_int_parameter(level, 30) * sign)
        cx, cy = W / 2.0, H / 2.0
        cos, sin = torch.cos(phi), torch.sin(phi)
        mat[:, 0, 0], mat[:, 0, 1], mat[:, 1, 0], mat[:, 1, 1] = cos, sin, -sin, cos
        mat[:, 0, 2] = cx - cos * cx - sin * cy
        mat[:, 1, 2] = cy + sin * cx - cos * cy
    elif name == "shear_x":
        mat[:, 0, 1] = level * 0.3 / 10 * sign
    elif name == "shear_y":
        mat[:, 1, 0] = level * 0.3 / 10 * sign
    elif name == "translate_x":
        mat[:, 0, 2] = _int_parameter(level, size / 3) * sign
    elif name == "translate_y":
        mat[:, 1, 2] = _int_parameter(level, size / 3) * sign
    else:  # pragma: no cover - names are checked by the caller
        raise ValueError(name)
    return _affine(x, mat.float().to(dev))


def _affine(x: torch.Tensor, mat: torch.Tensor) -> torch.Tensor:
    """Sample x at ``mat @ (output pixel center)`` (input pixel coordinates), bilinear, zero fill."""
    B, _, H, W = x.shape
    ys, xs = torch.meshgrid(torch.arange(H, device=x.device, dtype=torch.float32) + 0.5,
                            torch.arange(W, device=x.device, dtype=torch.float32) + 0.5, indexing="ij")
    pts = torch.stack([xs, ys, torch.ones_like(xs)], dim=-1)  # (H, W, 3)
    src = torch.einsum("hwk,bjk->bhwj", pts, mat)  # (B, H, W, 2) input pixel coordinates
    grid = torch.stack([src[..., 0] * (2.0 / W) - 1.0, src[..., 1] * (2.0 / H) - 1.0], dim=-1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _equalize(x: torch.Tensor) -> torch.Tensor:
    """PIL's ImageOps.equalize per image and channel: ``lut[i] = (step // 2 + #pixels below i) // step``."""
    B, C, H, W = x.shape
    flat = x.round().clamp(0, 255).long().reshape(B * C, H * W)
    hist = torch.zeros(B * C, 256, dtype=torch.long, device=x.device).scatter_add_(1, flat, torch.ones_like(flat))
    last = hist.gather(1, flat.amax(dim=1, keepdim=True))  # count of the highest used level
    step = (H * W - last) // 255
    below = torch.cumsum(hist, dim=1) - hist
    lut = ((step // 2 + below) // step.clamp_min(1)).clamp(0, 255)
    out = lut.gather(1, flat).to(x.dtype)
    nonzero_bins = (hist > 0).sum(dim=1, keepdim=True)
    keep = (step == 0) | (nonzero_bins <= 1)
    return torch.where(keep, flat.to(x.dtype), out).reshape(B, C, H, W)

