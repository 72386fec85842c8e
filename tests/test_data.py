import collections
import gzip
import hashlib
import os
import pickle
import struct

import numpy as np

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


def py2_cifar_batch(data, labels) -> bytes:
    """The bytes Python 2's ``cPickle.dump(batch, f, 2)`` writes for a CIFAR-10 batch: byte
    strings as STRING opcodes and the array through ``numpy.core.multiarray._reconstruct``."""
    def s(b):
        return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<i", len(b)) + b

    def i(v):
        return b"K" + bytes([v]) if 0 <= v < 256 else b"J" + struct.pack("<i", v)

    array = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + i(0) + b"\x85"
             + s(b"b") + b"\x87R"
             + b"(" + i(1) + b"(" + b"".join(i(n) for n in data.shape) + b"t"
             + b"cnumpy\ndtype\n" + s(b"u1") + i(0) + i(1) + b"\x87R"
             + b"(" + i(3) + s(b"|") + b"NNN" + b"J\xff\xff\xff\xffJ\xff\xff\xff\xff" + i(0)
             + b"tb" + b"\x89" + s(data.tobytes()) + b"tb")
    return (b"\x80\x02}(" + s(b"batch_label") + s(b"training batch") + s(b"data") + array
            + s(b"labels") + b"](" + b"".join(i(v) for v in labels) + b"e" + b"u.")


def write_cifar(root, make=None):
    """Fake CIFAR-10 batches (2 images each) in ``root/cifar-10-batches-py``; returns the
    images of the first file. ``make(data, labels)`` gives a file's bytes."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(exist_ok=True)
    g = np.random.default_rng(0)
    first = None
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        images = g.integers(0, 256, (2, 3072), dtype=np.uint8)
        first = images if first is None else first
        blob = (make or (lambda d, l: pickle.dumps({b"data": d, b"labels": l}, protocol=4)))(
            images, [1, 2])
        (folder / name).write_bytes(blob)
    return first


def cifar_sums(root):
    folder = root / "cifar-10-batches-py"
    return {f"cifar-10/{p.name}": hashlib.md5(p.read_bytes()).hexdigest()
            for p in folder.iterdir()}


@pytest.mark.parametrize("writer", ["python2", "python3"])
def test_cifar_reader(tmp_path, monkeypatch, writer):
    first = write_cifar(tmp_path, py2_cifar_batch if writer == "python2" else None)
    ds = data.load_cifar10(tmp_path, verify=False)
    assert ds.X.shape == (10, 3, 32, 32) and ds.X_test.shape == (2, 3, 32, 32)
    assert torch.equal(ds.X[0], torch.from_numpy(first[0]).view(3, 32, 32).float() / 255)
    assert ds.y.tolist() == [1, 2] * 5
    # verify=True checks every file against the published sums: these fakes fail ...
    with pytest.raises(ValueError, match="checksum mismatch for .*data_batch_1"):
        data.load_cifar10(tmp_path)
    # ... and pass once the sums are theirs
    monkeypatch.setattr(data, "KNOWN_MD5", {**data.KNOWN_MD5, **cifar_sums(tmp_path)})
    assert len(data.load_cifar10(tmp_path)) == 10
    with pytest.raises(FileNotFoundError):
        data.load_cifar10(tmp_path / "nowhere")


def test_cifar_published_checksums_are_known():
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    assert all(len(data.KNOWN_MD5[f"cifar-10/{n}"]) == 32 for n in names)
    assert data.KNOWN_MD5["cifar-10/data_batch_1"] == "c99cafc152244af753f735de768cd75f"


class Payload:
    """What an attacker pickles: unpickling it calls os.system."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_cifar_crafted_pickle_is_refused_and_nothing_runs(tmp_path, monkeypatch):
    write_cifar(tmp_path)
    marker = tmp_path / "pwned"
    evil = {b"data": Payload(marker), b"labels": [1, 2]}
    target = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    target.write_bytes(pickle.dumps(evil, protocol=4))
    # verified: the checksum refuses the file before it is opened as a pickle
    with pytest.raises(ValueError, match="checksum mismatch for .*data_batch_1"):
        data.load_cifar10(tmp_path)
    assert not marker.exists()
    # not verified, or a checksum table that lists the tampered file: the unpickler refuses
    for verify in (False, True):
        monkeypatch.setattr(data, "KNOWN_MD5", {**data.KNOWN_MD5, **cifar_sums(tmp_path)})
        with pytest.raises(pickle.UnpicklingError,
                           match=r"data_batch_1: refusing to unpickle (posix|nt|os)\.system"):
            data.load_cifar10(tmp_path, verify=verify)
        assert not marker.exists()
    # another global a batch never needs
    target.write_bytes(pickle.dumps({b"data": collections.OrderedDict(), b"labels": []}))
    with pytest.raises(pickle.UnpicklingError, match="refusing to unpickle collections"):
        data.load_cifar10(tmp_path, verify=False)


