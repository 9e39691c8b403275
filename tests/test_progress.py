"""Progress bars: drawn on a terminal, never on a pipe, off with --quiet."""

from __future__ import annotations

import io
import sys

import pytest
from conftest import SAMPLES, runner

import ksm_analyze.cli
from ksm_analyze import analyze
from ksm_analyze.cli import app
from ksm_analyze.render.progress import ScanProgress


class FakeTty(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def test_bars_show_bytes_throughput_and_eta_on_a_terminal(monkeypatch):
    tty = FakeTty()
    monkeypatch.setattr(sys, "stderr", tty)
    with ScanProgress() as bars:
        analyze(SAMPLES, progress=bars, jobs=1)
    out = tty.getvalue()
    for label in ("vm-a.elf", "vm-b.raw", "all inputs", "comparing"):
        assert label in out, out
    assert "2.0/2.0 MiB" in out  # each input: 512 stored pages
    assert "4.0/4.0 MiB" in out  # all inputs
    assert "/s" in out  # throughput
    assert "0:00:00" in out  # time left, once done


def test_no_bars_when_not_a_terminal_or_not_enabled(monkeypatch):
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    with ScanProgress() as bars:
        analyze(SAMPLES, progress=bars, jobs=1)
    assert stream.getvalue() == ""
    tty = FakeTty()
    monkeypatch.setattr(sys, "stderr", tty)
    with ScanProgress(enabled=False) as bars:
        analyze(SAMPLES, progress=bars, jobs=1)
    assert tty.getvalue() == ""


def test_callbacks_of_an_inactive_progress_do_nothing():
    with ScanProgress(enabled=False, stream=FakeTty()) as bars:
        assert not bars.active
        bars("all inputs", 5, 10)
        bars.bar("x")(5, 10)
        bars("comparing", 0, 0)


def test_cli_output_has_no_bars_under_a_runner():
    # CliRunner's stderr is not a terminal: the output must be exactly the report.
    r = runner.invoke(app, ["scan", *SAMPLES])
    assert r.exit_code == 0
    assert r.stderr == ""


@pytest.mark.parametrize(("args", "enabled"), [([], True), (["--quiet"], False),
                                                (["-q"], False)])
@pytest.mark.parametrize("command", ["scan", "report"])
def test_quiet_turns_the_bars_off(monkeypatch, tmp_path, command, args, enabled):
    seen = []

    class Spy(ScanProgress):
        def __init__(self, *, enabled: bool = True, stream=None) -> None:
            seen.append(enabled)
            super().__init__(enabled=enabled, stream=stream)

    monkeypatch.setattr(ksm_analyze.cli, "ScanProgress", Spy)
    extra = ["-o", str(tmp_path / "out")] if command == "report" else []
    r = runner.invoke(app, [command, SAMPLES[1], *extra, *args])
    assert r.exit_code == 0, r.output
    assert seen == [enabled]
