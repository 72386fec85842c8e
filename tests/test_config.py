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


def test_setup_turns_determinism_and_flushing_off_when_asked():
    import torch

    nu.setup(seed=0, theme=False)
    assert torch.are_deterministic_algorithms_enabled()
    nu.setup(seed=0, theme=False, deterministic=False, flush_denormal=False)
    assert not torch.are_deterministic_algorithms_enabled()
    assert torch.tensor([1e-39], dtype=torch.float32).item() != 0.0  # subnormal kept


@pytest.mark.parametrize("value, quiet", [("1", True), ("yes", True), ("False", False),
                                          ("no", False), ("off", False), ("0", False)])
def test_quiet_flag_reads_false_words(monkeypatch, value, quiet):
    for k in ("CI", "PYTEST_CURRENT_TEST"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("NNOPT_QUIET", value)
    assert nu.config.progress_enabled() is (not quiet)


def test_global_seed_shifts_every_draw(monkeypatch):
    import torch

    monkeypatch.delenv("NNOPT_SEED", raising=False)
    a = torch.randn(3, generator=nu.generator(5))
    assert torch.equal(a, torch.randn(3, generator=torch.Generator().manual_seed(5)))
    monkeypatch.setenv("NNOPT_SEED", "2")
    b = torch.randn(3, generator=nu.generator(5))
    assert not torch.equal(a, b)
    assert nu.derived_seed(5) == 5 + 2 * nu.config.SEED_STRIDE
    first = nu.mlp(4, [3], 2, seed=1).layers[0].weight
    assert torch.equal(first, nu.mlp(4, [3], 2, seed=1).layers[0].weight)  # equal stay equal
    monkeypatch.setenv("NNOPT_SEED", "x")
    with pytest.raises(ValueError, match="NNOPT_SEED must be a non-negative int, got 'x'"):
        nu.derived_seed(0)
