"""Oracle tests for swalab.update_bn: running statistics against statistics computed by hand."""

import os

import pytest
import torch
from torch import nn
from torch.optim import swa_utils

import swalab


def batches(sizes, features, seed=0, shape=()):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, features, *shape, generator=g) * 3 + 1 for n in sizes]


def expected_stats(inputs, dims):
    """torch's cumulative average (momentum=None): mean over batches of batch mean / unbiased var."""
    means = torch.stack([x.mean(dims) for x in inputs])
    variances = torch.stack([x.var(dims, unbiased=True) for x in inputs])
    return means.mean(0), variances.mean(0)


def linear_bn():
    torch.manual_seed(0)
    return nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 2))


def conv_bn():
    torch.manual_seed(0)
    return nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 2, 3))


@pytest.mark.parametrize("batch_format", ["tensor", "tuple", "dict", "forward_fn"])
def test_linear_bn_statistics_by_hand(batch_format):
    xs = batches([16, 16, 7], 4)
    model = linear_bn()
    model[0].momentum = 0.3
    model.eval()
    if batch_format == "tensor":
        loader, kwargs = xs, {}
    elif batch_format == "tuple":
        loader, kwargs = [(x, torch.zeros(len(x))) for x in xs], {}
    elif batch_format == "dict":
        loader, kwargs = [{"input": x} for x in xs], {"unpack": True}
        model = DictModel(model).eval()
    else:
        loader = [{"pixels": x, "label": 0} for x in xs]
        kwargs = {"forward_fn": lambda m, batch: m(batch["pixels"])}
    swalab.update_bn(loader, model, **kwargs)
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm1d))
    mean, var = expected_stats(xs, 0)
    torch.testing.assert_close(bn.running_mean, mean)
    torch.testing.assert_close(bn.running_var, var)
    assert bn.momentum == 0.3 and not model.training and int(bn.num_batches_tracked) == 3


class DictModel(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input):
        return self.inner(input)


def test_conv_bn_statistics_by_hand_and_same_as_torch():
    xs = batches([8, 8, 5], 3, shape=(6, 6))
    ours, theirs = conv_bn(), conv_bn()
    ours.train()
    swalab.update_bn([(x, 0) for x in xs], ours)
    swa_utils.update_bn([(x, 0) for x in xs], theirs)
    mean, var = expected_stats(xs, (0, 2, 3))
    torch.testing.assert_close(ours[0].running_mean, mean)
    torch.testing.assert_close(ours[0].running_var, var)
    assert torch.equal(ours[0].running_mean, theirs[0].running_mean)
    assert torch.equal(ours[0].running_var, theirs[0].running_var)
    assert ours.training and ours[0].momentum == 0.1


def test_tuple_input_is_unpacked_and_max_batches_limits_the_pass():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(4)

        def forward(self, x, scale):
            return self.bn(x * scale)

    xs = batches([10, 10, 10], 4)
    model = TwoInputs()
    swalab.update_bn([((x, 2.0), None) for x in xs], model, max_batches=2, unpack=True)
    mean, var = expected_stats([2 * x for x in xs[:2]], 0)
    torch.testing.assert_close(model.bn.running_mean, mean)
    torch.testing.assert_close(model.bn.running_var, var)


def test_updates_the_averaged_model():
    model = linear_bn()
    averaged = swalab.AveragedModel(model)
    averaged.update_parameters(model)
    xs = batches([5, 5], 4)
    swalab.update_bn(xs, averaged)
    torch.testing.assert_close(averaged.module[0].running_mean, expected_stats(xs, 0)[0])


def test_model_without_bn_is_left_alone_and_bad_limit_rejected():
    model = nn.Linear(4, 2)
    swalab.update_bn(batches([3], 4), model)
    with pytest.raises(ValueError, match="max_batches must be an integer >= 1, got 0"):
        swalab.update_bn(batches([3], 4), linear_bn(), max_batches=0)


