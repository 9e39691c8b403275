"""Issue 18, classes 6, 10, 15 and 17: jobs capped to the CPUs, plan sizes and counts
checked before anything is sized by them, and no output of plan or report replacing an
input."""

from __future__ import annotations

import shutil
import threading

import pytest
from conftest import SAMPLES, runner

from ksm_analyze import analyze
from ksm_analyze._parallel import default_jobs
from ksm_analyze.cli import app
from ksm_analyze.options import ScanOptions
from ksm_analyze.planning.plan import plan


def test_jobs_beyond_the_cpus_start_no_more_threads_than_cpus(monkeypatch):
    started = []
    start = threading.Thread.start

    def counting(self: threading.Thread) -> None:
        started.append(self.name)
        start(self)

    monkeypatch.setattr(threading.Thread, "start", counting)
    result = analyze(SAMPLES, jobs=100_000, verify=True)
    assert len(started) <= default_jobs()
    cpus = default_jobs()
    assert f"--jobs 100,000 is more than the {cpus:,} CPU" in " ".join(result.warnings)


def test_jobs_within_the_cpus_are_kept_without_a_word():
    assert ScanOptions(jobs=1).workers == 1
    assert ScanOptions(jobs=1).jobs_warning() is None
    assert ScanOptions(jobs=10**9).workers == default_jobs()
    assert ScanOptions().workers == default_jobs()


def test_plan_refuses_a_billion_hosts_before_sizing_anything():
    result = analyze(SAMPLES, jobs=1)
    with pytest.raises(ValueError, match=r"--hosts 1,000,000,000 is more hosts than the 2 "):
        plan(result, 1 << 30, hosts=10**9)
    r = runner.invoke(app, ["plan", *SAMPLES, "--host-memory", "1GiB", "--hosts", "1000000000"])
    assert r.exit_code == 2  # a bad argument (cli._errors: ValueError)
    assert r.output.strip().startswith("Error: --hosts 1,000,000,000 is more hosts than")
    assert "Traceback" not in r.output


@pytest.mark.parametrize("reserve", ["inf%", "1e400%", "-10%", "nan%", "100%", "250%"])
def test_plan_refuses_a_percentage_reserve_out_of_range_in_one_line(reserve):
    r = runner.invoke(app, ["plan", *SAMPLES, "--host-memory", "1GiB", "--reserve", reserve])
    assert r.exit_code == 2  # a bad argument (cli._errors: ValueError)
    assert r.output.strip().splitlines() == [
        (f"Error: --reserve {reserve!r}: give a percentage from 0 up to (not including) 100% "
         "of --host-memory")]


def test_plan_refuses_a_reserve_size_of_the_whole_host_in_human_units():
    r = runner.invoke(app, ["plan", *SAMPLES, "--host-memory", "1GiB", "--reserve", "1GiB"])
    assert r.exit_code == 2  # a bad argument (cli._errors: ValueError)
    assert r.output.strip() == ("Error: --reserve '1GiB' (1 GiB) leaves no memory of a host of "
                                "1 GiB (--host-memory): give less")


def test_plan_png_never_overwrites_an_input(tmp_path):
    # docs/security.md: an output never replaces an input. --png PREFIX writes
    # PREFIX-hosts.png: an input of that name must be refused, and left as it was.
    victim = tmp_path / "x-hosts.png"
    shutil.copy(SAMPLES[1], victim)
    before = victim.read_bytes()
    r = runner.invoke(app, ["plan", SAMPLES[0], str(victim), "--host-memory", "1GiB",
                            "--format", "raw", "--png", str(tmp_path / "x")])
    assert r.exit_code == 2, r.output
    assert "this input would be overwritten by the output x-hosts.png" in r.output
    assert victim.read_bytes() == before


def test_report_plan_files_never_overwrite_an_input(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    victim = out / "plan_hosts.png"
    shutil.copy(SAMPLES[1], victim)
    before = victim.read_bytes()
    r = runner.invoke(app, ["report", SAMPLES[0], str(victim), "-o", str(out), "--format",
                            "raw", "--host-memory", "1GiB"])
    assert r.exit_code == 2, r.output
    assert "this input would be overwritten by the output plan_hosts.png" in r.output
    assert victim.read_bytes() == before
