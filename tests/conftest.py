"""Fixtures shared by more than one test folder."""

import pytest

from cnnkit.models.backbones import build_backbone, get_backbone


@pytest.fixture(scope="session")
def untrained_backbone():
    """``untrained_backbone(name)``: the registered backbone, untrained, at its smallest input, built once per
    test process (building is the slow part: seconds for the larger ones). Tests only read it (one that sets
    weights puts them back).

    Example:
        >>> def test_x(untrained_backbone):  # doctest: +SKIP
        ...     assert untrained_backbone("vgg16").output.shape[-1] == 512
    """
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = build_backbone(name, input_shape=(*get_backbone(name).min_input_size, 3), weights=None)
        return cache[name]

    yield get
    cache.clear()


def pytest_collection_modifyitems(items):
    """The tests of one backbone (a ``name`` parameter) that use ``untrained_backbone`` go to one xdist
    worker (``--dist loadgroup``), so each backbone is built once in the whole suite."""
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if "untrained_backbone" in item.fixturenames and "name" in params:
            item.add_marker(pytest.mark.xdist_group(f"backbone-{params['name']}"))
