import gzip
import hashlib
import pickle

import pytest
import torch

import nnopt_utils as nu
from nnopt_utils import data


def test_least_squares_condition_number():
    ds = nu.least_squares(200, 10, cond=100.0, seed=0)
    ev = torch.linalg.eigvalsh(ds.X.T @ ds.X)
    assert ev[-1] / ev[0] == pytest.approx(100.0, rel=1e-6)
    assert torch.equal(ds.X, nu.least_squares(200, 10, cond=100.0, seed=0).X)


def test_quadratic_spectrum_and_gradient():
    q = nu.quadratic(20, L=4.0, kappa=1e3, seed=1)
    assert q.L == pytest.approx(4.0) and q.kappa == pytest.approx(1e3, rel=1e-8)
    x = torch.randn(20, dtype=torch.float64, requires_grad=True)
    q.loss(x).backward()
    assert torch.allclose(x.grad, q.grad(x.detach()))
    assert q.loss(q.x_star).item() == 0.0
    with pytest.raises(ValueError, match="unknown spectrum 'flat'"):
        nu.quadratic(5, kappa=10, spectrum="flat")
    with pytest.raises(ValueError, match="exactly one of mu or kappa"):
        nu.quadratic(5)


def test_teacher_student_is_realizable():
    ds, teacher = nu.teacher_student(100, 5, width=3, n_test=20, seed=0)
    assert ds.X.shape == (100, 5) and ds.X_test.shape == (20, 5)
    assert torch.allclose(teacher(ds.X).squeeze(1), ds.y)


def test_gaussian_mixture_separation():
    ds = data.gaussian_mixture(3000, 4, k=3, sep=4.0, seed=0)
    means = torch.stack([ds.X[ds.y == c].mean(0) for c in range(3)])
    d = torch.cdist(means, means)
    assert torch.allclose(d[~torch.eye(3, dtype=bool)], torch.full((6,), 4.0), atol=0.2)


def test_modular_arithmetic_labels():
    ds = data.modular_arithmetic(7, "*", train_frac=0.5, seed=0)
    X = torch.cat([ds.X, ds.X_test])
    y = torch.cat([ds.y, ds.y_test])
    assert len(X) == 49 and torch.equal(y, (X[:, 0] * X[:, 1]) % 7)
    with pytest.raises(ValueError, match="unknown op '/'"):
        data.modular_arithmetic(7, "/")


def test_digits_offline_and_standardized():
    ds = nu.digits(seed=0)
    assert ds.X.shape[1] == 64 and len(ds) + len(ds.X_test) == 1797
    assert ds.X.mean().abs() < 1e-5 and set(ds.y.tolist()) == set(range(10))
    img = nu.digits(flatten=False, seed=0)
    assert img.X.shape[1:] == (1, 8, 8)


def _write_idx(path, tensor, code):
    header = bytes([0, 0, code, tensor.dim()]) + b"".join(
        int(s).to_bytes(4, "big") for s in tensor.shape)
    payload = tensor.numpy().astype(tensor.numpy().dtype.newbyteorder(">")).tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + payload)


def test_idx_reader_roundtrip_and_checksums(tmp_path, monkeypatch):
    root = tmp_path / "mnist"
    root.mkdir()
    imgs = torch.randint(0, 256, (6, 28, 28), dtype=torch.uint8)
    labels = torch.arange(6, dtype=torch.uint8)
    for prefix in ("train", "t10k"):
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", imgs, 0x08)
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels, 0x08)
    ds = data.load_idx_dataset(tmp_path, "mnist", verify=False)
    assert ds.X.shape == (6, 784) and torch.equal(ds.y, labels.long())
    assert torch.allclose(ds.X[0], imgs[0].flatten().float() / 255)
    with pytest.raises(ValueError, match="checksum mismatch"):
        data.load_idx_dataset(tmp_path, "mnist", verify=True)
    # a matching checksum passes
    sums = {f"mnist/{p.name}": hashlib.md5(p.read_bytes()).hexdigest() for p in root.iterdir()}
    monkeypatch.setattr(data, "KNOWN_MD5", sums)
    assert len(data.load_idx_dataset(tmp_path, "mnist")) == 6
    ints = torch.tensor([[1, -2], [70000, 3]], dtype=torch.int32)
    _write_idx(tmp_path / "ints.gz", ints, 0x0C)
    assert torch.equal(data.read_idx(tmp_path / "ints.gz"), ints)
    with pytest.raises(ValueError, match="unknown dataset 'kmnist'"):
        data.load_idx_dataset(tmp_path, "kmnist")


def test_cifar_reader(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": torch.randint(0, 256, (2, 3072), dtype=torch.uint8).numpy(),
                 b"labels": [1, 2]}
        (folder / name).write_bytes(pickle.dumps(batch))
    ds = data.load_cifar10(tmp_path)
    assert ds.X.shape == (10, 3, 32, 32) and ds.X_test.shape == (2, 3, 32, 32)
    with pytest.raises(FileNotFoundError):
        data.load_cifar10(tmp_path / "nowhere")
