"""Fixtures for merge tests: zoo checkpoints re-saved as several small shards."""
from __future__ import annotations

import shutil

import pytest

from weightsmith.checkpoint import Checkpoint, copy_side_files, save_state_dict, write_config


def reshard(src, dst, shard_size: str = "300KB"):
    ck = Checkpoint(src)
    dst.mkdir(parents=True)
    save_state_dict(ck.state_dict(), dst, shard_size)
    write_config(dst, ck.config)
    copy_side_files(src, dst)
    for extra in ("trainer_state.json",):
        if (src / extra).exists():
            shutil.copy2(src / extra, dst / extra)
    return dst


@pytest.fixture(scope="session")
def sharded_zoo(zoo, tmp_path_factory):
    """base, ft-prose, ft-asyncio, ft-email as sharded folders (several 300 KB shards each)."""
    root = tmp_path_factory.mktemp("sharded")
    return {n: reshard(zoo.model(n), root / n) for n in ("base", "ft-prose", "ft-asyncio", "ft-email")}