def _rank_worker(rank, world, port, shards, out, weighting="batches"):
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    model = linear_bn()
    swalab.update_bn(shards[rank], model, weighting=weighting)
    torch.save({"mean": model[0].running_mean, "var": model[0].running_var}, f"{out}/{rank}.pt")
    torch.distributed.barrier()  # every rank done with gloo before it is torn down (a rank
    # destroyed while another still talks to it aborts that rank)
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_distributed_statistics_equal_single_process_over_all_data(tmp_path):
    xs = batches([8, 8, 8, 8, 8], 4)
    shards = [xs[:3], xs[3:]]  # unequal batch counts per rank
    port = 29500 + os.getpid() % 1000
    torch.multiprocessing.spawn(_rank_worker, args=(2, port, shards, str(tmp_path)), nprocs=2)
    mean, var = expected_stats(xs, 0)
    for rank in range(2):
        stats = torch.load(tmp_path / f"{rank}.pt")
        torch.testing.assert_close(stats["mean"], mean)
        torch.testing.assert_close(stats["var"], var)


def test_empty_loader_raises_before_resetting_statistics():
    """Issue 14, finding 4: update_bn([], model) silently reset the statistics to 0 and 1."""
    model = linear_bn()
    with torch.no_grad():
        model[0].running_mean.fill_(2.0)
    with pytest.raises(ValueError, match="yielded no batches"):
        swalab.update_bn([], model)
    with pytest.raises(ValueError, match="yielded no batches"):
        swalab.update_bn(iter(()), model)
    assert torch.equal(model[0].running_mean, torch.full((4,), 2.0))
    swalab.update_bn([], nn.Linear(2, 2))  # no BatchNorm: nothing to compute, nothing read


@pytest.mark.parametrize("max_batches", [1.5, float("inf"), True, 0])
def test_max_batches_must_be_a_positive_integer(max_batches):
    with pytest.raises(ValueError, match="max_batches"):
        swalab.update_bn(batches([4], 4), linear_bn(), max_batches=max_batches)


class DictInput(nn.Module):
    """A model that takes the whole dict batch as one argument, as torch's update_bn calls it."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(4)

    def forward(self, batch):
        return self.bn(batch["x"] * batch["scale"])


def test_torch_batch_convention_is_the_default_and_unpacking_is_asked_for():
    """Issue 23, class 1: a dict batch is passed whole, a tuple's first element is the input."""
    xs = batches([8, 8], 4)
    ours, theirs = DictInput(), DictInput()
    dict_batches = [{"x": x, "scale": 3.0} for x in xs]
    swalab.update_bn(dict_batches, ours)
    swa_utils.update_bn(dict_batches, theirs)
    mean, var = expected_stats([3 * x for x in xs], 0)
    for model in (ours, theirs):
        torch.testing.assert_close(model.bn.running_mean, mean)
        torch.testing.assert_close(model.bn.running_var, var)
    seen = []
    swalab.update_bn([[x, 1] for x in xs], _Recorder(seen))
    assert all(s is x for s, x in zip(seen, xs)) and len(seen) == 2  # model(batch[0]), as torch
    with pytest.raises(ValueError, match="forward_fn or unpack=True"):
        swalab.update_bn(xs, linear_bn(), forward_fn=lambda m, b: m(b), unpack=True)
    with pytest.raises(ValueError, match="unpack must be True or False, got 'yes'"):
        swalab.update_bn(xs, linear_bn(), unpack="yes")


class _Recorder(nn.Module):
    def __init__(self, seen) -> None:
        super().__init__()
        self.bn, self.seen = nn.BatchNorm1d(4), seen

    def forward(self, x):
        self.seen.append(x)
        return self.bn(x)


def sample_weighted_stats(inputs, dims):
    """The reference code's bn_update: batch statistics weighted by batch size, by hand."""
    sizes = torch.tensor([float(x.shape[0]) for x in inputs])
    means = torch.stack([x.mean(dims) for x in inputs])
    variances = torch.stack([x.var(dims, unbiased=True) for x in inputs])
    w = (sizes / sizes.sum()).reshape(-1, *[1] * (means.dim() - 1))
    return (w * means).sum(0), (w * variances).sum(0)


