"""Data for the demo: MNIST-1D generated locally, scikit-learn's bundled digits
(both need no download) and CIFAR-10 from its python-pickle files on disk (no
torchvision)."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

__all__ = ["load_mnist1d", "load_digits", "load_cifar10", "load_data_set", "balanced_subset", "Batches"]


DATA_SETS = ("mnist1d", "digits", "cifar10")
# MNIST-1D's 4,000 training sequences take the demo's ResNet to 99.4% and
# leave the recipes nothing to separate; 1,000 (100 per class) leave about 5%
# of the test set to win or lose (docs/tricks.md, the data chosen by measurement).
DEFAULT_TRAIN_SIZE = {"mnist1d": 1000}


def load_data_set(name: str, data_dir: str | Path | None = None, train_size: int | None = None):
    """(x_train, y_train, x_test, y_test) of data set `name` (DATA_SETS), the
    training part cut to `train_size` examples balanced over the classes
    (default: DEFAULT_TRAIN_SIZE)."""
    if name == "mnist1d":
        data = load_mnist1d()
    elif name == "digits":
        data = load_digits()
    elif name == "cifar10":
        if not data_dir:
            raise ValueError("--data cifar10 needs --data-dir (the folder with cifar-10-batches-py)")
        data = load_cifar10(data_dir)
    else:
        raise ValueError(f"unknown data set {name!r} (one of {', '.join(DATA_SETS)})")
    size = train_size or DEFAULT_TRAIN_SIZE.get(name)
    return data if size is None else (*balanced_subset(data[0], data[1], size), *data[2:])


def balanced_subset(x, y, size: int):
    """The first size // classes examples of each class, in their order (the
    rest of `size` from the classes in turn)."""
    classes = int(y.max()) + 1
    if not classes <= size <= len(y):
        raise ValueError(f"train_size must be between the number of classes ({classes}) and {len(y)}, got {size}")
    per_class = [torch.nonzero(y == c).flatten() for c in range(classes)]
    take = [size // classes + (c < size % classes) for c in range(classes)]
    if any(n > len(idx) for n, idx in zip(take, per_class)):
        raise ValueError(f"train_size {size}: some class has fewer than {max(take)} examples")
    keep = torch.sort(torch.cat([idx[:n] for n, idx in zip(take, per_class)])).values
    return x[keep], y[keep]


def load_digits(test_fraction: float = 0.2, seed: int = 0):
    """(x_train, y_train, x_test, y_test): 1797 8x8 grey digits scaled to
    [0, 1] as [N, 1, 8, 8] float32, split per class with a fixed seed."""
    from sklearn.datasets import load_digits as sk_digits

    data = sk_digits()
    x = torch.from_numpy(data.images.astype(np.float32) / 16.0).unsqueeze(1)
    y = torch.from_numpy(data.target.astype(np.int64))
    return _split(x, y, test_fraction, seed)


def load_mnist1d(num_samples: int = 5000, seed: int = 42):
    """(x_train, y_train, x_test, y_test): MNIST-1D (Greydanus, 2020) as
    [N, 1, 40] float32, generated on the spot by the `mnist1d` package from its
    ten templates (no download). The defaults are the package's own: 4,000
    training and 1,000 test sequences, the published data set."""
    import random

    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as exc:  # an optional dependency (pip install fasttricks[demo])
        raise ImportError("MNIST-1D needs the mnist1d package: pip install mnist1d==0.0.2.post1") from exc
    args = get_dataset_args()
    args.num_samples, args.seed = num_samples, seed
    # The generator seeds numpy's and Python's global generators: leave them as they were.
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)

    def tensors(x, y):
        return (torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).unsqueeze(1),
                torch.from_numpy(np.asarray(y, dtype=np.int64)))

    return (*tensors(data["x"], data["y"]), *tensors(data["x_test"], data["y_test"]))


def _split(x, y, test_fraction, seed):
    g = torch.Generator().manual_seed(seed)
    train_idx, test_idx = [], []
    for c in torch.unique(y).tolist():  # stratified: the same share of every class
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_test = int(round(len(idx) * test_fraction))
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    tr, te = torch.cat(train_idx).sort().values, torch.cat(test_idx).sort().values
    return x[tr], y[tr], x[te], y[te]


def load_cifar10(data_dir: str | Path):
    """(x_train, y_train, x_test, y_test) from `cifar-10-batches-py` (the
    python version of CIFAR-10): uint8 [N, 3, 32, 32] scaled to [0, 1] and
    normalised per channel with the training set's mean and std."""
    root = Path(data_dir)
    if (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    files = [root / f"data_batch_{i}" for i in range(1, 6)]
    missing = [str(f) for f in files + [root / "test_batch"] if not f.exists()]
    if missing:
        raise FileNotFoundError(f"CIFAR-10 python files not found: {', '.join(missing)}")

    def read(path):
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="bytes")
        x = torch.from_numpy(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        return x, torch.tensor(d[b"labels"], dtype=torch.int64)

    parts = [read(f) for f in files]
    x_train = torch.cat([p[0] for p in parts]).float() / 255
    y_train = torch.cat([p[1] for p in parts])
    x_test, y_test = read(root / "test_batch")
    x_test = x_test.float() / 255
    mean = x_train.mean(dim=(0, 2, 3), keepdim=True)
    std = x_train.std(dim=(0, 2, 3), keepdim=True)
    return (x_train - mean) / std, y_train, (x_test - mean) / std, y_test


class Batches:
    """Shuffled mini-batches of in-memory tensors, reshuffled each epoch from
    (seed, epoch); `shard=(rank, world)` keeps this rank's slice of every
    global batch (DDP: the ranks together see exactly the global batch)."""

    def __init__(self, x, y, batch_size: int, shuffle: bool = True, seed: int = 0, drop_last: bool = False,
                 shard: tuple[int, int] = (0, 1)):
        self.x, self.y, self.batch_size, self.shuffle, self.seed = x, y, batch_size, shuffle, seed
        self.drop_last, self.shard, self.epoch = drop_last, shard, 0

    def __len__(self):
        n = len(self.x)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        n = len(self.x)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch))
        else:
            order = torch.arange(n)
        rank, world = self.shard
        for b in range(len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            if world > 1:
                idx = idx.chunk(world)[rank] if len(idx) >= world else idx[:0]
            yield self.x[idx], self.y[idx]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
