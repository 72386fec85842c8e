"""Data: synthetic problems, scikit-learn's bundled digits, and opt-in file readers.

Nothing here touches the network. The default data of every chapter is either synthetic
(generated from a seed) or scikit-learn's bundled 8x8 digits (1,797 images, shipped inside
the package). Larger datasets (MNIST, Fashion-MNIST, CIFAR-10) are an opt-in: the reader
downloads the files once, and :func:`load_idx_dataset` / :func:`load_cifar10` read them
from disk, verifying checksums.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
from .config import generator

__all__ = [
    "Dataset",
    "Quadratic",
    "least_squares",
    "quadratic",
    "teacher_student",
    "gaussian_mixture",
    "modular_arithmetic",
    "digits",
    "read_idx",
    "load_idx_dataset",
    "load_cifar10",
    "KNOWN_MD5",
]


@dataclass
class Dataset:
    """Whole-dataset tensors: inputs ``X`` (n, ...) and targets ``y``; optional test split."""

    X: torch.Tensor
    y: torch.Tensor
    X_test: torch.Tensor | None = None
    y_test: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.X.shape[0]

    def to(self, device) -> "Dataset":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Dataset(move(self.X), move(self.y), move(self.X_test), move(self.y_test))


def _gen(seed: int) -> torch.Generator:
    return generator(seed)  # validates seed, applies NNOPT_SEED


def _positive(name: str, value, integer: bool = True) -> None:
    ok = (isinstance(value, int) and not isinstance(value, bool)) if integer else isinstance(
        value, (int, float)
    )
    if not ok or value <= 0:
        kind = "int" if integer else "number"
        raise ValueError(f"{name} must be a positive {kind}, got {value!r}")


def least_squares(
    n: int,
    d: int,
    *,
    noise: float = 0.0,
    cond: float | None = None,
    out_dim: int = 1,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> Dataset:
    """Linear regression data ``y = X w* + noise``.

    With ``cond`` the design's singular values are spaced geometrically from 1 down to
    ``1/sqrt(cond)``, so ``X^T X`` has condition number ``cond`` (when ``n >= d``).
    """
    _positive("n", n)
    _positive("d", d)
    _positive("out_dim", out_dim)
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise!r}")
    g = _gen(seed)
    X = torch.randn(n, d, generator=g, dtype=dtype)
    if cond is not None:
        if cond < 1:
            raise ValueError(f"cond must be >= 1, got {cond!r}")
        U, _, Vh = torch.linalg.svd(X, full_matrices=False)
        k = min(n, d)
        s = torch.logspace(0, -0.5 * torch.log10(torch.tensor(float(cond))).item(), k, dtype=dtype)
        X = (U * s) @ Vh * (n**0.5)
    w = torch.randn(d, out_dim, generator=g, dtype=dtype)
    y = X @ w + noise * torch.randn(n, out_dim, generator=g, dtype=dtype)
    return Dataset(X, y if out_dim > 1 else y.squeeze(1))


@dataclass
class Quadratic:
    """The quadratic ``f(x) = 1/2 (x - x*)^T A (x - x*)`` with known spectrum.

    ``L`` and ``mu`` are the largest and smallest eigenvalues of ``A``; ``kappa = L/mu``.
    """

    A: torch.Tensor
    x_star: torch.Tensor

    @property
    def eigenvalues(self) -> torch.Tensor:
        return torch.linalg.eigvalsh(self.A)

    @property
    def L(self) -> float:
        return float(self.eigenvalues[-1])

    @property
    def mu(self) -> float:
        return float(self.eigenvalues[0])

    @property
    def kappa(self) -> float:
        return self.L / self.mu

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        """``f(x)``; ``x`` may carry leading batch dimensions."""
        z = x - self.x_star
        return 0.5 * ((z @ self.A) * z).sum(-1)

    def grad(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.x_star) @ self.A


def quadratic(
    d: int,
    *,
    L: float = 1.0,
    mu: float | None = None,
    kappa: float | None = None,
    spectrum: str = "geometric",
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> Quadratic:
    """A random quadratic with eigenvalues between ``mu`` and ``L`` (or ``mu = L/kappa``).

    ``spectrum``: ``geometric`` or ``linear`` spacing of the eigenvalues, or ``extremes``
    (half at ``mu``, half at ``L``). Eigenvectors are a Haar-random orthogonal basis.
    """
    _positive("d", d)
    spectra = ("geometric", "linear", "extremes")
    if spectrum not in spectra:
        raise ValueError(f"unknown spectrum {spectrum!r}; choose one of: {', '.join(spectra)}")
    if (mu is None) == (kappa is None):
        raise ValueError("give exactly one of mu or kappa")
    if kappa is not None:
        if kappa < 1:
            raise ValueError(f"kappa must be >= 1, got {kappa!r}")
        mu = L / kappa
    if not 0 < mu <= L:
        raise ValueError(f"need 0 < mu <= L, got mu={mu!r}, L={L!r}")
    if d == 1 and mu != L:
        raise ValueError(f"d=1 has a single eigenvalue, so kappa must be 1 (mu = L); got "
                         f"mu={mu!r}, L={L!r} (kappa={L / mu:g})")
    g = _gen(seed)
    if spectrum == "geometric":
        lam = torch.logspace(torch.log10(torch.tensor(mu)).item(), torch.log10(torch.tensor(L)).item(),
                             d, dtype=dtype)
    elif spectrum == "linear":
        lam = torch.linspace(mu, L, d, dtype=dtype)
    else:
        lam = torch.full((d,), float(mu), dtype=dtype)
        lam[d // 2 :] = L
    lam[0], lam[-1] = mu, L
    Q, R = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=dtype))
    Q = Q * torch.sign(torch.diagonal(R))  # Haar measure
    A = (Q * lam) @ Q.T
    A = 0.5 * (A + A.T)
    x_star = torch.randn(d, generator=g, dtype=dtype)
    return Quadratic(A, x_star)


def teacher_student(
    n: int,
    d: int,
    *,
    width: int = 4,
    activation: str = "relu",
    noise: float = 0.0,
    n_test: int = 0,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> tuple[Dataset, torch.nn.Module]:
    """Gaussian inputs labelled by a random one-hidden-layer teacher network.

    The teacher is ``x -> a^T act(W x / sqrt(d))`` with ``W`` standard normal and output
    weights ``a = 1/sqrt(width)`` (Safran and Shamir's setting uses ``a = 1``). Returns the
    data and the teacher (an :class:`nnopt_utils.models.MLP`).
    """
    from .models import mlp

    _positive("n", n)
    _positive("d", d)
    if not isinstance(n_test, int) or isinstance(n_test, bool) or n_test < 0:
        raise ValueError(f"n_test must be a non-negative int, got {n_test!r}")
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise!r}")
    g = _gen(seed)
    teacher = mlp(d, [width], 1, activation=activation, bias=False, init="normal", std=1.0,
                  seed=seed + 10_000)
    with torch.no_grad():
        teacher.layers[0].weight.mul_(1.0 / d**0.5)
        teacher.layers[-1].weight.fill_(1.0 / width**0.5)
    teacher = teacher.to(dtype)
    X = torch.randn(n + n_test, d, generator=g, dtype=dtype)
    with torch.no_grad():
        y = teacher(X).squeeze(1)
    y = y + noise * torch.randn(y.shape, generator=g, dtype=dtype)
    ds = Dataset(X[:n], y[:n], X[n:] if n_test else None, y[n:] if n_test else None)
    return ds, teacher


def gaussian_mixture(
    n: int,
    d: int,
    *,
    k: int = 2,
    sep: float = 3.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Dataset:
    """``k`` isotropic unit-variance Gaussian classes with means ``sep`` apart on a simplex."""
    _positive("n", n)
    _positive("d", d)
    _positive("k", k)
    if k > d:
        raise ValueError(f"k={k} classes need d >= k dimensions, got d={d}")
    g = _gen(seed)
    means = torch.zeros(k, d, dtype=dtype)
    means[:, :k] = torch.eye(k, dtype=dtype) * sep / 2**0.5  # pairwise distances = sep
    means = means - means.mean(0)
    y = torch.randint(0, k, (n,), generator=g)
    X = means[y] + torch.randn(n, d, generator=g, dtype=dtype)
    return Dataset(X, y)


_OPS = {
    "+": lambda a, b, p: (a + b) % p,
    "-": lambda a, b, p: (a - b) % p,
    "*": lambda a, b, p: (a * b) % p,
}


def modular_arithmetic(p: int = 97, op: str = "+", *, train_frac: float = 0.5,
                       seed: int = 0) -> Dataset:
    """All pairs ``(a, b)`` with label ``a op b mod p``, split at random (Power et al., 2022).

    ``X`` holds integer pairs (n, 2); embed them with ``torch.nn.functional.one_hot``.
    """
    _positive("p", p)
    if op not in _OPS:
        raise ValueError(f"unknown op {op!r}; choose one of: {', '.join(_OPS)}")
    if not 0 < train_frac < 1:
        raise ValueError(f"train_frac must lie in (0, 1), got {train_frac!r}")
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    X = torch.stack([a.flatten(), b.flatten()], 1)
    y = _OPS[op](X[:, 0], X[:, 1], p)
    perm = torch.randperm(len(X), generator=_gen(seed))
    cut = int(train_frac * len(X))
    tr, te = perm[:cut], perm[cut:]
    return Dataset(X[tr], y[tr], X[te], y[te])


def digits(
    *,
    test_frac: float = 0.25,
    standardize: bool = True,
    flatten: bool = True,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device=None,
) -> Dataset:
    """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes) as whole tensors.

    Pixel values 0..16 are scaled to [0, 1]; with ``standardize`` each pixel is centred and
    scaled by the training split's statistics. ``flatten=False`` gives (n, 1, 8, 8) images.
    """
    from sklearn.datasets import load_digits

    if not 0 <= test_frac < 1:
        raise ValueError(f"test_frac must lie in [0, 1), got {test_frac!r}")
    raw = load_digits()
    X = torch.tensor(raw.data, dtype=dtype) / 16.0
    y = torch.tensor(raw.target, dtype=torch.long)
    perm = torch.randperm(len(X), generator=_gen(seed))
    X, y = X[perm], y[perm]
    n_test = int(round(test_frac * len(X)))
    Xtr, ytr, Xte, yte = X[n_test:], y[n_test:], X[:n_test], y[:n_test]
    if standardize:
        m, s = Xtr.mean(0), Xtr.std(0).clamp_min(1e-2)
        Xtr, Xte = (Xtr - m) / s, (Xte - m) / s
    if not flatten:
        Xtr, Xte = Xtr.view(-1, 1, 8, 8), Xte.view(-1, 1, 8, 8)
    ds = Dataset(Xtr, ytr, Xte if n_test else None, yte if n_test else None)
    return ds.to(device) if device is not None else ds


# ---------------------------------------------------------------------------------------
# Opt-in readers for files the reader has downloaded (never fetched here).

#: MD5 sums of the original distribution files
KNOWN_MD5 = {
    # MNIST (LeCun et al.)
    "mnist/train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "mnist/train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "mnist/t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "mnist/t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    # Fashion-MNIST (Xiao et al.)
    "fashion-mnist/train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "fashion-mnist/train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "fashion-mnist/t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "fashion-mnist/t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    # CIFAR-10 (Krizhevsky), python version: the archive and the files it extracts to
    "cifar-10/cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a",
    "cifar-10/data_batch_1": "c99cafc152244af753f735de768cd75f",
    "cifar-10/data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "cifar-10/data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "cifar-10/data_batch_4": "634d18415352ddfa80567beed471001a",
    "cifar-10/data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "cifar-10/test_batch": "40351d587109b95175f43aff81a1287e",
}

_IDX_DTYPES = {0x08: torch.uint8, 0x09: torch.int8, 0x0B: torch.int16, 0x0C: torch.int32,
               0x0D: torch.float32, 0x0E: torch.float64}


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _verify(path: Path, expected: str | None) -> None:
    if expected is not None and _md5(path) != expected:
        raise ValueError(f"checksum mismatch for {path}: md5 {_md5(path)}, expected {expected}")


def read_idx(path: str | Path, md5: str | None = None) -> torch.Tensor:
    """Read an IDX file (``.gz`` or raw), the format of MNIST and Fashion-MNIST (LeCun et al.).

    The header is ``0, 0, type code, ndim`` then ``ndim`` big-endian 32-bit sizes; the data
    are ``prod(sizes)`` big-endian values. With ``md5`` the file's checksum is verified first.
    A truncated or padded file raises a ``ValueError`` naming it.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; download the dataset files first")
    _verify(path, md5)
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # gzip: a truncated stream or not gzip at all
        raise ValueError(f"{path} cannot be read: {e}") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise ValueError(f"{path} is truncated: its header announces {ndim} dimensions")
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) - 4 - 4 * ndim != expected:
        raise ValueError(f"{path} holds {len(raw) - 4 - 4 * ndim} data bytes, but its header "
                         f"announces shape {tuple(shape)} of {dtype}, {expected} bytes "
                         "(truncated or corrupt file)")
    data = bytearray(raw[4 + 4 * ndim :])
    t = torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)
    if dtype.itemsize > 1:
        t = t.view(torch.uint8).view(-1, dtype.itemsize).flip(1).contiguous().view(dtype).flatten()
    return t.reshape(shape)


