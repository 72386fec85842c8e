import pytest
import torch

import nnopt_utils as nu
from nnopt_utils import config


def test_setup_seeds_reproducibly():
    nu.setup(seed=3, theme=False)
    a = torch.randn(5)
    nu.setup(seed=3, theme=False)
    assert torch.equal(a, torch.randn(5))


def test_setup_returns_cpu_here_and_validates(monkeypatch):
    assert nu.setup(seed=0, theme=False, device="cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="unknown device 'gpu'.*cpu, cuda"):
        nu.get_device("gpu")
    with pytest.raises(ValueError, match="threads must be a positive int, got 0"):
        nu.setup(seed=0, threads=0, theme=False)
    with pytest.raises(ValueError, match="seed must be a non-negative int, got -1"):
        nu.seed_everything(-1)


def test_scale_profile(monkeypatch):
    monkeypatch.delenv("NNOPT_SCALE", raising=False)
    assert nu.scale() == "default" and nu.by_scale(1, 2) == 1
    monkeypatch.setenv("NNOPT_SCALE", "full")
    assert nu.by_scale(1, 2) == 2
    monkeypatch.setenv("NNOPT_SCALE", "huge")
    with pytest.raises(ValueError, match="unknown NNOPT_SCALE 'huge'; choose one of: default, full"):
        nu.scale()


def test_progress_quiet_under_ci(monkeypatch):
    for k in ("CI", "NNOPT_QUIET", "PYTEST_CURRENT_TEST"):
        monkeypatch.delenv(k, raising=False)
    assert config.progress_enabled()
    monkeypatch.setenv("CI", "true")
    assert not config.progress_enabled()
