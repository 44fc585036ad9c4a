"""
What every other part of the trainer leans on, as llm.c's llmc/utils.h: the error users see for bad
input, checks that a file is there, writes that never leave half a file, copies from the device.
"""

import contextlib
import os

import numpy as np


class InputError(Exception):
    """Bad input (a missing or malformed file, a bad option): reported as one line
    'error: ...' with exit status 2, never a traceback."""


def check_file(path, what, hint):
    # the first thing every loader does: say clearly when there is no file to read
    if os.path.isdir(path):
        raise InputError(f"{what} {path} is a directory, not a file")
    if not os.path.isfile(path):
        raise InputError(f"{what} {path} not found: {hint}")


def check_file_size(path, expected_size, what):
    # a file must hold exactly what its header announces (so an absurd header can't ask for more
    # memory than the file holds)
    actual_size = os.path.getsize(path)
    if actual_size != expected_size:
        raise InputError(f"{path}: file is {actual_size:,} bytes, but {what} implies {expected_size:,}: "
                         f"truncated, or not what the header says")


@contextlib.contextmanager
def atomic_write(path):
    # with atomic_write(path) as f: write a temporary file in the same folder, renamed to path once
    # complete, so a crash never leaves a half-written file under the final name
    tmp_path = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp_path, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)


def all_finite(array):
    # no inf or nan in array: its max and min show both (nan propagates), with no temporary array
    return bool(np.isfinite(float(array.max())) and np.isfinite(float(array.min())))


def to_host(array):
    # a NumPy array of a device array (a copy from the GPU), for files and the sampler
    return array if isinstance(array, np.ndarray) else array.get()
