"""The fold keeps the stored dtype and one copy of the weights: importance and plan on a bfloat16 model never
allocate a float32 copy nor a second copy (bytes counted as operators allocate them), and the folded model
holds the original's own tensors until a heal trains them."""
import pytest
import torch

from peak_bytes import PeakBytes, bf16_llama
from weightsmith.checkpoint import read_json


class NewBytes(PeakBytes):
    """``PeakBytes`` not counting views of ``model``'s own tensors (already there, not allocated)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        for q in model.parameters():
            self.refs[q.untyped_storage().data_ptr()] = 1 << 40


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """Weights much larger than the activations of the calibration batches, so that a copy would show."""
    import weightsmith

    path = bf16_llama(tmp_path_factory.mktemp("bf16") / "m", hidden_size=256, intermediate_size=1024,
                      num_hidden_layers=5, vocab_size=128)
    model = weightsmith.load(path)
    return model, read_json(path / "config.json", "config"), sum(p.numel() * 2 for p in model.parameters()), path


@pytest.mark.parametrize("importance", ["bi", "angular", "loss"])
def test_importance_and_plan_allocate_no_copy_of_a_bf16_model(llama, importance):
    from weightsmith.fold.plan import fold_model
    from weightsmith.fold.stage import choose_removed

    model, config, nbytes, _ = llama
    windows = torch.randint(0, 128, (6, 12), generator=torch.Generator().manual_seed(0))
    with NewBytes(model) as p:
        removed, _ = choose_removed(model, windows, 2, importance, gate_steps=0, batch_size=2, seed=0, device="cpu",
                                    progress=None)
        folded = fold_model(model, config, removed, [1, 1, 1], share_init="first")
    assert p.peak < 0.2 * nbytes  # a float32 copy would be 2x, a second bf16 copy 1x
    assert {q.dtype for q in folded.parameters()} == {torch.bfloat16}
    held = {q.untyped_storage().data_ptr() for q in model.parameters()}
    assert all(q.untyped_storage().data_ptr() in held for q in folded.parameters())


def test_a_full_heal_trains_its_own_copy_and_leaves_the_teacher_as_it_was(llama):
    from weightsmith.fold.heal import heal
    from weightsmith.fold.plan import fold_model

    model, config, _, _ = llama
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = fold_model(model, config, [1, 3], [1, 1, 1], share_init="first")
    windows = torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(1))
    heal(folded, model, windows, steps=2, batch_size=2, lr=1e-2)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not torch.equal(folded.model.layers[0].mlp.up_proj.weight, model.model.layers[0].mlp.up_proj.weight)
    assert folded.model.embed_tokens.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # not trained


def test_a_lora_heal_merges_into_new_tensors_and_leaves_the_teacher_as_it_was(llama):
    from weightsmith.fold.heal import heal
    from weightsmith.fold.plan import fold_model

    model, config, _, _ = llama
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = fold_model(model, config, [0, 2], [1, 1, 1], share_init="first")
    windows = torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(2))
    heal(folded, model, windows, steps=2, batch_size=2, lr=1e-2, lora_rank=2)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert folded.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert not torch.equal(folded.model.layers[0].mlp.up_proj.weight, model.model.layers[1].mlp.up_proj.weight)


def test_spilled_states_read_back_exactly_in_their_dtype():
    from weightsmith.fold.removal import SpilledStates

    g = torch.Generator().manual_seed(4)
    tensors = [torch.randn(3, 5, 7, generator=g).to(torch.bfloat16), torch.randn(2, 9, generator=g),
               torch.randn(1, 4, generator=g).to(torch.float16)]
    store = SpilledStates()
    indices = [store.add(t) for t in tensors]
    for i in reversed(indices):
        back = store.get(i)
        assert back.dtype == tensors[i].dtype and torch.equal(back, tensors[i])
    store.close()


def test_a_heal_from_cached_teacher_outputs_takes_the_steps_of_one_with_the_teacher(llama):
    """Same losses and weights with the teacher's outputs cached on disk; without keep_teacher the student
    trains the tensors it shares with the teacher in place (no copy of the blocks)."""
    import weightsmith
    from weightsmith.fold.heal import heal
    from weightsmith.fold.plan import fold_model

    _, config, _, path = llama
    model = weightsmith.load(path)  # its blocks get trained
    windows = torch.randint(0, 128, (6, 12), generator=torch.Generator().manual_seed(5))
    live = fold_model(model, config, [1, 3], [1, 1, 1], share_init="first")
    a = heal(live, model, windows, steps=3, batch_size=2, lr=1e-2, tail=2)
    cached = fold_model(model, config, [1, 3], [1, 1, 1], share_init="first")
    up = cached.model.layers[0].mlp.up_proj.weight
    b = heal(cached, model, windows, steps=3, batch_size=2, lr=1e-2, tail=2, teacher_cache=True, keep_teacher=False)
    assert b["heal_losses"] == pytest.approx(a["heal_losses"], rel=1e-3)
    assert cached.model.layers[0].mlp.up_proj.weight.data_ptr() == up.data_ptr() == \
        model.model.layers[0].mlp.up_proj.weight.data_ptr()  # trained in place
    for x, y in zip(live.parameters(), cached.parameters()):
        assert torch.allclose(x.float(), y.float(), atol=2e-2)


@pytest.mark.parametrize("optimizer, states", [("adamw", 2.0), ("adafactor", 0.0)])
def test_the_heal_optimizer_holds_two_moments_per_weight_with_adamw_and_next_to_none_with_adafactor(
        llama, optimizer, states):
    import weightsmith
    from weightsmith.fold.heal import heal
    from weightsmith.fold.plan import fold_model

    _, config, _, path = llama
    model = weightsmith.load(path)
    folded = fold_model(model, config, [1, 3], [1, 1, 1], share_init="first")
    windows = torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(1))
    up = folded.model.layers[0].mlp.up_proj.weight.clone()
    rep = heal(folded, model, windows, steps=3, batch_size=2, lr=1e-2, optimizer=optimizer)
    trained = sum(q.numel() * q.element_size() for q in folded.model.layers.parameters())
    held = rep["heal_ranks"][0]["held"]["optimizer"] / trained
    assert held == pytest.approx(states, abs=0.05), held  # adafactor: a row and a column per matrix
    assert not torch.equal(folded.model.layers[0].mlp.up_proj.weight, up)


@pytest.mark.parametrize("lora", [0, 2])
def test_a_heal_that_recomputes_the_blocks_takes_the_same_steps_bit_for_bit(llama, lora):
    import weightsmith
    from weightsmith.fold.heal import heal, merge_lora
    from weightsmith.fold.plan import fold_model

    _, config, _, path = llama
    windows = torch.randint(0, 128, (4, 64), generator=torch.Generator().manual_seed(7))
    runs = []
    for recompute in (False, True):
        model = weightsmith.load(path)
        folded = fold_model(model, config, [1, 3], [1, 2], share_init="first")  # a shared pair of blocks
        torch.manual_seed(0)  # the adapters' initial weights
        with PeakBytes() as probe:
            rep = heal(folded, model, windows, steps=3, batch_size=4, lr=1e-2, lora_rank=lora, recompute=recompute)
        if lora:
            merge_lora(folded)
        runs.append((rep["heal_losses"], folded.state_dict(), probe.peak))
    (losses, state, peak), (again, recomputed, less) = runs
    assert losses == again
    assert all(torch.equal(state[k], recomputed[k]) for k in state)
    assert "forward" not in vars(folded.model.layers[0])  # the blocks' own forward is back
    if lora:  # the activations are most of a LoRA step (a full one holds gradients and moments)
        assert less < 0.5 * peak, (less, peak)


def test_analyze_and_fold_keep_the_stored_dtype_unless_told(llama, tmp_path, monkeypatch):
    import weightsmith.loading
    from weightsmith.fold.analyze import analyze
    from weightsmith.fold.stage import _load

    _, _, _, path = llama
    assert {p.dtype for p in _load(path, "cpu", None).parameters()} == {torch.bfloat16}
    assert {p.dtype for p in _load(path, "cpu", "float32").parameters()} == {torch.float32}
    data = tmp_path / "d.txt"
    data.write_text("a b c d e f g h " * 200)

    class Loaded(Exception):
        pass

    def load(*args, **kwargs):
        raise Loaded(kwargs.get("dtype"))

    monkeypatch.setattr(weightsmith.loading, "load", load)
    with pytest.raises(Loaded, match="float16"):
        analyze(path, data=data, dtype="float16")
