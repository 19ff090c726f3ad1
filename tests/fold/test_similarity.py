"""Similarity metrics against closed forms and an independent (kernel-form) CKA; hooks against hidden states."""
import math

import pytest
import torch

from weightsmith.fold.similarity import (angular, angular_distance, angular_drop, block_influence, cka_matrix,
                                         linear_cka, shortgpt_drop)


def hsic_cka(x, y):
    """CKA from centred Gram matrices: HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))."""
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    k, l = x.double() @ x.double().T, y.double() @ y.double().T
    hsic = lambda a, b: torch.trace(a @ h @ b @ h)  # noqa: E731
    return float(hsic(k, l) / torch.sqrt(hsic(k, k) * hsic(l, l)))


def test_cka_of_a_layer_with_itself_is_one_and_matches_kernel_form():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(50, 8, generator=g)
    y = x @ torch.randn(8, 6, generator=g) + 0.5 * torch.randn(50, 6, generator=g)
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, y) == pytest.approx(hsic_cka(x, y), abs=1e-10)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))
    assert linear_cka(x, 3.0 * x.double() @ q) == pytest.approx(1.0, abs=1e-10)  # rotation and scale invariant
    m = cka_matrix([x.view(5, 10, 8), y.view(5, 10, 6)], max_tokens=None)  # feature form (50 tokens > 8 dims)
    assert m[0, 1] == pytest.approx(hsic_cka(x, y), abs=1e-5) and m[1, 0] == m[0, 1]
    wide = torch.randn(12, 40, generator=g)  # Gram form (12 tokens < 40 dims)
    mixed = wide @ torch.randn(40, 40, generator=g) + torch.randn(12, 40, generator=g)
    m = cka_matrix([wide.view(3, 4, 40), mixed.view(3, 4, 40)], max_tokens=None)
    assert m[0, 1] == pytest.approx(hsic_cka(wide, mixed), abs=1e-5) and 0 < m[0, 1] < 1


def test_angular_distance_closed_form_and_planted_span():
    theta = torch.tensor([0.0, 0.3, 1.2, 2.0])
    a = torch.stack([torch.ones(4), torch.zeros(4)], -1)
    b = torch.stack([torch.cos(theta), torch.sin(theta)], -1)
    assert torch.allclose(angular(a, b), theta / math.pi, atol=1e-6)
    # states rotating by known angles per block: block 2 barely changes its input
    steps = [0.5, 0.7, 0.05, 0.6]
    angles = torch.tensor([0.0] + list(torch.cumsum(torch.tensor(steps), 0)))
    states = [torch.stack([torch.cos(t), torch.sin(t)]).expand(3, 4, 2).clone() for t in angles]
    d = angular_distance(states, last_token=True)
    assert d[1, 2].item() == pytest.approx((steps[1] + steps[2] + steps[3]) / math.pi, abs=1e-5)
    assert math.isnan(d[3, 1].item())
    assert angular_drop(d, 1) == [2] and angular_drop(d, 2) == [2, 3]
    bi = block_influence(states)
    assert torch.allclose(bi, 1 - torch.cos(torch.tensor(steps)), atol=1e-6)
    assert shortgpt_drop(bi, 1) == [2]


def test_block_states_are_the_block_inputs(zoo):
    import weightsmith
    from weightsmith.fold.analyze import block_states

    model = weightsmith.load(zoo.model("base"))
    x = torch.randint(0, 1000, (3, 24))
    states = block_states(model, x)
    hs = model(input_ids=x, output_hidden_states=True).hidden_states
    assert len(states) == 5
    for i in range(4):  # the last hidden state is normed in Llama; the hook reads the residual stream
        assert torch.equal(states[i], hs[i])
    assert torch.allclose(model.model.norm(states[4]), hs[4], atol=1e-5)


def test_metrics_streamed_batch_by_batch_equal_the_metrics_of_all_states(zoo):
    """BI, both angular distances and the sampled CKA, accumulated per batch in the model's dtype, against the
    functions on every state held at once in float32."""
    import weightsmith
    from weightsmith.fold.analyze import block_similarity, block_states

    model = weightsmith.load(zoo.model("base"))
    x = torch.randint(0, 1000, (7, 20), generator=torch.Generator().manual_seed(3))
    states = block_states(model, x, batch_size=3)
    stats = block_similarity(model, x, batch_size=3, cka_tokens=60)  # 3 uneven batches, 60 of 140 tokens drawn
    assert torch.allclose(stats.block_influence(), block_influence(states), atol=1e-6)
    for last in (True, False):
        full, streamed = angular_distance(states, last_token=last), stats.angular_distance(last_token=last)
        assert torch.equal(full.isnan(), streamed.isnan())
        assert torch.allclose(streamed.nan_to_num(), full.nan_to_num(), atol=1e-6)
    assert torch.allclose(stats.cka_matrix(), cka_matrix(states, max_tokens=60), atol=1e-5)
    light = block_similarity(model, x, batch_size=3, mean_angular=False, cka=False)  # one state held at a time
    assert torch.allclose(light.block_influence(), block_influence(states), atol=1e-6)
    assert torch.allclose(light.angular_distance().nan_to_num(), angular_distance(states).nan_to_num(), atol=1e-6)


def test_spilled_states_give_the_sums_of_every_state_of_a_batch_held(zoo):
    """The earlier states and CKA samples read back from the temporary file: bit for bit the metrics of the
    same sums taken with each batch's states and every sampled token held in memory (bfloat16 states)."""
    import weightsmith
    from weightsmith.fold.analyze import block_similarity, each_batch_states
    from weightsmith.fold.similarity import _centred, _cos, _gram, gram_cka

    model = weightsmith.load(zoo.model("base"), dtype="bfloat16")
    x = torch.randint(0, 1000, (7, 20), generator=torch.Generator().manual_seed(3))
    stats = block_similarity(model, x, batch_size=3, cka_tokens=60)
    batches: list[list[torch.Tensor]] = []
    each_batch_states(model, x, lambda i, s, k: (batches.append([]) if i == 0 else None, batches[-1].append(s)),
                      batch_size=3)
    k = len(batches[0])
    cos_sum, ang_sum = torch.zeros(k - 1, dtype=torch.float64), torch.zeros(k - 1, k - 1, dtype=torch.float64)
    for held in batches:
        for i in range(1, k):
            cos_sum[i - 1] += _cos(held[i - 1], held[i]).double().sum()
            for n in range(1, i + 1):
                ang_sum[i - n, n - 1] += angular(held[i - n], held[i]).double().sum()
    assert torch.equal(stats.block_influence(), (1.0 - cos_sum / x.numel()).float())
    streamed = stats.angular_distance(last_token=False)
    assert torch.equal(streamed.nan_to_num(), (ang_sum / x.numel()).float().masked_fill(streamed.isnan(), 0))
    tokens = [torch.cat([b[i].reshape(-1, b[i].shape[-1]) for b in batches])[stats.sample] for i in range(k)]
    assert torch.equal(stats.cka_matrix(), gram_cka([_gram(_centred(t)) for t in tokens]))
