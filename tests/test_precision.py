"""Mixed precision and channels_last in the training step (averages stay fp32), and training data
kept on the device with the batches of a loader that moves each batch."""

import copy
import dataclasses
import gc
import math
import os
import pickle
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from swalab.data import BatchLoader, load
from swalab.data.base import Split, fits_on_device, on_device
from swalab.data.images import NORMALIZATION, normalize_images, random_crop_flip
from swalab.lab.config import ConfigError, load_config
from swalab.lab.inputs import load_bundle
from swalab.lab.precision import Precision
from swalab.lab.trainer import train_run

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def mnist1d():
    return load("mnist1d", seed=0, val_size=500)


def test_bf16_on_the_cpu_trains_and_the_average_stays_fp32(tmp_path, mnist1d):
    sets = [
        "train.epochs=2",
        "pretrain.epochs=1",
        "methods=[{method: swa, options: {swa_start: 1}}]",
    ]
    fp32 = load_config("mnist1d", sets)
    bf16 = load_config("mnist1d", sets + ["train.precision=bf16"])
    a = train_run(fp32, fp32.methods[0], 0, mnist1d, tmp_path / "fp32" / "swa" / "seed0", CPU)
    b = train_run(bf16, bf16.methods[0], 0, mnist1d, tmp_path / "bf16" / "swa" / "seed0", CPU)
    assert b.status == "done" and all(math.isfinite(v) for v in b.metrics.values())
    assert b.metrics["test_accuracy"] > 40  # it learned (10 classes)
    assert b.metrics["train_loss"] != a.metrics["train_loss"]  # autocast was in effect
    average = torch.load(tmp_path / "bf16" / "swa" / "seed0" / "final.pt")
    floats = [v for v in average.values() if v.is_floating_point()]
    assert floats and all(v.dtype == torch.float32 for v in floats)
    pretrained = torch.load(
        tmp_path / "bf16" / "pretrain" / "seed0.pt"
    )  # pre-training autocasts too
    fp32_pretrained = torch.load(tmp_path / "fp32" / "pretrain" / "seed0.pt")
    assert all(v.dtype == fp32_pretrained[k].dtype for k, v in pretrained.items())
    assert not all(torch.equal(v, fp32_pretrained[k]) for k, v in pretrained.items())


def test_autocast_runs_the_forward_pass_in_bf16_and_keeps_weights_fp32():
    model = nn.Linear(4, 3)
    precision = Precision("bf16", False, CPU)
    with precision.autocast():
        out = model(torch.randn(2, 4))
    assert out.dtype == torch.bfloat16 and model.weight.dtype == torch.float32
    with Precision("fp32", False, CPU).autocast():
        assert model(torch.randn(2, 4)).dtype == torch.float32


def test_channels_last_formats_weights_and_batches_and_gives_the_same_step():
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    x, y = torch.randn(8, 3, 6, 6), torch.randint(0, 2, (8,))
    reference(x)  # materialise the lazy layer
    other = copy.deepcopy(reference)
    precision = Precision("fp32", True, CPU)
    precision.model(other)
    assert other[0].weight.is_contiguous(memory_format=torch.channels_last)
    batch = precision.inputs(x)
    assert batch.is_contiguous(memory_format=torch.channels_last) and torch.equal(batch, x)
    assert precision.inputs(torch.randn(8, 5)).is_contiguous()  # only 4-D tensors change format
    for model, inputs in ((reference, x), (other, batch)):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        loss = nn.functional.cross_entropy(model(inputs), y)
        Precision("fp32", False, CPU).backward_step(loss, optimizer)
    for p, q in zip(reference.parameters(), other.parameters()):
        torch.testing.assert_close(p, q)


def test_precision_refuses_fp16_on_the_cpu_and_unknown_values():
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device, got cpu"):
        Precision("fp16", False, CPU)
    with pytest.raises(
        ConfigError, match="train.precision must be one of fp32, bf16, fp16, got 'fp8'"
    ):
        Precision("fp8", False, CPU)
    with pytest.raises(ConfigError, match="train.precision must be one of"):
        load_config("mnist1d", ["train.precision=fp8"])


# --- train.compile -----------------------------------------------------------------------------


