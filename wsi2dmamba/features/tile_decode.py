"""Tiles of a slide decoded straight from its stored JPEG tiles, in batches, on the encoder's device.

The CPU's JPEG decoding is what limits extraction through OpenSlide. For slides whose levels are grids
of JPEG tiles (Aperio SVS, generic tiled TIFF: :mod:`wsi2dmamba.slide.jpeg_tiles`; DICOM WSI frames:
:mod:`wsi2dmamba.slide.dicom_frames`), a reader thread
reads the compressed bytes of the stored tiles a batch needs, ``torchvision.io.decode_jpeg`` decodes
them together on the device (nvJPEG on a GPU, libjpeg-turbo on the CPU), and the lattice's tiles are cut
from the decoded tiles there. Each stored tile is decoded once per slide, however the lattice falls on
it: it stays on the device from the first batch that needs it to the last.

Pixels match the OpenSlide path (:mod:`.loader`): equal where a tile sits on whole level pixels and is
not resized (the same libjpeg-turbo decode on the CPU); where it does not, the same operations are done
in floating point (OpenSlide's bilinear shift by the corner's sub-pixel remainder, then the area
average of ``cv2.INTER_AREA``), so values differ by rounding. On a GPU, nvJPEG's decode differs from
libjpeg-turbo's by a few levels (IDCT and chroma upsampling).

A stored tile that cannot be decoded makes the lattice tiles over it white and flagged, as an unreadable
region does on the OpenSlide path.
"""

from __future__ import annotations

import concurrent.futures
import os
from collections import deque
from collections.abc import Iterator

import numpy as np

from ..slide.jpeg_tiles import (
    JpegTileLevel,
    UnsupportedTiles,
    decode_schedule,
    jpeg_tile_level,
    region_windows,
    stored_tiles_of_region,
)
from .loader import BLANK_VALUE, TileReadPlan

DECODE_MODES = ("auto", "jpeg", "openslide")
# Mean absolute difference (grey levels) above which the device's JPEG decoder is taken to read a slide's
# tiles differently from libjpeg-turbo (a colour-space mix-up, not decoder rounding, which is below 1).
DECODER_AGREEMENT = 2.0

__all__ = ["DECODE_MODES", "JpegTileBatches", "UnsupportedTiles", "area_matrix", "choose_decode",
           "decode_streams", "resample_matrices"]


# ----------------------------------------------------------------------------------------------- resampling

