"""Open a whole-slide image and read pixels from it, whatever its format.

Pyramidal formats (Aperio SVS with JPEG or JPEG 2000 tiles, Hamamatsu NDPI, DICOM WSI, MIRAX, generic
tiled TIFF, …) are read with OpenSlide (the ``openslide-bin`` wheel, no system package). Plain images
(PNG, JPEG, untiled TIFF) are read whole with Pillow or tifffile and behave as a one-level slide.

Coordinates: ``level0_xy`` is always in level-0 pixels; sizes are in pixels of the level read.
Transparent pixels (outside the scanned area, or past the slide's edge) are composited onto white,
so that they look like glass, not like black tissue.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

import numpy as np

from ..errors import SlideError
from .mpp import Resolution, mpp_from_properties, mpp_from_tiff_resolution, resolve_mpp

PLAIN_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
TIFF_SUFFIXES = (".tif", ".tiff")
# A level read whole (segmentation, thumbnails) larger than this is refused: read a coarser level.
MAX_LEVEL_READ_PIXELS = 400_000_000
#: Largest plain image (PNG, JPEG, BMP, untiled TIFF) opened. Such an image is decoded whole into memory
#: (3 bytes a pixel, and as much again while it is converted to RGB), so its size is checked from its
#: header first: a small compressed file can declare gigapixels.
MAX_PLAIN_IMAGE_PIXELS = 100_000_000


def composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """(H, W, 4) uint8 RGBA (not premultiplied) → (H, W, 3) uint8 RGB over a white background."""
    import cv2

    alpha = rgba[..., 3]
    if alpha.min() == 255:
        return cv2.cvtColor(np.ascontiguousarray(rgba), cv2.COLOR_RGBA2RGB)  # far faster than a strided copy
    rgb = rgba[..., :3]
    a = alpha[..., None].astype(np.uint16)
    out = (rgb.astype(np.uint16) * a + 255 * (255 - a) + 127) // 255
    return out.astype(np.uint8)


def to_rgb(array: np.ndarray) -> np.ndarray:
    """Any 2D/3D uint8 or uint16 image array → (H, W, 3) uint8 RGB (alpha composited onto white)."""
    a = np.asarray(array)
    if a.dtype == np.uint16:
        a = (a >> 8).astype(np.uint8)
    elif a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif a.dtype != np.uint8:
        a = np.clip(a, 0, 255).astype(np.uint8)
    if a.ndim == 2:
        return np.repeat(a[..., None], 3, axis=2)
    if a.ndim == 3 and a.shape[2] == 1:
        return np.repeat(a, 3, axis=2)
    if a.ndim == 3 and a.shape[2] == 2:  # grey + alpha
        return composite_on_white(np.concatenate([np.repeat(a[..., :1], 3, axis=2), a[..., 1:]], axis=2))
    if a.ndim == 3 and a.shape[2] == 4:
        return composite_on_white(a)
    if a.ndim == 3 and a.shape[2] == 3:
        return np.ascontiguousarray(a)
    raise ValueError(f"unsupported image array shape {a.shape}")


class _OpenSlideSource:
    """Pixels from OpenSlide."""

    kind = "openslide"

    def __init__(self, path: Path) -> None:
        import openslide

        self._err = openslide.OpenSlideError
        try:
            self.osr = openslide.OpenSlide(str(path))
        except openslide.OpenSlideUnsupportedFormatError as exc:
            raise SlideError(f"{path}: OpenSlide does not recognise this file ({exc}): it is truncated or "
                             "damaged, or not a slide format OpenSlide reads (SVS, NDPI, DICOM, MRXS, SCN, "
                             "tiled TIFF, …).") from exc
        except (openslide.OpenSlideError, OSError) as exc:
            raise SlideError(f"{path}: cannot be opened ({exc}); the file may be truncated or damaged.") from exc
        self.path = path
        self.level_dimensions = tuple(tuple(int(v) for v in d) for d in self.osr.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in self.osr.level_downsamples)
        self.properties: Mapping[str, str] = dict(self.osr.properties)
        self.vendor = self.properties.get("openslide.vendor", "")
        self.ycbcr_as_rgb = self.vendor == "dicom" and _dicom_jpeg_mislabelled(path, self.properties)

    def resolution(self) -> Resolution | None:
        return mpp_from_properties(self.properties)

    def read(self, level0_xy: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        try:
            img = self.osr.read_region((int(level0_xy[0]), int(level0_xy[1])), int(level),
                                       (int(size[0]), int(size[1])))
        except self._err as exc:
            raise SlideError(f"{self.path}: reading pixels failed ({exc}); the file may be truncated or "
                             "damaged.") from exc
        rgba = np.asarray(img)
        if self.ycbcr_as_rgb:
            rgba = _ycbcr_to_rgb(rgba)
        return composite_on_white(rgba)

    def close(self) -> None:
        self.osr.close()


_JPEG_BASELINE_SYNTAXES = ("1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51")


def _dicom_jpeg_mislabelled(path: Path, props: Mapping[str, str]) -> bool:
    """True for DICOM WSI whose JPEG frames are YCbCr (JFIF) while the header says RGB.

    Some converters write PhotometricInterpretation "RGB" over JFIF frames; OpenSlide trusts the header
    and returns the YCbCr values as if they were RGB (glass looks salmon, tissue teal).
    """
    if props.get("dicom.PhotometricInterpretation", "").upper() != "RGB":
        return False
    if props.get("dicom.TransferSyntaxUID", "") not in _JPEG_BASELINE_SYNTAXES:
        return False
    try:
        with open(path, "rb") as fh:
            head = fh.read(1 << 20)
    except OSError:
        return False
    i = head.find(b"\xff\xd8\xff")
    # JFIF (an APP0 "JFIF" segment right after the start of image) means YCbCr by definition.
    return i >= 0 and head[i + 3:i + 4] == b"\xe0" and head[i + 6:i + 10] == b"JFIF"


def _ycbcr_to_rgb(rgba: np.ndarray) -> np.ndarray:
    """RGBA whose colour channels hold (Y, Cb, Cr) → RGBA (JPEG's full-range BT.601)."""
    import cv2

    ycrcb = np.ascontiguousarray(rgba[..., [0, 2, 1]])
    out = rgba.copy()
    out[..., :3] = cv2.cvtColor(ycrcb, cv2.COLOR_YCrCb2RGB)
    return out


class _ArraySource:
    """A plain image held in memory as one level."""

    kind = "image"

    def __init__(self, path: Path, rgb: np.ndarray, resolution: Resolution | None) -> None:
        self.path = path
        self.rgb = rgb
        self._resolution = resolution
        self.level_dimensions = ((int(rgb.shape[1]), int(rgb.shape[0])),)
        self.level_downsamples = (1.0,)
        self.properties: Mapping[str, str] = {}
        self.vendor = "image"

    def resolution(self) -> Resolution | None:
        return self._resolution

    def read(self, level0_xy: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        x, y = int(level0_xy[0]), int(level0_xy[1])
        w, h = int(size[0]), int(size[1])
        out = np.full((h, w, 3), 255, np.uint8)
        ih, iw = self.rgb.shape[:2]
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, iw), min(y + h, ih)
        if x1 > x0 and y1 > y0:
            out[y0 - y:y1 - y, x0 - x:x1 - x] = self.rgb[y0:y1, x0:x1]
        return out

    def close(self) -> None:
        self.rgb = np.zeros((0, 0, 3), np.uint8)


def _check_plain_size(path: Path, width: int, height: int, nbytes: int) -> None:
    """Refuse a plain image whose header declares more than :data:`MAX_PLAIN_IMAGE_PIXELS` pixels (or
    more than 8 bytes a pixel of them), before it is decoded."""
    if width * height > MAX_PLAIN_IMAGE_PIXELS or nbytes > 8 * MAX_PLAIN_IMAGE_PIXELS:
        raise SlideError(f"{path}: a plain (untiled) image of {width}×{height} pixels ({nbytes / 1e9:.1f} GB "
                         f"decoded) is above the {MAX_PLAIN_IMAGE_PIXELS // 1_000_000} megapixels read whole into "
                         "memory. It was not decoded. Convert it to a tiled pyramidal TIFF, which is read tile by "
                         "tile (e.g. `vips tiffsave in.tif out.tif --tile --pyramid --compression jpeg`).")


def _load_pillow(path: Path) -> _ArraySource:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            w, h = im.size
            _check_plain_size(path, w, h, w * h * max(len(im.getbands()), 1))
            dpi = im.info.get("dpi")
            im.load()
            has_alpha = im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info
            rgb = to_rgb(np.asarray(im.convert("RGBA" if has_alpha else "RGB")))
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise SlideError(f"{path}: cannot be read as an image ({exc}). Large images should be converted to "
                         "a tiled pyramidal TIFF first.") from exc
    res = mpp_from_tiff_resolution(dpi[0], dpi[1], "inch") if dpi else None
    return _ArraySource(path, rgb, res)


def _read_tiff_page(path: Path) -> tuple[np.ndarray, object, float | None, float | None]:
    """The first page of a plain TIFF: (pixels, resolution unit tag, x and y resolution), its size checked
    before it is decoded."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tf:
            page = tf.pages[0]
            size = (int(page.imagewidth), int(page.imagelength), int(page.nbytes))
            tags = page.tags
            unit = tags["ResolutionUnit"].value if "ResolutionUnit" in tags else None
            xres = _rational(tags["XResolution"].value) if "XResolution" in tags else None
            yres = _rational(tags["YResolution"].value) if "YResolution" in tags else None
            _check_plain_size(path, *size)
            return page.asarray(), unit, xres, yres
    except SlideError:
        raise
    except Exception as exc:  # tifffile raises many types for damaged files
        raise SlideError(f"{path}: cannot be read as a TIFF image ({type(exc).__name__}: {exc}); "
                         "the file may be truncated or damaged.") from exc


def _load_tifffile(path: Path) -> _ArraySource:
    arr, unit, xres, yres = _read_tiff_page(path)
    if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[2] not in (3, 4):  # planar (C, H, W)
        arr = np.moveaxis(arr, 0, -1)
    try:
        rgb = to_rgb(arr)
    except ValueError as exc:
        raise SlideError(f"{path}: {exc}; expected an RGB, RGBA or greyscale image.") from exc
    unit_name = {2: "inch", 3: "centimeter"}.get(int(unit), None) if unit is not None else None
    return _ArraySource(path, rgb, mpp_from_tiff_resolution(xres, yres, unit_name))


def _rational(value: object) -> float | None:
    if isinstance(value, tuple) and len(value) == 2:
        return value[0] / value[1] if value[1] else None
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def resolve_slide_file(path: str | os.PathLike[str]) -> Path:
    """The file to open for ``path``: the path itself, or for a folder of DICOM files one ``.dcm`` in it
    (OpenSlide finds the other levels of the series by itself)."""
    p = Path(path).expanduser()
    if p.is_dir():
        dcm = sorted(q for q in p.iterdir() if q.suffix.lower() == ".dcm" and q.is_file())
        if not dcm:
            raise SlideError(f"{p} is a folder without .dcm files; give the slide file itself "
                             "(a folder is accepted only for DICOM WSI series).")
        return dcm[0]
    if not p.exists():
        raise SlideError(f"Slide file not found: {p}")
    return p


class Slide:
    """One opened slide: its pyramid, its resolution, and pixel reads.

    Attributes:
        path: the file that was opened.
        level_dimensions: (width, height) in pixels of every pyramid level, level 0 first.
        level_downsamples: downsample of every level relative to level 0.
        mpp: µm per level-0 pixel.
        mpp_source: ``"override"``, ``"metadata"`` or ``"tiff-tags"``.
        backend: ``"openslide"`` or ``"image"``.
        vendor: OpenSlide's vendor name (``aperio``, ``hamamatsu``, ``dicom``, …) or ``"image"``.
        properties: the slide's metadata (OpenSlide properties; empty for plain images).
    """

    def __init__(self, source: _OpenSlideSource | _ArraySource, resolution: Resolution) -> None:
        self._src = source
        self.path: Path = source.path
        self.level_dimensions: tuple[tuple[int, int], ...] = source.level_dimensions  # type: ignore[assignment]
        self.level_downsamples: tuple[float, ...] = source.level_downsamples
        self.mpp: float = resolution.mpp
        self.mpp_source: str = resolution.source
        self.backend: str = source.kind
        self.vendor: str = source.vendor
        self.properties: Mapping[str, str] = source.properties

    # -------------------------------------------------------------------------------------- geometry
    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def dimensions(self) -> tuple[int, int]:
        """(width, height) of level 0 in pixels."""
        return self.level_dimensions[0]

    def level_mpp(self, level: int) -> float:
        """µm per pixel of ``level``."""
        return self.mpp * self.level_downsamples[level]

    def best_level_for(self, mpp: float, tolerance: float = 0.0) -> int:
        """The coarsest level that is at least as fine as ``mpp`` µm/px (within ``tolerance``, relative).

        Reading from that level and shrinking never magnifies pixels; level 0 is returned when even
        level 0 is coarser than asked.
        """
        best = 0
        for lvl, ds in enumerate(self.level_downsamples):
            if self.mpp * ds <= mpp * (1.0 + tolerance):
                if ds > self.level_downsamples[best]:
                    best = lvl
        return best

    def best_level_for_downsample(self, downsample: float) -> int:
        """The coarsest level whose downsample is at most ``downsample`` (a 1 % slack for odd pyramids)."""
        return self.best_level_for(self.mpp * downsample, tolerance=0.01)

    # -------------------------------------------------------------------------------------- pixels
    def read_region(self, level0_xy: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """Pixels of ``level`` whose top-left corner is at level-0 ``level0_xy``.

        Args:
            level0_xy: (x, y) in level-0 pixels.
            level: pyramid level.
            size: (width, height) in pixels of ``level``.

        Returns:
            (height, width, 3) uint8 RGB; pixels outside the slide are white.
        """
        if not 0 <= level < self.level_count:
            raise SlideError(f"{self.path}: level {level} does not exist (the slide has {self.level_count}).")
        if size[0] <= 0 or size[1] <= 0:
            return np.zeros((max(size[1], 0), max(size[0], 0), 3), np.uint8)
        return self._src.read(level0_xy, level, size)

    def read_level(self, level: int) -> np.ndarray:
        """The whole of ``level`` as (height, width, 3) uint8 RGB.

        Read in one call: OpenSlide shifts a region by the sub-pixel remainder of its level-0 origin
        on levels whose downsample is not a whole number, so reading strips would not give the same pixels.
        """
        w, h = self.level_dimensions[level]
        if w * h > MAX_LEVEL_READ_PIXELS:
            raise SlideError(f"{self.path}: level {level} has {w}×{h} pixels, too many to read whole; the "
                             "slide lacks a coarse pyramid level. Convert it to a pyramidal TIFF.")
        return self.read_region((0, 0), level, (w, h))

    def downsampled_size(self, downsample: float) -> tuple[int, int]:
        """(width, height) of the whole slide at ``downsample`` (≥ 1) relative to level 0."""
        downsample = max(float(downsample), 1.0)
        w0, h0 = self.dimensions
        return max(1, round(w0 / downsample)), max(1, round(h0 / downsample))

    def read_downsampled(self, downsample: float) -> np.ndarray:
        """The whole slide at ``downsample`` (relative to level 0, ≥ 1), read from the nearest finer level
        and shrunk with area averaging.

        Returns:
            (round(H0 / downsample), round(W0 / downsample), 3) uint8 RGB.
        """
        import cv2

        downsample = max(float(downsample), 1.0)
        out_w, out_h = self.downsampled_size(downsample)
        level = self.best_level_for_downsample(downsample)
        img = self.read_level(level)
        if img.shape[1] != out_w or img.shape[0] != out_h:
            img = cv2.resize(img, (out_w, out_h), interpolation=cv2.INTER_AREA)
        return img

    def thumbnail(self, max_px: int = 1024) -> np.ndarray:
        """The whole slide shrunk so that its longer side is at most ``max_px``: (h, w, 3) uint8 RGB.

        Its downsample relative to level 0 is ``slide.dimensions[0] / thumb.shape[1]`` (per axis).
        """
        w0, h0 = self.dimensions
        return self.read_downsampled(max(w0, h0) / max_px)

    # -------------------------------------------------------------------------------------- lifetime
    def close(self) -> None:
        self._src.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Slide({str(self.path)!r}, {self.backend}/{self.vendor}, levels={self.level_count}, "
                f"level0={self.dimensions}, mpp={self.mpp:.4g} ({self.mpp_source}))")


def _open_source(path: Path) -> _OpenSlideSource | _ArraySource:
    suffix = path.suffix.lower()
    if suffix in PLAIN_IMAGE_SUFFIXES:
        return _load_pillow(path)
    if suffix in TIFF_SUFFIXES:
        import openslide

        # OpenSlide reads tiled (pyramidal) TIFFs; a plain strip TIFF is read whole with tifffile.
        try:
            fmt = openslide.OpenSlide.detect_format(str(path))
        except openslide.OpenSlideError:
            fmt = None
        return _OpenSlideSource(path) if fmt else _load_tifffile(path)
    return _OpenSlideSource(path)


def open_slide(path: str | os.PathLike[str], mpp_override: float | None = None) -> Slide:
    """Open a slide file (or a DICOM WSI folder).

    Args:
        path: the slide.
        mpp_override: µm per level-0 pixel to use instead of the slide's metadata (e.g. from the cohort
            manifest's ``mpp`` column).

    Raises:
        SlideError: the file is missing, unreadable, truncated, or has no known resolution.
    """
    file = resolve_slide_file(path)
    src = _open_source(file)
    try:
        w, h = src.level_dimensions[0]
        if w <= 0 or h <= 0:
            raise SlideError(f"{file}: level 0 is empty ({w}×{h} pixels).")
        found = src.resolution()
        power = src.properties.get("openslide.objective-power")
        res = resolve_mpp(mpp_override, found, path=str(file), objective_power=power)
        if not math.isfinite(res.mpp):
            raise SlideError(f"{file}: invalid resolution {res.mpp}.")
    except BaseException:
        src.close()
        raise
    return Slide(src, res)
