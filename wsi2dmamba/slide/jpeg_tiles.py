"""The compressed JPEG tiles of one pyramid level, read as bytes, and where a region's pixels lie in them.

Aperio SVS and generic tiled TIFF files store each level as a grid of JPEG tiles; a tile's bytes plus
the page's shared JPEG tables (quantisation and Huffman tables) make a complete JPEG stream that any
decoder reads, nvJPEG on a GPU included. :func:`jpeg_tile_level` finds that grid for one level of a
slide opened with OpenSlide (matched by its pixel size), or says why the level cannot be read this way
(JPEG 2000, NDPI's restart-marker strips, planar or 16-bit data, other vendors' TIFF variants): the
caller then reads that slide with OpenSlide. DICOM WSI frames are described the same way by
:mod:`.dicom_frames`.

The geometry helpers are pure: which stored tiles a region needs (:func:`stored_tiles_of_region`), and
for a sequence of regions in batches, which tiles each batch decodes first and which it may forget
(:func:`decode_schedule`), so that every stored tile is decoded once per slide.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

__all__ = [
    "DecodeStep",
    "JpegTileLevel",
    "UnsupportedTiles",
    "decode_schedule",
    "jpeg_tile_level",
    "region_windows",
    "stored_tiles_of_region",
]

# Vendors whose TIFF levels are plain tiled JPEG pages (OpenSlide's names); others have quirks
# (Philips' sparse tiles, Ventana's overlaps, Leica's mosaics) and keep to OpenSlide.
_TIFF_VENDORS = ("aperio", "generic-tiff")
_COMPRESSION_JPEG = 7
_PHOTOMETRIC_RGB = 2
_PHOTOMETRIC_YCBCR = 6
# APP14 "Adobe" segment with transform 0: the three components are R, G, B, not YCbCr. Aperio writes
# RGB-coded tiles without any marker saying so (the TIFF's Photometric tag does); without this segment
# every decoder would convert them from YCbCr.
_ADOBE_RGB = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"
_SOI, _EOI = b"\xff\xd8", b"\xff\xd9"


class UnsupportedTiles(Exception):
    """The level cannot be read as JPEG tile bytes; ``str(exc)`` says why (the slide is read with OpenSlide)."""


@dataclass(frozen=True)
class JpegTileLevel:
    """The stored JPEG tiles of one pyramid level.

    Attributes:
        path: the slide file.
        width, height: the level's size in pixels.
        tile_width, tile_height: a stored tile's size in pixels (edge tiles are padded to it).
        offsets, bytecounts: (n_tiles,) int64 file offset and length of each tile's JPEG bytes, row-major;
            a length of 0 is a tile that was never written (read as white, like OpenSlide's transparency).
        tables: the page's shared JPEG tables (the segments between their start and end markers).
        rgb_coded: the tiles hold R, G, B components, not YCbCr (TIFF Photometric RGB).
    """

    path: str
    width: int
    height: int
    tile_width: int
    tile_height: int
    offsets: np.ndarray
    bytecounts: np.ndarray
    tables: bytes
    rgb_coded: bool

    @property
    def tiles_across(self) -> int:
        return math.ceil(self.width / self.tile_width)

    @property
    def tiles_down(self) -> int:
        return math.ceil(self.height / self.tile_height)

    @property
    def n_tiles(self) -> int:
        return self.tiles_across * self.tiles_down

    def tile_origin(self, t: int) -> tuple[int, int]:
        """(x, y) in level pixels of stored tile ``t``'s top-left corner."""
        return (t % self.tiles_across) * self.tile_width, (t // self.tiles_across) * self.tile_height

    def jpeg_streams(self, tiles, fh) -> list[bytes | None]:
        """The complete JPEG stream of each stored tile in ``tiles`` (None for a tile never written).

        ``fh`` is an open binary file of :attr:`path`; tiles are read in file order (one seek each).
        """
        tiles = [int(t) for t in tiles]
        out: dict[int, bytes | None] = {}
        for t in sorted(tiles, key=lambda k: int(self.offsets[k])):
            n = int(self.bytecounts[t])
            if n <= 4:
                out[t] = None
                continue
            fh.seek(int(self.offsets[t]))
            data = fh.read(n)
            out[t] = self.stream(data)
        return [out[t] for t in tiles]

    def stream(self, data: bytes) -> bytes:
        """A stored tile's bytes → a complete JPEG stream (bytes that do not start one are left for the
        decoder to refuse, so the tile is flagged as damaged)."""
        if data[:2] != _SOI:
            return data
        # A JFIF segment says YCbCr whatever the TIFF's Photometric tag says; decoders obey it first.
        colour = _ADOBE_RGB if self.rgb_coded and data[2:4] != b"\xff\xe0" else b""
        return _SOI + colour + self.tables + data[2:]


def _page_problem(page) -> str:
    """Why a TIFF page is not a grid of baseline JPEG tiles of 8-bit RGB ("" when it is)."""
    if not page.is_tiled:
        return "its level is stored in strips, not tiles"
    if int(page.compression) != _COMPRESSION_JPEG:
        return f"its tiles are compressed with TIFF compression {int(page.compression)}, not JPEG"
    if int(page.photometric) not in (_PHOTOMETRIC_RGB, _PHOTOMETRIC_YCBCR):
        return f"its colour space (TIFF photometric {int(page.photometric)}) is neither RGB nor YCbCr"
    if page.samplesperpixel != 3 or page.bitspersample != 8 or int(page.planarconfig) != 1:
        return "its pixels are not 8-bit interleaved RGB"
    if page.imagedepth != 1 or page.tilewidth % 8 or page.tilelength % 8:
        return "its tiles are volumetric or not a multiple of 8 pixels"
    return ""


def _level_page(tf, width: int, height: int):
    """The tiled page of size (width, height), or None."""
    for page in tf.pages:
        if (int(page.imagewidth), int(page.imagelength)) == (width, height) and page.is_tiled:
            return page
    return None


def _tables(page) -> bytes:
    tables = page.jpegtables or b""
    return tables[2:-2] if tables[:2] == _SOI and tables[-2:] == _EOI else b""


def jpeg_tile_level(path: str | os.PathLike[str], vendor: str, size: tuple[int, int]) -> JpegTileLevel:
    """The JPEG tiles of the level of ``size`` (width, height) pixels in the slide at ``path``.

    Args:
        path: the slide file.
        vendor: OpenSlide's vendor name for it (``aperio``, ``generic-tiff``, …).
        size: the level's (width, height), as OpenSlide reports it.

    Raises:
        UnsupportedTiles: the level is not a plain grid of JPEG tiles; the message says why.
    """
    if vendor not in _TIFF_VENDORS:
        raise UnsupportedTiles(f"its format ({vendor or 'not a TIFF'}) is read by OpenSlide only")
    import tifffile

    try:
        with tifffile.TiffFile(path) as tf:
            if tf.is_ndpi:
                raise UnsupportedTiles("NDPI tiles are JPEG strips with restart markers")
            page = _level_page(tf, int(size[0]), int(size[1]))
            if page is None:
                raise UnsupportedTiles(f"no tiled page of {size[0]}×{size[1]} pixels")
            problem = _page_problem(page)
            if problem:
                raise UnsupportedTiles(problem)
            level = JpegTileLevel(str(path), int(page.imagewidth), int(page.imagelength), int(page.tilewidth),
                                  int(page.tilelength), np.asarray(page.dataoffsets, np.int64),
                                  np.asarray(page.databytecounts, np.int64), _tables(page),
                                  int(page.photometric) == _PHOTOMETRIC_RGB)
    except UnsupportedTiles:
        raise
    except Exception as exc:  # tifffile raises many types for files it cannot parse
        raise UnsupportedTiles(f"tifffile cannot read its tile table ({type(exc).__name__}: {exc})") from exc
    if len(level.offsets) != level.n_tiles:
        raise UnsupportedTiles(f"its tile table has {len(level.offsets)} entries for {level.n_tiles} tiles")
    return level


# ----------------------------------------------------------------------------------------------- geometry

def region_windows(coords: np.ndarray, downsample: float, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Where each region lies on its level.

    Args:
        coords: (N, 2) level-0 (x, y) of each region's top-left corner.
        downsample: the level's downsample.
        side: the region's side in level pixels.

    Returns:
        ``(origin, frac)``: (N, 2) int64 whole level pixel of the corner, and (N, 2) float64 sub-pixel
        remainder in [0, 1), by which OpenSlide shifts the region (bilinearly) on levels whose
        downsample does not divide the corner.
    """
    pos = np.asarray(coords, np.float64) / float(downsample)
    origin = np.floor(pos + 1e-9).astype(np.int64)
    frac = np.clip(pos - origin, 0.0, None)
    frac[frac < 1e-6] = 0.0
    return origin, frac


def stored_tiles_of_region(level: JpegTileLevel, x: int, y: int, w: int, h: int) -> np.ndarray:
    """Row-major indices of the stored tiles that the level-pixel rectangle (x, y, w, h) overlaps."""
    x0, y0 = max(int(x), 0), max(int(y), 0)
    x1, y1 = min(int(x) + int(w), level.width), min(int(y) + int(h), level.height)
    if x1 <= x0 or y1 <= y0:
        return np.zeros(0, np.int64)
    cols = np.arange(x0 // level.tile_width, (x1 - 1) // level.tile_width + 1)
    rows = np.arange(y0 // level.tile_height, (y1 - 1) // level.tile_height + 1)
    return (rows[:, None] * level.tiles_across + cols[None, :]).ravel().astype(np.int64)


@dataclass(frozen=True)
class DecodeStep:
    """One batch of regions: the stored tiles it decodes first, and those no later batch needs."""

    decode: np.ndarray
    forget: np.ndarray


def decode_schedule(level: JpegTileLevel, origins: np.ndarray, window: int,
                    batches: list[np.ndarray]) -> list[DecodeStep]:
    """For regions read in ``batches``, which stored tiles each batch decodes and afterwards forgets.

    Args:
        level: the stored tiles.
        origins: (N, 2) level-pixel corners of the regions.
        window: side of every region in level pixels.
        batches: region indices of each batch, in reading order.

    Returns:
        One step per batch. Every stored tile is decoded in the first batch that needs it and kept until
        the last one does, so it is decoded once per slide whatever the regions' alignment.
    """
    first: dict[int, int] = {}
    last: dict[int, int] = {}
    for b, idx in enumerate(batches):
        for i in idx:
            for t in stored_tiles_of_region(level, origins[i, 0], origins[i, 1], window, window).tolist():
                first.setdefault(t, b)
                last[t] = b
    decode: list[list[int]] = [[] for _ in batches]
    forget: list[list[int]] = [[] for _ in batches]
    for t, b in first.items():
        decode[b].append(t)
    for t, b in last.items():
        forget[b].append(t)
    return [DecodeStep(np.array(sorted(d), np.int64), np.array(sorted(f), np.int64))
            for d, f in zip(decode, forget)]