def area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float64 weights of ``cv2.INTER_AREA`` shrinking ``n_in`` pixels to ``n_out`` (≤ n_in):
    output pixel k averages source interval [k·s, (k+1)·s), s = n_in / n_out, by overlap."""
    s = n_in / n_out
    lo = np.arange(n_out)[:, None] * s
    j = np.arange(n_in)[None, :]
    overlap = np.clip(np.minimum(j + 1, lo + s) - np.maximum(j, lo), 0.0, None)
    return overlap / s


def shift_matrix(n: int, frac: float) -> np.ndarray:
    """(n, n + 1) float64: output pixel k = (1 - frac)·in[k] + frac·in[k + 1] (a bilinear sub-pixel shift)."""
    m = np.zeros((n, n + 1))
    k = np.arange(n)
    m[k, k] = 1.0 - frac
    m[k, k + 1] = frac
    return m


def resample_matrices(fracs: np.ndarray, read_px: int, tile_px: int, window: int) -> np.ndarray:
    """Per-tile, per-axis (tile_px, window) maps from a window of level pixels to the delivered tile.

    Args:
        fracs: (B, 2) sub-pixel remainders (x, y) of the tiles' corners.
        read_px: side of the tile's region in level pixels.
        tile_px: side of the delivered tile.
        window: side of the window read (``read_px``, or ``read_px + 1`` when some corner is shifted).

    Returns:
        (B, 2, tile_px, window) float32; [b, 0] maps columns, [b, 1] rows.
    """
    area = area_matrix(read_px, tile_px)
    out = np.zeros((len(fracs), 2, tile_px, window), np.float32)
    for b, f in enumerate(np.asarray(fracs, np.float64)):
        for axis in (0, 1):
            m = area @ shift_matrix(read_px, f[axis]) if window > read_px else area
            out[b, axis, :, :m.shape[1]] = m
    return out


def _resample(windows, mats):
    """(B, window, window, 3) uint8 → (B, tile_px, tile_px, 3) uint8 with (B, 2, tile_px, window) maps."""
    import torch

    x = windows.float()
    b, w = x.shape[0], x.shape[1]
    rows = torch.matmul(mats[:, 1], x.reshape(b, w, w * 3)).reshape(b, -1, w, 3)  # (B, T, W, 3)
    out = torch.matmul(rows.permute(0, 1, 3, 2), mats[:, 0].transpose(1, 2).unsqueeze(1))  # (B, T, 3, T)
    return out.permute(0, 1, 3, 2).round_().clamp_(0, 255).to(torch.uint8)


# ----------------------------------------------------------------------------------------------- decoding

def _as_tensor(stream: bytes | None):
    import torch

    return None if stream is None else torch.frombuffer(bytearray(stream), dtype=torch.uint8)


def _decode(data, device):
    from torchvision.io import ImageReadMode, decode_jpeg

    return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)


def _decode_or_none(data, device):
    try:
        return _decode(data, device)
    except RuntimeError:
        return None


def _decode_all(data: list, device) -> list:
    try:
        return _decode(data, device)
    except RuntimeError:  # one damaged tile fails the whole batch: find it tile by tile
        return [_decode_or_none(d, device) for d in data]


def _decode_guarded(data: list, device, stream) -> list:
    """:func:`_decode_all` on a GPU without the decoder writing into memory that queued work still reads.

    ``decode_jpeg(device="cuda")`` allocates its outputs on the current stream and lets nvJPEG write them
    from a stream of its own, without waiting for the current stream's queued work (nvJPEG's hardware
    engine does not wait even when asked to). The caching allocator hands out a block freed on the current
    stream at once, so the decoder can overwrite memory whose readers, e.g. the encoder's kernels of the
    previous batch, have not run yet: wrong features and NaNs on a few tiles. With ``stream`` (a stream of
    the decoder's own) the outputs come from that stream's blocks, which hold nothing but decoded tiles,
    and each output records its use by the current stream, so its block is not handed out again before
    that use is done; without it, the current stream is drained first.
    """
    import torch

    main = torch.cuda.current_stream(device)
    if stream is None:
        main.synchronize()
        return _decode_all(data, device)
    with torch.cuda.stream(stream):
        decoded = _decode_all(data, device)
    main.wait_stream(stream)
    for img in decoded:
        if img is not None:
            img.record_stream(main)
    return decoded


def decode_streams(streams: list, device, shape: tuple[int, int], stream=None) -> tuple[list, set[int]]:
    """Decode JPEG byte tensors together on ``device``.

    Args:
        streams: uint8 CPU tensors (None for a tile never written).
        device: where to decode (nvJPEG on CUDA, libjpeg-turbo on the CPU).
        shape: the (height, width) every stored tile decodes to.
        stream: on a GPU, a CUDA stream used only for decoding (see :func:`_decode_guarded`); None drains
            the current stream before each decode instead.

    Returns:
        ``(tiles, bad)``: (height, width, 3) uint8 tensors on ``device`` (None where absent or bad) and the
        positions whose bytes did not decode to a tile of ``shape``.
    """
    import torch

    present = [k for k, s in enumerate(streams) if s is not None]
    tiles: list = [None] * len(streams)
    bad: set[int] = set()
    if not present:
        return tiles, bad
    data = [streams[k] for k in present]
    if torch.device(device).type == "cuda":
        decoded = _decode_guarded(data, device, stream)
    else:
        decoded = _decode_all(data, device)
    for k, img in zip(present, decoded):
        if img is None or tuple(img.shape[1:]) != tuple(shape):
            bad.add(k)
        else:
            tiles[k] = img.permute(1, 2, 0)
    return tiles, bad


class JpegTileBatches:
    """The tiles of a read plan, decoded from the slide's stored JPEG tiles on ``device``.

    Iterating yields ``(images, indices, blank)`` like the OpenSlide loader: uint8 (B, tile_px, tile_px, 3)
    on ``device``, int64 (B,) row numbers in the tiles file, and bool (B,) True where a white tile
    replaced one whose stored tiles could not be decoded.

    Args:
        plan: the tiles to read (their level, corners and sizes).
        level: the stored tiles of ``plan.level``.
        batch_size: tiles per batch.
        device: the encoder's device.
        prefetch: batches of compressed bytes read ahead by the reader thread.
    """

    def __init__(self, plan: TileReadPlan, level: JpegTileLevel, batch_size: int, device, prefetch: int = 2) -> None:
        import torch

        self.plan, self.level, self.device = plan, level, torch.device(device)
        self.prefetch = max(1, int(prefetch))
        n = len(plan.coords)
        self.batches = [np.arange(s, min(s + batch_size, n)) for s in range(0, n, max(1, batch_size))]
        self.origins, self.fracs = region_windows(plan.coords, plan.downsample, plan.read_px)
        shifted = bool(self.fracs.any())
        self.window = plan.read_px + int(shifted)
        self.resampled = shifted or plan.read_px != plan.tile_px
        self.schedule = decode_schedule(level, self.origins, self.window, self.batches)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def __len__(self) -> int:
        return len(self.batches)

    def _read(self, fh, tiles: np.ndarray) -> list:
        return [_as_tensor(s) for s in self.level.jpeg_streams(tiles, fh)]

    def __iter__(self) -> Iterator:
        with open(self.level.path, "rb") as fh, concurrent.futures.ThreadPoolExecutor(1) as pool:
            pending = deque(pool.submit(self._read, fh, step.decode) for step in self.schedule[:self.prefetch])
            cache: dict[int, object] = {}
            bad: set[int] = set()
            for b, (idx, step) in enumerate(zip(self.batches, self.schedule)):
                streams = pending.popleft().result()
                if b + self.prefetch < len(self.schedule):
                    pending.append(pool.submit(self._read, fh, self.schedule[b + self.prefetch].decode))
                shape = (self.level.tile_height, self.level.tile_width)
                tiles, failed = decode_streams(streams, self.device, shape, self.stream)
                cache.update(zip(step.decode.tolist(), tiles))
                bad.update(int(step.decode[k]) for k in failed)
                images, blank = self._assemble(idx, cache, bad)
                for t in step.forget.tolist():
                    cache.pop(t, None)
                yield images, self._cpu_long(idx), blank

    @staticmethod
    def _cpu_long(idx: np.ndarray):
        import torch

        return torch.from_numpy(idx.astype(np.int64))

    def _paste(self, out, k: int, x: int, y: int, t: int, tile) -> None:
        """Copy the part of stored tile ``t`` inside the window at level pixel (x, y) into ``out[k]``."""
        lv, w = self.level, self.window
        tx, ty = lv.tile_origin(t)
        x0, y0 = max(x, tx, 0), max(y, ty, 0)
        x1 = min(x + w, tx + lv.tile_width, lv.width)
        y1 = min(y + w, ty + lv.tile_height, lv.height)
        if x1 > x0 and y1 > y0:
            out[k, y0 - y:y1 - y, x0 - x:x1 - x] = tile[y0 - ty:y1 - ty, x0 - tx:x1 - tx]

    def _aligned(self, idx: np.ndarray, cache: dict, bad: set[int]) -> list[int] | None:
        """The decoded stored tile that is exactly each window of the batch, or None unless all of them are."""
        lv, w = self.level, self.window
        if (lv.tile_width, lv.tile_height) != (w, w) or self.resampled:
            return None
        o = self.origins[idx]
        if (o % w).any() or (o < 0).any() or (o[:, 0] + w > lv.width).any() or (o[:, 1] + w > lv.height).any():
            return None
        same = (o[:, 1] // w * lv.tiles_across + o[:, 0] // w).tolist()
        ok = not bad.intersection(same) and all(cache.get(t) is not None for t in same)
        return same if ok else None

    def _assemble(self, idx: np.ndarray, cache: dict, bad: set[int]):
        """Cut the batch's windows from the decoded tiles (white outside the level), resample them."""
        import torch

        same = self._aligned(idx, cache, bad)
        if same is not None:
            # A lattice on the stored tiles' grid: the batch is the decoded tiles themselves.
            return torch.stack([cache[t] for t in same]), torch.zeros(len(idx), dtype=torch.bool)
        out = torch.full((len(idx), self.window, self.window, 3), BLANK_VALUE, dtype=torch.uint8, device=self.device)
        blank = torch.zeros(len(idx), dtype=torch.bool)
        for k, i in enumerate(idx.tolist()):
            x, y = (int(v) for v in self.origins[i])
            for t in stored_tiles_of_region(self.level, x, y, self.window, self.window).tolist():
                if t in bad:
                    blank[k] = True
                elif cache.get(t) is not None:
                    self._paste(out, k, x, y, t, cache[t])
        if self.resampled:
            mats = resample_matrices(self.fracs[idx], self.plan.read_px, self.plan.tile_px, self.window)
            out = _resample(out, torch.from_numpy(mats).to(self.device))
        if blank.any():
            out[blank.to(self.device)] = BLANK_VALUE
        return out, blank


# ----------------------------------------------------------------------------------------------- choice

def _decoder_disagrees(level: JpegTileLevel, device) -> str:
    """"" when ``device`` decodes the level's first stored tile like libjpeg-turbo, else the reason."""
    import torch

    if torch.device(device).type == "cpu":
        return ""
    with open(level.path, "rb") as fh:
        first = next((t for t in range(level.n_tiles) if level.bytecounts[t] > 4), None)
        if first is None:
            return ""
        stream = [_as_tensor(level.jpeg_streams([first], fh)[0])]
    shape = (level.tile_height, level.tile_width)
    on_dev, bad_dev = decode_streams(stream, device, shape)
    on_cpu, bad_cpu = decode_streams(stream, "cpu", shape)
    if bad_dev or bad_cpu:
        return "its first stored tile does not decode"
    diff = (on_dev[0].cpu().float() - on_cpu[0].float()).abs().mean().item()
    if diff > DECODER_AGREEMENT:
        return f"the device's JPEG decoder reads its tiles differently from libjpeg-turbo (mean |Δ| {diff:.1f})"
    return ""


def _stored_tiles(slide, read_level: int) -> JpegTileLevel:
    """The stored JPEG tiles of a level of an opened slide (TIFF tiles, or DICOM frames)."""
    size = slide.level_dimensions[read_level]
    if slide.vendor == "dicom":
        from ..slide.dicom_frames import dicom_tile_level

        return dicom_tile_level(os.fspath(slide.path), size)
    return jpeg_tile_level(os.fspath(slide.path), slide.vendor, size)


def choose_decode(mode: str, slide, read_level: int, device) -> tuple[JpegTileLevel | None, str]:
    """Which path reads a slide's tiles.

    Args:
        mode: ``openslide``; ``jpeg`` (stored JPEG tiles decoded on ``device``, or an error); ``auto``
            (stored JPEG tiles when ``device`` is a GPU and the slide allows it, else OpenSlide).
        slide: the opened slide.
        read_level: the pyramid level the tiles are read from.
        device: the encoder's device.

    Returns:
        ``(level, reason)``: the stored tiles to decode, or None with the reason OpenSlide reads them.

    Raises:
        UnsupportedTiles: ``mode`` is ``jpeg`` and the slide cannot be read that way.
    """
    import torch

    if mode == "openslide":
        return None, "asked for"
    if mode == "auto" and torch.device(device).type != "cuda":
        return None, "decoding on the CPU is faster in the reader processes"
    try:
        if slide.backend != "openslide":
            raise UnsupportedTiles("it is a plain image, held whole in memory")
        level = _stored_tiles(slide, read_level)
        reason = _decoder_disagrees(level, device)
        if reason:
            raise UnsupportedTiles(reason)
    except UnsupportedTiles as exc:
        if mode == "jpeg":
            raise
        return None, str(exc)
    return level, ""
