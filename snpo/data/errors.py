"""The data package's error hierarchy: every failure to read training data is a :class:`DataError`.

- :class:`snpo.data.decode.BadImageError` (and its :class:`~snpo.data.decode.ImageTooLargeError`):
  one image cannot be used — the bad-image rule of :func:`snpo.data.decode.decode_image`;
- :class:`snpo.data.paths.PathOutsideError`: an image path that leaves its data file's folder.
"""

from __future__ import annotations


class DataError(RuntimeError):
    """Unreadable training data (bad files, or a bad image with ``on_bad_image: fail``)."""
