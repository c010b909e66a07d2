"""Images and datasets: Pillow IO, mod-crop, PIL bicubic LR, split-image and CUFED5-layout pairs.

Tensors are float32 (3, H, W) (or batched (B, 3, H, W)) RGB in [0, 1]; every file is read by
:func:`load_image` (image rules below: EXIF orientation, 16-bit, transparency, pixel limit).
LR images are made the way docs/CONTRACT.md §10 says: HR mod-cropped to a multiple of 4, then PIL bicubic
x1/4 on 8-bit pixels.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..swap import UPSCALE
from .checkpoint import atomic_write, temp_name_prefix
from .pairs import DEFAULT_PAIR_MIX, choose_mode, overlap_view, parse_pair_mix

SCALE = UPSCALE  # x4: relu1_1's scale over relu3_1
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
CUFED5_TARGET = re.compile(r"^(?P<stem>.+)_0\.(?:png|jpe?g|bmp)$", re.IGNORECASE)


class ImageReadError(ValueError):
    """An image file exists but cannot be decoded, or is refused (too many pixels)."""


class ImageTooLargeError(ImageReadError):
    """An image whose header declares more pixels than the limit (checked before decoding)."""


# ---------------------------------------------------------------------------------------------
# IO
#
# Image rules (one loader for every command): the file's EXIF orientation is applied; greyscale
# and palette images are expanded to RGB; 16-bit greyscale (PNG mode I;16 / I) is scaled from
# [0, 65535], float images (mode F) are clipped to [0, 1]; images with transparency are
# composited on white; images above ``max_pixels`` are refused from their header, before any
# pixel is decoded.

DEFAULT_MAX_PIXELS = 64_000_000
WRITE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP", ".tif": "TIFF",
                 ".tiff": "TIFF", ".webp": "WEBP"}
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA = ("RGBA", "RGBa", "LA", "La", "PA")


def _check_file(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"image not found: {path}")
    if path.is_dir():
        raise IsADirectoryError(f"expected an image file, got a directory: {path}")


def _open(path: Path, max_pixels: int) -> Image.Image:
    """Open lazily (header only) and refuse images above ``max_pixels``."""
    _check_file(path)
    try:
        with warnings.catch_warnings():
            # Pillow's own bomb warning is replaced by the max_pixels check below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(f"image {path} refused: {e}") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageReadError(f"cannot read image {path}: not a valid image file or corrupt ({e})") from e
    w, h = im.size
    if w * h > max_pixels:
        im.close()
        raise ImageTooLargeError(
            f"image {path} is {w}x{h} = {w * h:,} pixels, above the limit of {max_pixels:,} "
            "(max_pixels; the CLI's --max-pixels raises it)"
        )
    return im


def image_size(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(width, height) from the header, as :func:`load_image` would return it (EXIF rotation)."""
    with _open(Path(path), max_pixels) as im:
        w, h = im.size
        rotated = im.getexif().get(0x0112, 1) in (5, 6, 7, 8)
    return (h, w) if rotated else (w, h)


def _to_rgb_array(im: Image.Image) -> np.ndarray:
    """(H, W, 3) float32 in [0, 1] following the image rules above."""
    if im.mode in _SIXTEEN_BIT:
        grey = np.asarray(im, dtype=np.float32).clip(0, 65535) / 65535
        return np.repeat(grey[..., None], 3, axis=2)
    if im.mode == "F":
        grey = np.nan_to_num(np.asarray(im, dtype=np.float32), nan=0.0).clip(0, 1)
        return np.repeat(grey[..., None], 3, axis=2)
    if im.mode in _ALPHA or "transparency" in im.info:
        rgba = np.asarray(im.convert("RGBA"), dtype=np.float32) / 255
        alpha = rgba[..., 3:]
        return rgba[..., :3] * alpha + (1 - alpha)
    return np.asarray(im.convert("RGB"), dtype=np.float32) / 255


def load_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """(3, H, W) float32 RGB in [0, 1] (see the image rules above); clear errors for bad files."""
    path = Path(path)
    im = _open(path, max_pixels)
    try:
        with im:
            im.load()
            upright = ImageOps.exif_transpose(im)
            arr = _to_rgb_array(upright)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageReadError(f"cannot read image {path}: not a valid image file or corrupt ({e})") from e
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).contiguous()


def pil_to_tensor(im: Image.Image) -> torch.Tensor:
    arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def tensor_to_pil(x: torch.Tensor) -> Image.Image:
    """(3, H, W) or (1, 3, H, W) in [0, 1] -> 8-bit RGB (rounded, clamped)."""
    if x.dim() == 4:
        if x.shape[0] != 1:
            raise ValueError(f"x: expected a single image, got batch of {x.shape[0]}")
        x = x[0]
    if x.dim() != 3 or x.shape[0] != 3:
        raise ValueError(f"x: expected (3, H, W), got shape {tuple(x.shape)}")
    arr = x.detach().float().cpu().clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(arr, "RGB")