@pytest.mark.parametrize("content, match", [
    (pickle.dumps({b"data": np.zeros((2, 3072), dtype=np.float64), b"labels": [1, 2]},
                  protocol=4), "not a CIFAR-10 batch: expected a dict"),
    (pickle.dumps({b"data": np.zeros((2, 3072), dtype=np.uint8), b"labels": [1]}, protocol=4),
     "not a CIFAR-10 batch: expected a dict"),
    (pickle.dumps([1, 2], protocol=4), "not a CIFAR-10 batch: expected a dict"),
    (pickle.dumps({b"data": np.zeros((2, 3072), dtype=np.uint8), b"labels": [1, 2]},
                  protocol=4)[:-30], "not a CIFAR-10 batch"),
], ids=["float_data", "short_labels", "not_a_dict", "truncated"])
def test_cifar_malformed_batches_name_the_file(tmp_path, content, match):
    write_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(content)
    with pytest.raises(ValueError, match=f"test_batch is {match}"):
        data.load_cifar10(tmp_path, verify=False)


def test_idx_reader_closes_its_file_and_names_a_truncated_one(tmp_path, monkeypatch):
    imgs = torch.randint(0, 256, (6, 28, 28), dtype=torch.uint8)
    path = tmp_path / "imgs.gz"
    _write_idx(path, imgs, 0x08)
    opened = []
    real_open = gzip.open

    def tracking_open(*args, **kwargs):
        opened.append(real_open(*args, **kwargs))
        return opened[-1]

    monkeypatch.setattr(data.gzip, "open", tracking_open)
    assert torch.equal(data.read_idx(path), imgs)
    assert len(opened) == 1 and opened[0].closed
    monkeypatch.undo()
    # a file cut short: the payload is shorter than the header announces
    raw = gzip.decompress(path.read_bytes())
    short = tmp_path / "short.gz"
    short.write_bytes(gzip.compress(raw[:-100]))
    with pytest.raises(ValueError, match=r"short.gz holds 4604 data bytes, but its header "
                                         r"announces shape \(6, 28, 28\)"):
        data.read_idx(short)
    # a gzip stream cut short
    cut = tmp_path / "cut.gz"
    cut.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(ValueError, match="cut.gz cannot be read"):
        data.read_idx(cut)
    # a header cut inside the sizes
    head = tmp_path / "head.idx"
    head.write_bytes(bytes([0, 0, 0x08, 3, 0, 0]))
    with pytest.raises(ValueError, match="head.idx is truncated"):
        data.read_idx(head)


def test_quadratic_in_one_dimension_has_kappa_one():
    q = nu.quadratic(1, kappa=1.0, L=2.0)
    assert q.kappa == 1.0 and q.L == 2.0
    with pytest.raises(ValueError, match="d=1 has a single eigenvalue, so kappa must be 1"):
        nu.quadratic(1, kappa=10)
    with pytest.raises(ValueError, match="d=1 has a single eigenvalue"):
        nu.quadratic(1, mu=0.5, L=1.0)


@pytest.mark.parametrize("kw, match", [(dict(n_test=-4), "n_test must be a non-negative int, "
                                                         "got -4"),
                                       (dict(n_test=2.5), "n_test must be a non-negative int"),
                                       (dict(noise=-0.1), "noise must be >= 0"),
                                       (dict(d=0), "d must be a positive int, got 0")])
def test_teacher_student_bad_arguments(kw, match):
    args = dict(n=10, d=3)
    args.update(kw)
    n, d = args.pop("n"), args.pop("d")
    with pytest.raises(ValueError, match=match):
        nu.teacher_student(n, d, **args)
