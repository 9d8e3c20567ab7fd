"""Oracle tests of swalab.ensembles: FGE collection, prediction averaging, soups, the ensemble view."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from swalab.ensembles import (
    FGE,
    ensemble_predict,
    ensemble_view,
    fge_should_collect,
    greedy_soup,
    predict_outputs,
    uniform_soup,
    weighted_soup,
)
from swalab.schedules import fge_lr


@pytest.mark.parametrize(
    "cycle, expected",
    [(2, [0, 2, 4, 6, 8, 10]), (4, [1, 5, 9]), (6, [2, 8]), (3, [0, 3, 6, 9])],
)
def test_fge_collects_at_the_reference_epochs(cycle: int, expected: list[int]) -> None:
    assert [e for e in range(12) if fge_should_collect(e, cycle)] == expected


@pytest.mark.parametrize("cycle", [2, 4, 6])
def test_fge_collects_where_the_triangular_schedule_reaches_a2(cycle: int) -> None:
    schedule = fge_lr(a1=0.05, a2=0.01, cycle=cycle)
    for epoch in range(3 * cycle):
        # At the end of a collection epoch (fractional epoch epoch + 1) the lr is the cycle's minimum.
        at_end = schedule(epoch + 1)
        assert (at_end == pytest.approx(0.01)) == fge_should_collect(epoch, cycle)


@pytest.mark.parametrize("epoch, cycle", [(0, 1), (0, 0), (-1, 2)])
def test_fge_should_collect_bad_input(epoch: int, cycle: int) -> None:
    with pytest.raises(ValueError):
        fge_should_collect(epoch, cycle)


def _bn_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def _loader(seed: int = 0, n_batches: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (2 * torch.randn(10, 4, generator=gen) + 1, torch.randint(0, 3, (10,), generator=gen))
        for _ in range(n_batches)
    ]


def _train_step(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    """A forward in train mode (moves BN statistics) and a random step on the parameters."""
    model.train()
    model(batch[0])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))


@pytest.mark.parametrize("on_disk", [False, True])
def test_fge_predict_averages_member_softmax_with_own_bn(on_disk: bool, tmp_path) -> None:
    model, loader = _bn_model(), _loader()
    fge = FGE(tmp_path / "fge" if on_disk else None)
    snapshots = []
    for step in range(3):
        _train_step(model, loader[step])
        fge.collect(model)
        snapshots.append(copy.deepcopy(model).eval())
    assert len(fge) == 3
    if on_disk:
        assert sorted(p.name for p in (tmp_path / "fge").iterdir()) == [
            f"member_{i:03d}.pt" for i in range(3)
        ]
    _train_step(model, loader[0])  # the template's own weights must come back after predict
    before = copy.deepcopy(model.state_dict())

    out = fge.predict(loader, model)
    with torch.no_grad():
        expected = torch.stack(
            [torch.cat([m(x).softmax(-1) for x, _ in loader]) for m in snapshots]
        ).mean(0)
    assert torch.allclose(out["probs"], expected, atol=1e-6)
    assert torch.equal(out["targets"], torch.cat([y for _, y in loader]))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert model.training


def test_ensemble_predict_with_predict_fn_averages_what_it_returns() -> None:
    """The hook a sharded evaluation uses: each member's predictions come from ``predict_fn``."""
    model, loader = _bn_model(), _loader()
    members = []
    for step in range(2):
        _train_step(model, loader[step])
        members.append(copy.deepcopy(model.state_dict()))
    by_loader = ensemble_predict(members, model, loader)
    seen = []

    def predict_fn(m: nn.Module) -> torch.Tensor:
        seen.append(m.training)
        outputs, _ = predict_outputs(m, loader)
        return outputs.softmax(-1)

    out = ensemble_predict(members, model, None, predict_fn=predict_fn)
    assert torch.allclose(out["probs"], by_loader["probs"], atol=1e-7) and out["targets"] is None
    assert len(seen) == 2


def test_predict_outputs_without_targets_and_with_forward_fn() -> None:
    model = nn.Linear(4, 2)
    xs = [torch.randn(5, 4), torch.randn(3, 4)]
    outputs, targets = predict_outputs(model, xs)
    assert outputs.shape == (8, 2) and targets is None
    dict_batches = [{"pixels": x} for x in xs]
    outputs2, _ = predict_outputs(model, dict_batches, forward_fn=lambda m, b: m(b["pixels"]))
    assert torch.equal(outputs, outputs2)


def _states() -> list[dict[str, torch.Tensor]]:
    return [
        {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(5)},
        {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(7)},
    ]


