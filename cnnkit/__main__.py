"""``python -m cnnkit``: the same as the ``cnnkit`` command (see :mod:`cnnkit.cli`)."""

from cnnkit.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
