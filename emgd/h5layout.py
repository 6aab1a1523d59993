"""The recording file itself: its layout, its creation with mode 0600, its disk reserve.

Used by :class:`emgd.recorder.Recorder` (which re-exports the public names); every dataset
and attribute is described in ``docs/recording.md``.

- :func:`create_file`: ``os.open(O_CREAT|O_EXCL|O_NOFOLLOW, 0o600)`` makes the inode (sEMG
  is biometric data), HDF5 then truncates that same file, and the inode is checked through
  HDF5's own descriptor.
- :func:`create_layout`: the resizable compound dataset ``data`` (``time`` f8, ``emg`` f4 ×
  16, ``sample_index`` i8) in the public dataset's layout, ``markers`` and ``events``, and
  the root attributes; :func:`event_sample_and_t` fills the ``events`` table's index columns.
- :class:`DiskReserve`: keeps ``RESERVE_BYTES`` allocated past HDF5's end of file with
  ``posix_fallocate`` so HDF5 itself never meets a full disk (with HDF5 2.0 / h5py 3.16,
  closing a file after a write failed with ENOSPC segfaults); :class:`DiskFull` when it
  cannot be renewed.
"""

from __future__ import annotations

import errno
import logging
import math
import os
from typing import TYPE_CHECKING

import h5py
import msgpack
import numpy as np

from emgd import N_CHANNELS, SAMPLE_RATE, __version__
from emgd.errors import EmgdError

if TYPE_CHECKING:
    from emgd.drivers.base import DeviceInfo

log = logging.getLogger(__name__)

FORMAT = "emgd-recording"
FORMAT_VERSION = 1
#: ``data.attrs["task"]`` of a recording that followed no protocol of the public dataset.
FREE_TASK = "free"
DATA_DTYPE = np.dtype([("time", "<f8"), ("emg", "<f4", (N_CHANNELS,)), ("sample_index", "<i8")])
MARKER_DTYPE = np.dtype([("sample", "<i8"), ("time", "<f8"), ("text", h5py.string_dtype())])
EVENT_DTYPE = np.dtype([("sample", "<i8"), ("t", "<f8"), ("topic", h5py.string_dtype()),
                        ("payload", h5py.vlen_dtype(np.uint8))])
CHUNK_ROWS = 2000  # one HDF5 chunk of `data` = 1 s (160 kB)
RESERVE_BYTES = 4 << 20  # disk space kept allocated ahead of HDF5's end of file (~25 s)


class RecordingError(EmgdError, OSError):
    """A recording could not be created (file exists, no permission, bad path)."""


class DiskFull(RecordingError):
    """No room for the next stretch of the recording (the reserve could not be renewed)."""


def create_file(path: str, overwrite: bool) -> tuple[h5py.File, int]:
    """An HDF5 file at ``path`` with mode 0600 from its creation (module docstring), and
    the recorder's own descriptor of it (for the disk reserve)."""
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    flags |= os.O_TRUNC if overwrite else os.O_EXCL
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError as exc:
        raise RecordingError(f"{path}: file exists; choose another name or remove it "
                             "(recordings are never overwritten silently)") from exc
    except OSError as exc:
        raise RecordingError(f"cannot create recording {path}: {exc.strerror}") from exc
    try:
        os.fchmod(fd, 0o600)  # an overwritten file keeps its old mode otherwise
        mine = os.fstat(fd)
        try:
            f = h5py.File(path, "w")
        except OSError as exc:
            raise RecordingError(f"cannot create recording {path}: {exc}") from exc
        theirs = os.fstat(f.id.get_vfd_handle())
        if (mine.st_dev, mine.st_ino) != (theirs.st_dev, theirs.st_ino):
            f.close()
            raise RecordingError(f"{path} was replaced while it was being created; not "
                                 "recording into a file of unknown permissions")
        return f, fd
    except BaseException:
        os.close(fd)
        raise


def create_layout(f: h5py.File, task: str) -> None:
    """The (empty) datasets and the fixed root attributes of a new recording."""
    data = f.create_dataset("data", shape=(0,), maxshape=(None,), dtype=DATA_DTYPE,
                            chunks=(CHUNK_ROWS,))
    data.attrs["task"] = task
    data.attrs["emg_units"] = "uV"
    data.attrs["time_units"] = "s since the Unix epoch"
    data.attrs["sample_rate"] = float(SAMPLE_RATE)
    f.create_dataset("markers", shape=(0,), maxshape=(None,), dtype=MARKER_DTYPE,
                     chunks=(64,))
    f.create_dataset("events", shape=(0,), maxshape=(None,), dtype=EVENT_DTYPE,
                     chunks=(256,))
    a = f.attrs
    a["format"] = FORMAT
    a["format_version"] = FORMAT_VERSION
    a["emgd_version"] = __version__
    a["sample_rate"] = float(SAMPLE_RATE)
    a["channels"] = N_CHANNELS
    a["emg_units"] = "uV"
    a["start_time"] = math.nan  # Unix s of the first sample, once there is one
    a["closed_cleanly"] = False


def write_device_info(f: h5py.File, info: DeviceInfo) -> None:
    """The device's fields as root attributes."""
    a = f.attrs
    a["device_id"] = info.device_id
    a["device_name"] = info.name
    a["transport"] = info.transport
    a["url"] = info.url
    a["simulated"] = bool(info.simulated)
    a["firmware"] = info.firmware
    a["scale_uv"] = math.nan if info.scale_uv is None else float(info.scale_uv)


def extend(ds: h5py.Dataset, rows: np.ndarray) -> None:
    """Append ``rows`` to the resizable dataset ``ds``."""
    n0 = ds.shape[0]
    ds.resize((n0 + rows.shape[0],))
    ds[n0:] = rows


def event_sample_and_t(payload: bytes) -> tuple[int, float]:
    """The event's ``sample`` and ``t`` for the table's index columns; (-1, nan) if the
    payload is not an emgd event (it is stored anyway)."""
    try:
        event = msgpack.unpackb(payload, raw=False)
        return int(event["sample"]), float(event["t"])
    except Exception:  # noqa: BLE001 - any undecodable payload is kept as bytes
        return -1, math.nan


class DiskReserve:
    """Disk space kept allocated past HDF5's end of file through the descriptor ``fd``."""

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self.fd = fd
        self.reserved_to = 0
        self.enabled = True  # false once the file system turned out not to support it

    def ensure_room(self, f: h5py.File) -> None:
        """Keep RESERVE_BYTES allocated past HDF5's end of file, so that HDF5's own writes
        (including the metadata written by ``close``) never meet a full disk."""
        if not self.enabled:
            return
        eoa = f.id.get_filesize()
        if self.reserved_to - eoa >= RESERVE_BYTES // 2:
            return
        try:
            os.posix_fallocate(self.fd, eoa, RESERVE_BYTES)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                log.warning("%s: the file system cannot reserve space; a full disk may "
                            "corrupt the end of this recording", self.path)
                self.enabled = False
                return
            raise DiskFull(f"{self.path}: {exc.strerror} (recording stopped with "
                           f"{self.reserved_to - eoa} bytes of reserve left)") from exc
        self.reserved_to = eoa + RESERVE_BYTES

    def trim(self) -> None:
        """Give back the unused reserve after a clean close."""
        with h5py.File(self.path, "r") as g:
            eoa = g.id.get_filesize()
        if os.fstat(self.fd).st_size > eoa:
            os.ftruncate(self.fd, eoa)
