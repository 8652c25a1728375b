"""Fill plans: what each edge holds, fetches (hottest first, from a peer when one has it) and
drops; churn counts only the bytes fetched."""

from __future__ import annotations

import msgspec
import numpy as np

from streamplane.placement import hca
from streamplane.placement.fill import FillPlan, churn, fill_plans
from streamplane.placement.model import Catalog, Placement, Server
from tests.placement.clusters import catalog_for, cluster


def small() -> tuple[list[Server], Catalog, Placement]:
    servers = cluster(1, 2)
    cat = catalog_for(servers, 600, 0.5, seed=11)
    return servers, cat, hca.place(servers, cat)


def test_without_a_previous_plan_every_title_held_is_added() -> None:
    _, cat, p = small()
    plans = fill_plans(p)
    for i, plan in enumerate(plans):
        assert plan.server == p.servers[i].id
        assert [a.title for a in plan.add] == plan.hold
        assert plan.drop == []
        assert plan.add_bytes == plan.hold_bytes == int(p.server_bytes[i])
    held = {t for plan in plans for t in plan.hold}
    assert held == set(cat.ids)


def test_titles_arrive_hottest_first() -> None:
    _, cat, p = small()
    density = dict(zip(cat.ids, cat.log_density().tolist(), strict=True))
    for plan in fill_plans(p):
        order = [density[a.title] for a in plan.add]
        assert order == sorted(order, reverse=True)


def test_against_yesterday_edges_fetch_only_what_is_new_and_drop_what_left() -> None:
    _, cat, p = small()
    now = p.holder_map()
    # Yesterday: one title sat elsewhere, one title is new today, one title has since retired.
    moved, new = cat.ids[0], cat.ids[1]
    previous = {t: s for t, s in now.items() if t != new}
    elsewhere = next(s.id for s in p.servers if s.id not in now[moved])
    previous[moved] = (elsewhere,)
    previous["retired"] = (p.servers[0].id,)
    plans = {plan.server: plan for plan in fill_plans(p, previous, {"retired": 123})}
    added = {(a.title, s) for s, plan in plans.items() for a in plan.add}
    assert added == {(moved, s) for s in now[moved]} | {(new, s) for s in now[new]}
    dropped = {(d.title, s) for s, plan in plans.items() for d in plan.drop}
    assert dropped == {(moved, elsewhere), ("retired", p.servers[0].id)}
    assert plans[p.servers[0].id].drop[0].title == "retired"  # gone titles free room first
    c = churn(p, previous, {"retired": 123})
    size = dict(zip(cat.ids, cat.size_bytes.tolist(), strict=True))
    assert c.added_bytes == size[moved] * len(now[moved]) + size[new] * len(now[new])
    assert c.dropped_bytes == size[moved] + 123


def test_a_title_fetched_by_one_more_edge_names_its_peers() -> None:
    _, cat, p = small()
    now = p.holder_map()
    copies = (
        next(t for t, s in now.items() if len(s) > 1)
        if any(len(s) > 1 for s in now.values())
        else None
    )
    title = copies or cat.ids[0]
    previous = dict(now)
    previous[title] = now[title][:1]  # one copy yesterday
    plans = fill_plans(p, previous)
    for plan in plans:
        for a in plan.add:
            assert a.title == title
            assert a.peers == list(now[title][:1])


def test_a_plan_round_trips_as_json() -> None:
    _, _, p = small()
    plan = fill_plans(p)[1]
    again = msgspec.json.decode(msgspec.json.encode(plan), type=FillPlan)
    assert again == plan
    assert again.format == "streamplane.fill/1"


def test_unchanged_plan_has_no_churn() -> None:
    _, _, p = small()
    c = churn(p, p.holder_map())
    assert (c.added_bytes, c.dropped_bytes, c.ratio) == (0, 0, 0.0)
    assert c.stored_bytes == int(np.sum(p.server_bytes))
