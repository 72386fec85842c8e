"""Data-parallel training on ``torch.distributed`` (survey section 5.5).

Everything here runs on real worker processes that exchange tensors through a
``torch.distributed`` backend (gloo on CPUs, NCCL on GPUs); nothing is simulated in one
process. Three layers, read top to bottom:

1. **Launching.** :func:`launch` starts ``world_size`` processes (``spawn``), joins them into
   one process group through a rendezvous on a free loopback port (127.0.0.1 only), runs
   ``fn(rank, world_size, *args)`` in each and returns the results in rank order. A worker's
   exception is raised in the caller with the worker's traceback; workers still running at
   the timeout are killed; no process or port outlives the call. The same training code also
   runs under ``torchrun`` (:func:`main`, ``python -m nnopt_utils.distributed``).
2. **Communication.** Gradient compressors (:class:`Dense`, :class:`SignMajority`,
   :class:`TopK`, :class:`QSGD`), each an ``encode``/``decode`` pair around one collective,
   optionally with error feedback; every exchange counts the bytes a worker puts into the
   collective. :func:`average_parameters` is the one collective of local SGD.
3. **Training.** :func:`run_configs` trains one :class:`RunConfig` after another inside the
   workers (so one launch amortizes the seconds that starting processes costs):
   ``mode='ddp'`` wraps the model in ``DistributedDataParallel``; ``'local_sgd'`` averages
   parameters every ``H`` steps (Stich, 2019; Lin et al., 2020); ``'compressed'`` averages
   compressed gradients (Bernstein et al., 2018; Alistarh et al., 2017; Stich et al., 2018;
   Karimireddy et al., 2019). :func:`train_distributed` is the one-call front end.
4. **Large-batch theory, in one process.** :func:`optimal_step` (Ma, Bassily and Belkin,
   2018), :func:`gradient_noise_scale` (McCandlish et al., 2018) and a vectorized
   measurement of SGD's steps against batch size and step on least squares,
   :func:`least_squares_sgd_steps`. Data-parallel SGD *is* large-batch SGD, so these
   decide how far data parallelism pays.

Worker start-up is kept light: a worker imports ``torch`` and this module's few
dependencies, not the plotting stack that ``import nnopt_utils`` brings in.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import pickle
import socket
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import wait as _wait_ready
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn
from .config import generator
from .optim import SGD

__all__ = [
    "BACKENDS",
    "WorkerError",
    "launch",
    "init_from_env",
    "worker_device",
    "SHARDINGS",
    "shard_batches",
    "average_parameters",
    "flat_grad",
    "Compressor",
    "Dense",
    "SignMajority",
    "TopK",
    "QSGD",
    "COMPRESSORS",
    "make_compressor",
    "MODES",
    "RunConfig",
    "build_model",
    "run_configs",
    "train_distributed",
    "optimal_step",
    "gradient_noise_scale",
    "least_squares_sgd_steps",
    "least_squares_expected_steps",
    "main",
]

BACKENDS = ("gloo", "nccl")
LOOPBACK = "127.0.0.1"


# =======================================================================================
# 1. Launching worker processes

class WorkerError(RuntimeError):
    """A worker process failed; ``rank`` is the failing worker, ``worker_traceback`` its
    formatted traceback (also part of the message)."""

    def __init__(self, rank: int, summary: str, worker_traceback: str = ""):
        self.rank, self.summary, self.worker_traceback = rank, summary, worker_traceback
        msg = f"worker rank {rank} failed: {summary}"
        if worker_traceback:
            msg += f"\n\nWorker traceback (rank {rank}):\n{worker_traceback}"
        super().__init__(msg)


def _loopback_interface() -> str | None:
    """The name of the loopback network interface (``lo`` on Linux, ``lo0`` on macOS)."""
    try:
        names = [name for _, name in socket.if_nameindex()]
    except (OSError, AttributeError):  # pragma: no cover - platform without if_nameindex
        return None
    return next((n for n in names if n.startswith("lo")), None)


# A spawned worker first runs this code (``exec`` is a builtin, so it pickles by reference).
# It registers ``nnopt_utils`` as a bare package whose ``__path__`` is the package's own
# directory (where ``__init__.py`` lies), so submodules are found by the ordinary path
# finder however the package was installed (wheel, editable, source tree on ``PYTHONPATH``).
# The worker then imports only the submodules it uses, not the package's plotting stack (matplotlib,
# seaborn, scipy), which would cost seconds per worker. Attributes of the bare package
# resolve to submodules (``nu.train``), so code that runs in workers should import the
# submodules it needs.
_BOOTSTRAP = """
import importlib, sys, types
if "nnopt_utils" not in sys.modules:
    def _submodule(name):
        if name.startswith("_"):
            raise AttributeError(name)
        return importlib.import_module("nnopt_utils." + name)
    _pkg = types.ModuleType("nnopt_utils")
    _pkg.__path__ = [PACKAGE_DIR]
    _pkg.__getattr__ = _submodule
    sys.modules["nnopt_utils"] = _pkg
