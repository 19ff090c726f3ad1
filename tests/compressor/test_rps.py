"""RPS models: exact recovery at full budget (STABLE-RPS, not ROAST), least-squares projection,
gradients to the slots and their scaling, save/load/export round trips and real memory savings."""
import json

import pytest
import torch
from torch import nn

import weightsmith
from weightsmith.compressor import format as rps_format
from weightsmith.compressor.memory import HashedMemory, RPSLinear, plan_specs, resident_bytes
from weightsmith.compressor.project import compress_model, init_model, project, select_modules
from weightsmith.compressor.rps import compress_rps
from weightsmith.checkpoint import Checkpoint
from weightsmith.errors import InvalidChoice, MissingOption, OutOfRange, UnknownOption, WeightsmithError

X = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))


def _dense(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).eval()


def _logits(model):
    with torch.no_grad():
        return model(input_ids=X).logits


def _chosen_weights(model):
    return {n: m.weight.detach().clone() for n, m in select_modules(model, None)}


def test_stable_rps_at_full_budget_reproduces_weights_and_logits_exactly_roast_does_not(tiny_llama):
    folder = tiny_llama()
    ref = _dense(folder)
    weights = _chosen_weights(ref)
    ref_logits = _logits(ref)
    stable = _dense(folder)
    mem, stats = compress_model(stable, budget=1.0, mapping="stable")
    assert stats["relative_error"] == 0.0
    for spec in mem.specs.values():
        assert torch.equal(mem.weight(spec), weights[spec.name])
    assert torch.equal(_logits(stable), ref_logits)

    roast = _dense(folder)
    rmem, rstats = compress_model(roast, budget=1.0, mapping="roast", tile=16)
    count, _ = rmem.slot_stats()
    assert int(count.max()) > 1 and int((count == 0).sum()) > 0  # collisions, although m == n
    assert rstats["relative_error"] > 0.1
    assert (_logits(roast) - ref_logits).abs().max() > 1e-3


def test_projection_is_the_least_squares_optimum(tiny_llama):
    model = _dense(tiny_llama())
    weights = _chosen_weights(model)
    for mapping in ("stable", "roast"):
        chosen = select_modules(model, None)
        mem = HashedMemory(plan_specs([(n, "linear", tuple(m.weight.shape), False) for n, m in chosen], 0.2, "global",
                                      mapping, 16), mapping=mapping, seed=0, sharing="global", tile=16)
        project(mem, weights)

        def err(z):
            with torch.no_grad():
                mem.memory.copy_(z)
                return sum(float((mem.weight(s).double() - weights[s.name].double()).square().sum())
                           for s in mem.specs.values())

        z0 = mem.memory.detach().clone()
        best = err(z0)
        count, _ = mem.slot_stats()
        used = torch.nonzero(count > 0).reshape(-1)
        gen = torch.Generator().manual_seed(0)
        for j in used[torch.randperm(used.numel(), generator=gen)[:25]].tolist():
            for eps in (1e-3, -1e-3):
                z = z0.clone()
                z[j] += eps
                assert err(z) > best
        z = z0 + 1e-3 * torch.randn(z0.shape, generator=gen)
        assert err(z) > best


def test_gradient_reaches_the_slots_and_is_scaled_per_slot(tiny_llama):
    folder = tiny_llama()
    model = _dense(folder)
    mem, _ = compress_model(model, budget=0.3, mapping="stable")
    mem.grad_scaling = False
    model(input_ids=X, labels=X).loss.backward()
    raw = mem.memory.grad.clone()
    # the chain rule by hand: dL/dz_j = sum_{i->j} lambda_i g_i dL/dW_i
    ref = _dense(folder)
    for name, m in select_modules(ref, None):
        m.weight.data = mem.weight(mem.specs[name]).detach()
    ref(input_ids=X, labels=X).loss.backward()
    expect = torch.zeros_like(raw, dtype=torch.float64)
    for name, m in select_modules(ref, None):
        spec = mem.specs[name]
        slot, sign = mem.index(spec)
        expect.scatter_add_(0, slot, (spec.scale * sign * m.weight.grad.reshape(-1)).double())
    assert raw.abs().sum() > 0
    torch.testing.assert_close(raw.double(), expect, rtol=1e-4, atol=1e-7)

    mem.grad_scaling = True
    mem.memory.grad = None
    model(input_ids=X, labels=X).loss.backward()
    count, lam = mem.slot_stats()
    s = lam.square() / count
    torch.testing.assert_close(mem.memory.grad.double(), raw.double() / s, rtol=1e-4, atol=1e-7)


class _Regressor(nn.Module):
    def __init__(self, memory, spec):
        super().__init__()
        self.rps = memory
        self.lin = RPSLinear(memory, spec)


@pytest.mark.parametrize("scale", [0.3, 1.0, 3.0])
def test_gradient_scaling_keeps_sgd_stable_where_unscaled_roast_diverges(scale):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 32, generator=gen)
    target = x @ (torch.randn(32, 32, generator=gen) / 32 ** 0.5)

    def train(mapping, scaling):
        spec = plan_specs([("lin", "linear", (32, 32), False)], 0.25, "global", mapping, 16)[0]
        spec.scale = scale
        mem = HashedMemory([spec], mapping=mapping, seed=0, sharing="global", tile=16, grad_scaling=scaling)
        with torch.no_grad():
            mem.memory.copy_(torch.randn(mem.num_slots, generator=torch.Generator().manual_seed(1)) * 0.1)
        net = _Regressor(mem, spec)
        opt = torch.optim.SGD(net.parameters(), lr=1.0)
        first = None
        for _ in range(60):
            loss = (net.lin(x) - target).square().mean()
            first = first if first is not None else loss.item()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return first, loss.item()

    first, last = train("stable", True)
    assert last < first and last < 0.75  # converges at every init scale, to the same loss
    rfirst, rlast = train("roast", False)
    if scale == 3.0:
        assert not rlast < rfirst  # its effective step grows with lambda^2 x collisions: diverges (or nan)
    else:
        assert rlast < rfirst


