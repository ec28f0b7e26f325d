"""prebias/smoothness.py: random directions cover the trained occurrences only; on a toy
whose probe is exactly quadratic in the data weights, the relative error of the linear
prediction, the curvature and the size up to which first order holds are the analytic
ones, from a metagradient and from the central difference alike."""

import numpy as np
import pytest

from prebias import smoothness as SM


def test_directions_are_seeded_rademacher_on_the_trained_occurrences():
    occ = np.array([[0, 0], [0, 1], [1, 1], [2, 0], [2, 1], [3, 1]])
    d = SM.directions(occ, (4, 2), R=3, seed=5)
    assert d.shape == (3, 4, 2)
    assert d[:, 1, 0].tolist() == [0, 0, 0] and d[:, 3, 0].tolist() == [0, 0, 0]  # masked or untrained: 0
    assert set(np.unique(d[:, occ[:, 0], occ[:, 1]])) == {-1.0, 1.0}
    assert np.array_equal(SM.directions(occ, (4, 2), R=2, seed=5), d[:2])  # direction k: its own draw
    assert not np.array_equal(d[0], d[1])
    assert SM.parse_eps("1, 0.01,0.1,0.01") == [0.01, 0.1, 1.0]
    for bad in ("", "0,1", "-1", "nan"):
        with pytest.raises(ValueError):
            SM.parse_eps(bad)


def quadratic_probe(rng, steps=5, B=3):
    """probe(w) = g . (w - 1) + 0.5 (w - 1)^T H (w - 1): the exact change along d is
    eps <g, d> + 0.5 eps^2 d^T H d."""
    g = rng.normal(size=(steps, B))
    A = rng.normal(size=(steps * B, steps * B))
    H = 0.05 * (A + A.T)
    return g, lambda dw: float(g.ravel() @ dw.ravel() + 0.5 * dw.ravel() @ H @ dw.ravel()), H


def test_first_order_size_of_a_quadratic_is_the_analytic_one():
    rng = np.random.default_rng(0)
    g, probe, H = quadratic_probe(rng)
    occ = np.argwhere(np.ones((5, 3), bool))
    d = SM.directions(occ, (5, 3), R=4, seed=1)
    eps = [1e-3, 1e-2, 0.1, 0.3, 1.0, 3.0]
    plus = np.array([[probe(e * dk) for e in eps] for dk in d])
    minus = np.array([[probe(-e * dk) for e in eps] for dk in d])
    slope = np.array([float((g * dk).sum()) for dk in d])
    a, b = slope, np.array([0.5 * float(dk.ravel() @ H @ dk.ravel()) for dk in d])  # change = a eps + b eps^2
    for table in (SM.smoothness_table(eps, plus, minus, slope, tol=0.1), SM.smoothness_table(eps, plus, minus)):
        for r in range(4):
            part = table[table["direction"] == r]
            want = np.abs(b[r] / a[r]) * np.asarray(eps)  # |b eps^2| / |a eps|, the same for +eps and -eps
            np.testing.assert_allclose(part["rel_err"], want, rtol=1e-6)
            np.testing.assert_allclose(part["curvature"], want, rtol=1e-6)
            np.testing.assert_allclose(part["predicted"], a[r] * np.asarray(eps), rtol=1e-6)
        size = SM.first_order_size(table)
        for r in range(4):
            held = [e for e in eps if abs(b[r] / a[r]) * e <= 0.1]
            assert size[r] == (max(held) if held else 0.0)
    assert set(size) != {0.0} and (size < 3.0).any()  # the grid spans where it holds and where it fails
    # a wrong metagradient (half the slope) fails at every size
    bad = SM.smoothness_table(eps, plus, minus, slope / 2, tol=0.1)
    assert (SM.first_order_size(bad) == 0).all() and (bad["rel_err"] > 0.9).all()


def test_an_exactly_linear_probe_holds_everywhere():
    rng = np.random.default_rng(1)
    g = rng.normal(size=(4, 2))
    d = SM.directions(np.argwhere(np.ones((4, 2), bool)), (4, 2), R=2, seed=0)
    eps = [0.01, 0.1, 1.0]
    plus = np.array([[e * float((g * dk).sum()) for e in eps] for dk in d])
    table = SM.smoothness_table(eps, plus, -plus, np.array([float((g * dk).sum()) for dk in d]))
    assert table["holds"].all() and (table["rel_err"] < 1e-12).all() and (table["curvature"] < 1e-12).all()
    assert SM.first_order_size(table).tolist() == [1.0, 1.0]