from nnopt_utils.distributed import _worker_main
_worker_main(PAYLOAD, CONN)
"""


#: after a first worker error, how long the launcher waits for the others to report theirs
_ERROR_GRACE_S = 3.0


def _worker_main(payload: bytes, conn) -> None:
    """Body of a launched worker: join the group, run ``fn``, send back the outcome."""
    rank = -1
    try:
        fn, args, spec = pickle.loads(payload)
        rank = spec["rank"]
        torch.set_num_threads(spec["threads"])
        os.environ.update(spec["env"])
        timeout = datetime.timedelta(seconds=spec["timeout"])
        if spec["backend"] == "nccl":  # one GPU per process (shared round-robin if fewer)
            torch.cuda.set_device(rank % torch.cuda.device_count())
        store = dist.TCPStore(LOOPBACK, spec["port"], spec["world_size"], is_master=False,
                              timeout=timeout)
        dist.init_process_group(spec["backend"], store=store, rank=rank,
                                world_size=spec["world_size"], timeout=timeout)
        message = ("ok", fn(rank, spec["world_size"], *args))
    except BaseException as exc:  # noqa: BLE001 - every failure goes back to the caller
        # the time of failure lets the caller tell a root cause from its consequences: a
        # worker that raises tears down the group, and its peers then fail in collectives
        message = ("error", f"{type(exc).__name__}: {exc}", traceback.format_exc(), time.time())
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    try:
        data = pickle.dumps(message)
    except Exception as exc:  # noqa: BLE001 - an unpicklable result is a worker error
        data = pickle.dumps(("error", f"result of rank {rank} cannot be pickled: {exc}",
                             traceback.format_exc(), time.time()))
    conn.send_bytes(data)
    conn.close()


def _stop(procs: list) -> None:
    """Terminate, then kill, every process still alive, and reap them all."""
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(timeout=3)
        if p.is_alive():
            p.kill()
            p.join()


def launch(
    fn: Callable[..., Any],
    world_size: int,
    *,
    args: Sequence[Any] = (),
    backend: str = "gloo",
    timeout: float = 120.0,
    threads: int = 1,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` worker processes; return the
    results as a list indexed by rank.

    Each worker is a fresh ``spawn``-ed Python process (so this works from Jupyter), joined
    into one ``torch.distributed`` process group with ``backend`` through a ``TCPStore`` that
    the caller hosts on a free loopback port; ``fn`` may use any collective. ``fn`` must be
    importable by the workers (a module-level function, e.g. :func:`run_configs`), and
    ``args`` and the results must pickle. Workers use ``threads`` intra-op threads each.

    Raises :class:`WorkerError` (with the worker's traceback) when a worker raises or dies:
    after the first failure the others get a few seconds to report, and the *earliest*
    failure is raised, since a crash makes its peers fail in their next collective. Raises
    ``TimeoutError`` when the workers have not all finished after ``timeout`` seconds. In
    every case all workers are terminated. Starting the processes costs
    about a second each (importing torch), so launch once per experiment, not per step.
    """
    if not callable(fn):
        raise ValueError(f"fn must be callable, got {fn!r}")
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("backend 'nccl' needs CUDA GPUs; use backend='gloo' on CPUs")
    if not (isinstance(timeout, (int, float)) and timeout > 0):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    if not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive int, got {threads!r}")
    env = {}
    lo = _loopback_interface()
    if lo is not None:  # keep gloo/NCCL traffic on the loopback interface
        env = {"GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", lo),
               "NCCL_SOCKET_IFNAME": os.environ.get("NCCL_SOCKET_IFNAME", lo)}
    # The caller hosts the rendezvous store on port 0 (the OS picks a free port), so no
    # other program can take the port between choosing and binding it.
    store = dist.TCPStore(LOOPBACK, 0, world_size, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=timeout))
    package_dir = os.path.dirname(os.path.abspath(__file__))  # the nnopt_utils directory
    ctx = torch.multiprocessing.get_context("spawn")
    procs, conns = [], []
    try:
        for rank in range(world_size):
            spec = dict(rank=rank, world_size=world_size, backend=backend, port=store.port,
                        timeout=timeout, threads=threads,
                        env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank),
                             "WORLD_SIZE": str(world_size), "MASTER_ADDR": LOOPBACK,
                             "MASTER_PORT": str(store.port)})
            payload = pickle.dumps((fn, tuple(args), spec))
            recv, send = ctx.Pipe(duplex=False)
            p = ctx.Process(target=exec, daemon=True, name=f"nnopt-worker-{rank}",
                            args=(_BOOTSTRAP, {"PACKAGE_DIR": package_dir,
                                               "PAYLOAD": payload, "CONN": send}))
            p.start()
            send.close()  # the worker holds the only write end: EOF means it died
            procs.append(p)
            conns.append(recv)
        results: dict[int, Any] = {}
        errors: dict[int, tuple] = {}
        pending = dict(enumerate(conns))
        deadline = time.monotonic() + timeout
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if errors:
                    break
                raise TimeoutError(f"workers {sorted(pending)} of {world_size} did not finish "
                                   f"within {timeout:g} s; killed all workers")
            for conn in _wait_ready(list(pending.values()), timeout=remaining):
                rank = next(r for r, c in pending.items() if c is conn)
                del pending[rank]
                try:
                    message = pickle.loads(conn.recv_bytes())
                except EOFError:
                    procs[rank].join(timeout=3)
                    message = ("error", f"process exited with code {procs[rank].exitcode} "
                                        "before returning a result", "", time.time())
                if message[0] == "error":
                    if not errors:  # give the peers a moment to report their own failures
                        deadline = min(deadline, time.monotonic() + _ERROR_GRACE_S)
                    errors[rank] = message
                else:
                    results[rank] = message[1]
        if errors:  # the earliest failure is the cause; later ones are its consequences
            rank, message = min(errors.items(), key=lambda item: item[1][3])
            raise WorkerError(rank, message[1], message[2])
        return [results[r] for r in range(world_size)]
    finally:
        _stop(procs)
        for c in conns:
            c.close()
        for p in procs:
            p.close()
        del store  # closes the rendezvous port


