"""The JPEG frames of one level of a DICOM WSI series, as a grid of stored tiles.

A DICOM WSI level (VL Whole Slide Microscopy, one file per level, ``TILED_FULL``) stores its tiles as
the frames of encapsulated Pixel Data, row by row; with baseline JPEG each frame is one complete JPEG
stream. :func:`dicom_tile_level` reads the file's header and the item table of its Pixel Data (never
the pixels) and describes the frames as a :class:`~.jpeg_tiles.JpegTileLevel`, or says why the level is
left to OpenSlide (another transfer syntax, frames split over several fragments, several focal planes
or optical paths, sparse tiling).

Only what is needed is parsed: explicit-VR little-endian data elements, sequences skipped whole.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

from .jpeg_tiles import JpegTileLevel, UnsupportedTiles

__all__ = ["dicom_tile_level", "read_dicom_header"]

_JPEG_BASELINE = ("1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51")
_LONG_VRS = {b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"UC", b"UR", b"OD", b"OL", b"OV", b"SV", b"UV"}
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_PIXEL_DATA = 0x7FE00010
_UNDEFINED = 0xFFFFFFFF
_WANTED = {
    0x00020010: "TransferSyntaxUID", 0x00080008: "ImageType", 0x0020000E: "SeriesInstanceUID",
    0x00280002: "SamplesPerPixel", 0x00280004: "PhotometricInterpretation", 0x00280006: "PlanarConfiguration",
    0x00280008: "NumberOfFrames", 0x00280010: "Rows", 0x00280011: "Columns", 0x00280100: "BitsAllocated",
    0x00480006: "TotalPixelMatrixColumns", 0x00480007: "TotalPixelMatrixRows",
    0x00480303: "TotalPixelMatrixFocalPlanes", 0x00480302: "NumberOfOpticalPaths",
    0x00209311: "DimensionOrganizationType",
}


def _value(vr: bytes, raw: bytes):
    if vr == b"US":
        return struct.unpack("<H", raw[:2])[0]
    if vr == b"UL":
        return struct.unpack("<I", raw[:4])[0]
    text = raw.decode("ascii", "replace").strip("\x00 ")
    if vr == b"IS":
        return int(text or 0)
    return text


def _tag_length(fh) -> tuple[int, int]:
    head = fh.read(8)
    if len(head) < 8:
        raise UnsupportedTiles("its DICOM header ends early")
    group, element, length = struct.unpack("<HHI", head)
    return (group << 16) | element, length


def _skip_sequence(fh, length: int) -> None:
    """Skip a sequence's value (its items, of defined or undefined length)."""
    if length != _UNDEFINED:
        fh.seek(length, os.SEEK_CUR)
        return
    while True:
        tag, item_len = _tag_length(fh)
        if tag == _SEQ_END:
            return
        if tag != _ITEM:
            raise UnsupportedTiles("a DICOM sequence is malformed")
        if item_len != _UNDEFINED:
            fh.seek(item_len, os.SEEK_CUR)
        else:
            _read_elements(fh, {}, until=_ITEM_END)


def _read_elements(fh, out: dict, until: int | None = None) -> int | None:
    """Read data elements into ``out`` (the wanted ones) up to the item delimiter ``until`` or Pixel Data.

    Returns the Pixel Data's value length when it is reached (the file is then at its value).
    """
    while True:
        pos = fh.tell()
        head = fh.read(4)
        if len(head) < 4:
            return None
        group, element = struct.unpack("<HH", head)
        tag = (group << 16) | element
        if tag == until:
            fh.read(4)
            return None
        if group == 0xFFFE:
            raise UnsupportedTiles(f"unexpected DICOM item at byte {pos}")
        vr = fh.read(2)
        if vr in _LONG_VRS:
            fh.read(2)
            length = struct.unpack("<I", fh.read(4))[0]
        else:
            length = struct.unpack("<H", fh.read(2))[0]
        if tag == _PIXEL_DATA:
            return length
        if vr == b"SQ":
            _skip_sequence(fh, length)
        elif tag in _WANTED and length < 4096:
            out[_WANTED[tag]] = _value(vr, fh.read(length))
        else:
            fh.seek(length, os.SEEK_CUR)


