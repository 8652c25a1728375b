"""The weight solve: exact traffic shares, storage as a limit, the lowest possible fill."""

from __future__ import annotations

import numpy as np
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from numpy.typing import NDArray
from scipy.optimize import linprog

from streamplane.placement.hca import solve_shares

Array = NDArray[np.float64]

servers = st.lists(
    st.tuples(st.floats(1.0, 300.0), st.floats(1.0, 200.0)), min_size=1, max_size=8
)  # (storage, throughput)
split = st.tuples(
    st.floats(1.0, 500.0),  # head bytes
    st.floats(1.0, 500.0),  # tail bytes
    st.floats(0.01, 0.99),  # head traffic share
)


def solve(
    cluster: list[tuple[float, float]], bh: float, bt: float, ph: float
) -> tuple[Array, Array, Array, Array, Array]:
    storage = np.array([s for s, _ in cluster])
    tput = np.array([t for _, t in cluster])
    r = solve_shares(storage, tput, bh, bt, ph, 1 - ph)
    return r.head, r.tail, r.bytes, storage, tput / tput.sum()


@settings(max_examples=300, deadline=None)
@given(servers, split)
def test_shares_are_non_negative_and_sum_to_one(
    cluster: list[tuple[float, float]], s: tuple[float, float, float]
) -> None:
    head, tail, _, _, _ = solve(cluster, *s)
    assert (head >= 0).all() and (tail >= 0).all()
    assert abs(head.sum() - 1) < 1e-9 and abs(tail.sum() - 1) < 1e-9


@settings(max_examples=300, deadline=None)
@given(servers, split)
def test_every_server_gets_its_throughput_share(
    cluster: list[tuple[float, float]], s: tuple[float, float, float]
) -> None:
    bh, bt, ph = s
    head, tail, placed, _, tau = solve(cluster, bh, bt, ph)
    assert np.allclose(head * ph + tail * (1 - ph), tau, atol=1e-9)
    assert np.allclose(head * bh + tail * bt, placed, rtol=1e-6)
    assert abs(placed.sum() - (bh + bt)) < 1e-6 * (bh + bt)


@settings(max_examples=150, deadline=None)
@given(servers, split)
def test_the_fill_is_the_lowest_any_weights_can_reach(
    cluster: list[tuple[float, float]], s: tuple[float, float, float]
) -> None:
    """Against a linear program: minimise the max fill subject to exact traffic shares."""
    bh, bt, ph = s
    _, _, placed, storage, tau = solve(cluster, bh, bt, ph)
    n = len(cluster)
    # variables: h (n), t (n), f
    c = np.zeros(2 * n + 1)
    c[-1] = 1
    a_eq = np.zeros((n + 2, 2 * n + 1))
    for i in range(n):
        a_eq[i, i], a_eq[i, n + i] = ph, 1 - ph
    a_eq[n, :n] = 1
    a_eq[n + 1, n : 2 * n] = 1
    b_eq = np.concatenate((tau, [1, 1]))
    a_ub = np.zeros((n, 2 * n + 1))
    for i in range(n):
        a_ub[i, i], a_ub[i, n + i], a_ub[i, -1] = bh, bt, -storage[i]
    lp = linprog(c, A_ub=a_ub, b_ub=np.zeros(n), A_eq=a_eq, b_eq=b_eq, bounds=(0, None))
    assume(lp.status == 0)
    assert (placed / storage).max() <= lp.fun * (1 + 1e-6) + 1e-9


@settings(max_examples=300, deadline=None)
@given(servers, split)
def test_it_is_the_two_equation_solve_where_that_is_non_negative(
    cluster: list[tuple[float, float]], s: tuple[float, float, float]
) -> None:
    """Per server: h Bh + t Bt = storage share x B and h Ph + t Pt = throughput share."""
    bh, bt, ph = s
    head, tail, _, storage, tau = solve(cluster, bh, bt, ph)
    sigma = storage / storage.sum()
    matrix = np.array([[bh, bt], [ph, 1 - ph]])
    assume(abs(np.linalg.det(matrix)) > 1e-6 * (bh + bt))
    h2, t2 = np.linalg.solve(matrix, np.vstack((sigma * (bh + bt), tau)))
    assume((h2 >= 0).all() and (t2 >= 0).all())
    assert np.allclose(head, h2, atol=1e-6) and np.allclose(tail, t2, atol=1e-6)


def test_alike_servers_share_alike() -> None:
    head, tail, placed, _, _ = solve([(100.0, 50.0)] * 4, 30.0, 170.0, 0.8)
    assert np.allclose(head, 0.25) and np.allclose(tail, 0.25) and np.allclose(placed, 50.0)


def test_flash_takes_the_head_and_storage_the_tail() -> None:
    # The reference cluster, a head with 83 % of the traffic in 20 % of the bytes.
    head, tail, placed, storage, _ = solve(
        [(200.0, 40.0), (18.0, 100.0), (18.0, 100.0)], 30, 120, 0.83
    )
    assert head[1] > 0.45 and tail[0] > 0.9
    assert (placed / storage).max() < 0.95