def test_uniform_and_weighted_soups_by_hand(tmp_path) -> None:
    states = _states()
    paths = []
    for i, state in enumerate(states):
        paths.append(tmp_path / f"s{i}.pt")
        torch.save(state, paths[-1])
    for checkpoints in (states, paths):
        soup = uniform_soup(checkpoints)
        assert torch.equal(soup["w"], torch.tensor([2.0, 4.0])) and soup["n"].item() == 5
        weighted = weighted_soup(checkpoints, scores=[1.0, 3.0])  # weights 1/4, 3/4
        assert torch.allclose(weighted["w"], torch.tensor([2.5, 5.0])) and weighted["n"].item() == 5
    # softmax([0, ln 3]) = [1/4, 3/4]
    tempered = weighted_soup(
        states, scores=[0.0, 2 * torch.log(torch.tensor(3.0)).item()], temperature=2.0
    )
    assert torch.allclose(tempered["w"], torch.tensor([2.5, 5.0]))
    assert states[0]["w"].tolist() == [1.0, 2.0]  # inputs untouched


def test_soup_keeps_half_precision_dtype() -> None:
    states = [{"w": torch.full((3,), v, dtype=torch.float16)} for v in (1.0, 2.0, 4.0)]
    soup = uniform_soup(states)
    assert soup["w"].dtype == torch.float16
    assert torch.allclose(soup["w"].float(), torch.full((3,), 7 / 3), atol=1e-3)


def test_greedy_soup_never_accepts_a_candidate_that_lowers_the_metric() -> None:
    values = [
        1.2,
        0.5,
        3.0,
        0.9,
        0.9,
    ]  # the last one duplicates the first ingredient: equal, not better
    states = [{"w": torch.tensor([v])} for v in values]
    history: list[float] = []

    def evaluate(state: dict[str, torch.Tensor]) -> float:
        score = -abs(state["w"].item() - 1.0)
        history.append(score)
        return score

    result = greedy_soup(states, evaluate)
    # Order by own score: 0.9 (idx 3), 0.9 (idx 4), 1.2 (idx 0), 0.5, 3.0.
    # {0.9}: -0.1 ; +0.9 -> 0.9: -0.1 (equal, rejected) ; +1.2 -> 1.05: -0.05 (accepted) ;
    # +0.5 -> 0.8667: -0.133 (rejected) ; +3.0 -> 1.7: -0.7 (rejected).
    assert result.ingredients == [3, 0]
    assert result.state_dict["w"].item() == pytest.approx(1.05)
    assert result.score == pytest.approx(-0.05)
    soup_scores = history[len(values) :]  # after the candidates' own scores
    assert soup_scores == pytest.approx([-0.1, -0.05, -0.4 / 3, -0.7])
    best = -0.1
    for score, accepted in zip(soup_scores, [False, True, False, False]):
        assert accepted == (score > best)
        if accepted:
            best = score


def test_greedy_soup_uses_given_scores_without_reevaluating() -> None:
    states = [{"w": torch.tensor([v])} for v in (0.0, 2.0)]
    calls = []
    result = greedy_soup(
        states, lambda s: calls.append(s) or -abs(s["w"].item() - 1.0), scores=[-1.0, -1.0]
    )
    assert len(calls) == 1 and result.ingredients == [0, 1] and result.state_dict["w"].item() == 1.0


def test_soup_recomputes_batchnorm_for_the_result() -> None:
    # BN first: its recomputed running mean is the mean of the inputs over the loader.
    def make() -> nn.Module:
        return nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 2))

    states = [make().state_dict() for _ in range(2)]
    loader = _loader(seed=3)
    model = make()
    soup = uniform_soup(states, model=model, bn_loader=loader)
    data_mean = torch.cat([x for x, _ in loader]).mean(0)
    assert torch.allclose(soup["0.running_mean"], data_mean, atol=1e-5)
    assert torch.equal(model.state_dict()["0.running_mean"], soup["0.running_mean"])
    greedy = greedy_soup(states, lambda s: 0.0, model=model, bn_loader=loader)
    assert torch.allclose(greedy.state_dict["0.running_mean"], data_mean, atol=1e-5)


def test_ensemble_view_by_hand() -> None:
    model = nn.Linear(2, 3, bias=False)
    w1 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    w2 = torch.tensor([[0.0, 1.0], [1.0, 0.0], [-0.5, 0.5]])
    snapshots = [{"weight": w1}, {"weight": w2}]
    average = {"weight": (w1 + w2) / 2}
    x = torch.tensor([[1.0, 2.0], [2.0, -1.0], [0.0, 0.0]])
    view = ensemble_view(snapshots, average, model, [(x, torch.zeros(3))])

    p_ens = ((x @ w1.T).softmax(-1) + (x @ w2.T).softmax(-1)) / 2
    p_avg = (x @ average["weight"].T).softmax(-1)
    assert view["delta"] == pytest.approx(torch.linalg.vector_norm(w1 - w2).item() / 2)
    assert view["agreement"] == pytest.approx(
        (p_ens.argmax(-1) == p_avg.argmax(-1)).float().mean().item()
    )
    assert view["kl"] == pytest.approx(
        (p_ens * (p_ens / p_avg).log()).sum(-1).mean().item(), rel=1e-5
    )
    same = ensemble_view([average, average], average, model, [(x, torch.zeros(3))])
    assert same == pytest.approx({"delta": 0.0, "agreement": 1.0, "kl": 0.0}, abs=1e-7)