def read_dicom_header(path: str | os.PathLike[str]) -> tuple[dict, int | None, int]:
    """The wanted header values of a DICOM file, Pixel Data's value length and its file offset.

    Raises:
        UnsupportedTiles: not a DICOM file, or one this parser does not read (implicit VR, big endian).
    """
    with open(path, "rb") as fh:
        if fh.read(132)[128:] != b"DICM":
            raise UnsupportedTiles("it is not a DICOM Part 10 file")
        out: dict = {}
        length = _read_elements(fh, out)
        return out, length, fh.tell()


def _frame_fragments(path: str, start: int) -> tuple[np.ndarray, np.ndarray]:
    """File offsets and lengths of the fragments of encapsulated Pixel Data starting at ``start``
    (the Basic Offset Table item excluded)."""
    offsets, lengths = [], []
    with open(path, "rb") as fh:
        fh.seek(start)
        tag, n = _tag_length(fh)
        if tag != _ITEM:
            raise UnsupportedTiles("its Pixel Data is not encapsulated")
        fh.seek(n, os.SEEK_CUR)  # the Basic Offset Table
        while True:
            tag, n = _tag_length(fh)
            if tag == _SEQ_END:
                break
            if tag != _ITEM or n == _UNDEFINED:
                raise UnsupportedTiles("its Pixel Data items are malformed")
            offsets.append(fh.tell())
            lengths.append(n)
            fh.seek(n, os.SEEK_CUR)
    return np.asarray(offsets, np.int64), np.asarray(lengths, np.int64)


def _header_problem(h: dict) -> str:
    """Why a DICOM level is not a plain grid of baseline JPEG frames ("" when it is)."""
    if h.get("TransferSyntaxUID") not in _JPEG_BASELINE:
        return f"its frames are not baseline JPEG (transfer syntax {h.get('TransferSyntaxUID', 'unknown')})"
    if h.get("SamplesPerPixel") != 3 or h.get("BitsAllocated") != 8 or h.get("PlanarConfiguration", 0) != 0:
        return "its pixels are not 8-bit interleaved colour"
    if h.get("TotalPixelMatrixFocalPlanes", 1) != 1 or h.get("NumberOfOpticalPaths", 1) != 1:
        return "it has several focal planes or optical paths"
    if h.get("DimensionOrganizationType", "TILED_FULL") != "TILED_FULL":
        return "its tiles are sparse (not TILED_FULL)"
    return ""


def _level_file(folder: Path, size: tuple[int, int], series: str) -> tuple[Path, dict, int | None, int]:
    for p in sorted(q for q in folder.iterdir() if q.suffix.lower() == ".dcm"):
        try:
            h, length, start = read_dicom_header(p)
        except (UnsupportedTiles, OSError, struct.error):
            continue
        dims = (h.get("TotalPixelMatrixColumns"), h.get("TotalPixelMatrixRows"))
        if dims == tuple(size) and h.get("SeriesInstanceUID") == series and "VOLUME" in h.get("ImageType", ""):
            return p, h, length, start
    raise UnsupportedTiles(f"no DICOM file of its series holds a level of {size[0]}×{size[1]} pixels")


def dicom_tile_level(path: str | os.PathLike[str], size: tuple[int, int]) -> JpegTileLevel:
    """The JPEG frames of the level of ``size`` (width, height) in the DICOM WSI series of ``path``.

    Raises:
        UnsupportedTiles: the level cannot be read as JPEG frames; the message says why.
    """
    try:
        opened, _, _ = read_dicom_header(path)
        file, h, length, start = _level_file(Path(path).parent, size, opened.get("SeriesInstanceUID", ""))
    except (OSError, struct.error) as exc:
        raise UnsupportedTiles(f"its DICOM header cannot be read ({exc})") from exc
    problem = _header_problem(h)
    if problem:
        raise UnsupportedTiles(problem)
    if length != _UNDEFINED:
        raise UnsupportedTiles("its Pixel Data is not encapsulated")
    offsets, lengths = _frame_fragments(str(file), start)
    level = JpegTileLevel(str(file), int(size[0]), int(size[1]), int(h["Columns"]), int(h["Rows"]), offsets,
                          lengths, b"", h.get("PhotometricInterpretation") == "RGB")
    frames = int(h.get("NumberOfFrames", 1))
    if len(offsets) != frames or frames != level.n_tiles:
        raise UnsupportedTiles(f"its {frames} frames in {len(offsets)} fragments do not make the "
                               f"{level.n_tiles} tiles of a full grid")
    return level
