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


def _every_group_every_sweep(spec, state_a, state_b, max_sweeps, seed=0):
    """Coordinate descent as first written: every group's cost matrix rebuilt and solved in every sweep."""
    import numpy as np
    from scipy.optimize import linear_sum_assignment

    from weightsmith.merge.align.apply import identity_perms, permute_tensor

    perms = identity_perms(spec)
    rng = np.random.default_rng(seed)
    for _ in range(max_sweeps):
        gained = False
        for g in rng.permutation(list(spec.groups)):
            n = spec.groups[g].size
            c = torch.zeros(n, n, dtype=torch.float64)
            for name, ax in spec.tensors_of(g):
                wa = state_a[name].double().movedim(ax.dim, 0).reshape(n, -1)
                wb = permute_tensor(state_b[name].double(), spec.axes[name], perms, skip=g).movedim(ax.dim, 0)
                c += wa @ wb.reshape(n, -1).T
            c = c.numpy()
            _, cols = linear_sum_assignment(c, maximize=True)
            old, new = c[np.arange(n), perms[g].numpy()].sum(), c[np.arange(n), cols].sum()
            if new > old + 1e-12 * max(1.0, abs(old)):
                perms[g], gained = torch.as_tensor(cols), True
        if not gained:
            break
    return perms


def test_skipping_groups_whose_neighbours_did_not_move_gives_the_permutations_of_solving_every_group(tmp_path):
    from weightsmith.merge.align import random_perms

    shape = dict(hidden_size=32, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2)
    state_a = load(bf16_llama(tmp_path / "a", **shape)).state_dict()
    spec = spec_for(load(tmp_path / "a"))
    # B: A permuted plus noise as large as the weights, so later sweeps still move groups
    gen = torch.Generator().manual_seed(5)
    state_b = {k: (v.float() + v.float().std() * torch.randn(v.shape, generator=gen)).to(v.dtype)
               for k, v in apply_permutation(state_a, spec, random_perms(spec, 1)).items()}
    one, two = (_every_group_every_sweep(spec, state_a, state_b, n) for n in (1, 2))
    assert any(not torch.equal(one[g], two[g]) for g in spec.groups)  # the second sweep changes something
    for seed in (0, 1):
        for sweeps in (1, 2, 100):
            got = weight_matching(spec, state_a, state_b, max_sweeps=sweeps, seed=seed)
            want = _every_group_every_sweep(spec, state_a, state_b, sweeps, seed)
            assert all(torch.equal(got[g], want[g]) for g in spec.groups), (seed, sweeps)