def load_idx_dataset(root: str | Path, name: str = "mnist", *, verify: bool = True,
                     flatten: bool = True) -> Dataset:
    """MNIST or Fashion-MNIST from ``root/<name>/*.gz`` files (the original four files)."""
    names = ("mnist", "fashion-mnist")
    if name not in names:
        raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(names)}")
    root = Path(root) / name
    parts = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        for kind, f in (("images", f"{prefix}-images-idx3-ubyte.gz"),
                        ("labels", f"{prefix}-labels-idx1-ubyte.gz")):
            md5 = KNOWN_MD5.get(f"{name}/{f}") if verify else None
            parts[split, kind] = read_idx(root / f, md5)
    def images(t):
        t = t.float() / 255.0
        return t.flatten(1) if flatten else t.unsqueeze(1)
    return Dataset(images(parts["train", "images"]), parts["train", "labels"].long(),
                   images(parts["test", "images"]), parts["test", "labels"].long())


class _Refused(pickle.UnpicklingError):
    """A pickle named a global that a CIFAR-10 batch never needs."""


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles a CIFAR-10 batch and nothing else.

    A pickle can name any importable callable and call it; this one resolves only the three
    globals a batch file refers to (NumPy's array reconstruction: ``_reconstruct``,
    ``ndarray``, ``dtype``). Dicts, lists, ints and byte strings need no global. Anything else,
    ``os.system`` for instance, is refused before it is looked up.
    """

    def __init__(self, file, path: Path):
        super().__init__(file, encoding="bytes")  # the files were written by Python 2
        self.path = path

    def find_class(self, module: str, name: str):
        import numpy as np

        reconstruct = np.empty(0).__reduce__()[0]  # numpy's own, wherever this version keeps it
        allowed = {
            # numpy < 2 (and the original files) say numpy.core, numpy >= 2 numpy._core
            ("numpy.core.multiarray", "_reconstruct"): reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): reconstruct,
            ("numpy", "ndarray"): np.ndarray,
            ("numpy", "dtype"): np.dtype,
        }
        if (module, name) not in allowed:
            raise _Refused(f"{self.path}: refusing to unpickle {module}.{name}; a CIFAR-10 "
                           "batch holds only dicts, lists, bytes and NumPy arrays (numpy "
                           "ndarray, dtype, _reconstruct)")
        return allowed[module, name]


def _cifar_batch(path: Path, md5: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One CIFAR-10 batch file: verified (when ``md5`` is given), unpickled restrictedly,
    and checked to hold ``data`` (n, 3072) uint8 and ``labels`` (n integers in 0..9)."""
    import numpy as np

    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; extract cifar-10-python.tar.gz there")
    _verify(path, md5)
    with open(path, "rb") as f:
        try:
            d = _CifarUnpickler(f, path).load()
        except _Refused:
            raise
        except Exception as e:  # truncated, not a pickle, or a malformed array
            raise ValueError(f"{path} is not a CIFAR-10 batch: {type(e).__name__}: {e}") from e
    data = d.get(b"data") if isinstance(d, dict) else None
    labels = d.get(b"labels") if isinstance(d, dict) else None
    ok = (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
          and data.shape[1] == 3072 and isinstance(labels, list) and len(labels) == len(data)
          and all(isinstance(v, int) and 0 <= v < 10 for v in labels))
    if not ok:
        raise ValueError(f"{path} is not a CIFAR-10 batch: expected a dict with b'data', a "
                         "uint8 array (n, 3072), and b'labels', n integers in 0..9")
    X = torch.from_numpy(data.copy()).view(-1, 3, 32, 32).float() / 255.0
    return X, torch.tensor(labels, dtype=torch.long)