def init_from_env(backend: str | None = None) -> tuple[int, int]:
    """Join the process group described by ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and
    ``MASTER_PORT`` (what ``torchrun`` sets); return ``(rank, world_size)``.

    ``backend`` defaults to NCCL when CUDA is available, gloo otherwise.
    """
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
               if k not in os.environ]
    if missing:
        raise ValueError(f"environment variables {missing} are not set; start the script with "
                         "torchrun (or use launch())")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    if backend == "nccl":  # one GPU per process, chosen before NCCL sets up
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method="env://")
    return dist.get_rank(), dist.get_world_size()


def worker_device() -> torch.device:
    """The device of this worker: its GPU under NCCL, the CPU under gloo."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# =======================================================================================
# 2. Communication: parameter averaging and gradient compression

SHARDINGS = ("strided", "contiguous")


def shard_batches(n: int, rank: int, world_size: int, batch_size: int, steps: int, *,
                  seed: int = 0, sharding: str = "strided") -> Iterator[torch.Tensor]:
    """Yield ``steps`` index tensors (into the whole dataset of size ``n``) for worker ``rank``.

    The data are split into ``world_size`` disjoint shards and each worker reshuffles its own
    shard every epoch. ``sharding='strided'`` gives worker ``r`` the samples
    ``r, r + world_size, ...``: every shard looks like the whole data set, even when the data
    are stored sorted. ``'contiguous'`` gives it the ``r``-th consecutive block (the first
    ``n % world_size`` blocks one sample longer): on data sorted by label the shards hold
    different classes, the heterogeneous (non-i.i.d.) setting of federated learning. The
    concatenation over ranks of step ``t``'s indices is the combined batch that data-parallel
    SGD effectively uses.
    """
    from .train import batches

    if sharding not in SHARDINGS:
        raise ValueError(f"unknown sharding {sharding!r}; choose one of: {', '.join(SHARDINGS)}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, {world_size}), got {rank!r}")
    if sharding == "strided":
        shard = torch.arange(rank, n, world_size)
    else:
        bounds = [r * (n // world_size) + min(r, n % world_size) for r in range(world_size + 1)]
        shard = torch.arange(bounds[rank], bounds[rank + 1])
    if batch_size > len(shard):
        raise ValueError(f"batch_size {batch_size} exceeds the shard size {len(shard)} "
                         f"(n={n}, world_size={world_size})")
    for idx in batches(len(shard), batch_size, steps, seed=seed * 1000 + rank):
        yield shard if idx is None else shard[idx]


def flat_grad(model: nn.Module) -> torch.Tensor:
    """All parameter gradients of ``model`` concatenated into one vector (zeros if none)."""
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                      for p in model.parameters()])


def _set_flat_grad(model: nn.Module, vec: torch.Tensor) -> None:
    offset = 0
    for p in model.parameters():
        n = p.numel()
        p.grad = vec[offset:offset + n].view_as(p).clone()
        offset += n


@torch.no_grad()
def average_parameters(model: nn.Module) -> int:
    """Replace every worker's parameters by their average over the group (one all-reduce of
    the flattened parameters); return the bytes this worker sent, ``4 d`` in float32."""
    params = list(model.parameters())
    vec = torch.cat([p.reshape(-1) for p in params])
    dist.all_reduce(vec)
    vec /= dist.get_world_size()
    offset = 0
    for p in params:
        p.copy_(vec[offset:offset + p.numel()].view_as(p))
        offset += p.numel()
    return vec.numel() * vec.element_size()


def _pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Pack a 0/1 vector into bytes, 8 entries per byte (little-endian within a byte)."""
    pad = (-bits.numel()) % 8
    b = torch.cat([bits.to(torch.uint8), bits.new_zeros(pad, dtype=torch.uint8)]).view(-1, 8)
    weights = (2 ** torch.arange(8, device=bits.device)).to(torch.uint8)
    return (b * weights).sum(1, dtype=torch.uint8)


def _unpack_bits(packed: torch.Tensor, d: int) -> torch.Tensor:
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    return ((packed.unsqueeze(-1) >> shifts) & 1).reshape(*packed.shape[:-1], -1)[..., :d]


