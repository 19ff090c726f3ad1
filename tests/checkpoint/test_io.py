"""Reader/writer round trips and every refusal of bad input (one clear error, nothing written)."""
from __future__ import annotations

import json
import struct

import pytest
import torch
from transformers import AutoModelForCausalLM

from weightsmith.checkpoint import (Checkpoint, ShardedWriter, copy_side_files, output_folder, parse_size,
                                    save_state_dict, write_config)
from weightsmith.errors import WeightsmithError


def resave(src, dst, shard_size):
    ckpt = Checkpoint(src)
    with output_folder(dst, inputs=[src]) as tmp:
        writer = ShardedWriter(tmp, [(n, ckpt.info(n).torch_dtype, ckpt.info(n).shape) for n in ckpt.names()], shard_size)
        for name in reversed(ckpt.names()):  # any order works: each tensor goes to its planned offset
            writer.write(name, ckpt.get(name))
        writer.close()
        write_config(tmp, ckpt.config)
        copy_side_files(src, tmp)
    return dst


def test_sharded_write_reloads_with_stock_transformers_and_identical_logits(tiny_llama, tmp_path):
    src = tiny_llama(hidden_size=48, intermediate_size=96)
    out = resave(src, tmp_path / "resharded", shard_size="20KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and all(s.endswith(f"-of-{len(shards):05d}.safetensors") for s in shards)
    assert index["metadata"]["total_size"] == Checkpoint(src).nbytes
    x = torch.randint(0, 128, (2, 16))
    a = AutoModelForCausalLM.from_pretrained(src).eval()
    b = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.equal(a(x).logits, b(x).logits)
    assert not list(tmp_path.glob("*.tmp-*"))


def test_single_shard_has_no_index(tmp_path):
    save_state_dict({"a": torch.ones(3), "b": torch.zeros(2, 2, dtype=torch.bfloat16)}, tmp_path)
    assert not (tmp_path / "model.safetensors.index.json").exists()
    ckpt = Checkpoint(tmp_path)
    assert ckpt.get("b").dtype == torch.bfloat16 and torch.equal(ckpt.get("a"), torch.ones(3))


@pytest.fixture
def sharded(tiny_llama, tmp_path):
    return resave(tiny_llama(), tmp_path / "sharded", "8KB")


def _index(folder):
    return json.loads((folder / "model.safetensors.index.json").read_text())


def test_index_pointing_to_missing_shard(sharded):
    victim = sorted(set(_index(sharded)["weight_map"].values()))[1]
    (sharded / victim).unlink()
    with pytest.raises(WeightsmithError, match=f"shard {victim}.*does not exist"):
        Checkpoint(sharded)


def test_tensor_listed_in_index_but_missing_from_shard(sharded):
    idx = _index(sharded)
    idx["weight_map"]["model.layers.9.mlp.up_proj.weight"] = next(iter(idx["weight_map"].values()))
    (sharded / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(WeightsmithError, match="model.layers.9.mlp.up_proj.weight.*missing from the shard"):
        Checkpoint(sharded)


def test_truncated_shard_names_file_and_tensor(sharded):
    victim = sharded / sorted(set(_index(sharded)["weight_map"].values()))[0]
    data = victim.read_bytes()
    victim.write_bytes(data[:-10])
    with pytest.raises(WeightsmithError, match=rf"{victim.name}: tensor '.*' ends at byte .*truncated file"):
        Checkpoint(sharded)


def test_corrupt_header(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", 5) + b"{oops" + b"\0" * 8)
    with pytest.raises(WeightsmithError, match="corrupt safetensors header"):
        Checkpoint(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(WeightsmithError, match="truncated"):
        Checkpoint(tmp_path)


def test_duplicate_tensor_across_shards(tmp_path):
    save_state_dict({"w": torch.ones(2)}, tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "a.safetensors")
    save_state_dict({"w": torch.ones(2), "x": torch.ones(1)}, tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "b.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "a.safetensors", "x": "b.safetensors"}}))
    with pytest.raises(WeightsmithError, match="'w' appears in both a.safetensors and b.safetensors"):
        Checkpoint(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(
        '{"weight_map": {"w": "a.safetensors", "w": "b.safetensors"}}')
    with pytest.raises(WeightsmithError, match="names 'w' twice"):
        Checkpoint(tmp_path)
    (tmp_path / "model.safetensors.index.json").unlink()
    with pytest.raises(WeightsmithError, match="no model.safetensors.index.json"):
        Checkpoint(tmp_path)


def test_pickle_needs_explicit_opt_in(tmp_path):
    torch.save({"w": torch.arange(4.0)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(WeightsmithError, match="Set allow_pickle if you trust this folder"):
        Checkpoint(tmp_path)
    assert torch.equal(Checkpoint(tmp_path, allow_pickle=True).get("w"), torch.arange(4.0))


def test_output_folder_refuses_inputs_and_existing_and_cleans_up(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    with pytest.raises(WeightsmithError, match="inside input"):
        with output_folder(src / "sub", inputs=[src]):
            pass
    with pytest.raises(WeightsmithError, match="inside input"):
        with output_folder(src, inputs=[src], force=True):
            pass
    with pytest.raises(WeightsmithError, match="already exists"):
        with output_folder(src):
            pass
    with pytest.raises(RuntimeError):
        with output_folder(tmp_path / "out") as tmp:
            (tmp / "model.safetensors").write_bytes(b"partial")
            raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]
    (src / "keep").write_text("x")
    with output_folder(tmp_path / "out") as tmp:
        (tmp / "f").write_text("1")
    with output_folder(tmp_path / "out", force=True) as tmp:
        (tmp / "g").write_text("2")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".weightsmith-output", "g"]  # the new folder, marked
    assert (src / "keep").exists()


def test_writer_refuses_unplanned_or_missing_tensors(tmp_path):
    w = ShardedWriter(tmp_path, [("a", torch.float32, (2,)), ("b", torch.float32, (3,))])
    with pytest.raises(WeightsmithError, match="not in the output plan"):
        w.write("c", torch.ones(2))
    with pytest.raises(WeightsmithError, match="planned"):
        w.write("a", torch.ones(3))
    w.write("a", torch.ones(2))
    with pytest.raises(WeightsmithError, match="'b'.*never written"):
        w.close()


@pytest.mark.parametrize("text,expected", [("5GB", 5 * 10**9), ("300MB", 300 * 10**6), ("2GiB", 2 * 2**30),
                                           ("1024", 1024), ("1.5 kb", 1500)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["five", "-3MB", "3XB", "0"])
def test_parse_size_rejects(bad):
    with pytest.raises(WeightsmithError):
        parse_size(bad)


def test_read_gives_owned_tensors_equal_to_the_mapped_ones_cropped_and_converted(tmp_path):
    state = {"emb": torch.randn(7, 5), "half": torch.randn(3, 4).to(torch.bfloat16), "ids": torch.arange(6)}
    save_state_dict(state, tmp_path, max_shard_size="100B")
    ckpt = Checkpoint(tmp_path)
    for name, t in state.items():
        assert torch.equal(ckpt.read(name), ckpt.get(name)) and torch.equal(ckpt.read(name), t)
    assert torch.equal(ckpt.read("emb", rows=4), state["emb"][:4])
    as_float = ckpt.read("half", dtype=torch.float32)
    assert as_float.dtype == torch.float32 and torch.equal(as_float, state["half"].float())
    owned = ckpt.read("emb")
    owned.zero_()  # writing to it must not touch the file
    assert torch.equal(Checkpoint(tmp_path).get("emb"), state["emb"])


def test_map_reads_like_read_and_writes_never_reach_the_file(tiny_llama, tmp_path):
    src = tiny_llama("m", vocab_size=96)
    files = {p: p.read_bytes() for p in src.glob("*.safetensors")}
    ckpt = Checkpoint(src)
    for name in ckpt.names():
        mapped = ckpt.map(name)
        assert mapped.dtype == ckpt.info(name).torch_dtype and torch.equal(mapped, ckpt.read(name))
        mapped.add_(1.0)  # copy-on-write: this process's pages only
        assert not torch.equal(mapped, ckpt.read(name))
    emb = "model.embed_tokens.weight"
    assert torch.equal(ckpt.map(emb, rows=10), ckpt.read(emb)[:10])
    assert {p: p.read_bytes() for p in files} == files
