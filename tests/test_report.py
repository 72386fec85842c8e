import pytest

import nnopt_utils as nu
from nnopt_utils.report import fmt


def test_claims_assert_and_table():
    claims = nu.Claims("test")
    claims.check("one is one", 1.0, True, expected="= 1")
    with pytest.raises(AssertionError, match="claim failed: two is three: measured 2"):
        claims.check("two is three", 2, False, expected="= 3")
    claims.check("one is one", 1.0, True, expected="= 1")  # re-run replaces
    df = claims.table().data
    assert list(df["result"]) == ["pass", "FAIL"] and len(claims) == 2


def test_fmt_and_slope():
    assert fmt(0.000123456) == "1.23e-04"
    assert fmt(12345) == "12,345"
    assert fmt(3.14159) == "3.14"
    assert nu.loglog_slope([1, 10, 100], [5, 0.5, 0.05]) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="positive"):
        nu.loglog_slope([1, 2], [0, 1])