class Compressor:
    """Average a gradient over the workers through a compressed message.

    A subclass defines ``encode(p) -> message`` (one flat tensor, so that one collective
    carries it) and ``decode(message, d) -> tensor``; :meth:`exchange` all-gathers the
    messages and averages their decodings. With ``error_feedback`` the worker adds back what compression dropped
    before (Stich et al., 2018; Karimireddy et al., 2019):

    .. math:: p_t = g_t + e_t, \\qquad \\Delta_t = C(p_t), \\qquad e_{t+1} = p_t - \\Delta_t,

    and the update uses the average of the :math:`\\Delta_t` over workers. ``bytes_sent``
    accumulates the size of every message this worker put into a collective.
    """

    name = "base"

    def __init__(self, error_feedback: bool = False):
        self.error_feedback = bool(error_feedback)
        self.memory: torch.Tensor | None = None
        self.bytes_sent = 0

    def encode(self, p: torch.Tensor) -> torch.Tensor:
        """The message this worker sends for the vector ``p`` (one flat tensor)."""
        raise NotImplementedError

    def decode(self, message: torch.Tensor, d: int) -> torch.Tensor:
        """The ``d``-dimensional float32 vector a message stands for."""
        raise NotImplementedError

    def message_bytes(self, d: int) -> int:
        """Bytes of one message for a ``d``-dimensional vector (the formula the tests pin)."""
        raise NotImplementedError

    def combine(self, decoded: torch.Tensor) -> torch.Tensor:
        """Aggregate the (world_size, d) decoded messages: their mean."""
        return decoded.mean(0)

    def exchange(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """All-gather the messages; return (aggregate over workers, this worker's C(p))."""
        message = self.encode(p)
        self.bytes_sent += message.numel() * message.element_size()
        parts = [torch.empty_like(message) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, message)
        decoded = torch.stack([self.decode(m, p.numel()) for m in parts]).to(p.dtype)
        return self.combine(decoded), decoded[dist.get_rank()]

    def __call__(self, g: torch.Tensor) -> torch.Tensor:
        """The gradient estimate every worker applies, from this worker's gradient ``g``."""
        p = g + self.memory if (self.error_feedback and self.memory is not None) else g
        aggregate, local = self.exchange(p)
        if self.error_feedback:
            self.memory = p - local
        return aggregate


class Dense(Compressor):
    """No compression: an all-reduce of the float32 gradient, ``4 d`` bytes per step."""

    name = "none"

    def message_bytes(self, d: int) -> int:
        return 4 * d

    def exchange(self, p):
        buf = p.to(torch.float32).clone()
        self.bytes_sent += buf.numel() * buf.element_size()
        dist.all_reduce(buf)
        return (buf / dist.get_world_size()).to(p.dtype), p


class SignMajority(Compressor):
    """signSGD with majority vote (Bernstein et al., 2018): each worker sends the signs of its
    gradient packed 8 to a byte (``ceil(d/8)`` bytes); the update is
    :math:`\\operatorname{sign}(\\sum_i \\operatorname{sign}(g_i))` (0 on a tie).

    Its steps have entries of size 1 whatever the gradient's scale, so it takes a much
    smaller learning rate than SGD."""

    name = "sign"

    def message_bytes(self, d: int) -> int:
        return math.ceil(d / 8)

    def encode(self, p):
        return _pack_bits(p >= 0)

    def decode(self, message, d):
        return _unpack_bits(message, d).to(torch.float32) * 2 - 1

    def combine(self, decoded):
        return torch.sign(decoded.sum(0))


class TopK(Compressor):
    """Top-k sparsification: send the ``k = max(1, round(ratio d))`` largest-magnitude entries
    as float32 values and int32 indices (one int32 message: the values' bits, then the
    indices), ``8 k`` bytes per step. Biased; pair it with
    ``error_feedback=True`` (Stich et al., 2018)."""

    name = "topk"

    def __init__(self, ratio: float = 0.01, error_feedback: bool = False):
        if not 0 < ratio <= 1:
            raise ValueError(f"ratio must lie in (0, 1], got {ratio!r}")
        super().__init__(error_feedback)
        self.ratio = float(ratio)

    def k(self, d: int) -> int:
        """Entries sent for a ``d``-dimensional vector."""
        return max(1, round(self.ratio * d))

    def message_bytes(self, d: int) -> int:
        return 8 * self.k(d)

    def encode(self, p):
        idx = p.abs().topk(self.k(p.numel()), sorted=False).indices
        return torch.cat([p[idx].to(torch.float32).view(torch.int32), idx.to(torch.int32)])

    def decode(self, message, d):
        values, idx = message.view(2, -1)
        values = values.view(torch.float32)
        return values.new_zeros(d).index_put_((idx.long(),), values)


class QSGD(Compressor):
    """QSGD (Alistarh et al., 2017) with ``s`` levels: :math:`Q(v)_i = \\|v\\|_2 \\,
    \\operatorname{sign}(v_i)\\, \\xi_i / s` with :math:`\\xi_i` the stochastic rounding of
    :math:`s |v_i| / \\|v\\|_2` to a neighbouring integer, so :math:`\\E Q(v) = v`. Sends the
    float32 norm and one signed int8 level per entry as one byte message, ``4 + d`` bytes
    (``s <= 127``); the
    paper's Elias coding of the sparse levels would send fewer."""

    name = "qsgd"

    def __init__(self, levels: int = 4, error_feedback: bool = False, seed: int = 0):
        if not isinstance(levels, int) or not 1 <= levels <= 127:
            raise ValueError(f"levels must be an int in [1, 127], got {levels!r}")
        super().__init__(error_feedback)
        self.levels = levels
        self.seed = seed
        self._gen: torch.Generator | None = None

    def message_bytes(self, d: int) -> int:
        return 4 + d

    def encode(self, p):
        if self._gen is None or self._gen.device != p.device:
            rank = dist.get_rank() if dist.is_initialized() else 0
            self._gen = generator(self.seed * 1000 + rank, device=p.device)
        norm = p.norm().to(torch.float32).reshape(1)
        scaled = p.abs() / norm.clamp_min(1e-30) * self.levels
        low = scaled.floor()
        level = low + (torch.rand(p.shape, generator=self._gen, device=p.device, dtype=p.dtype)
                       < scaled - low)
        levels = (torch.sign(p) * level).to(torch.int8)
        return torch.cat([norm.view(torch.uint8), levels.view(torch.uint8)])

    def decode(self, message, d):
        norm = message[:4].view(torch.float32)
        level = message[4:].view(torch.int8)
        return norm * level.to(torch.float32) / self.levels


COMPRESSORS = {"none": Dense, "sign": SignMajority, "topk": TopK, "qsgd": QSGD}


def make_compressor(name: str, *, ratio: float = 0.01, levels: int = 4,
                    error_feedback: bool = False, seed: int = 0) -> Compressor:
    """The compressor ``name`` (``none``, ``sign``, ``topk``, ``qsgd``) with its options."""
    if name not in COMPRESSORS:
        raise ValueError(f"unknown compressor {name!r}; choose one of: {', '.join(COMPRESSORS)}")
    if name == "topk":
        return TopK(ratio, error_feedback)
    if name == "qsgd":
        return QSGD(levels, error_feedback, seed)
    return COMPRESSORS[name](error_feedback)


# =======================================================================================
# 3. Training inside the workers

MODES = ("ddp", "local_sgd", "compressed")


@dataclass
class RunConfig:
    """One data-parallel training run (an MLP with SGD) to do inside the workers.

    Attributes
    ----------
    mode
        ``ddp`` (DistributedDataParallel: gradients averaged every step), ``local_sgd``
        (each worker takes ``H`` local SGD steps, then parameters are averaged; also after
        the last step, so the run ends with one model), or ``compressed`` (gradients
        averaged through ``compressor``).
    batch_size
        Per worker; the effective batch is ``world_size * batch_size``.
    sharding
        How the data are split over the workers (see :func:`shard_batches`).
    eval_every
        The full training loss is recorded every so many steps and at the end. For local
        SGD it is the loss of the workers' average, computed without changing them (a
        measurement, not counted as communication), so any ``eval_every`` works with any
        ``H``.
    return_params
        Also return the final parameters (for equivalence checks).
    """

    mode: str = "ddp"
    hidden: tuple[int, ...] = (64,)
    activation: str = "relu"
    loss: str = "cross_entropy"
    lr: float = 0.1
    steps: int = 100
    batch_size: int = 16
    sharding: str = "strided"
    H: int = 1
    compressor: str = "none"
    ratio: float = 0.01
    levels: int = 4
    error_feedback: bool = False
    seed: int = 0
    dtype: str = "float32"
    eval_every: int = 10
    return_params: bool = False
    tag: str = ""
    extra: dict = field(default_factory=dict)

    def validate(self) -> "RunConfig":
        """Check every field; return ``self`` (raises ``ValueError`` naming a bad value)."""
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; choose one of: {', '.join(MODES)}")
        if self.compressor not in COMPRESSORS:
            raise ValueError(f"unknown compressor {self.compressor!r}; choose one of: "
                             f"{', '.join(COMPRESSORS)}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"unknown dtype {self.dtype!r}; choose one of: float32, float64")
        for name in ("steps", "batch_size", "H", "eval_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.sharding not in SHARDINGS:
            raise ValueError(f"unknown sharding {self.sharding!r}; choose one of: "
                             f"{', '.join(SHARDINGS)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")
        return self


def build_model(cfg: RunConfig, in_dim: int, out_dim: int) -> nn.Module:
    """The MLP of ``cfg`` (Kaiming init with ``cfg.seed``, so every worker builds the same)."""
    from .models import mlp

    model = mlp(in_dim, list(cfg.hidden), out_dim, activation=cfg.activation, seed=cfg.seed)
    return model.to(getattr(torch, cfg.dtype))


def _full_loss(model: nn.Module, X: torch.Tensor, y: torch.Tensor, loss_fn) -> float:
    with torch.no_grad():
        return float(loss_fn(model(X), y))


def _train_one(cfg: RunConfig, rank: int, world: int, X: torch.Tensor, y: torch.Tensor) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from .train import LOSSES

    cfg.validate()
    device = worker_device()
    dtype = getattr(torch, cfg.dtype)
    X = X.to(device, dtype)
    y = y.to(device) if y.dtype == torch.long else y.to(device, dtype)
    out_dim = int(y.max()) + 1 if cfg.loss == "cross_entropy" else (1 if y.dim() == 1 else y.shape[1])
    loss_fn = LOSSES[cfg.loss]
    model = build_model(cfg, X.shape[1], out_dim).to(device)
    comm = {"bytes": 0}
    net: nn.Module = model
    if cfg.mode == "ddp":
        def counting_allreduce(state: dict, bucket):
            # DDP's default hook (average = divide, then all-reduce), plus a byte count
            buf = bucket.buffer()
            state["bytes"] += buf.numel() * buf.element_size()
            buf.div_(world)
            return dist.all_reduce(buf, async_op=True).get_future().then(lambda f: f.value()[0])

        net = DDP(model, device_ids=None if device.type == "cpu" else [device])
        net.register_comm_hook(comm, counting_allreduce)
    compressor = (make_compressor(cfg.compressor, ratio=cfg.ratio, levels=cfg.levels,
                                  error_feedback=cfg.error_feedback, seed=cfg.seed)
                  if cfg.mode == "compressed" else None)
    opt = SGD(net.parameters(), lr=cfg.lr)
    record = {"step": [], "loss": [], "rounds": [], "bytes": []}
    rounds, diverged = 0, False

    def log(t: int) -> bool:
        evaluated = model
        if cfg.mode == "local_sgd" and t % cfg.H and t != cfg.steps:
            evaluated = copy.deepcopy(model)          # the workers differ: measure their average
            average_parameters(evaluated)
        value = _full_loss(evaluated, X, y, loss_fn)
        record["step"].append(t)
        record["loss"].append(value)
        record["rounds"].append(rounds)
        record["bytes"].append(comm["bytes"] if compressor is None else compressor.bytes_sent)
        return math.isfinite(value)

    log(0)
    batches = shard_batches(len(X), rank, world, cfg.batch_size, cfg.steps, seed=cfg.seed,
                            sharding=cfg.sharding)
    for t, idx in enumerate(batches, start=1):
        opt.zero_grad(set_to_none=True)
        loss_fn(net(X[idx]), y[idx]).backward()
        if compressor is not None:
            _set_flat_grad(model, compressor(flat_grad(model)))
        opt.step()
        if cfg.mode != "local_sgd":
            rounds += 1
        elif t % cfg.H == 0 or t == cfg.steps:
            # local SGD averages every H steps, and once more at the end when H does not
            # divide the steps: the run returns the average, not one worker's model
            comm["bytes"] += average_parameters(model)
            rounds += 1
        if t % cfg.eval_every == 0 or t == cfg.steps:
            # the loss of the average (local SGD between rounds) or of the common model: the
            # same number on every worker, so all agree on divergence
            if not log(t):
                diverged = True
                if cfg.mode == "local_sgd" and t % cfg.H and t != cfg.steps:
                    comm["bytes"] += average_parameters(model)
                    rounds += 1
                break
    result = {"config": asdict(cfg), "world_size": world, "diverged": diverged, **record}
    if cfg.return_params:
        result["params"] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return result


def run_configs(rank: int, world_size: int, configs: Sequence[RunConfig], X: torch.Tensor,
                y: torch.Tensor) -> list[dict] | list[int]:
    """Worker function: train every config in turn on ``(X, y)`` (each worker sampling its own
    shard, see :func:`shard_batches`). Rank 0 returns one record per config -- ``step``,
    ``loss`` (full training loss), ``rounds`` (communication rounds so far), ``bytes`` (bytes
    this worker sent so far), ``diverged``, optionally ``params``; the other ranks return
    their byte counts (which equal rank 0's)."""
    records = [_train_one(c, rank, world_size, X, y) for c in configs]
    if rank == 0:
        return records
    return [r["bytes"][-1] for r in records]


def train_distributed(configs: Sequence[RunConfig], X: torch.Tensor, y: torch.Tensor, *,
                      world_size: int = 4, backend: str = "gloo",
                      timeout: float = 300.0) -> list[dict]:
    """Train all ``configs`` in one :func:`launch` of ``world_size`` workers; return rank 0's
    records (see :func:`run_configs`)."""
    configs = [c.validate() for c in configs]
    if not configs:
        raise ValueError("configs must not be empty")
    results = launch(run_configs, world_size, args=(configs, X.cpu(), y.cpu()), backend=backend,
                     timeout=timeout)
    for r, counts in enumerate(results[1:], start=1):
        if counts != [rec["bytes"][-1] for rec in results[0]]:
            raise RuntimeError(f"rank {r} sent {counts} bytes, rank 0 "
                               f"{[rec['bytes'][-1] for rec in results[0]]}")
    return results[0]


# =======================================================================================
# 4. Large-batch theory, measured in one process

def optimal_step(m: int | torch.Tensor, beta: float, lam1: float) -> torch.Tensor:
    """Ma, Bassily and Belkin's (2018) optimal step for mini-batch SGD of size ``m`` on an
    interpolating least-squares problem, :math:`\\eta^*(m) = m / (\\beta + (m-1)\\lambda_1)`,
    with :math:`\\beta = \\max_i \\|x_i\\|^2` and :math:`\\lambda_1` the top eigenvalue of
    :math:`H = \\frac1n \\sum_i x_i x_i^\\top`. Linear in ``m`` below the critical batch
    :math:`m^* = \\beta/\\lambda_1`, saturating at :math:`1/\\lambda_1` above it."""
    if not (beta > 0 and lam1 > 0):
        raise ValueError(f"beta and lam1 must be positive, got beta={beta!r}, lam1={lam1!r}")
    m = torch.as_tensor(m, dtype=torch.float64)
    if (m < 1).any():
        raise ValueError(f"batch sizes must be >= 1, got {m.tolist()!r}")
    return m / (beta + (m - 1) * lam1)


def gradient_noise_scale(per_sample_grads: torch.Tensor) -> float:
    """The simple noise scale of McCandlish et al. (2018),
    :math:`B_{noise} = \\tr(\\Sigma) / \\|G\\|^2`, from an (n, d) matrix of per-sample
    gradients: :math:`G` their mean, :math:`\\Sigma` their covariance (one sample's gradient
    noise). The batch size at which the noise and the signal of a mini-batch gradient are
    equal; McCandlish et al. show it predicts the critical batch size."""
    g = torch.as_tensor(per_sample_grads)
    if g.dim() != 2 or g.shape[0] < 2:
        raise ValueError(f"per_sample_grads must be (n >= 2, d), got shape {tuple(g.shape)}")
    G = g.mean(0)
    trace_sigma = (g - G).pow(2).sum(1).mean()
    return float(trace_sigma / G.pow(2).sum())


def least_squares_sgd_steps(X: torch.Tensor, y: torch.Tensor, batch_sizes: Sequence[int],
                            etas: torch.Tensor, *, steps: int, reps: int = 4,
                            target: float = 1e-4, seed: int = 0) -> torch.Tensor:
    """Steps mini-batch SGD needs to bring the least-squares loss
    :math:`\\frac1{2n}\\|Xw - y\\|^2` below ``target`` times its value at :math:`w = 0`.

    One vectorized run trains every combination of batch size ``batch_sizes[i]``, step
    ``etas[i, j]`` and repetition (``reps``; batches drawn i.i.d. with replacement): the
    samples of all runs are drawn as one index vector and each run's gradient is summed with
    ``index_add_``, so no run is padded to the largest batch. Returns an (M, reps, E) tensor;
    runs that do not reach the target within ``steps`` (or diverge) get ``inf``. The step
    count is fractional: the crossing time of the log-loss interpolated between two steps.
    """
    M = len(batch_sizes)
    etas = torch.as_tensor(etas, dtype=X.dtype)
    if etas.dim() != 2 or etas.shape[0] != M:
        raise ValueError(f"etas must be (len(batch_sizes)={M}, E), got shape {tuple(etas.shape)}")
    if not 0 < target < 1:
        raise ValueError(f"target must lie in (0, 1), got {target!r}")
    if M == 0 or min(batch_sizes) < 1:
        raise ValueError(f"batch sizes must be >= 1, got {list(batch_sizes)!r}")
    n, d = X.shape
    E = etas.shape[1]
    g = generator(seed)
    P = M * reps * E                                         # number of runs
    m = torch.as_tensor(batch_sizes).repeat_interleave(reps * E)           # (P,)
    run_of_sample = torch.arange(P).repeat_interleave(m)                     # (sum m,)
    lr = etas.unsqueeze(1).expand(M, reps, E).reshape(P, 1)
    H, b = X.T @ X / n, X.T @ y / n                        # loss(w) = w'Hw/2 - b'w + c
    c = 0.5 * y.pow(2).mean()
    W = torch.zeros(P, d, dtype=X.dtype)
    hit = torch.full((P,), math.inf, dtype=X.dtype)
    log_target, log_prev = math.log(target), torch.zeros(P, dtype=X.dtype)
    for t in range(1, steps + 1):
        idx = torch.randint(0, n, (len(run_of_sample),), generator=g)
        xb = X[idx]
        r = (xb * W[run_of_sample]).sum(1) - y[idx]                          # residuals
        grad = torch.zeros_like(W).index_add_(0, run_of_sample, r.unsqueeze(1) * xb)
        W = (W - lr * grad / m.unsqueeze(1)).nan_to_num(nan=1e30).clamp(-1e30, 1e30)
        log_loss = torch.log((0.5 * ((W @ H) * W).sum(1) - W @ b + c).clamp_min(1e-300) / c)
        hit = _record_crossing(hit, t, log_prev, log_loss, log_target)
        log_prev = log_loss
        if torch.isfinite(hit).all():
            break
    return hit.view(M, reps, E)


def _record_crossing(hit: torch.Tensor, t: int, log_prev: torch.Tensor, log_now: torch.Tensor,
                     log_target: float) -> torch.Tensor:
    """Fill in the crossing time of the runs that crossed ``log_target`` between steps
    ``t - 1`` and ``t`` (``log(loss)`` interpolated linearly between the two steps)."""
    crossed = (log_now < log_target) & torch.isinf(hit)
    frac = (log_prev - log_target) / (log_prev - log_now)
    return torch.where(crossed, t - 1 + frac, hit)


def least_squares_expected_steps(X: torch.Tensor, e0: torch.Tensor, batch_sizes: Sequence[int],
                                 etas: torch.Tensor, *, steps: int,
                                 target: float = 1e-4) -> torch.Tensor:
    r"""Steps after which the *expected* loss of mini-batch SGD on interpolating least squares
    falls below ``target`` times its initial value, computed exactly (no sampling).

    With batches of ``m`` samples drawn i.i.d. uniformly and :math:`e_t = w_t - w^*`,
    :math:`e_{t+1} = (I - \eta H_b) e_t`, so the second moment :math:`S_t = \E[e_te_t^\top]`
    obeys the linear recursion (the independence of the draws gives
    :math:`\E[H_b S H_b] = \frac1m \E[xx^\top S xx^\top] + (1-\frac1m) HSH`)

    .. math::

        S_{t+1} = S_t - \eta(HS_t + S_tH)
        + \eta^2\Big(\tfrac1m \tfrac1n\sum_i (x_i^\top S_t x_i)\, x_ix_i^\top
        + \big(1 - \tfrac1m\big) HS_tH\Big),

    and :math:`\E f(w_t) = \frac12 \tr(HS_t)`. The recursion is a symmetric linear map on
    :math:`S` (:math:`d^2 \times d^2`), diagonalized once per (batch size, step); this is
    what Ma, Bassily and Belkin's bound (:func:`optimal_step`) bounds. ``e0``: the initial
    error :math:`w_0 - w^*` (``d``); ``etas``: an (M, E) tensor as in
    :func:`least_squares_sgd_steps`. Returns (M, E) fractional crossing times (``log`` of the
    expected loss interpolated linearly between steps), ``inf`` where the target is not
    reached within ``steps`` (or the expected loss grows). For ``d`` up to a few tens.
    """
    M = len(batch_sizes)
    etas = torch.as_tensor(etas, dtype=X.dtype)
    if X.dim() != 2 or e0.shape != (X.shape[1],):
        raise ValueError(f"need X (n, d) and e0 (d,), got {tuple(X.shape)} and {tuple(e0.shape)}")
    if etas.dim() != 2 or etas.shape[0] != M:
        raise ValueError(f"etas must be (len(batch_sizes)={M}, E), got shape {tuple(etas.shape)}")
    if not 0 < target < 1:
        raise ValueError(f"target must lie in (0, 1), got {target!r}")
    if M == 0 or min(batch_sizes) < 1:
        raise ValueError(f"batch sizes must be >= 1, got {list(batch_sizes)!r}")
    n, d = X.shape
    H = X.T @ X / n
    eye = torch.eye(d, dtype=X.dtype)
    first = torch.kron(H, eye) + torch.kron(eye, H)          # S -> HS + SH, on vec(S)
    xx = (X[:, :, None] * X[:, None, :]).reshape(n, d * d)   # vec(x_i x_i^T)
    fourth = xx.T @ xx / n                                   # S -> E[x x^T S x x^T]
    cross = torch.kron(H, H)                                 # S -> H S H
    m = torch.as_tensor(batch_sizes, dtype=X.dtype)[:, None, None, None]
    eta = etas[:, :, None, None]
    T = (torch.eye(d * d, dtype=X.dtype) - eta * first
         + eta**2 * (fourth / m + (1 - 1 / m) * cross)).reshape(-1, d * d, d * d)
    mu, U = torch.linalg.eigh(T)
    # E f(w_t) = 1/2 vec(H)^T T^t vec(S_0) = sum_k c_k mu_k^t
    c = 0.5 * (H.reshape(-1) @ U) * (torch.outer(e0, e0).reshape(-1) @ U)
    loss0 = c.sum(1)
    hit = torch.full((len(c),), math.inf, dtype=X.dtype)
    log_target, log_prev = math.log(target), torch.zeros(len(c), dtype=X.dtype)
    live = torch.ones(len(c), dtype=torch.bool)
    for t in range(1, steps + 1):
        c = c * mu
        c = torch.where(c.abs() < 1e-250, 0.0, c)          # no subnormal arithmetic
        log_loss = torch.log((c.sum(1) / loss0).clamp_min(1e-300))
        hit = _record_crossing(hit, t, log_prev, log_loss, log_target)
        live &= log_loss < 50                               # expected loss blew up: inf
        log_prev = log_loss
        if not (live & torch.isinf(hit)).any():
            break
    return hit.view(M, -1)


# =======================================================================================
# torchrun entry point

def main(argv: Sequence[str] | None = None) -> dict | None:
    """Train one :class:`RunConfig` on the digits data under ``torchrun``::

        torchrun --standalone --nproc_per_node=4 -m nnopt_utils.distributed --mode local_sgd --H 8

    Every process reads ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT`` from the
    environment (:func:`init_from_env`); rank 0 prints one JSON line with the result.
    """
    parser = argparse.ArgumentParser(prog="python -m nnopt_utils.distributed",
                                     description="data-parallel training of an MLP on digits")
    parser.add_argument("--mode", choices=MODES, default="ddp")
    parser.add_argument("--backend", choices=BACKENDS, default=None)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--sharding", choices=SHARDINGS, default="strided")
    parser.add_argument("--H", type=int, default=1)
    parser.add_argument("--compressor", choices=list(COMPRESSORS), default="none")
    parser.add_argument("--ratio", type=float, default=0.01)
    parser.add_argument("--levels", type=int, default=4)
    parser.add_argument("--error-feedback", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    a = parser.parse_args(argv)
    torch.set_num_threads(a.threads)
    cfg = RunConfig(mode=a.mode, steps=a.steps, lr=a.lr, batch_size=a.batch_size, H=a.H,
                    sharding=a.sharding, compressor=a.compressor, ratio=a.ratio,
                    levels=a.levels, error_feedback=a.error_feedback, seed=a.seed,
                    eval_every=max(1, a.steps // 10)).validate()
    from .data import digits

    data = digits(seed=a.seed)
    rank, world = init_from_env(a.backend)
    try:
        rec = _train_one(cfg, rank, world, data.X, data.y)
    finally:
        dist.destroy_process_group()
    summary = {"world_size": world, "mode": cfg.mode, "steps": rec["step"][-1],
               "initial_loss": rec["loss"][0], "final_loss": rec["loss"][-1],
               "rounds": rec["rounds"][-1], "bytes_per_worker": rec["bytes"][-1],
               "diverged": rec["diverged"]}
    if rank == 0:
        print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":  # pragma: no cover - exercised through torchrun in the tests
    sys.exit(0 if main() is not None else 1)