@pytest.mark.parametrize(
    "model_fn, dims, shape", [(linear_bn, 0, ()), (conv_bn, (0, 2, 3), (5, 5))]
)
def test_samples_weighting_with_a_short_last_batch_by_hand(model_fn, dims, shape):
    """weighting="samples" (timgaripov/swa bn_update: momentum = b / (n + b)) on 16 + 16 + 7 samples:
    the short batch counts 7/39 of the statistics, not 1/3 as in torch's convention."""
    xs = batches([16, 16, 7], 4 if model_fn is linear_bn else 3, shape=shape)
    xs[-1] = xs[-1] * 4 - 5  # a last batch unlike the others, so the two conventions differ
    model = model_fn()
    loader = [(x, torch.zeros(len(x))) for x in xs]
    swalab.update_bn(loader, model, weighting="samples")
    bn = model[0]
    mean, var = sample_weighted_stats(xs, dims)
    # by hand for one channel of the means, from the raw numbers
    c0 = torch.cat([x.movedim(1, -1).reshape(-1, x.shape[1])[:, 0] for x in xs])
    assert bn.running_mean[0].item() == pytest.approx(c0.mean().item(), rel=1e-5)
    torch.testing.assert_close(bn.running_mean, mean)
    torch.testing.assert_close(bn.running_var, var)
    assert int(bn.num_batches_tracked) == 3 and bn.momentum == 0.1
    equal_mean, _ = expected_stats(xs, dims)
    assert (bn.running_mean - equal_mean).abs().max() > 0.1  # the conventions really differ here
    swalab.update_bn(loader, model)  # the default stays torch's
    torch.testing.assert_close(bn.running_mean, equal_mean)


def test_samples_weighting_equals_batches_for_equal_batches_and_rejects_bad_input():
    xs = batches([8, 8, 8], 4)
    a, b = linear_bn(), linear_bn()
    swalab.update_bn(xs, a, weighting="samples")
    swalab.update_bn(xs, b)
    torch.testing.assert_close(a[0].running_var, b[0].running_var)
    with pytest.raises(ValueError, match="weighting must be one of batches, samples, got 'mean'"):
        swalab.update_bn(xs, a, weighting="mean")
    with pytest.raises(ValueError, match="no tensor with a batch dimension"):
        swalab.update_bn([{"x": 1}], a, weighting="samples", forward_fn=lambda m, b: None)
    assert swalab.bn.batch_size({"a": [torch.zeros(3, 2)], "b": torch.zeros(5)}) == 3


@pytest.mark.slow
def test_distributed_samples_weighting_equals_single_process(tmp_path):
    xs = batches([8, 8, 8, 8, 3], 4)
    shards = [xs[:3], xs[3:]]  # unequal sample counts per rank: 24 and 11
    port = 29500 + (os.getpid() + 500) % 1000
    torch.multiprocessing.spawn(
        _rank_worker, args=(2, port, shards, str(tmp_path), "samples"), nprocs=2
    )
    mean, var = sample_weighted_stats(xs, 0)
    for rank in range(2):
        stats = torch.load(tmp_path / f"{rank}.pt")
        torch.testing.assert_close(stats["mean"], mean)
        torch.testing.assert_close(stats["var"], var)


def test_lab_eval_context_and_config_carry_the_weighting():
    """The lab's BN passes (EvalContext.recompute_bn) follow train.bn_weighting; bad values refused."""
    from swalab.lab.config import ExperimentConfig, TrainConfig
    from swalab.lab.evaluation import EvalContext
    from swalab.lab.task import task_of

    xs = batches([16, 16, 7], 4)
    xs[-1] = xs[-1] * 4 - 5
    model = linear_bn()
    ctx = EvalContext(
        task_of("classification"), torch.device("cpu"), 8, lambda: iter(xs), None, None, "samples"
    )
    ctx.recompute_bn(model)
    torch.testing.assert_close(model[0].running_mean, sample_weighted_stats(xs, 0)[0])
    assert TrainConfig().bn_weighting == "batches"
    with pytest.raises(ValueError, match="train.bn_weighting"):
        ExperimentConfig(train=TrainConfig(bn_weighting="size"))
