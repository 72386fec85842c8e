"""Shared test settings."""

import os

import pytest
import torch

# Unit tests pin exact values drawn from fixed seeds: the global seed of a chapter run
# (NNOPT_SEED) must not shift them.
os.environ.pop("NNOPT_SEED", None)


@pytest.fixture(autouse=True)
def torch_globals():
    """Unit tests use tiny tensors: one intra-op thread is fastest for them and immune to
    busy-waiting when the machine's cores are shared. Every test starts from the same global
    torch state (threads, deterministic mode, denormal flushing), and whatever a test changes
    (``nu.setup`` does) is restored after it."""
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    torch.set_flush_denormal(False)
