"""Projection without the dense model: slot ranges filled one at a time give the same memory as one range,
and compressing a bfloat16 checkpoint keeps bfloat16 and never holds a float32 copy or a second model."""
import pytest
import torch
from peak_bytes import PeakBytes, bf16_llama
from weightsmith.checkpoint import Checkpoint
from weightsmith.compressor import project as projection
from weightsmith.compressor.memory import HashedMemory, plan_specs
from weightsmith.compressor.rps import compress_rps


@pytest.mark.parametrize("mapping,sharing", [("stable", "global"), ("stable", "module"), ("roast", "global")])
def test_projection_by_slot_ranges_equals_one_range(monkeypatch, mapping, sharing):
    gen = torch.Generator().manual_seed(0)
    shapes = [("a", (48, 40)), ("b", (40, 48)), ("c", (96, 40)), ("d", (40, 96))]
    weights = {n: (torch.randn(s, generator=gen) * (i + 1)).to(torch.bfloat16) for i, (n, s) in enumerate(shapes)}

    def run():
        specs = plan_specs([(n, "linear", s, False) for n, s in shapes], 0.37, sharing, mapping, 16)
        mem = HashedMemory(specs, mapping=mapping, seed=3, sharing=sharing, tile=16)
        return mem, projection.project(mem, weights)

    ranged, stats = run()
    assert len(projection._windows(ranged)) > 1 or mapping == "roast"  # ROAST tiles land anywhere: one range
    monkeypatch.setattr(projection, "MIN_WINDOWS", 1)
    monkeypatch.setattr(projection, "MAX_WINDOW_SLOTS", 1 << 40)
    whole, whole_stats = run()
    assert len(projection._windows(whole)) == (len(shapes) if sharing == "module" else 1)
    assert torch.equal(ranged.memory, whole.memory)
    assert stats["empty_slots"] == whole_stats["empty_slots"]
    assert stats["relative_error"] == pytest.approx(whole_stats["relative_error"], rel=1e-9)
    # the error from the sums is the error of the weights read back from the memory
    err = sum(float((ranged.weight(s).double() - weights[s.name].double()).square().sum())
              for s in ranged.specs.values())
    total = sum(float(w.double().square().sum()) for w in weights.values())
    assert stats["relative_error"] == pytest.approx((err / total) ** 0.5, rel=1e-9)


def test_compress_of_a_bf16_model_keeps_bf16_and_holds_under_1_3_model_bytes(tmp_path, monkeypatch):
    src = bf16_llama(tmp_path / "m")
    monkeypatch.setattr(projection, "BLOCK", 4096)  # hashing temporaries as small beside this model as beside 1B
    model_bytes = Checkpoint(src).nbytes
    with PeakBytes() as probe:
        info = compress_rps(src, tmp_path / "rps", budget=0.5, device="cpu")
    out = Checkpoint(tmp_path / "rps")
    assert {out.info(n).torch_dtype for n in out.names()} == {torch.bfloat16}
    assert info["relative_error"] < 1
    # not the dense model beside the memory (1.5 B), a float32 copy (2 B) or sums over every slot at once
    assert probe.peak < 1.3 * model_bytes, probe.peak / model_bytes