def test_save_load_gives_identical_logits_small_resident_memory_and_plain_export(tiny_llama, tmp_path):
    folder = tiny_llama(hidden_size=64, intermediate_size=128)
    out = tmp_path / "rps"
    info = compress_rps(folder, out, budget=0.1, mapping="stable", device="cpu")
    model = _dense(folder)
    compress_model(model, budget=0.1, mapping="stable")
    loaded = weightsmith.load(out)
    assert torch.equal(_logits(loaded), _logits(model))

    ws = json.loads((out / "config.json").read_text())["weightsmith"]
    assert ws["format"] == "rps" and ws["mapping"] == "stable" and ws["budget"] == 0.1
    compressed = info["compressed_params"]
    dense = _dense(folder)
    other = sum(p.numel() for p in dense.parameters()) - compressed
    ckpt = Checkpoint(out)
    assert ckpt.info("rps.memory").numel == round(0.1 * compressed)
    assert ckpt.num_params == other + round(0.1 * compressed)
    desc = rps_format.describe(ckpt)
    assert desc["total_params"] == other + compressed and desc["unique_params"] == ckpt.num_params
    # resident parameters of the loaded model: budget x compressed + everything else (4 bytes each)
    assert resident_bytes(loaded)["parameters"] == 4 * (other + round(0.1 * compressed))
    assert not any(isinstance(m, nn.Linear) for n, m in loaded.named_modules() if ".layers." in n)

    plain = tmp_path / "plain"
    rps_format.export_plain(out, plain)
    stock = _dense(plain)
    torch.testing.assert_close(_logits(stock), _logits(loaded), rtol=0, atol=1e-5)


def test_module_sharing_and_embedding_rows(tiny_llama):
    model = _dense(tiny_llama())
    ref = _logits(model)
    mem, stats = compress_model(model, budget=1.0, mapping="stable", sharing="module",
                                pattern=r"embed_tokens|layers\.\d+\.mlp")
    assert stats["relative_error"] == 0.0
    assert torch.equal(_logits(model), ref)
    spec = mem.specs["model.embed_tokens"]
    ids = torch.tensor([[3, 7], [127, 0]])
    assert torch.equal(mem.rows(spec, ids), mem.weight(spec)[ids])
    assert len({s.base for s in mem.specs.values()}) == len(mem.specs)


def test_from_scratch_init_trains(tiny_llama):
    from weightsmith.compressor.train import fit

    from weightsmith.loading import load

    model = load(tiny_llama())
    mem = init_model(model, budget=0.2, mapping="stable")
    assert mem.memory.std() > 0
    tokens = torch.arange(64).repeat(20) % 128
    losses = fit(model, tokens, steps=15, lr=3e-2, batch_size=4, seq_len=16, seed=0)
    assert sum(losses[-3:]) / 3 < losses[0] - 0.5
    assert not mem._cache  # index maps dropped after training


def test_bad_inputs_are_refused_with_one_clear_error(tiny_llama, tmp_path):
    folder = tiny_llama()
    with pytest.raises(OutOfRange, match=r"^budget: 0 is out of range; it must be in \(0, 4\]$"):
        compress_rps(folder, tmp_path / "a", budget=0)
    with pytest.raises(InvalidChoice, match="^mapping: 'lsh' is not one of stable, roast$"):
        compress_rps(folder, tmp_path / "a", mapping="lsh")
    with pytest.raises(MissingOption, match=r"^data: healing \(heal_steps > 0\) needs text"):
        compress_rps(folder, tmp_path / "a", heal_steps=5)
    with pytest.raises(UnknownOption, match="^seq: no such option"):
        compress_rps(folder, tmp_path / "a", seq=5)
    with pytest.raises(WeightsmithError, match="matches no"):
        compress_rps(folder, tmp_path / "a", modules="nothing_here")
    with pytest.raises(WeightsmithError, match="inside input"):
        compress_rps(folder, folder / "out")


def test_an_encoder_is_compressed_and_its_heal_refused_by_name(tmp_path):
    """The real all-MiniLM-L6-v2 (it stores a position_ids buffer transformers ignores) projects; a heal, which
    trains a causal-LM loss, is refused before the projection, with nothing written."""
    from weightsmith.compressor.rps import compress_rps
    from weightsmith.errors import OptionError
    from weightsmith.zoo import minilm_path

    data = tmp_path / "s.txt"
    data.write_text("a sentence.\nanother one.\n")
    with pytest.raises(OptionError, match="not a causal LM"):
        compress_rps(minilm_path(), tmp_path / "healed", budget=0.5, heal_steps=2, data=data, device="cpu")
    assert not (tmp_path / "healed").exists()
    info = compress_rps(minilm_path(), tmp_path / "plain", budget=0.5, device="cpu")
    assert 0 < info["relative_error"] < 1 and (tmp_path / "plain" / "config.json").is_file()