def load_cifar10(root: str | Path, *, verify: bool = True) -> Dataset:
    """CIFAR-10 (Krizhevsky, 2009) from the extracted python version in
    ``root/cifar-10-batches-py`` (``data_batch_1`` .. ``data_batch_5`` and ``test_batch``).

    ``verify`` checks every batch file against the published MD5 sums in :data:`KNOWN_MD5`
    before reading it (and the archive ``root/cifar-10-python.tar.gz`` when it is present).
    Whatever ``verify``, the files are unpickled by a restricted unpickler that admits only
    the NumPy array pieces the format needs, so a tampered file cannot run code; it raises
    ``pickle.UnpicklingError`` naming the file.
    """
    root = Path(root)
    archive = root / "cifar-10-python.tar.gz"
    if verify and archive.exists():
        _verify(archive, KNOWN_MD5["cifar-10/cifar-10-python.tar.gz"])
    folder = root / "cifar-10-batches-py"
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} not found; extract cifar-10-python.tar.gz there")

    def batch(name):
        return _cifar_batch(folder / name, KNOWN_MD5[f"cifar-10/{name}"] if verify else None)

    train = [batch(f"data_batch_{i}") for i in range(1, 6)]
    Xte, yte = batch("test_batch")
    return Dataset(torch.cat([b[0] for b in train]), torch.cat([b[1] for b in train]), Xte, yte)
