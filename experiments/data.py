"""Datasets of Table 1 (and two stand-ins), the distributed sampler, and the on-device encoder
that turns a batch into the (T, B, 3, H, W) spike input of SpikingJelly's Spiking-ResNets.

Inputs follow the paper's code (github.com/EMI-Group/snn-temporal-fusion, single_gpu_test.py),
which feeds SpikingJelly's 3-channel ResNets unchanged: a 1-channel image is repeated to 3
channels before Poisson encoding (so the three copies fire independently), and the 2 polarity
channels of event frames get a third, all-zero channel.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, Sampler, TensorDataset

RESNET_CHANNELS = 3  # SpikingJelly's SpikingResNet.conv1 takes 3 channels


@dataclass(frozen=True)
class DataSpec:
    label: str             # as the paper's Table 1 names it
    kind: str              # "static": (C, H, W) in [0, 1]; "event": (T, 2, H, W) event counts
    shape: tuple           # one sample: (C, H, W); event data: (2, H, W) per frame
    classes: int
    train_size: int
    test_size: int


SPECS = {
    "mnist": DataSpec("MNIST", "static", (1, 28, 28), 10, 60000, 10000),
    "cifar10": DataSpec("CIFAR-10", "static", (3, 32, 32), 10, 50000, 10000),
    "nmnist": DataSpec("N-MNIST", "event", (2, 34, 34), 10, 60000, 10000),
    "dvs128_gesture": DataSpec("DvsGesture", "event", (2, 128, 128), 11, 1176, 288),
    # scikit-learn's 1797 8x8 digits: stratified 1437 / 360 split, padded to MNIST's shape.
    "digits": DataSpec("digits", "static", (1, 28, 28), 10, 1437, 360),
}

SYNTHETIC_NOTE = ("synthetic data: random inputs and labels of {label}'s shape; only the timings "
                  "mean something, the accuracy is chance by construction")


def spec_of(config: dict) -> DataSpec:
    """The shape and size of the data the config trains on (synthetic data copies its model)."""
    name = config["synthetic_like"] if config["dataset"] == "synthetic" else config["dataset"]
    return SPECS[name]


def load(config: dict) -> tuple[Dataset, Dataset]:
    """(train, test) datasets of ``config``; a sample is (x, label) with x as in ``DataSpec``."""
    name, root = config["dataset"], Path(config["data_root"])
    if name == "synthetic":
        spec = spec_of(config)
        return (SyntheticDataset(spec, config["T"], spec.train_size, seed=1),
                SyntheticDataset(spec, config["T"], spec.test_size, seed=2))
    if name == "digits":
        return digits()
    if name in ("mnist", "cifar10"):
        return tuple(_torchvision(name, root, train, config["download"]) for train in (True, False))
    return tuple(_spikingjelly(name, root, train, config["T"], config["event_split_by"])
                 for train in (True, False))


def digits() -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's bundled 8x8 digits as MNIST-shaped images: intensities 0..16 scaled to
    [0, 1], resized to 20x20 and padded to 28x28 (MNIST centres its digits in a 20x20 box)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.pad(F.interpolate(images, size=(20, 20), mode="bilinear", align_corners=False)
                   .clamp_(0.0, 1.0), (4, 4, 4, 4))
    labels = torch.tensor(bunch.target, dtype=torch.long)
    spec = SPECS["digits"]
    train, test = train_test_split(range(len(labels)), test_size=spec.test_size,
                                   stratify=bunch.target, random_state=0)
    train, test = torch.tensor(train), torch.tensor(test)
    return TensorDataset(images[train], labels[train]), TensorDataset(images[test], labels[test])


class SyntheticDataset(Dataset):
    """Random samples of a dataset's shape, generated per index (reproducible, no storage):
    static images uniform in [0, 1], event frames with 5% of the pixels holding one event."""

    def __init__(self, spec: DataSpec, T: int, length: int, seed: int):
        self.spec, self.T, self.length, self.seed = spec, T, length, seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        if self.spec.kind == "static":
            x = torch.rand(self.spec.shape, generator=g)
        else:
            x = (torch.rand((self.T,) + self.spec.shape, generator=g) < 0.05).float()
        return x, int(torch.randint(self.spec.classes, (), generator=g))


def _torchvision(name: str, root: Path, train: bool, download: bool) -> Dataset:
    from torchvision import datasets, transforms

    cls = datasets.MNIST if name == "mnist" else datasets.CIFAR10
    try:
        return cls(str(root), train=train, download=False, transform=transforms.ToTensor())
    except RuntimeError:
        if not download:
            raise FileNotFoundError(
                f"{SPECS[name].label} not found under {root} and download is false: set "
                f"download: true (needs a network) or point --data-root at a folder holding "
                f"torchvision's {cls.__name__} files") from None
    try:
        return cls(str(root), train=train, download=True, transform=transforms.ToTensor())
    except Exception as error:  # URLError, HTTPError, socket errors: no network
        raise FileNotFoundError(
            f"{SPECS[name].label} is not under {root} and downloading it failed ({error}). On a "
            f"machine with a network run once with --data-root {root}, or copy torchvision's "
            f"{cls.__name__} folder there, then pass --data-root") from None


_SJ_FOLDERS = {"nmnist": "NMNIST", "dvs128_gesture": "DVS128Gesture"}


def _spikingjelly(name: str, root: Path, train: bool, T: int, split_by: str) -> Dataset:
    if name == "nmnist":
        from spikingjelly.datasets.n_mnist import NMNIST as cls
    else:
        from spikingjelly.datasets.dvs128_gesture import DVS128Gesture as cls
    folder = root / _SJ_FOLDERS[name]
    if not (folder / "events_np").is_dir():
        files = cls.resource_url_md5()
        missing = [f for f, _, _ in files if not (folder / "download" / f).is_file()]
        if missing:
            listing = "\n".join(f"  {f}  from  {url}" for f, url, _ in files)
            raise FileNotFoundError(
                f"{SPECS[name].label} needs a manual download (SpikingJelly cannot fetch it). "
                f"Download these files:\n{listing}\ninto {folder / 'download'} ; missing now: "
                f"{', '.join(missing)}. On first use SpikingJelly extracts them and integrates "
                f"the events into frames under {folder} (this takes a while, once).")
    # SpikingJelly converts with a thread pool of os.cpu_count() workers on the first call.
    return cls(str(folder), train=train, data_type="frame", frames_number=T, split_by=split_by)


class ShardSampler(Sampler[int]):
    """One process's share of an epoch, in global-batch order.

    All processes draw the same permutation (seeded by ``seed`` and the epoch); process ``rank``
    of ``world`` takes positions rank, rank + world, ... So with a per-process batch of
    batch_size / world, local batch i of every process together is exactly global batch i of a
    one-process run, which is what lets N processes reproduce one. Training keeps whole global
    batches only (``drop_last``); testing keeps every sample once (no padding, unlike
    torch's DistributedSampler, which would count repeated test samples).
    """

    def __init__(self, size: int, batch_size: int, world: int = 1, rank: int = 0,
                 shuffle: bool = False, drop_last: bool = False, seed: int = 0):
        if batch_size % world:
            raise ValueError(f"batch_size {batch_size} must be divisible by the {world} processes")
        self.size, self.batch_size, self.world, self.rank = size, batch_size, world, rank
        self.shuffle, self.drop_last, self.seed, self.epoch = shuffle, drop_last, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        if self.drop_last:
            order = order[: self.size // self.batch_size * self.batch_size]
        return order[self.rank::self.world]

    def __iter__(self) -> Iterator[int]:
        return iter(self._order())

    def __len__(self) -> int:
        return len(self._order())

    def global_batches(self) -> int:
        full = self.size // self.batch_size
        return full if self.drop_last else math.ceil(self.size / self.batch_size)

    def global_batch_size(self, index: int) -> int:
        """Samples in global batch ``index`` (the last test batch may be short)."""
        return min(self.batch_size, self.size - index * self.batch_size)


class Encoder:
    """(x, label) batches -> (T, B, 3, H, W) float inputs on the device.

    Static images are Poisson-encoded here, on the device, from a generator reseeded per
    (repeat, epoch, phase); the random draws are made for the whole global batch and each process
    keeps its columns, so the spikes a sample gets do not depend on the number of processes
    (the draw costs T * B * C * H * W uniforms, small beside one convolution).
    """

    def __init__(self, spec: DataSpec, T: int, static_encoding: str, device: torch.device,
                 dtype: torch.dtype = torch.float32, world: int = 1, rank: int = 0):
        self.spec, self.T, self.static_encoding = spec, T, static_encoding
        self.device, self.dtype, self.world, self.rank = device, dtype, world, rank
        self.generator = torch.Generator(device=device)

    def reseed(self, seed: int) -> None:
        self.generator.manual_seed(seed)

    def __call__(self, x: Tensor, global_batch: int) -> Tensor:
        """x: (B, C, H, W) static or (B, T, 2, H, W) event, on the device; ``global_batch``:
        the size of the global batch this local batch belongs to."""
        if self.spec.kind == "event":
            if x.dim() != 5 or x.shape[1] != self.T:
                raise ValueError(f"event batch must be (B, T={self.T}, 2, H, W), got {tuple(x.shape)}")
            x = x.to(self.dtype).transpose(0, 1)  # (T, B, 2, H, W)
            zeros = x.new_zeros(x.shape[:2] + (RESNET_CHANNELS - x.shape[2],) + x.shape[3:])
            return torch.cat([x, zeros], dim=2).contiguous()
        if x.shape[1] == 1:
            x = x.expand(-1, RESNET_CHANNELS, -1, -1)
        x = x.to(self.dtype)
        if self.static_encoding == "direct":
            return x.unsqueeze(0).expand(self.T, *x.shape).contiguous()
        noise = torch.rand((self.T, global_batch) + tuple(x.shape[1:]), device=self.device,
                           generator=self.generator)
        return (noise[:, self.rank::self.world] < x).to(self.dtype)
