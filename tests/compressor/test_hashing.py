"""Index maps: the universal hash is exact in int64, RandomFold is a permutation / evenly loaded, ROAST stays in range."""
import torch

from weightsmith.compressor.hashing import P, UniversalHash, random_fold_slots, roast_slots, sign_hash


def test_universal_hash_matches_big_integer_arithmetic_for_huge_indices():
    h = UniversalHash.from_seed(3, 1)
    xs = [0, 1, 12345, P - 1, P, P + 7, 2**40 + 3, 10**12 + 11]
    got = h(torch.tensor(xs)).tolist()
    assert got == [(h.a * x + h.b * x * x + h.c) % P for x in xs]


def test_random_fold_is_a_permutation_when_memory_covers_the_weights():
    for n, m in [(1000, 1000), (777, 1000)]:
        slots = random_fold_slots(0, torch.arange(n), m)
        assert slots.unique().numel() == n and int(slots.max()) < m


def test_random_fold_load_differs_by_at_most_one_over_the_global_index_space():
    n, m = 10_007, 613
    counts = torch.bincount(random_fold_slots(5, torch.arange(n), m), minlength=m)
    assert int(counts.max() - counts.min()) <= 1
    # an i.i.d. uniform hash of the same sizes is far less even
    iid = torch.bincount(UniversalHash.from_seed(5, 9)(torch.arange(n)) % m, minlength=m)
    assert int(iid.max() - iid.min()) > 5


def test_random_fold_chunks_get_different_shifts():
    m = 500
    a = random_fold_slots(1, torch.arange(0, m), m)
    b = random_fold_slots(1, torch.arange(m, 2 * m), m)
    assert not torch.equal(a, b)


def test_roast_tiles_are_contiguous_and_inside_memory():
    rows = torch.arange(40).unsqueeze(1)
    cols = torch.arange(24).unsqueeze(0)
    slots = roast_slots(0, rows, cols, (40, 24), 0, 300, (8, 8))
    assert int(slots.min()) >= 0 and int(slots.max()) < 300
    tile = slots[:8, :8].reshape(-1)
    assert torch.equal(tile - tile[0], torch.arange(64))


def test_sign_hash_is_balanced_and_deterministic():
    g = sign_hash(0, torch.arange(20_000))
    assert set(g.unique().tolist()) == {-1.0, 1.0}
    assert abs(float(g.mean())) < 0.05
    assert torch.equal(g, sign_hash(0, torch.arange(20_000)))
    assert not torch.equal(g, sign_hash(1, torch.arange(20_000)))
