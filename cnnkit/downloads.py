"""Keras's downloads (``keras.datasets``, ``weights="imagenet"``) with a one-line error offline.

Keras's ``get_file`` raises a bare ``Exception("URL fetch failure on URL: ...")`` when it cannot
download; a user without network then sees a long traceback. ``keras_download`` turns it into an
``OSError`` naming what was being fetched and the local-file alternative, which the CLI prints as
one line (exit 2).

Example:
    >>> with keras_download("MNIST", "set CNNKIT_DATA_DIR to a folder holding mnist.npz"):  # doctest: +SKIP
    ...     keras.datasets.mnist.load_data()
"""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def keras_download(what: str, offline: str):
    """Run a Keras download; a failed fetch becomes ``OSError("could not download WHAT ...; offline: OFFLINE")``.

    Args:
        what: what is being downloaded, for the message.
        offline: how to do without the network (a local file, another option).

    Raises:
        OSError: the download failed; other errors pass through unchanged.
    """
    try:
        yield
    except Exception as error:  # Keras raises a bare Exception for a failed fetch
        if not str(error).startswith("URL fetch failure"):
            raise
        reason = str(error).splitlines()[0]
        raise OSError(f"could not download {what} ({reason}); without network: {offline}") from None