def test_ensemble_predict_single_checkpoint_is_the_model() -> None:
    model = _bn_model().eval()
    loader = _loader()
    out = ensemble_predict([model.state_dict()], model, loader)
    with torch.no_grad():
        assert torch.allclose(
            out["probs"], torch.cat([model(x).softmax(-1) for x, _ in loader]), atol=1e-6
        )


def test_bad_input(tmp_path) -> None:
    states = _states()
    with pytest.raises(ValueError, match="empty"):
        uniform_soup([])
    with pytest.raises(ValueError, match="empty"):
        greedy_soup([], lambda s: 0.0)
    with pytest.raises(ValueError, match="missing key 'n'"):
        uniform_soup([states[0], {"w": torch.zeros(2)}])
    with pytest.raises(ValueError, match="unexpected key 'bias'"):
        weighted_soup([states[0], {**states[1], "bias": torch.zeros(1)}], [1, 1])
    with pytest.raises(ValueError, match="key 'w' has shape \\(3,\\)"):
        greedy_soup(
            [states[0], {"w": torch.zeros(3), "n": torch.tensor(1)}], lambda s: 0.0, scores=[1, 0]
        )
    with pytest.raises(ValueError, match="scores"):
        weighted_soup(states, [1.0, -1.0])
    with pytest.raises(ValueError, match="2 checkpoints"):
        weighted_soup(states, [1.0])
    with pytest.raises(ValueError, match="temperature"):
        weighted_soup(states, [1.0, 2.0], temperature=0.0)
    for temperature in (float("inf"), float("nan")):  # issue 14, finding 7: inf was accepted
        with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
            weighted_soup(states, [1.0, 2.0], temperature=temperature)
    with pytest.raises(ValueError, match="needs a model"):
        uniform_soup(states, bn_loader=[torch.zeros(1)])
    with pytest.raises(ValueError, match="'0.weight'"):
        uniform_soup([nn.Linear(2, 2).state_dict()], model=nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="before any collect"):
        FGE().predict([], nn.Linear(2, 2))
    fge = FGE()
    fge.collect(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="'weight'"):
        fge.collect(nn.Linear(2, 3))
    torch.save([1, 2], tmp_path / "not_a_state.pt")
    with pytest.raises(ValueError, match="state_dict"):
        uniform_soup([tmp_path / "not_a_state.pt"])


def test_fge_collect_notices_a_replaced_layer_and_copies_current_values() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    fge = FGE()
    fge.collect(model)
    model[2] = nn.Linear(4, 2)
    with torch.no_grad():
        model[2].weight.fill_(5.0)
        model[1].running_mean.fill_(1.5)
    fge.collect(model)
    assert torch.equal(fge.members[1]["2.weight"], torch.full((2, 4), 5.0))
    assert torch.equal(fge.members[1]["1.running_mean"], torch.full((4,), 1.5))
    assert not torch.equal(fge.members[0]["2.weight"], fge.members[1]["2.weight"])
    model[2] = nn.Linear(4, 3)
    with pytest.raises(ValueError, match="collect: model: key '2.weight' has shape"):
        fge.collect(model)
    assert len(fge) == 2


def test_fge_member_file_is_never_half_written(tmp_path, monkeypatch) -> None:
    """A save that fails half-way (disk full) leaves no member, no partial file and an existing
    file of that name (from an earlier run) as it was; the next collection works."""
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    directory = tmp_path / "fge"
    directory.mkdir()
    earlier = b"member of an earlier run"
    (directory / "member_001.pt").write_bytes(earlier)
    fge = FGE(directory)
    fge.collect(model)
    torch.save({}, tmp_path / "plain.pt")
    assert (directory / "member_000.pt").stat().st_mode == (tmp_path / "plain.pt").stat().st_mode

    def save_fails_half_way(obj, f, *args, **kwargs):
        with open(f, "wb") as out:
            out.write(b"PK half a zip")
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", save_fails_half_way)
        with pytest.raises(OSError, match="No space left"):
            fge.collect(model)
    assert len(fge) == 1
    assert sorted(p.name for p in directory.iterdir()) == ["member_000.pt", "member_001.pt"]
    assert (directory / "member_001.pt").read_bytes() == earlier
    with torch.no_grad():
        model[0].weight.fill_(2.0)
    fge.collect(model)
    assert fge.members[1] == directory / "member_001.pt"
    saved = torch.load(fge.members[1])
    for key, value in model.state_dict().items():
        assert torch.equal(saved[key], value), key


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_fge_collect_from_gpu_equals_state_dict() -> None:
    model = nn.Sequential(nn.Linear(300, 400), nn.BatchNorm1d(400), nn.Linear(400, 2)).cuda()
    fge = FGE()
    for _ in range(2):
        with torch.no_grad():
            for p in model.parameters():
                p.normal_()
        fge.collect(model)
        for key, value in model.state_dict().items():
            assert fge.members[-1][key].device.type == "cpu"
            assert torch.equal(fge.members[-1][key], value.cpu()), key
