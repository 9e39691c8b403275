"""Merging policies: trust domains (no sharing across them) and the zero-pages-only what-if."""

from __future__ import annotations

import json

import pytest
from conftest import SAMPLES, runner, scan_memory

from ksm_analyze import KsmSettings, analyze
from ksm_analyze.cli import app
from ksm_analyze.planning.plan import plan


@pytest.mark.parametrize("mps", [256, 3])
def test_one_domain_per_input_is_the_inputs_apart(mps):
    ksm = KsmSettings(max_page_sharing=mps)
    apart = analyze(SAMPLES, ksm=ksm, domains=(("a", "vm-a*"), ("b", "vm-b*")), jobs=1)
    alone = [analyze([p], ksm=ksm, jobs=1).counters.as_dict() for p in SAMPLES]
    assert apart.counters.as_dict() == {k: sum(a[k] for a in alone) for k in alone[0]}
    assert apart.savings.at["sharing_across_inputs", "with_zero_pages_pages"] == 0
    assert (apart.pairwise["extra_saved_pages"] == 0).all()
    # The per-process ksm_stat of each input is that of the input alone.
    for row, p in zip(apart.per_input.itertuples(), SAMPLES, strict=True):
        single = analyze([p], ksm=ksm, jobs=1).per_input.iloc[0]
        assert row.ksm_merging_pages == single["ksm_merging_pages"]
    assert apart.unrestricted == analyze(SAMPLES, ksm=ksm, jobs=1).counters


def test_one_domain_for_all_is_no_policy():
    none = analyze(SAMPLES, jobs=1)
    one = analyze(SAMPLES, domains=(("all", "*"),), jobs=1)
    assert one.counters == none.counters == one.unrestricted
    for name in ("host", "savings", "histogram", "per_input", "pairwise", "top_contents"):
        assert getattr(one, name).equals(getattr(none, name)), name


def test_zero_only_merges_the_zero_pages_and_nothing_else():
    # The samples hold 838 zero pages and 186 non-zero pages (tests/sample_dumps.json):
    # 838 = 3 x 256 + 70 zero pages make 4 KSM pages; every non-zero page stays unshared.
    c = analyze(SAMPLES, merge="zero-only", jobs=1).counters
    assert (c.pages_shared, c.pages_sharing, c.pages_unshared) == (4, 834, 186)
    z = analyze(SAMPLES, merge="zero-only", ksm=KsmSettings(use_zero_pages=True), jobs=1)
    assert (z.counters.ksm_zero_pages, z.counters.pages_sharing) == (838, 0)


def test_plan_with_domains_is_scan_with_domains_host_by_host(tmp_path):
    result = analyze(SAMPLES, domains=(("a", "vm-a*"), ("b", "vm-b*")), jobs=1)
    planned = plan(result, 1 << 30)
    for r in planned.hosts.itertuples():
        inputs = [p for p in SAMPLES for n in r.inputs if p.endswith("/" + n)]
        assert r.memory_after_bytes == scan_memory(inputs, "--domain", "a=vm-a*",
                                                   "--domain", "b=vm-b*")


def test_the_cost_of_the_policy_is_one_line_and_in_the_json(tmp_path):
    csv = tmp_path / "domains.csv"
    csv.write_text(f"input,domain\n{SAMPLES[0]},web\n{SAMPLES[1]},db\n")
    r = runner.invoke(app, ["scan", *SAMPLES, "--domains", str(csv)])
    assert r.exit_code == 0, r.output
    lines = [line for line in r.stdout.splitlines() if "Policy:" in line]
    assert lines == [("  Policy: pages merge only within domains web (1 input), db (1 input). "
                     "general_profit 3.38 MiB against 3.53 MiB with no policy: it costs "
                     "160 KiB.")]
    data = json.loads(runner.invoke(app, ["scan", *SAMPLES, "--domains", str(csv), "--json"]
                                    ).stdout)
    assert data["policy"]["domains"] == {"vm-a.elf": "web", "vm-b.raw": "db"}
    assert data["policy"]["unrestricted"]["general_profit"] > data["host"][
        "general_profit"]["with_zero_pages"]


@pytest.mark.parametrize(("args", "message"), [
    (["--domain", "a=vm-a*"], f"{SAMPLES[1]} matches no --domain: give each input exactly one"),
    (["--domain", "a=vm*", "--domain", "b=*.raw"],
     f"{SAMPLES[1]} matches several domains (a, b): give each input exactly one"),
    (["--domain", "nonsense"], "--domain 'nonsense' is not NAME=GLOB (e.g. web=web-*.elf)"),
    (["--merge", "some"], "unknown --merge 'some'; choose one of: all, zero-only"),
])
def test_bad_policies_are_one_line(args, message):
    r = runner.invoke(app, ["scan", *SAMPLES, *args])
    assert r.exit_code == 2
    assert r.stderr.strip() == f"Error: {message}"