def check_output_path(path: str | os.PathLike, *, inputs: Sequence[str | os.PathLike] = (),
                      overwrite: bool = False, extensions: Sequence[str] = tuple(WRITE_FORMATS),
                      what: str = "output") -> Path:
    """Check an output file before any work: known extension, not a folder, not one of ``inputs``
    (unless ``overwrite``), not an existing file (unless ``overwrite``), and a folder that exists
    (or can be created) and can be written to. Creates missing parent folders."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{what}: {path} is a folder; give a file name")
    if path.suffix.lower() not in extensions:
        raise ValueError(f"{what}: unknown file extension {path.suffix or '(none)'!r} in {path}; "
                         f"use one of {', '.join(extensions)}")
    if not overwrite:
        for i in inputs:
            if path.exists() and Path(i).exists() and os.path.samefile(path, i):
                raise ValueError(f"{what}: {path} is also an input ({i}); refusing to overwrite an input "
                                 "(pass --overwrite to allow it)")
        if path.exists():
            raise FileExistsError(f"{what}: {path} exists; pass --overwrite to replace it")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path.parent, prefix=temp_name_prefix(path))
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"{what}: cannot write to folder {path.parent} ({e.strerror or e})") from e
    return path


def save_image(x: torch.Tensor | Image.Image, path: str | os.PathLike) -> Path:
    """Write 8-bit RGB (a tensor in [0, 1] or a PIL image) atomically (temporary file in the same
    folder, then ``os.replace``); the format follows the extension (:data:`WRITE_FORMATS`)."""
    path = Path(path)
    fmt = WRITE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"path: unknown image extension {path.suffix or '(none)'!r} in {path}; "
                         f"use one of {', '.join(WRITE_FORMATS)}")
    im = x if isinstance(x, Image.Image) else tensor_to_pil(x)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda f: im.save(f, format=fmt))


def quantize(x: torch.Tensor) -> torch.Tensor:
    """Round to 8-bit levels (what saving and reloading would give)."""
    return x.clamp(0, 1).mul(255).round().div(255)


def list_images(folder: str | os.PathLike) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


# ---------------------------------------------------------------------------------------------
# resizing

def mod_crop(x: torch.Tensor, multiple: int = SCALE) -> torch.Tensor:
    """Crop the bottom/right so H and W are multiples of ``multiple``."""
    h, w = x.shape[-2:]
    hh, ww = h - h % multiple, w - w % multiple
    if hh == 0 or ww == 0:
        raise ValueError(f"image of size {h}x{w} is smaller than {multiple} pixels")
    return x[..., :hh, :ww]


def pil_resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """PIL bicubic resize of (3, H, W) or (B, 3, H, W) to ``size`` = (H', W'), on 8-bit pixels."""
    if x.dim() == 4:
        return torch.stack([pil_resize(xi, size) for xi in x])
    h, w = size
    return pil_to_tensor(tensor_to_pil(x).resize((w, h), Image.BICUBIC))


def bicubic_down(hr: torch.Tensor, scale: int = SCALE) -> torch.Tensor:
    """LR = PIL bicubic x1/scale of HR (H, W must be multiples of scale; mod-crop first)."""
    h, w = hr.shape[-2:]
    if h % scale or w % scale:
        raise ValueError(f"hr: size {h}x{w} is not a multiple of {scale}; mod_crop it first")
    return pil_resize(hr, (h // scale, w // scale))


def bicubic_up(lr: torch.Tensor, scale: int = SCALE) -> torch.Tensor:
    """PIL bicubic x``scale`` (the evaluation's bicubic baseline)."""
    h, w = lr.shape[-2:]
    return pil_resize(lr, (h * scale, w * scale))


# ---------------------------------------------------------------------------------------------
# pairs

@dataclass
class Pair:
    """One evaluation / training item: target HR (mod-cropped) and its reference HR images."""

    name: str
    hr: torch.Tensor
    refs: list[torch.Tensor]


def split_image(hr: torch.Tensor, multiple: int = SCALE) -> tuple[torch.Tensor, torch.Tensor]:
    """Split-image protocol (docs/CONTRACT.md §10): the longer side in two halves -> (target, reference).

    The target is the first half (left or top), the reference the second; each half is
    mod-cropped to ``multiple``.
    """
    h, w = hr.shape[-2:]
    if w >= h:
        half = w // 2
        a, b = hr[..., :, :half], hr[..., :, half:]
    else:
        half = h // 2
        a, b = hr[..., :half, :], hr[..., half:, :]
    return mod_crop(a, multiple), mod_crop(b, multiple)


def is_cufed5_folder(folder: str | os.PathLike) -> bool:
    return any(CUFED5_TARGET.match(p.name) for p in list_images(folder))


def cufed5_groups(folder: str | os.PathLike) -> list[tuple[str, Path, list[Path]]]:
    """``(stem, target, [ref_1, ..., ref_k])`` for every ``STEM_0.ext`` with refs ``STEM_i.ext``."""
    files = list_images(folder)
    by_name = {p.name: p for p in files}
    groups = []
    for p in files:
        m = CUFED5_TARGET.match(p.name)
        if not m:
            continue
        stem = m.group("stem")
        refs = []
        for i in range(1, 100):
            names = (f"{stem}_{i}{e}" for e in (p.suffix, ".png", ".jpg"))
            hit = next((by_name[n] for n in names if n in by_name), None)
            if hit is None:
                break
            refs.append(hit)
        if not refs:
            raise ValueError(f"{folder}: CUFED5 target {p.name} has no reference {stem}_1.*")
        groups.append((stem, p, refs))
    return groups


def load_pairs(
    folder: str | os.PathLike, layout: str = "auto", ref_levels: Sequence[int] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> list[Pair]:
    """Evaluation pairs from a folder: ``layout`` "split" (any HR images, docs/CONTRACT.md §10 split-image
    protocol), "cufed5" (``NNN_0`` target, ``NNN_1..5`` references) or "auto" (cufed5 when
    ``*_0.*`` files are present). ``ref_levels`` picks CUFED5 references (1-based; default all).
    An unusable image stops the loading with an error naming it (a table over a silently
    smaller set would not be comparable)."""
    if layout not in ("auto", "split", "cufed5"):
        raise ValueError(f"layout: expected 'auto', 'split' or 'cufed5', got {layout!r}")
    files = list_images(folder)
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {folder}")
    if layout == "auto":
        layout = "cufed5" if is_cufed5_folder(folder) else "split"
    pairs = []
    if layout == "split":
        for p in files:
            target, ref = _named(p, lambda p=p: split_image(load_image(p, max_pixels)))
            pairs.append(Pair(p.stem, target, [ref]))
        return pairs
    for stem, target, refs in cufed5_groups(folder):
        chosen = refs if ref_levels is None else [refs[i - 1] for i in ref_levels if 0 < i <= len(refs)]
        pairs.append(Pair(stem, _named(target, lambda t=target: mod_crop(load_image(t, max_pixels))),
                          [_named(r, lambda r=r: mod_crop(load_image(r, max_pixels))) for r in chosen]))
    return pairs


def _named(path: Path, make):
    """``make()``, with ValueErrors (unreadable / too small images) naming ``path``."""
    try:
        return make()
    except ValueError as e:
        if str(path) in str(e):
            raise
        raise type(e)(f"{path}: {e}") from e


# ---------------------------------------------------------------------------------------------
# training crops

class TrainCrops:
    """Random training crops with a reference: (lr, hr, ref), all in [0, 1].

    Sources: folders of HR images (split-image pairs: the crop comes from one half of the
    image and the reference crop from the other half, sides chosen at random) or CUFED5-layout
    folders (target ``NNN_0``, reference ``NNN_1``..). Images are decoded once and kept as
    uint8. An image that cannot be used (unreadable, too small to split, above the pixel limit)
    is skipped with a warning naming it; no usable image at all is an error. Sampling is driven
    by an explicit ``torch.Generator`` so that a resumed run draws the same batches as an
    uninterrupted one.

    Args:
        folders: image folders (layout detected per folder).
        crop: HR crop size (multiple of 4); the LR crop is ``crop // 4``.
        ref_crop: reference crop size (multiple of 4).
        augment: random flips / 90-degree rotations (not in the original code); an ``overlap``
            reference gets the same one as its target.
        pair_mix: which reference each crop gets (:mod:`srntt_core.models.pairs`), e.g.
            ``"overlap:0.5,half:0.3,unrelated:0.2"``; the default is the item's own reference.
    """

    def __init__(self, folders: Sequence[str | os.PathLike], crop: int = 160, ref_crop: int = 160,
                 augment: bool = False, pair_mix: str = DEFAULT_PAIR_MIX):
        if crop % SCALE or ref_crop % SCALE or crop < 4 * SCALE or ref_crop < 4 * SCALE:
            raise ValueError(f"crop/ref_crop: need multiples of {SCALE} and >= 16, got {crop}/{ref_crop}")
        self.mix = parse_pair_mix(pair_mix)
        self.crop, self.ref_crop, self.augment = crop, ref_crop, augment
        self.items: list[tuple[str, torch.Tensor, list[torch.Tensor]]] = []
        self.image_of: list[int] = []  # the image of each item (both halves of a split image: one)
        self.skipped: list[str] = []
        for folder in folders:
            if is_cufed5_folder(folder):
                for stem, target, refs in cufed5_groups(folder):
                    group = self._usable(
                        lambda t=target, rs=refs: (_cropped_u8(t), [_cropped_u8(r) for r in rs]))
                    if group is not None:
                        self.items.append((stem, *group))
                        self.image_of.append(self.image_of[-1] + 1 if self.image_of else 0)
            else:
                for p in list_images(folder):
                    halves = self._usable(lambda p=p: _named(p, lambda: split_image(load_image(p))))
                    if halves is None:
                        continue
                    a, b = halves
                    # split pairs work both ways round: either half may be the target.
                    self.items.append((p.stem, _u8(a), [_u8(b)]))
                    self.items.append((p.stem + "@b", _u8(b), [_u8(a)]))
                    image = self.image_of[-1] + 1 if self.image_of else 0
                    self.image_of += [image, image]
        if not self.items:
            why = f" (skipped: {'; '.join(self.skipped[:3])})" if self.skipped else ""
            raise ValueError(f"no usable training images in {list(map(str, folders))}{why}")
        if self.mix["unrelated"] > 0 and len(set(self.image_of)) < 2:
            raise ValueError("pair_mix: 'unrelated' references need at least two training images, "
                             f"got one in {list(map(str, folders))}")

    def _usable(self, make):
        """``make()``, or None with a warning naming the file when it is unreadable or too small."""
        try:
            return make()
        except ValueError as e:
            self.skipped.append(str(e))
            print(f"srntt: warning: skipping a training image: {e}", file=sys.stderr)
            return None

    def __len__(self) -> int:
        return len(self.items)

    @staticmethod
    def _crop(img: torch.Tensor, size: int, g: torch.Generator) -> torch.Tensor:
        return TrainCrops._crop_box(img, size, g)[0]

    @staticmethod
    def _crop_box(img: torch.Tensor, size: int, g: torch.Generator
                  ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """``(crop, image it was cut from (padded when small), (y, x))``."""
        h, w = img.shape[-2:]
        if h < size or w < size:  # small image: pad by reflection (rare on the bundled data)
            img = torch.nn.functional.pad(img[None].float(), (0, max(0, size - w), 0, max(0, size - h)),
                                          mode="replicate")[0].to(torch.uint8)
            h, w = img.shape[-2:]
        y = int(torch.randint(0, (h - size) // SCALE + 1, (1,), generator=g)) * SCALE
        x = int(torch.randint(0, (w - size) // SCALE + 1, (1,), generator=g)) * SCALE
        return img[:, y:y + size, x:x + size], img, (y, x)

    def sample(self, batch: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = len(self.items)
        parts = [self.item(int(torch.randint(0, n, (1,), generator=g)), g) for _ in range(batch)]
        return tuple(torch.stack(t) for t in zip(*parts, strict=True))

    def item(self, index: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(lr, hr, ref)`` crops of item ``index``; pair mode, positions (and augmentation)
        drawn from ``g``."""
        _, target, ref_list = self.items[index]
        mode = choose_mode(self.mix, g)
        if mode == "half":
            ref = ref_list[int(torch.randint(0, len(ref_list), (1,), generator=g))]
        hr_u8, source, (y, x) = self._crop_box(target, self.crop, g)
        if mode == "half":
            rc = self._crop(ref, self.ref_crop, g)
        elif mode == "unrelated":
            others = [j for j, im in enumerate(self.image_of) if im != self.image_of[index]]
            other = self.items[others[int(torch.randint(0, len(others), (1,), generator=g))]][1]
            rc = self._crop(other, self.ref_crop, g)
        else:
            rc = overlap_view(source, (y, x, self.crop), self.ref_crop, g)[0]
        hr, rc = hr_u8.float() / 255, rc.float() / 255
        if self.augment:
            k = int(torch.randint(0, 4, (1,), generator=g))
            flip = bool(int(torch.randint(0, 2, (1,), generator=g)))
            hr = _orient(hr, k, flip)
            if mode == "overlap":
                rc = _orient(rc, k, flip)
        return bicubic_down(hr), hr, rc


def _orient(x: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    x = torch.rot90(x, k, (1, 2))
    return x.flip(-1) if flip else x


def _cropped_u8(path: Path) -> torch.Tensor:
    return _u8(_named(path, lambda: mod_crop(load_image(path))))


def _u8(x: torch.Tensor) -> torch.Tensor:
    return x.mul(255).round().to(torch.uint8)
