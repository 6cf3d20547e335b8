"""Files imsa writes whole: a new file beside the target, synced, then renamed over it."""

import os
import tempfile


def replace_atomically(path, data, mode=0o600):
    """Replace *path* with *data* (str as UTF-8, or bytes): a reader sees the old file or the new one, never a part.

    The new file is made by mkstemp (0600, a fresh random name: no symlink of someone else's is followed), written,
    synced, given *mode* and renamed over *path*; a symlink at *path* is replaced, never followed. On any failure the
    new file goes and *path* is left as it was.
    """
    if isinstance(data, str):
        data = data.encode("utf-8")
    directory = os.path.dirname(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=".imsa-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if mode != 0o600:
            os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise
