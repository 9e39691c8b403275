"""``ksm-analyze report``: the files it writes, that it keeps page bytes out of them, and
that the HTML page renders in a real browser."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import stat
import struct
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import series_target
from conftest import PS, ROOT, SAMPLES, runner

from dumpwriter.elf import make_elf_core
from dumpwriter.raw import make_raw
from ksm_analyze.cli import app
from ksm_analyze.render.report import CHARTS, TABLES, TIME_CHARTS

SECRET = b"hunter2:correct-horse-battery-staple;"  # 37 bytes: not a power-of-two period
SECRET_PAGE = (SECRET * (PS // len(SECRET) + 1))[:PS]


def _report(*args: str) -> tuple[int, str, str]:
    r = runner.invoke(app, ["report", *args])
    return r.exit_code, r.stdout, r.stderr


@pytest.fixture(scope="module")
def sample_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "out"
    code, stdout, stderr = _report(*SAMPLES, "-o", str(out))
    assert code == 0, stdout + stderr
    return out


def test_report_writes_every_table_chart_and_the_page(sample_report):
    names = sorted(p.name for p in sample_report.iterdir())
    want = sorted([f"{t}.csv" for t in TABLES] + [f"{c}.png" for c in CHARTS] + ["index.html"])
    assert names == want
    for p in sample_report.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p.name
    for c in CHARTS:
        assert (sample_report / f"{c}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_csvs_are_the_scan_numbers(sample_report):
    scan = json.loads(runner.invoke(app, ["scan", *SAMPLES, "--json"]).stdout)
    host = pd.read_csv(sample_report / "host.csv", index_col="counter")
    for counter, by_scenario in scan["host"].items():
        for scenario, value in by_scenario.items():
            assert host.at[counter, scenario] == value
    pw = pd.read_csv(sample_report / "pairwise.csv")
    assert pw.to_dict(orient="records") == scan["pairwise"]
    # The sample manifest (hashlib over the raw windows) says 25 pages hold the most
    # duplicated non-zero content and 838 are zero.
    manifest = json.loads((ROOT / "tests" / "sample_dumps.json").read_text())["vm-a+vm-b"]
    top = pd.read_csv(sample_report / "top_contents.csv")
    assert list(top["copies"][:2]) == [manifest["zero_pages"],
                                       max(manifest["copies_of_nonzero_contents"])]
    assert top["content_class"][0] == "zero"


def test_report_html_embeds_every_chart_and_table(sample_report):
    page = (sample_report / "index.html").read_text()
    imgs = re.findall(r'<img src="data:image/png;base64,([^"]+)"', page)
    assert len(imgs) == len(CHARTS)
    for c, data in zip(CHARTS, imgs, strict=True):
        assert base64.b64decode(data) == (sample_report / f"{c}.png").read_bytes()
    for section in ("summary", "table-host", "table-pairwise", "table-top_contents",
                    "options"):
        assert f'id="{section}"' in page
    assert "http://" not in page and "https://" not in page  # nothing to fetch


def _png_size(path: Path) -> tuple[int, int]:
    w, h = struct.unpack(">II", path.read_bytes()[16:24])  # IHDR width, height
    return w, h


_CHECK = """<script>
window.addEventListener("load", () => {
  const imgs = [...document.images].map(i => [i.complete, i.naturalWidth, i.naturalHeight]);
  document.body.setAttribute("data-img-check", JSON.stringify(imgs));
});
</script>"""


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="chromium missing (.ci/install-system-deps.sh installs it)")
def test_report_renders_in_headless_chromium(sample_report, tmp_path):
    # A copy with a check script: the report itself carries no script.
    page = (sample_report / "index.html").read_text()
    assert "<script" not in page
    check = tmp_path / "check.html"
    check.write_text(page.replace("</body>", _CHECK + "</body>"))
    r = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000",
         "--dump-dom", check.as_uri()],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    found = re.search(r'data-img-check="([^"]*)"', r.stdout)
    assert found, r.stdout[:2000]
    decoded = json.loads(found.group(1).replace("&quot;", '"'))
    want = [[True, *_png_size(sample_report / f"{c}.png")] for c in CHARTS]
    assert decoded == want
    assert "KSM savings report" in r.stdout
    shot = tmp_path / "shot.png"
    subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,2400",
         f"--screenshot={shot}", (sample_report / "index.html").as_uri()],
        capture_output=True, timeout=120, check=True,
    )
    from matplotlib.image import imread

    pixels = imread(shot)
    assert pixels.shape[:2] == (2400, 1280)
    assert len(np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)) > 50  # not blank


_FIT = """<script>
window.addEventListener("load", () => {
  const page = document.documentElement;
  const tables = [...document.querySelectorAll("table.data")].map(t => {
    const box = t.parentElement;
    let h = box.previousElementSibling;  // the section's heading
    while (h && !/^H[23]$/.test(h.tagName)) h = h.previousElementSibling;
    return [h ? h.id : "", box.className, box.scrollWidth <= box.clientWidth];
  });
  document.body.setAttribute("data-fit", JSON.stringify(
    {page: [page.scrollWidth, page.clientWidth], tables}));
});
</script>"""


@pytest.fixture(scope="module")
def plan_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("plan-report") / "out"
    code, stdout, stderr = _report(*SAMPLES, "-o", str(out), "--host-memory", "400KiB",
                                   "--project", "1,2,10,100")
    assert code == 0, stdout + stderr
    return out


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="chromium missing (.ci/install-system-deps.sh installs it)")
def test_report_tables_fit_or_scroll_in_headless_chromium(plan_report, tmp_path):
    page = (plan_report / "index.html").read_text()
    check = tmp_path / "fit.html"
    check.write_text(page.replace("</body>", _FIT + "</body>"))
    r = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000",
         "--window-size=1200,2000", "--dump-dom", check.as_uri()],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    found = re.search(r'data-fit="([^"]*)"', r.stdout)
    assert found, r.stdout[:2000]
    fit = json.loads(found.group(1).replace("&quot;", '"'))
    width, visible = fit["page"]
    assert width <= visible  # the page itself never scrolls sideways
    # Every table sits in a wrapper that scrolls sideways (the inputs' 17 columns with
    # absolute paths need it); the savings, the plan's hosts and its marginal memory, numbers
    # under long column names, fit a 1,200-pixel window whole.
    tables = fit["tables"]
    assert [h for h, _, _ in tables] == [
        "table-per_input", "table-host", "table-savings", "table-histogram", "table-pairwise",
        "table-top_contents", "huge-pages", "plan", "plan", "table-plan_marginal", "overcommit"]
    assert all(cls == "scroll" for _, cls, _ in tables)
    fits = [f for _, _, f in tables]
    assert fits[2] and fits[-3] and fits[-2], tables  # the savings, the plan's hosts, marginal


def test_charts_that_change_with_the_policy_name_it_in_their_titles():
    from ksm_analyze import analyze

    for merge in ("all", "zero-only"):
        result = analyze(SAMPLES, jobs=1, merge=merge)
        titles = {"savings": result.plot_savings().get_suptitle(),
                  "histogram": result.plot_histogram().axes[0].get_title(),
                  "pairwise": result.plot_pairwise().axes[0].get_title()}
        for chart, title in titles.items():
            assert f"merge={merge}," in title, (chart, title)
            assert "max_page_sharing=256" in title, (chart, title)


def test_the_html_pairwise_table_shows_the_most_alike_pairs_of_many(monkeypatch):
    # Thousands of inputs: index.html lists the pairs with most pages of A in B (the CSV has
    # every pair). The samples: vm-a.elf has 52 pages in vm-b.raw, vm-b.raw 51 in vm-a.elf.
    from ksm_analyze import analyze
    from ksm_analyze.render import report

    result = analyze(SAMPLES, jobs=1)
    monkeypatch.setattr(report, "PAIRS_SHOWN", 1)
    page = report.render_html(result, {})
    section = page.split('id="table-pairwise">', 1)[1].split("</table>", 1)[0]
    assert section.startswith("Pairwise sharing (non-zero pages; extra saving if only the two "
                              "share a host): the 1 pair with the most pages of A in B, of 2")
    assert "<td>52</td>" in section and "<td>51</td>" not in section  # vm-a.elf's row
    assert section.count("</tr>") == 2  # the header and one pair


def test_the_html_shows_the_first_rows_of_a_table_of_many_and_names_its_csv(monkeypatch):
    # Thousands of inputs: index.html shows the first ROWS_SHOWN inputs (and hosts of each
    # method), says how many there are and which CSV has them all; the title and the
    # options name the first NAMES_SHOWN inputs. The samples in 400 KiB hosts: 2 inputs,
    # a host each by either method (4 rows of plan_hosts.csv).
    from ksm_analyze import analyze
    from ksm_analyze.planning.plan import plan
    from ksm_analyze.render import report

    result = analyze(SAMPLES, jobs=1)
    made = plan(result, 400 * 1024)
    whole = report.render_html(result, {}, made)  # 2 inputs: every row, every name
    assert "Shown:" not in whole and "more" not in whole.split("<body>", 1)[1].split("<h2")[0]
    assert "<title>KSM savings report: vm-a.elf, vm-b.raw</title>" in whole
    monkeypatch.setattr(report, "ROWS_SHOWN", 1)
    monkeypatch.setattr(report, "NAMES_SHOWN", 1)
    page = report.render_html(result, {}, made)
    assert "<title>KSM savings report: vm-a.elf and 1 more</title>" in page
    assert "<h1>KSM savings report: vm-a.elf and 1 more</h1>" in page
    inputs = page.split('id="table-per_input">', 1)[1].split("</table>", 1)[0]
    assert ('<p class="note">Shown: the first 1 of 2 inputs; <a href="per_input.csv">'
            "per_input.csv</a> has them all.</p>") in inputs
    assert inputs.count("</tr>") == 2 and "vm-a.elf" in inputs and "vm-b.raw" not in inputs
    hosts = page.split('id="plan">', 1)[1].split("</table>", 2)[1]  # after the summary's
    assert ('<p class="note">Shown: the first 1 host of each method (2 of 4 rows); '
            '<a href="plan_hosts.csv">plan_hosts.csv</a> has them all.</p>') in hosts
    assert hosts.count("</tr>") == 3 and "sharing" in hosts and "first_fit" in hosts
    options = page.split('id="options">', 1)[1]
    assert "sample_dumps/vm-a.elf ... and 1 more (per_input.csv has them all)" in options
    assert "vm-b.raw" not in options


def test_heatmap_cells_are_imshows_pixels_without_its_float_copies():
    # The pairwise heatmap of a thousand inputs is 2,000 pixels a side: imshow resamples its
    # image in float32 RGBA at the axes' pixels (16 bytes each, more than once); _CellImage
    # picks each pixel's cell in bytes. The same pixels as imshow's, on an odd grid with
    # blank (NaN) cells, in a fraction of the memory.
    import tracemalloc

    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from ksm_analyze.render.plots import _CellImage

    rng = np.random.default_rng(1)
    frac = rng.random((61, 97))
    frac[rng.random(frac.shape) < 0.1] = np.nan
    rgba = colormaps["Blues"](frac, bytes=True)

    def draw(cells: bool) -> tuple[np.ndarray, int, int]:
        fig = Figure(figsize=(9, 7), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        ax.set_facecolor("#eeeeee")
        if cells:
            image = _CellImage(ax, interpolation="nearest", origin="upper")
            image.set_data(rgba)
            image.set_clip_path(ax.patch)
            image.set_extent(image.get_extent())
            ax.set_aspect("equal")
            ax.add_image(image)
        else:
            ax.imshow(rgba, interpolation="nearest")
        fig.canvas.draw()
        tracemalloc.start()  # numpy reports its arrays to it
        fig.canvas.draw()
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        area = int(ax.bbox.width * ax.bbox.height)
        return np.asarray(fig.canvas.buffer_rgba()).copy(), peak, area

    want, _, _ = draw(cells=False)
    got, peak, area = draw(cells=True)
    assert got.shape == want.shape and (got == want).all()
    assert peak < area * 16  # under one float32 RGBA copy of the axes' pixels


def test_heatmap_clusters_are_the_families_under_a_base_image():
    # 3 families of 4 inputs (0-3, 4-7, 8-11) sharing half their pages within, and a base
    # image a tenth of every input's pages: the families are the clusters; without the
    # base, the families too; without any pair, every input alone.
    from ksm_analyze.render.plots import _clusters

    pairs = [(x, y, 0.5 if x // 4 == y // 4 else 0.1) for x in range(12) for y in range(12)
             if x != y]
    a, b, f = (np.array(c) for c in zip(*pairs, strict=True))
    families = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert sorted(sorted(c) for c in _clusters(12, a, b, f)) == families
    within = f == 0.5
    assert sorted(sorted(c) for c in _clusters(13, a[within], b[within], f[within])) == \
        [*families, [12]]
    assert _clusters(3, a[:0], b[:0], f[:0]) == [[0], [1], [2]]
    # A fourth family of 6: the largest cluster first.
    big = [(x, y, 0.5) for x in range(12, 18) for y in range(12, 18) if x != y]
    a2, b2, f2 = (np.array(c) for c in zip(*pairs, *big, strict=True))
    assert sorted(_clusters(18, a2, b2, f2)[0]) == list(range(12, 18))


def test_heatmap_clusters_are_families_of_guests_of_mixed_sizes():
    # 3 families of 4 guests under a base layer of 40 pages. What two guests of a family both
    # hold varies with their sizes (guests of 1 to 64 GiB): 2,000, 1,000 or 500 pages along
    # each family's chain, 300 for its other pairs. The cut is at the largest ratio between
    # successive joins (500 -> 40), not the largest difference (2,000 -> 1,000, which would
    # split every family).
    from ksm_analyze.render.plots import _clusters

    chain = {(0, 1): 2000.0, (1, 2): 1000.0, (2, 3): 500.0}
    pairs = [(x, y, chain.get((x % 4, y % 4), chain.get((y % 4, x % 4), 300.0))
              if x // 4 == y // 4 else 40.0) for x in range(12) for y in range(12) if x != y]
    a, b, pages = (np.array(c) for c in zip(*pairs, strict=True))
    assert sorted(sorted(c) for c in _clusters(12, a, b, pages)) == [
        [0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]


# -- over time: the ksmd replay's charts and sections -----------------------------------


@pytest.fixture(scope="module")
def series_report(tmp_path_factory):
    """The report of a live series of a churning process (tests/series_target.py)."""
    base = tmp_path_factory.mktemp("series-report")
    files = series_target.series(base / "fp")
    code, stdout, stderr = _report(*files, "-o", str(base / "out"))
    assert code == 0, stdout + stderr
    return base / "out"


def _decoded(path: Path) -> np.ndarray:
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    pixels = imread(path)
    assert pixels.shape[:2] == _png_size(path)[::-1]
    return pixels


@pytest.mark.parametrize("which", ["series_report", "sample_report"])
def test_report_draws_the_time_charts_for_a_series_and_for_single_dumps(which, request):
    out = request.getfixturevalue(which)
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([f"{t}.csv" for t in TABLES] + [f"{c}.png" for c in CHARTS]
                           + ["index.html"])
    assert {"timeline", "ksmd_settings"} <= set(CHARTS)
    for chart in TIME_CHARTS:
        pixels = _decoded(out / f"{chart}.png")
        colors = np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)
        assert len(colors) > 50, chart  # drawn, not a blank canvas


@pytest.mark.parametrize("which", ["series_report", "sample_report"])
def test_report_html_has_the_over_time_section(which, request):
    out = request.getfixturevalue(which)
    page = (out / "index.html").read_text()
    section = page[page.index('<h2 id="over-time">'):page.index('<h2 id="tables">')]
    for chart in TIME_CHARTS:  # its charts, as the files hold them
        found = re.search(f'<figure id="chart-{chart}"><img src="data:image/png;base64,'
                          '([^"]+)"', section)
        assert found and base64.b64decode(found[1]) == (out / f"{chart}.png").read_bytes()
    # The convergence in words, with the numbers of convergence.csv.
    conv = pd.read_csv(out / "convergence.csv", index_col="item")["value"]
    assert f"ksmd replayed with the rules of {conv['kernel_rules']}" in section
    assert f"sleep_millisecs={conv['sleep_millisecs']}" in section
    assert "steady state after" in section
    host = page[page.index('id="table-host"'):page.index('id="table-savings"')]
    assert "<code>steady_state</code> (ksmd replayed, steady)" in host
    series = which == "series_report"
    assert ("<code>if_memory_stood_still</code> (if memory stood still)" in host) == series
    assert ('id="table-stability"' in section) == series
    if series:
        # The target's 600 pages of 40 contents and 100 written zero pages hold still; its
        # 400 pages of one content rewritten without pause only coincide.
        table = section[section.index('id="table-stability"'):]
        row = re.findall(r"<td>([^<]*)</td>", table)
        assert re.match(r"python[\d.]*-\d+$", row[0]) and row[1] == "3"  # python3 too
        assert row[-2:] == [f"{series_target.STABLE_DUPLICATE_PAGES:,}", "400"]
        summary = page[page.index('id="summary"'):page.index('id="charts"')]
        assert "general_profit (if memory stood still)" in summary
    else:
        assert "Each input was seen once" in section


def test_the_timeline_chart_marks_the_convergence_times_and_names_its_knobs():
    from ksm_analyze import analyze

    result = analyze(SAMPLES, jobs=1, pages_to_scan=500, sleep_millisecs=50, smart_scan=False,
                     kernel="6.12")
    fig = result.plot_timeline()
    title = fig.get_suptitle()
    for words in ("rules of kernel 6.12 (--kernel)", "smart_scan=0", "pages_to_scan=500",
                  "sleep_millisecs=50", "max_page_sharing=256", "use_zero_pages=0"):
        assert words in title, (words, title)
    conv = result.convergence["value"]
    ax = fig.axes[0]
    marks = sorted(float(line.get_xdata()[0]) for line in ax.lines
                   if len(set(line.get_xdata())) == 1)
    assert marks == sorted(float(conv[k]) for k in (
        "time_to_50_percent_seconds", "time_to_90_percent_seconds", "steady_state_seconds"))
    # One step line per counter, over every full scan replayed (and t=0).
    steps = [line for line in ax.lines if len(set(line.get_xdata())) > 1]
    assert len(steps) == 4 and all(len(line.get_xdata()) == len(result.timeline) + 1
                                   for line in steps)


def _legend(fig) -> list[str]:
    return [t.get_text() for legend in fig.legends for t in legend.get_texts()]


def test_the_settings_chart_marks_the_advisor_the_replayed_and_the_cheapest_setting():
    from ksm_analyze import analyze

    result = analyze(SAMPLES, jobs=1, converge_within=0.5)
    fig = result.plot_ksmd_settings()
    ax = fig.axes[0]
    # Steady-state times from milliseconds (sleep 0) to seconds: log scales.
    assert (ax.get_xscale(), ax.get_yscale()) == ("log", "log")
    assert "rules of kernel" in fig.get_suptitle()
    labels = _legend(fig)
    assert "the scan-time advisor (advisor_mode=scan-time)" in labels
    assert any(t.startswith("replayed: pages_to_scan=100, sleep_millisecs=20\n")
               for t in labels), labels
    # The cheapest is the one convergence names (ksmd/cost.py's cheapest(), in words).
    words = result.convergence.at["cheapest_setting", "value"]
    rate, sleep = re.search(r"pages_to_scan (\d+), sleep_millisecs (\d+):", words).groups()
    assert any(t.startswith(f"cheapest within 500 ms: pages_to_scan={int(rate):,}, "
                            f"sleep_millisecs={sleep}\n") for t in labels), (words, labels)


def test_the_settings_chart_stays_linear_where_values_span_less_than_20x():
    import dataclasses

    from ksm_analyze import analyze
    from ksm_analyze.columns import Columns

    result = analyze(SAMPLES, jobs=1)
    narrow = Columns.from_records(
        [{"pages_to_scan": p, "sleep_millisecs": 20, "advisor_mode": "none",
          "full_scan_seconds": t, "steady_state_seconds": 2 * t, "ksmd_cpu_percent": cpu,
          "advised_pages_to_scan": None} for p, t, cpu in ((100, 1.0, 2.0), (500, 0.2, 9.0))],
        list(result.columns["ksmd_settings"].names))
    fig = dataclasses.replace(result, columns={**result.columns,
                                               "ksmd_settings": narrow}).plot_ksmd_settings()
    assert (fig.axes[0].get_xscale(), fig.axes[0].get_yscale()) == ("linear", "linear")
    assert not any(t.startswith("the scan-time advisor") for t in _legend(fig))


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="chromium missing (.ci/install-system-deps.sh installs it)")
def test_series_report_tables_fit_or_scroll_in_headless_chromium(series_report, tmp_path):
    page = (series_report / "index.html").read_text()
    check = tmp_path / "fit.html"
    check.write_text(page.replace("</body>", _FIT + "</body>"))
    r = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000",
         "--window-size=1200,2000", "--dump-dom", check.as_uri()],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    found = re.search(r'data-fit="([^"]*)"', r.stdout)
    assert found, r.stdout[:2000]
    fit = json.loads(found.group(1).replace("&quot;", '"'))
    width, visible = fit["page"]
    assert width <= visible
    tables = fit["tables"]
    assert [h for h, _, _ in tables][:2] == ["table-stability", "table-per_input"]
    assert all(cls == "scroll" for _, cls, _ in tables)


# -- page bytes stay out ---------------------------------------------------------------


@pytest.fixture(scope="module")
def secret_dumps(tmp_path_factory):
    d = tmp_path_factory.mktemp("secret")
    rng = np.random.default_rng(7)
    other = rng.integers(0, 256, PS, dtype=np.uint8).tobytes()
    a = make_raw(d / "a.raw", [SECRET_PAGE, SECRET_PAGE, bytes(PS), other, SECRET_PAGE])
    b = d / "b.elf"
    make_elf_core(b, [(0, SECRET_PAGE + other + bytes(PS))], unaligned=False)
    return [str(a), str(b)]


def _needles() -> list[bytes]:
    head = SECRET_PAGE[:64]
    return [SECRET[:16], SECRET.hex().encode()[:32], SECRET.hex().upper().encode()[:32],
            base64.b64encode(head)[:24], head.hex().encode()]


def _leaks(directory: Path) -> list[str]:
    found = []
    for p in directory.iterdir():
        data = p.read_bytes()
        found += [f"{p.name}: {n!r}" for n in _needles() if n in data]
    return found


def test_no_page_bytes_in_any_output_without_show_content(secret_dumps, tmp_path):
    out = tmp_path / "out"
    code, stdout, stderr = _report(*secret_dumps, "-o", str(out))
    assert code == 0, stdout + stderr
    top = pd.read_csv(out / "top_contents.csv")
    assert "content_hex" not in top.columns
    assert top["copies"].max() == 4  # the secret page is the most duplicated content
    assert _leaks(out) == []
    scan = runner.invoke(app, ["scan", *secret_dumps, "--json", "--csv", str(tmp_path / "c")])
    assert not [n for n in _needles() if n in scan.stdout.encode()]
    assert _leaks(tmp_path / "c") == []


def test_show_content_puts_the_first_bytes_in_the_table_and_page(secret_dumps, tmp_path):
    out = tmp_path / "out"
    code, stdout, stderr = _report(*secret_dumps, "-o", str(out), "--show-content")
    assert code == 0, stdout + stderr
    top = pd.read_csv(out / "top_contents.csv").set_index("copies")
    assert top.at[4, "content_hex"] == SECRET_PAGE[:64].hex()
    page = (out / "index.html").read_text()
    assert SECRET_PAGE[:64].hex() in page
    assert "--show-content" in page  # the page warns that it holds page bytes
    leaked = _leaks(out)
    assert leaked and all(x.startswith(("top_contents.csv", "index.html")) for x in leaked)


# -- errors ----------------------------------------------------------------------------


def test_report_bad_input_is_one_line_exit_1(tmp_path):
    p = tmp_path / "nope.raw"
    code, _, stderr = _report(str(p), "-o", str(tmp_path / "out"))
    assert code == 1
    assert stderr.strip().splitlines() == [f"Error: {p}: no such file"]


def test_report_unwritable_output_is_one_line_exit_1(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    out = blocker / "out"
    code, _, stderr = _report(SAMPLES[0], "-o", str(out))
    assert code == 1
    line = f"Error: {out}: cannot write the report: Not a directory"
    assert stderr.strip().splitlines() == [line]


def test_report_write_failure_is_one_line_exit_1(tmp_path, monkeypatch):
    # As root, permissions cannot stop a write: make the write itself fail.
    from ksm_analyze.render import report

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "out" / "per_input.csv"))

    monkeypatch.setattr(report, "atomic_write", full)
    out = tmp_path / "out"
    code, _, stderr = _report(SAMPLES[0], "-o", str(out))
    assert code == 1
    line = (f"Error: {out}: cannot write the report: No space left on device "
            f"({out / 'per_input.csv'})")
    assert stderr.strip().splitlines() == [line]


def test_report_negative_top_is_exit_2(tmp_path):
    code, _, stderr = _report(SAMPLES[0], "-o", str(tmp_path / "o"), "--top", "-1")
    assert code == 2
    assert "--top cannot be negative" in stderr


def test_report_creates_a_private_folder(tmp_path):
    out = tmp_path / "new" / "out"
    code, *_ = _report(SAMPLES[0], "-o", str(out))
    assert code == 0
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o700


def test_host_chart_of_many_hosts_marks_each_worst_case_within_its_bar(tmp_path):
    # Ten inputs of 4 random pages in hosts of 5 pages: one input a host, 10 bars a method
    # (more than 8: the many-bars layout). Each host's memory before KSM is its input's
    # 16 KiB: a tick as wide as its bar (bars are 0.8 wide), not markers of a fixed size
    # that run into one line across a hundred bars.
    from ksm_analyze import analyze
    from ksm_analyze.planning.plan import plan

    rng = np.random.default_rng(5)
    paths = []
    for k in range(10):
        path = tmp_path / f"g{k}.raw"
        path.write_bytes(rng.integers(0, 256, 4 * PS, dtype=np.uint8).tobytes())
        paths.append(str(path))
    made = plan(analyze(paths, jobs=1), 5 * PS)
    fig = made.plot_hosts()
    panels = [ax for ax in fig.axes if ax.patches]
    assert len(panels) == 2
    for ax in panels:
        ticks = [c for c in ax.collections if c.get_label() == "memory before KSM (worst case)"]
        assert len(ticks) == 1
        segments = ticks[0].get_segments()
        assert len(segments) == 10
        for x, seg in enumerate(segments):
            (x0, y0), (x1, y1) = seg
            assert (x0, x1) == pytest.approx((x - 0.4, x + 0.4)) and y0 == y1
            assert y0 * (1 << 10) == pytest.approx(4 * PS)  # 16 KiB, on a KiB scale


def test_histogram_legend_leaves_the_bar_labels_readable():
    # A fleet's histogram (1,000 guests of 64 pages in 100 families): the unique pages'
    # bars are the tallest, in the upper left where the legend was: it hid their numbers.
    from types import SimpleNamespace

    from ksm_analyze import analyze
    from ksm_analyze.render.plots import plot_histogram

    sample = analyze(SAMPLES, jobs=1)
    hist = pd.DataFrame({"copies": [1, 4, 8, 4096], "contents": [28743, 222, 2978, 1],
                         "pages_referenced": [28743, 1507, 27320, 6430],
                         "pages_after_merging": [28743, 222, 2978, 26]})
    fleet = SimpleNamespace(histogram=hist, ksm=sample.ksm, options=sample.options,
                            domains=sample.domains)
    fig = plot_histogram(fleet)
    fig.canvas.draw()
    ax = fig.axes[0]
    legend = ax.get_legend().get_window_extent()
    labels = [t for t in ax.texts if t.get_text()]
    assert {t.get_text() for t in labels} >= {"28,743", "27,320", "6,430"}
    hidden = [t.get_text() for t in labels if t.get_window_extent().overlaps(legend)]
    assert hidden == []