def test_compile_without_a_compiler_is_one_line_naming_the_key(monkeypatch):
    import swalab.lab.precision as precision_module

    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(precision_module.shutil, "which", lambda name: None)
    with pytest.raises(ConfigError) as error:
        Precision("fp32", False, CPU, compile=True)
    message = str(error.value)
    assert "train.compile on the CPU needs a C++ compiler (g++ or clang++" in message
    assert "set train.compile false" in message and "\n" not in message
    Precision("fp32", False, CPU)  # not asked: not checked


def test_compile_wraps_the_training_forward_only():
    model = nn.Linear(4, 3)
    assert Precision("fp32", False, CPU).compiled(model) is model
    if not shutil.which(os.environ.get("CXX") or "g++") and not shutil.which("clang++"):
        pytest.skip("no C++ compiler: train.compile cannot work here")
    net = Precision("fp32", False, CPU, compile=True).compiled(model)
    assert net is not model and net._orig_mod is model  # shares the parameters
    with pytest.raises(ConfigError, match="train.compile must be bool"):
        load_config("mnist1d", ["train.compile=maybe"])
    assert load_config("mnist1d", ["train.compile=true"]).train.compile


@pytest.mark.slow
def test_a_compiled_run_trains_like_an_eager_one_and_saves_plain_weights(tmp_path, mnist1d):
    if not shutil.which(os.environ.get("CXX") or "g++") and not shutil.which("clang++"):
        pytest.skip("no C++ compiler: train.compile cannot work here")
    sets = [
        "train.epochs=2",
        "data.train_size=300",
        "methods=[{method: swa, options: {swa_start: 1}}]",
    ]
    eager = load_config("mnist1d", sets)
    compiled = load_config("mnist1d", [*sets, "train.compile=true"])
    a = train_run(eager, eager.methods[0], 0, mnist1d, tmp_path / "a" / "swa" / "seed0", CPU)
    b = train_run(compiled, compiled.methods[0], 0, mnist1d, tmp_path / "b" / "swa" / "seed0", CPU)
    assert b.status == "done"
    for key, value in a.metrics.items():  # other kernels: rounding, amplified by 2 epochs of SGD
        assert b.metrics[key] == pytest.approx(value, rel=5e-3, abs=5e-3), key
    final = torch.load(tmp_path / "b" / "swa" / "seed0" / "final.pt")
    assert final.keys() == torch.load(tmp_path / "a" / "swa" / "seed0" / "final.pt").keys()


# --- data on the device ----------------------------------------------------------------------


def moved_batches(split, batch_size, generator, augment):
    """Today's loader, written out: permutation and augmentation drawn on the CPU from ``generator``
    each batch cut from the CPU split and moved."""
    order = torch.randperm(len(split), generator=generator)
    for start in range(0, len(split), batch_size):
        index = order[start : start + batch_size]
        yield augment(split.x[index], generator), split.y[index]


@pytest.mark.parametrize("keep", [True, False, None])
def test_batches_on_the_device_equal_todays_for_the_same_generator(keep):
    torch.manual_seed(0)
    split = Split(torch.randn(70, 3, 8, 8), torch.randint(0, 10, (70,)))

    def augment(x, g):
        return random_crop_flip(x, g, padding=2, flip=True, fill=torch.zeros(3))

    loader = BatchLoader(
        split,
        16,
        shuffle=True,
        generator=torch.Generator().manual_seed(5),
        augment=augment,
        device="cpu",
        keep_on_device=keep,
    )
    reference = torch.Generator().manual_seed(5)
    for _ in range(2):  # two epochs: the generator carries on identically
        got, want = list(loader), list(moved_batches(split, 16, reference, augment))
        assert len(got) == len(want) == 5
        for (x, y), (x0, y0) in zip(got, want):
            assert torch.equal(x, x0) and torch.equal(y, y0)


def test_split_is_copied_to_the_device_once_and_freed_with_it():
    split = Split(torch.randn(10, 2), torch.arange(10))
    meta = torch.device("meta")  # a device other than the split's, without a GPU
    first = BatchLoader(split, 4, device=meta, keep_on_device=True)
    second = BatchLoader(
        split, 4, shuffle=True, generator=torch.Generator(), device=meta, keep_on_device=True
    )
    batches = list(first) + list(second)
    assert [x.device.type for x, _ in batches] == ["meta"] * 6
    assert [x.shape[0] for x, _ in batches] == [4, 4, 2, 4, 4, 2]
    kept = on_device(split, meta)
    assert kept is on_device(split, meta) and kept.x.device.type == "meta"
    from swalab.data import base

    key = (id(split), "meta")
    assert key in base._ON_DEVICE
    del first, second, split, batches
    gc.collect()
    assert key not in base._ON_DEVICE


