"""Keras's downloads (``keras.datasets``, ``weights="imagenet"``) with a one-line error offline.

Keras's ``get_file`` raises a bare ``Exception("URL fetch failure on URL: ...")`` when it cannot
reach the server, and lets other failures through as they come: a timeout or a reset connection
(``OSError``), a cut-off response (``http.client.IncompleteRead``), a truncated file
(``ValueError("Incomplete or corrupted file detected. ...")``); a user without network then sees a
long traceback. ``keras_download`` turns each into an ``OSError`` naming what was being fetched and
the local-file alternative, which the CLI prints as one line (exit 2).

Example:
    >>> with keras_download("MNIST", "set CNNKIT_DATA_DIR to a folder holding mnist.npz"):  # doctest: +SKIP
    ...     keras.datasets.mnist.load_data()
"""

from __future__ import annotations

import contextlib
import http.client

_KERAS_MESSAGES = ("URL fetch failure", "Incomplete or corrupted file detected")  # get_file's own errors


@contextlib.contextmanager
def keras_download(what: str, offline: str):
    """Run a Keras download; a failed fetch becomes ``OSError("could not download WHAT ...; without network: OFFLINE")``.

    A failed fetch is Keras's "URL fetch failure" or "Incomplete or corrupted file detected" error, any
    ``OSError`` (a timeout, a reset connection, a cache folder that cannot be written) or an
    ``http.client.HTTPException`` (a cut-off response).

    Args:
        what: what is being downloaded, for the message.
        offline: how to do without the network (a local file, another option).

    Raises:
        OSError: the download failed; other errors pass through unchanged.
    """
    try:
        yield
    except Exception as error:
        message = next(iter(str(error).splitlines()), "")
        if message.startswith(_KERAS_MESSAGES):
            reason = message
        elif isinstance(error, (OSError, http.client.HTTPException)):
            reason = f"{type(error).__name__}: {message}" if message else type(error).__name__
        else:
            raise
        raise OSError(f"could not download {what} ({reason}); without network: {offline}") from None
