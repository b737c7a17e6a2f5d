"""Atomic file writes shared by label images and checkpoints."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_atomically(path: Path, write: Callable[[str], None], suffix: str = ".tmp") -> None:
    """Call ``write(temporary_path)`` beside ``path``, then rename the result onto ``path``.

    A crash or an error leaves ``path`` as it was and removes the temporary
    file. The result gets the permissions a plain ``open()`` would give
    (``0o666`` minus the umask), because ``mkstemp`` creates files with mode
    0600, which would hide them from other users of a shared server.
    """
    handle, tmp_name = tempfile.mkstemp(prefix=path.name + ".", suffix=suffix, dir=path.parent)
    os.close(handle)
    try:
        write(tmp_name)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_name, 0o666 & ~umask)
        os.replace(tmp_name, path)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
