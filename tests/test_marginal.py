"""Marginal memory (what an input adds to its host = what moving it away frees) and
``plan --add`` (the best host for a new input against a placement file)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import PS, SAMPLES, runner, scan_memory

from ksm_analyze import analyze
from ksm_analyze.cli import app
from ksm_analyze.errors import InputError
from ksm_analyze.planning.marginal import add, read_placement

RMAP = 64  # bytes per rmap_item
SHARED, PRIVATE = 200, 20  # pages a family shares, pages each input has alone


def _write(path: Path, *blocks: np.ndarray) -> str:
    np.concatenate(blocks).tofile(path)
    return str(path)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """Inputs of known sharing. A1, A2, A3 hold the same 200 pages (family A); B1, B2
    another 200 (family B); every input also 20 random pages of its own and some zero
    pages (A1: 5, A2: 3, A3: 0, B1: 4, B2: 2); X and Y hold 300 pages of their own only.
    An input of the families takes about 900 KiB after KSM alone, X and Y 1.2 MiB."""
    rng = np.random.default_rng(23)
    d = tmp_path_factory.mktemp("family")

    def pages(n: int) -> np.ndarray:
        return rng.integers(0, 256, (n, PS), dtype=np.uint8)

    zero = {"A1": 5, "A2": 3, "A3": 0, "B1": 4, "B2": 2}
    paths = {}
    for fam in "AB":
        common = pages(SHARED)
        for name in (n for n in zero if n[0] == fam):
            paths[name] = _write(d / f"{name}.raw", common, pages(PRIVATE),
                                 np.zeros((zero[name], PS), np.uint8))
    paths["X"] = _write(d / "X.raw", pages(300))
    paths["Y"] = _write(d / "Y.raw", pages(300))
    return paths


def _host_paths(row: dict, paths: list[str]) -> list[str]:
    return [p for name in row["inputs"] for p in paths if Path(p).name == name]


_SCANS: dict[tuple[str, ...], int] = {}


def _scan(paths: list[str], *options: str) -> int:
    """``scan_memory``, once per set of inputs and options."""
    key = (*sorted(paths), "|", *options)
    if key not in _SCANS:
        _SCANS[key] = scan_memory(paths, *options)
    return _SCANS[key]


def _check_against_scans(paths: list[str], host_memory: str, *options: str) -> int:
    """Every input of every host of the plan (both methods): what it adds is scan of its
    host less scan of its host without it (0: an empty host). Returns the rows checked."""
    r = runner.invoke(app, ["plan", *paths, "--host-memory", host_memory, "--json", "-q",
                            *options])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    marginal = {(m["method"], m["input"]): m for m in out["marginal"]}
    assert len(marginal) == len(out["assignments"])
    checked = 0
    for host in out["hosts"]:
        inputs = _host_paths(host, paths)
        total = _scan(inputs, *options)
        assert total == host["memory_after_bytes"]
        for p in inputs:
            rest = [q for q in inputs if q != p]
            without = _scan(rest, *options) if rest else 0
            row = marginal[(host["method"], Path(p).name)]
            assert row["host"] == host["host"]
            assert row["added_bytes"] == total - without, (host, p)
            assert row["alone_bytes"] == _scan([p], *options)
            checked += 1
    return checked


def test_marginal_is_the_difference_of_two_scans_on_every_host(family):
    paths = [family[n] for n in ("A1", "B1", "A2", "B2", "A3", "X")]
    # Hosts of 2500 KiB: family A with X beside it and B1 + B2 (sharing-aware), families
    # mixed (first-fit). max_page_sharing=2: a family's third copy of a page opens a second
    # KSM page (and the placement changes). --use-zero-pages: zero pages are not counted.
    assert _check_against_scans(paths, "2500KiB") == 12
    assert _check_against_scans(paths, "2500KiB", "--max-page-sharing", "2") == 12
    assert _check_against_scans(paths, "2500KiB", "--use-zero-pages") == 12


def test_marginal_of_the_sample_dumps_is_the_difference_of_two_scans():
    assert _check_against_scans(SAMPLES, "4MiB") == 4  # one host of both, by each method


def test_marginal_counted_by_hand(family):
    # A1, A2, A3 on one host. A3 adds its 20 private pages, no zero page and 220 rmap_items:
    # its 200 family pages are there already. With max_page_sharing=2 the family's third
    # copy needs a second KSM page: 200 pages more.
    paths = [family[n] for n in ("A1", "A2", "A3")]
    for mps, extra in ((256, 0), (2, SHARED)):
        r = plan_json(paths, "4MiB", "--max-page-sharing", str(mps))
        a3 = next(m for m in r["marginal"] if m["input"] == "A3.raw" and m["method"] == "sharing")
        assert a3["added_bytes"] == (PRIVATE + extra) * PS + (SHARED + PRIVATE) * RMAP
        assert a3["memory_before_bytes"] == (SHARED + PRIVATE) * PS
        assert a3["alone_bytes"] == (SHARED + PRIVATE) * (PS + RMAP)


def plan_json(paths: list[str], host_memory: str, *options: str) -> dict:
    r = runner.invoke(app, ["plan", *paths, "--host-memory", host_memory, "--json", "-q",
                            *options])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def _placement(tmp_path: Path, rows: list[tuple[str, int]]) -> str:
    path = tmp_path / "assignments.csv"
    path.write_text("method,input,host\n" + "".join(f"sharing,{n},{h}\n" for n, h in rows))
    return str(path)


def _add(placed: list[str], placement: str, new: list[str], host_memory: str,
         *options: str):
    return runner.invoke(app, ["plan", *placed, "--host-memory", host_memory, "--placement",
                               placement, *(a for p in new for a in ("--add", p)), "-q",
                               *options])


def test_add_picks_the_host_that_shares_most(family, tmp_path):
    # B1 on host 0, A1 on host 1, X on host 2: A2 shares its 200 family pages with A1 only,
    # so host 1 is where it adds least: its 20 private pages and 223 rmap_items (its 3 zero
    # pages merge with A1's 5).
    placed = [family["B1"], family["A1"], family["X"]]
    placement = _placement(tmp_path, [("B1.raw", 0), ("A1.raw", 1), ("X.raw", 2)])
    r = _add(placed, placement, [family["A2"]], "4MiB", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    (choice,) = out["choices"]
    assert (choice["host"], choice["new_host"]) == (1, False)
    assert choice["added_bytes"] == PRIVATE * PS + (SHARED + PRIVATE + 3) * RMAP
    assert [o["fits"] for o in out["options"]] == [True, True, True]
    assert [o["chosen"] for o in out["options"]] == [False, True, False]
    # On the other hosts it adds its whole self but the zero pages (B1 has zero pages; X
    # none: there A2's 3 zero pages merge with each other into one page).
    added = [o["added_bytes"] for o in out["options"]]
    assert added[0] == (SHARED + PRIVATE) * PS + (SHARED + PRIVATE + 3) * RMAP
    assert added[2] == (SHARED + PRIVATE + 1) * PS + (SHARED + PRIVATE + 3) * RMAP
    text = _add(placed, placement, [family["A2"]], "4MiB")
    assert text.exit_code == 0, text.output
    assert "Best: host 1: it adds" in text.stdout


def test_add_ties_go_to_the_least_filled_host_and_new_inputs_join_in_turn(family, tmp_path):
    # X shares nothing and holds no zero page: it adds the same to A1 (host 0) and to the
    # larger host of B1 and B2 (host 1): the least filled, host 0, wins. Then A3 (added
    # second) sees X on host 0 and still prefers it for the family pages of A1.
    placed = [family["A1"], family["B1"], family["B2"]]
    placement = _placement(tmp_path, [("A1.raw", 0), ("B1.raw", 1), ("B2.raw", 1)])
    r = _add(placed, placement, [family["X"], family["A3"]], "4MiB", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    x_options = [o for o in out["options"] if o["new_input"] == "X.raw"]
    assert x_options[0]["added_bytes"] == x_options[1]["added_bytes"] == 300 * (PS + RMAP)
    assert [c["host"] for c in out["choices"]] == [0, 0]
    host0 = next(h for h in out["hosts"] if h["host"] == 0)
    assert sorted(host0["inputs"]) == ["A1.raw", "A3.raw", "X.raw"]
    assert host0["memory_after_bytes"] == scan_memory([family["A1"], family["X"],
                                                       family["A3"]])


def test_add_says_a_new_host_when_none_fits(family, tmp_path):
    # A1 + X on host 0, B1 + Y on host 1: 521 pages each after KSM. Hosts 10 pages larger than
    # host 0 needs: A2 would add its 20 private pages to host 0 and 220 pages to host 1.
    placed = [family["A1"], family["X"], family["B1"], family["Y"]]
    placement = _placement(tmp_path, [("A1.raw", 0), ("X.raw", 0), ("B1.raw", 1),
                                      ("Y.raw", 1)])
    size = scan_memory([family["A1"], family["X"]]) + 10 * PS
    assert scan_memory([family["B1"], family["Y"]]) <= size
    r = _add(placed, placement, [family["A2"]], str(size), "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    (choice,) = out["choices"]
    assert (choice["host"], choice["new_host"]) == (2, True)
    assert choice["added_bytes"] == scan_memory([family["A2"]])
    assert [o["fits"] for o in out["options"]] == [False, False]
    text = _add(placed, placement, [family["A2"]], str(size))
    assert "Best: a new host (host 2): it fits none of the hosts" in text.stdout


def test_add_reads_the_placement_plan_writes(family, tmp_path):
    # plan --csv and plan --json of A1, B1: their assignments are placements --add takes.
    placed = [family["A1"], family["B1"]]
    r = runner.invoke(app, ["plan", *placed, "--host-memory", "1MiB", "--csv",
                            str(tmp_path / "csv"), "--json", "-q"])
    assert r.exit_code == 0, r.output
    (tmp_path / "plan.json").write_text(r.stdout)
    for placement in (tmp_path / "csv" / "assignments.csv", tmp_path / "plan.json"):
        assert read_placement(placement) == {"A1.raw": 0, "B1.raw": 1}
        out = _add(placed, str(placement), [family["A2"]], "1MiB", "--json")
        assert out.exit_code == 0, out.output
        assert json.loads(out.stdout)["choices"][0]["host"] == 0


@pytest.mark.parametrize(("content", "says"), [
    ("input,node\nA1.raw,0\n", "no 'host' column"),
    ("method,input,host\nsharing,A1.raw,0\nsharing,Z.raw,1\n", "input 'Z.raw' is not among"),
    ("method,input,host\nsharing,A1.raw,0\n", "input 'B1.raw' is given but not placed"),
    ("method,input,host\nsharing,A1.raw,0\nsharing,B1.raw,0\n", "host 0 already needs"),
    ("method,input,host\nsharing,A1.raw,zero\nsharing,B1.raw,1\n", "is not a host number"),
    ("method,input,host\nsharing,A1.raw,0\nsharing,A1.raw,1\n", "placed twice"),
    ('{"hosts": []}', "without an 'assignments' key"),
    ("[1, 2]", "not a list of rows"),
    ("\x00\xff", "not UTF-8"),
    ("", "empty"),
])
def test_a_bad_placement_is_one_line_and_exit_1(family, tmp_path, content, says):
    path = tmp_path / "placement.csv"
    path.write_bytes(content.encode("latin-1"))
    # Hosts of 1 MiB hold A1 or B1 (898 KiB each after KSM), not both.
    r = _add([family["A1"], family["B1"]], str(path), [family["A2"]], "1MiB")
    assert r.exit_code == 1, r.output
    assert r.stdout == ""
    (line,) = r.stderr.splitlines()
    assert line.startswith(f"Error: {path}: ") and says in line, line


def test_add_options_that_do_not_go_together(family, tmp_path):
    placement = _placement(tmp_path, [("A1.raw", 0)])
    for options, says in ((["--add", family["A2"]], "--add needs --placement"),
                          (["--placement", placement], "--placement needs --add"),
                          (["--placement", placement, "--add", family["A2"], "--hosts", "1"],
                           "--hosts does not apply")):
        r = runner.invoke(app, ["plan", family["A1"], "--host-memory", "1MiB", *options])
        assert r.exit_code == 2 and says in r.stderr, r.output


def test_add_from_python(family):
    analysis = analyze([family["A1"], family["B1"], family["A2"]], jobs=1)
    result = add(analysis, {"A1.raw": 0, "B1.raw": 1}, ["A2.raw"], 1 << 20)
    assert result.choices["host"].tolist() == [0]
    with pytest.raises(InputError, match="placed already"):
        add(analysis, {"A1.raw": 0, "B1.raw": 1, "A2.raw": 1}, ["A2.raw"], 1 << 20)
