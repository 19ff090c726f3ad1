"""Weight matching from two checkpoints read a group's tensors at a time: the permutations of the in-memory
float32 models, the output in the stored dtype, and never two models' worth of tensors held."""
import torch

from peak_bytes import PeakBytes, bf16_llama
from weightsmith.checkpoint import Checkpoint
from weightsmith.loading import load
from weightsmith.merge.align import apply_permutation, spec_for, weight_matching
from weightsmith.merge.align.folders import align


def test_align_of_bf16_checkpoints_streams_and_matches_in_memory_weight_matching(tmp_path):
    # deep for its width, as real models are: one group's tensors and cost matrix are a small part of it
    shape = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=12)
    a, b = bf16_llama(tmp_path / "a", seed=0, **shape), bf16_llama(tmp_path / "b", seed=1, **shape)
    model_bytes = Checkpoint(a).nbytes
    with PeakBytes() as probe:
        report = align(a, b, tmp_path / "out", method="weight", max_sweeps=3, device="cpu")
    assert report["units_moved"] > 0
    # two models (2 B) upcast to float64 (8 B) is what holding them costs; one group at a time is far less
    assert probe.peak < 1.0 * model_bytes, probe.peak / model_bytes

    ma, mb = load(a, dtype=torch.float32), load(b, dtype=torch.float32)
    spec = spec_for(ma)
    perms = weight_matching(spec, ma.state_dict(), mb.state_dict(), max_sweeps=3)
    expected = apply_permutation(mb.state_dict(), spec, perms)
    out = Checkpoint(tmp_path / "out")
    assert {out.info(n).torch_dtype for n in out.names()} == {torch.bfloat16}
    for name in out.names():
        assert torch.equal(out.get(name).float(), expected[name]), name
