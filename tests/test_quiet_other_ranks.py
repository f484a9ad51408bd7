"""``quiet_other_ranks``: ranks other than 0 keep warnings but not the progress lines of dira3d, ignite and MONAI."""

import logging

import pytest

from dira3d.engines import distributed


@pytest.fixture
def restore_levels():
    names = ("DiRATrainer", "DiRAEvaluator", "ignite", "monai", "dira3d")
    levels = {name: logging.getLogger(name).level for name in names}
    yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


@pytest.mark.parametrize("rank, quiet", [(0, False), (1, True)])
def test_the_default_quiets_dira3ds_own_loggers_on_other_ranks_only(monkeypatch, restore_levels, rank, quiet):
    monkeypatch.setattr(distributed, "is_main_process", lambda: rank == 0)
    for name in ("dira3d", "monai", "ignite"):
        logging.getLogger(name).setLevel(logging.NOTSET)
    distributed.quiet_other_ranks()
    cache_logger = logging.getLogger("dira3d.engines.cache")  # the cache lines dira_pretrain's ranks repeated
    if quiet:
        assert not cache_logger.isEnabledFor(logging.INFO)
    assert logging.getLogger("dira3d").level == (logging.WARNING if quiet else logging.NOTSET)
    assert logging.getLogger("monai").level == (logging.WARNING if quiet else logging.NOTSET)
    assert cache_logger.isEnabledFor(logging.WARNING)