def test_fits_on_device_takes_a_quarter_of_free_cuda_memory(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (4000, 8000))
    cuda = torch.device("cuda", 0)
    assert fits_on_device(1000, cuda) and not fits_on_device(1001, cuda)
    assert fits_on_device(10**12, CPU)
    assert not fits_on_device(1, torch.device("meta"))


# --- images kept as uint8, normalised per batch --------------------------------------------------


def _fake_cifar10(root, n_train=25, n_test=8):
    """CIFAR-10 in torchvision's pickle layout with random pixels (no md5 check: see below)."""
    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    images = rng.integers(0, 256, (n_train + n_test, 3072), dtype=np.uint8)
    labels = rng.integers(0, 10, n_train + n_test).tolist()
    per = n_train // 5
    parts = {f"data_batch_{b + 1}": slice(b * per, (b + 1) * per) for b in range(5)}
    for name, part in {**parts, "test_batch": slice(n_train, None)}.items():
        with open(folder / name, "wb") as f:
            pickle.dump({"data": images[part], "labels": labels[part]}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [str(k) for k in range(10)]}, f)


def _as_today(split, normalization):
    """The split as it was held before: every image normalised up front, in fp32."""
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in NORMALIZATION[normalization])
    return Split((split.x.float() / 255 - mean) / std, split.y)


@pytest.fixture
def cifar_files(tmp_path, monkeypatch):
    import torchvision.datasets.cifar

    monkeypatch.setattr(
        torchvision.datasets.cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath)
    )
    _fake_cifar10(tmp_path / "data")
    return tmp_path / "data"


@pytest.mark.parametrize("keep", [True, False])
def test_uint8_images_give_todays_batches(cifar_files, keep):
    bundle = load("cifar10", root=str(cifar_files), val_size=4, normalization="vgg")
    assert bundle.train.x.dtype == torch.uint8 and bundle.train.x.shape == (21, 3, 32, 32)
    today = _as_today(bundle.train, "vgg")
    assert torch.equal(bundle.train.inputs(), today.x)
    with pytest.raises(ValueError, match="expects uint8 images, got torch.float32"):
        normalize_images(today.x, "vgg")  # would normalise a float split in place
    loaders = [
        BatchLoader(
            split,
            6,
            shuffle=True,
            generator=torch.Generator().manual_seed(3),
            augment=bundle.augment,
            device="cpu",
            keep_on_device=keep,
        )
        for split in (bundle.train, today)
    ]
    for _ in range(2):  # two epochs: two orders, two sets of crops and flips
        pairs = list(zip(*loaders, strict=True))
        assert len(pairs) == 4
        for (x, y), (x_today, y_today) in pairs:
            assert x.dtype == torch.float32
            assert torch.equal(x, x_today) and torch.equal(y, y_today)


def test_a_run_on_uint8_images_equals_todays_bit_for_bit(cifar_files, tmp_path):
    cfg = load_config(
        "mnist1d",
        [
            "data.name=cifar10",
            f"data.root={cifar_files}",
            "data.options={val_size: 4, normalization: resnet}",
            "model.name=small_cnn",
            "model.options={blocks: 2, hidden: 8, bn: true}",
            "train.epochs=2",
            "train.batch_size=8",
            "methods=[{method: swa, options: {swa_start: 1}}]",  # BN recomputation: decoded too
        ],
    )
    bundle = load_bundle(cfg, 0)
    today = dataclasses.replace(
        bundle, **{k: _as_today(getattr(bundle, k), "resnet") for k in ("train", "val", "test")}
    )
    results = []
    for name, data in (("uint8", bundle), ("today", today)):
        results.append(train_run(cfg, cfg.methods[0], 0, data, tmp_path / name / "swa" / "s0", CPU))
    assert results[0].status == "done" and results[0] == results[1]
    final = [torch.load(tmp_path / name / "swa" / "s0" / "final.pt") for name in ("uint8", "today")]
    assert all(torch.equal(v, final[1][k]) for k, v in final[0].items())
    curves = [
        (tmp_path / n / "swa" / "s0" / "metrics.jsonl").read_text() for n in ("uint8", "today")
    ]
    assert curves[0] == curves[1]
