"""NUMA nodes merged apart (``--numa-nodes``, ``merge_across_nodes=0``): crafted raw dumps
whose sharing is known page by page, placed on nodes so that the sharing pairs are split or
kept together; every expected counter is derived by hand below."""

from __future__ import annotations

import json

import pytest
from conftest import PS, SAMPLES, runner, scan_memory

from dumpwriter.raw import make_raw
from ksm_analyze import analyze
from ksm_analyze.cli import app
from ksm_analyze.planning.plan import plan
from ksm_analyze.whatif.numa import node_of

ZERO = bytes(PS)


def _page(tag: int) -> bytes:
    """A page of its own content (no two tags alike, none all zero)."""
    return (tag.to_bytes(4, "little") + b"numa").ljust(16, b".") * (PS // 16)


# Six pages each. a and b share S1-S3; c and d share T1 and T2; a and c hold two zero pages
# each; every U page is unique.
S1, S2, S3, T1, T2 = (_page(k) for k in range(1, 6))
INPUTS = {
    "a.raw": [S1, S2, S3, ZERO, ZERO, _page(10)],
    "b.raw": [S1, S2, S3, _page(20), _page(21), _page(22)],
    "c.raw": [T1, T2, ZERO, ZERO, _page(30), _page(31)],
    "d.raw": [T1, T2, _page(40), _page(41), _page(42), _page(43)],
}


@pytest.fixture(scope="module")
def dumps(tmp_path_factory):
    d = tmp_path_factory.mktemp("numa")
    return [str(make_raw(d / name, pages)) for name, pages in INPUTS.items()]


def _counters(result):
    c = result.counters
    return c.pages_shared, c.pages_sharing, c.pages_unshared


def _row(result, node):
    return result.numa.set_index("node").loc[node]


def test_the_balanced_placement_splits_the_sharing_pairs(dumps):
    # Four inputs of 6 pages: largest first (ties in input order) onto the least-filled
    # node: a->0, b->1, c->0, d->1. Node 0 (a, c): the 4 zero pages make 1 KSM page and 3
    # sharing; S and T pages are alone on the node: 12 - 1 - 3 = 8 unshared. Node 1 (b, d):
    # nothing shared, 12 unshared. Across nodes: S1-S3 (2 copies each): 3 + 3, T1-T2: 2 + 2,
    # zero: 1 + 3 -> 6 shared, 8 sharing, so keeping nodes apart loses 5 pages.
    r = analyze(dumps, numa_nodes=2, jobs=1)
    assert r.nodes == [0, 1, 0, 1]
    assert _counters(r) == (1, 3, 20)
    n0, n1, total = (_row(r, k) for k in ("0", "1", "total"))
    assert (n0.pages_shared, n0.pages_sharing, n0.pages_unshared, n0.saved_pages) == (1, 3, 8, 3)
    assert (n1.pages_shared, n1.pages_sharing, n1.pages_unshared, n1.saved_pages) == (0, 0, 12, 0)
    assert n0.inputs == ["a.raw", "c.raw"] and n1.input_count == 2 and n0.pages == 12
    assert (total.saved_pages, total.saved_across_nodes_pages, total.lost_pages) == (3, 8, 5)
    assert total.lost_bytes == 5 * PS
    assert r.savings.at["saved", "with_zero_pages_pages"] == 3  # the host is the per-node KSM
    assert _counters(analyze(dumps, jobs=1)) == (6, 8, 10) == (
        r.unrestricted.pages_shared, r.unrestricted.pages_sharing, r.unrestricted.pages_unshared)


def test_pinned_together_the_pairs_lose_nothing(dumps):
    # Node 0 (a, b): S1-S3 3 + 3, zero pages of a 1 + 1, 12 - 4 - 4 = 4 unshared. Node 1
    # (c, d): T1-T2 2 + 2, zero pages of c 1 + 1, 12 - 3 - 3 = 6 unshared. Only the zero
    # content, now on both nodes, costs one KSM page more than across nodes (1 + 3): 1 lost.
    r = analyze(dumps, numa_nodes=2, numa_pins=((0, "[ab].raw"), (1, "*/[cd].raw")), jobs=1)
    assert r.nodes == [0, 0, 1, 1]
    assert _counters(r) == (7, 7, 10)
    assert [(_row(r, k).pages_shared, _row(r, k).pages_sharing) for k in "01"] == [(4, 4),
                                                                                   (3, 3)]
    assert (_row(r, "total").lost_pages, _row(r, "total").saved_pages) == (1, 7)


def test_a_domain_and_a_node_must_both_match(dumps):
    # Domains x = {a, c}, y = {b, d}; nodes 0 = {a, b}, 1 = {c, d}: no two inputs share both,
    # so only the zero pages within a (1 + 1) and within c (1 + 1) merge. The domains alone
    # would merge the 4 zero pages of a and c (1 + 3): 3 saved, 1 lost to the nodes.
    r = analyze(dumps, numa_nodes=2, numa_pins=((0, "[ab].raw"), (1, "[cd].raw")),
                domains=(("x", "[ac].raw"), ("y", "[bd].raw")), jobs=1)
    assert _counters(r) == (2, 2, 20)
    total = _row(r, "total")
    assert (total.saved_pages, total.saved_across_nodes_pages, total.lost_pages) == (2, 3, 1)
    data = r.to_dict()["policy"]
    assert data["domains"] == {"a.raw": "x", "b.raw": "y", "c.raw": "x", "d.raw": "y"}
    assert data["numa_node"] == {"a.raw": 0, "b.raw": 0, "c.raw": 1, "d.raw": 1}


def test_one_node_is_the_plain_prediction():
    plain, one = analyze(SAMPLES, jobs=1), analyze(SAMPLES, numa_nodes=1, jobs=1)
    assert one.counters == plain.counters == one.unrestricted
    for name in ("host", "savings", "histogram", "per_input", "pairwise"):
        assert getattr(one, name).equals(getattr(plain, name)), name
    total = _row(one, "total")
    assert total.lost_pages == 0 and total.saved_pages == plain.counters.pages_sharing
    assert plain.numa.empty and len(one.numa) == 2


def test_plan_refuses_a_projection_of_nodes(dumps):
    r = runner.invoke(app, ["plan", *dumps, "--host-memory", "80KiB", "--numa-nodes", "2",
                            "--project", "4"])
    assert r.exit_code == 2
    assert r.stderr == ("Error: --project with --numa-nodes: the projection does not model "
                        "NUMA nodes; plan without --project\n")


def test_balance_by_memory_largest_first_onto_the_least_filled_node():
    # Sizes 5, 4, 3, 3, 1 onto 2 nodes, input 3 pinned to node 1 (load 3): 5 -> node 0 (0
    # against 3), 4 -> node 1 (3 < 5), 3 (input 2) -> node 0 (5 < 7), 1 -> node 1 (7 < 8).
    assert node_of(["e", "d", "c", "p", "a"], [5, 4, 3, 3, 1], 2, [(1, "p")]) == [0, 1, 0, 1, 1]
    assert node_of(["x", "y"], [1, 1], 3) == [0, 1]  # a node may stay empty


def test_scan_text_json_and_csv(dumps, tmp_path):
    r = runner.invoke(app, ["scan", *dumps, "--numa-nodes", "2", "--csv", str(tmp_path / "t")])
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    at = lines.index("NUMA nodes, merge_across_nodes=0 (each node its own KSM; zero pages "
                     "present)")
    assert lines[at + 2].split() == ["0", "2", "12", "1", "3", "12", "KiB"]
    assert lines[at + 5] == ("  Merging across nodes (merge_across_nodes=1) would save 32 KiB: "
                             "keeping nodes apart costs 20 KiB (5 pages).")
    assert (tmp_path / "t" / "numa.csv").read_text().splitlines()[1].startswith(
        "0,a.raw c.raw,2,12,1,3,8,0,")
    data = json.loads(runner.invoke(app, ["scan", *dumps, "--numa-nodes", "2", "--json"]).stdout)
    assert [row["saved_pages"] for row in data["numa"]] == [3, 0, 3]
    assert data["numa"][0]["lost_pages"] is None and data["policy"]["numa_nodes"] == 2
    plain = runner.invoke(app, ["scan", *dumps])
    assert "NUMA" not in plain.stdout and json.loads(
        runner.invoke(app, ["scan", *dumps, "--json"]).stdout)["numa"] == []


@pytest.mark.parametrize(("args", "message"), [
    (["--numa-nodes", "0"], "--numa-nodes must be at least 1, not 0"),
    (["--numa-nodes", "2", "--numa-node", "2=a.raw"],
     "--numa-node 2=a.raw: the node must be 0 to 1 (--numa-nodes 2)"),
    (["--numa-nodes", "2", "--numa-node", "0=z*.raw"], "--numa-node 0=z*.raw matches no input"),
    (["--numa-nodes", "2", "--numa-node", "0=a.raw", "--numa-node", "1=[ab].raw"],
     "{a} is pinned to several NUMA nodes (0, 1): give each input one --numa-node"),
    (["--numa-node", "0=a.raw"], "--numa-node needs --numa-nodes N (the nodes of the host)"),
    (["--numa-nodes", "2", "--numa-node", "x=a.raw"],
     "--numa-node x=a.raw: NODE is a node number (0, 1...)"),
])
def test_bad_values_are_one_line(dumps, args, message):
    r = runner.invoke(app, ["scan", *dumps, *args])
    assert r.exit_code == 2
    assert r.stderr == f"Error: {message.format(a=dumps[0])}\n"


def test_report_has_the_numa_section_only_when_asked(dumps, tmp_path):
    r = runner.invoke(app, ["report", *dumps, "--numa-nodes", "2", "-o", str(tmp_path / "n")])
    assert r.exit_code == 0, r.output
    page = (tmp_path / "n" / "index.html").read_text()
    assert 'id="table-numa"' in page
    assert ("Merging across nodes (merge_across_nodes=1) would save 32 KiB: keeping nodes "
            "apart costs 20 KiB (5 pages).") in page
    assert (tmp_path / "n" / "numa.csv").read_text().splitlines()[3].startswith("total,")
    r = runner.invoke(app, ["report", *dumps, "-o", str(tmp_path / "p")])
    assert r.exit_code == 0 and 'id="table-numa"' not in (tmp_path / "p" / "index.html"
                                                         ).read_text()


def test_plan_packs_nodes_each_equal_to_a_scan_of_its_inputs(dumps):
    # Hosts of 80 KiB, two nodes of 40 KiB (40,960 bytes). Node footprints (pages left x 4 KiB
    # + 64 bytes per scanned page): a+b 12 - 3 (S) - 1 (zero) = 8 pages, 33,536 bytes; c+d
    # 12 - 2 (T) - 1 = 9 pages, 37,632; no three inputs fit a node (a+b+c: 12 pages left).
    # Sharing-aware: the pairs on the two nodes of one host. First-fit by each input's own
    # footprint (b, d 24,960; c, a 20,864): no two fit a node -> 4 nodes, 2 hosts.
    result = analyze(dumps, numa_nodes=2, jobs=1)
    planned = plan(result, 80 << 10)
    summary = planned.summary.set_index("method")["hosts"]
    assert (summary["sharing"], summary["first_fit"]) == (1, 2)
    nodes = planned.nodes[planned.nodes["method"] == "sharing"]
    assert sorted(map(sorted, nodes["inputs"])) == [["a.raw", "b.raw"], ["c.raw", "d.raw"]]
    assert sorted(nodes["memory_after_bytes"]) == [33_536, 37_632]
    assert planned.hosts.set_index("method").loc["sharing", "memory_after_bytes"] == 71_168
    by_name = {p.rsplit("/", 1)[1]: p for p in dumps}
    for r in planned.nodes.itertuples():  # a node is a host of its inputs alone
        assert r.memory_after_bytes == scan_memory([by_name[n] for n in r.inputs])
    for (method, host), group in planned.nodes.groupby(["method", "host"]):
        pins = [arg for r in group.itertuples() for n in r.inputs
                for arg in ("--numa-node", f"{r.node}={n}")]
        inputs = [by_name[n] for r in group.itertuples() for n in r.inputs]
        assert planned.hosts.set_index(["method", "host"]).loc[
            (method, host), "memory_after_bytes"] == scan_memory(inputs, "--numa-nodes", "2",
                                                                 *pins)
    assert set(planned.assignments.columns) == {"method", "input", "host", "node"}
    assert plan(analyze(dumps, jobs=1), 80 << 10).nodes.empty


def test_the_json_options_record_the_what_ifs_asked():
    # scan --json's "options" say how the prediction was made: the NUMA nodes and the
    # near-duplicates asked appear there, and only when asked.
    asked = json.loads(runner.invoke(app, ["scan", *SAMPLES, "--json", "--numa-nodes", "2",
                                           "--near-duplicates", "3", "-q"]).stdout)["options"]
    assert (asked["numa_nodes"], asked["near_duplicates"]) == (2, 3)
    plain = json.loads(runner.invoke(app, ["scan", *SAMPLES, "--json", "-q"]).stdout)["options"]
    assert "numa_nodes" not in plain and "near_duplicates" not in plain
