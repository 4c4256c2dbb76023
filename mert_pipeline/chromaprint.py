"""Chromaprint, the acoustic fingerprint of MusicBrainz/AcoustID, through its C library (ctypes).

Chromaprint turns audio into one 32-bit sub-fingerprint per 0.124 s: 16 filters over a 12-band chroma
image (11025 Hz, 4096-sample frames, hop 1365), each quantised to 2 bits. Copies of one recording (another
codec, rate, channel count or gain) give sub-fingerprints that differ in a few bits; different recordings
differ in about half of them. That is what `mert_pipeline.dedup` matches on.

The library is the system's (`libchromaprint.so.1`: Debian/Ubuntu `libchromaprint1`, macOS
`brew install chromaprint`, conda-forge `chromaprint`), or the file named by MERT_PIPELINE_CHROMAPRINT.
Only the raw-fingerprint calls of its stable C API (1.4 and later) are used; audio is fed as int16 in
blocks, so a file of any length costs a bounded amount of memory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from functools import lru_cache

import numpy as np

ALGORITHM = 1  # CHROMAPRINT_ALGORITHM_TEST2, the default of fpcalc and AcoustID
INSTALL_HINT = (
    "install the Chromaprint library (Debian/Ubuntu: apt-get install libchromaprint1; macOS: brew install "
    "chromaprint; conda: conda install -c conda-forge chromaprint), or set MERT_PIPELINE_CHROMAPRINT to "
    "its file"
)


class ChromaprintMissing(RuntimeError):
    """The C library cannot be loaded; the message says how to install it."""


@lru_cache(maxsize=1)
def library() -> ctypes.CDLL:
    """The loaded library, with the signatures of the calls used here (loaded once per process)."""
    names = [os.environ.get("MERT_PIPELINE_CHROMAPRINT"), ctypes.util.find_library("chromaprint")]
    names += ["libchromaprint.so.1", "libchromaprint.1.dylib", "chromaprint.dll"]
    errors = []
    for name in filter(None, names):
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError as exc:
            errors.append(str(exc))
    else:
        raise ChromaprintMissing(
            f"Chromaprint not found ({'; '.join(errors[:1]) or 'no library'}): {INSTALL_HINT}"
        )
    ctx = ctypes.c_void_p
    lib.chromaprint_new.argtypes, lib.chromaprint_new.restype = [ctypes.c_int], ctx
    lib.chromaprint_free.argtypes, lib.chromaprint_free.restype = [ctx], None
    lib.chromaprint_start.argtypes, lib.chromaprint_start.restype = (
        [ctx, ctypes.c_int, ctypes.c_int],
        ctypes.c_int,
    )
    lib.chromaprint_feed.argtypes = [ctx, ctypes.POINTER(ctypes.c_int16), ctypes.c_int]
    lib.chromaprint_feed.restype = ctypes.c_int
    lib.chromaprint_finish.argtypes, lib.chromaprint_finish.restype = [ctx], ctypes.c_int
    lib.chromaprint_get_raw_fingerprint.argtypes = [
        ctx,
        ctypes.POINTER(ctypes.POINTER(ctypes.c_uint32)),
        ctypes.POINTER(ctypes.c_int),
    ]
    lib.chromaprint_get_raw_fingerprint.restype = ctypes.c_int
    lib.chromaprint_dealloc.argtypes, lib.chromaprint_dealloc.restype = [ctypes.c_void_p], None
    lib.chromaprint_get_version.argtypes, lib.chromaprint_get_version.restype = [], ctypes.c_char_p
    return lib


def version() -> str:
    """The library's version, recorded with the fingerprints (another version may fingerprint otherwise)."""
    return library().chromaprint_get_version().decode()


def item_seconds() -> float:
    """Seconds of audio between two sub-fingerprints: the hop, 1365.33 samples at 11025 Hz (4096 / 3)."""
    return 4096 / 3 / 11025


class Fingerprinter:
    """One file's fingerprint, fed block by block: `feed` int16 or float audio, then `finish`."""

    def __init__(self, sample_rate: int, channels: int = 1) -> None:
        self._lib = library()
        self._ctx = self._lib.chromaprint_new(ALGORITHM)
        self.channels = channels
        if not self._ctx or not self._lib.chromaprint_start(self._ctx, int(sample_rate), int(channels)):
            self.close()
            raise ValueError(f"Chromaprint cannot start at {sample_rate} Hz x {channels} channels")

    def feed(self, block: np.ndarray) -> None:
        """Audio of shape (frames,) or (frames, channels); float in [-1, 1] is scaled to int16."""
        if block.dtype != np.int16:
            block = (np.clip(block, -1.0, 1.0) * 32767.0).round().astype(np.int16)
        data = np.ascontiguousarray(block).reshape(-1)
        if data.size and not self._lib.chromaprint_feed(
            self._ctx, data.ctypes.data_as(ctypes.POINTER(ctypes.c_int16)), int(data.size)
        ):
            raise RuntimeError("Chromaprint refused a block of audio")

    def finish(self) -> np.ndarray:
        """The raw fingerprint: uint32 sub-fingerprints, one per `item_seconds()` (empty for < ~3 s)."""
        try:
            if not self._lib.chromaprint_finish(self._ctx):
                raise RuntimeError("Chromaprint could not finish the fingerprint")
            pointer = ctypes.POINTER(ctypes.c_uint32)()
            size = ctypes.c_int()
            if not self._lib.chromaprint_get_raw_fingerprint(
                self._ctx, ctypes.byref(pointer), ctypes.byref(size)
            ):
                raise RuntimeError("Chromaprint returned no fingerprint")
            try:
                return (
                    np.ctypeslib.as_array(pointer, shape=(size.value,)).copy()
                    if size.value
                    else np.zeros(0, np.uint32)
                )
            finally:
                self._lib.chromaprint_dealloc(pointer)
        finally:
            self.close()

    def close(self) -> None:
        if self._ctx:
            self._lib.chromaprint_free(self._ctx)
            self._ctx = None

    def __del__(self) -> None:
        self.close()


def fingerprint(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """The raw fingerprint of a whole signal in memory (tests, benchmarks); files use `Fingerprinter`."""
    channels = 1 if audio.ndim == 1 else audio.shape[1]
    printer = Fingerprinter(sample_rate, channels)
    printer.feed(audio)
    return printer.finish()
