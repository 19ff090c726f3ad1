"""Data-parallel fold across processes: `accelerate launch --cpu --num_processes 2` gives two gloo ranks
that each heal on their own half of every batch, hold equal gradients after the reduce; rank 0 alone
writes, and the output equals the one-process fold."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from weightsmith.checkpoint import Checkpoint
from weightsmith.errors import WeightsmithError
from weightsmith.fold import fold
from weightsmith.fold.ranks import cpu_ranks_command


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_cpu_ranks_heal_data_parallel_and_match_one_process(zoo, tmp_path):
    base, data = zoo.model("base"), zoo.data("general", "calib")
    args = ["fold", str(base), "--data", str(data), "--remove", "0.25", "--share", "2", "--heal-steps", "4",
            "--batch-size", "4", "--max-tokens", "1024", "--seq", "64", "--device", "cpu", "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
                          "--main_process_port", str(free_port()), "-m", "weightsmith", *args, "-o",
                          str(tmp_path / "two")], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    two = json.loads(run.stdout)  # one JSON document: only rank 0 reports
    one = fold(base, tmp_path / "one", data=data, remove=0.25, share="2", heal_steps=4, batch_size=4, max_tokens=1024,
               seq_len=64, device="cpu")
    assert two["processes"] == 2 and one["processes"] == 1
    ranks = two["heal_ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert ranks[0]["first_windows"] + ranks[1]["first_windows"] == one["heal_ranks"][0]["first_windows"]
    assert ranks[0]["first_windows"] != ranks[1]["first_windows"]
    assert ranks[0]["loss_first"] != ranks[1]["loss_first"]  # different batches ...
    assert ranks[0]["grad_norm_last"] == ranks[1]["grad_norm_last"]  # ... one reduced gradient
    assert ranks[0]["grad_norm_last"] == pytest.approx(one["heal_ranks"][0]["grad_norm_last"], rel=1e-4)
    assert two["removed"] == one["removed"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # no temp folder left behind
    a, b = Checkpoint(tmp_path / "one"), Checkpoint(tmp_path / "two")
    assert a.names() == b.names()
    for name in a.names():
        assert torch.allclose(a.get(name), b.get(name), atol=1e-5), name


def test_two_cpu_ranks_heal_sharded_and_match_one_process(zoo, tmp_path):
    """FSDP: the same loss curve and output as one process, each rank holding about half the parameters,
    gradients and optimizer states (tensor bytes) of the one process."""
    base, data = zoo.model("base"), zoo.data("general", "calib")
    args = ["fold", str(base), "--data", str(data), "--remove", "0.25", "--share", "2", "--importance", "bi",
            "--heal-steps", "3", "--batch-size", "4", "--max-tokens", "1024", "--seq", "64", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(free_port()), "-m", "weightsmith", *args, "--fsdp", "--json", "-o", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    two = json.loads(run.stdout)
    one = fold(base, tmp_path / "one", data=data, remove=0.25, share="2", importance="bi", heal_steps=3, batch_size=4,
               max_tokens=1024, seq_len=64, device="cpu")
    assert two["processes"] == 2 and two["groups"] == one["groups"] == [[0, 1], [2]]
    assert two["heal_losses"] == pytest.approx(one["heal_losses"], rel=1e-5)
    held_one = one["heal_ranks"][0]["held"]
    for r in two["heal_ranks"]:
        assert r["grad_norm_last"] == pytest.approx(one["heal_ranks"][0]["grad_norm_last"], rel=1e-4)
        for kind in ("params", "grads", "optimizer"):
            assert r["held"][kind] <= 0.6 * held_one[kind], kind
    a, b = Checkpoint(tmp_path / "one"), Checkpoint(tmp_path / "two")
    assert a.names() == b.names()
    for name in a.names():
        assert torch.allclose(a.get(name), b.get(name), atol=1e-4), name


def test_fsdp_is_asked_for_by_the_option_or_by_accelerate_launch(monkeypatch):
    from weightsmith.fold.shard import fsdp_requested

    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert fsdp_requested(True) and not fsdp_requested(False)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what accelerate launch --use_fsdp sets
    assert fsdp_requested(False)


def test_accelerate_cpu_launch_that_started_one_process_is_refused(zoo, tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with pytest.raises(WeightsmithError, match="--multi_gpu"):
        fold(zoo.model("base"), tmp_path / "o", data=zoo.data("general", "calib"), device="cpu")
    assert not (tmp_path / "o").exists()


def test_cpu_launch_becomes_the_ranks_it_asked_for():
    env = {"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29511"}
    launcher = ["python", "accelerate", "launch", "--cpu", "--num_processes", "3", "-m", "weightsmith", "fold",
                "--num_processes", "9"]
    cmd = cpu_ranks_command(env, launcher, ["fold", "m", "-o", "x"])
    assert cmd[1:] == ["-m", "torch.distributed.run", "--nproc_per_node", "3", "--master_addr", "127.0.0.1",
                       "--master_port", "29511", "-m", "weightsmith", "fold", "m", "-o", "x"]
    assert cpu_ranks_command(env, ["accelerate", "launch", "--num-processes=2", "s.py"], [])[4] == "2"
    assert cpu_ranks_command(env, ["py", "-m", "accelerate.commands.launch", "--num_processes", "4", "x.py"], [])[4] == "4"
    assert cpu_ranks_command(env, ["accelerate", "launch", "--cpu", "-m", "weightsmith"], []) is None  # one process
    assert cpu_ranks_command({**env, "LOCAL_RANK": "0"}, launcher, []) is None  # already a rank
    assert cpu_ranks_command({"MASTER_ADDR": "127.0.0.1"}, launcher, []) is None  # not a --cpu launch
