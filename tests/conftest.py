"""Fixtures shared by more than one test folder."""

import doctest

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


# Session-scoped fixtures that train or build something (seconds each), by test module. A module-scoped one
# would be made again whenever its worker ran another module's test in between.
TRAINING_FIXTURES = {
    "test_exporting.py": "seed_run", "test_ensemble.py": "seeded", "test_finetune.py": "pretrained",
    "test_html_report.py": "tiny_run", "test_visualize.py": "net", "test_finetune_search.py": "backbone",
}


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups into the test ids
def pytest_collection_modifyitems(config, items):
    """Tests that share something slow to make go to one xdist worker (``--dist loadgroup``), so it is made
    once in the whole suite: the tests of one backbone (a ``name`` parameter) that use ``untrained_backbone``,
    and those of a module that use its ``TRAINING_FIXTURES`` entry. A docstring whose examples are all
    marked ``+SKIP`` (they need data or a trained run) is deselected: there is nothing in it to run."""
    illustrations = [item for item in items if hasattr(item, "dtest")
                     and all(example.options.get(doctest.SKIP) for example in item.dtest.examples)]
    if illustrations:
        config.hook.pytest_deselected(items=illustrations)
        deselected = set(illustrations)
        items[:] = [item for item in items if item not in deselected]
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        fixture = TRAINING_FIXTURES.get(item.path.name)
        if "untrained_backbone" in item.fixturenames and "name" in params:
            item.add_marker(pytest.mark.xdist_group(f"backbone-{params['name']}"))
        elif fixture in item.fixturenames:
            item.add_marker(pytest.mark.xdist_group(f"{item.path.stem}-{fixture}"))
