"""Hostile checkpoints made on the fly for the checkpoint and CLI tests: zip bombs, headers that lie,
meta records that declare absurd sizes. Each is a small file; none is ever loaded by the tests
except to see it refused."""

import io
import json
import os
import time
import tracemalloc
import zipfile

import numpy as np

MiB = 2**20


def npy_header(dtype, shape) -> bytes:
    """The .npy header (format 1.0) numpy writes before an array of this dtype and shape."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                               "fortran_order": False, "shape": tuple(shape)})
    return buf.getvalue()


def add_member(path, name, dtype, shape, data_bytes=0, declare=None):
    """Append member `name`.npy to the zip at `path`: a header for (dtype, shape), then `data_bytes`
    zero bytes deflated (200 MB of zeros deflate to about 200 KB), the zip's directory declaring
    `declare` bytes uncompressed if given (a lie) instead of the truth."""
    with zipfile.ZipFile(path, "a", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        with zf.open(name + ".npy", "w", force_zip64=True) as f:
            f.write(npy_header(dtype, shape))
            chunk = bytes(min(data_bytes, 4 * MiB))
            left = data_bytes
            while left > 0:
                f.write(chunk[:left])
                left -= len(chunk)
        if declare is not None:
            zf.getinfo(name + ".npy").file_size = declare  # the central directory is written on close


def drop_member(src, dst, name):
    """A copy of the zip at `src` without member `name`.npy (members are copied as stored)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            if info.filename != name + ".npy":
                zout.writestr(info, zin.read(info))


def with_meta(src, dst, change=None, raw=None):
    """A copy of the checkpoint at `src` whose meta record is updated with `change`, or replaced by
    the array `raw`."""
    with np.load(src, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    if raw is None:
        meta = json.loads(str(arrays["meta"][()]))
        meta.update(change or {})
        raw = np.array(json.dumps(meta))
    arrays["meta"] = raw
    with open(dst, "wb") as f:
        np.savez(f, **arrays)
    return str(dst)


def refusal(load, path, **kw):
    """Load `path` expecting a refusal; return (message, seconds, peak bytes allocated meanwhile)."""
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        load(path, **kw)
    except Exception as e:  # noqa: BLE001 - the caller checks the type
        err = e
    else:
        err = None
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return err, seconds, peak


def size(path) -> int:
    return os.path.getsize(path)


def crowded_directory(path, n):
    """A zip whose central directory lists `n` empty members (`n` x ~55 bytes) that all point at one
    local header: zipfile parses such a directory whole before anything can be checked."""
    import struct

    local = b"PK\x03\x04" + bytes(26)
    cd = bytearray()
    for i in range(n):
        name = b"optim.b%d.decoder.bias.npy" % i
        cd += struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, 0, 0, 0, 0, 0, 0, len(name), 0, 0, 0, 0, 0, 0) + name
    count = min(n, 0xFFFF)
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, count, count, len(cd), len(local), 0)
    with open(path, "wb") as f:
        f.write(local + bytes(cd) + end)
