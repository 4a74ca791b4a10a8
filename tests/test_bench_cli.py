"""`uffd-pager bench` as a user runs it: arguments refused before any work,
progress while it runs, --json, and --report's Markdown and plots, from a run
and from a saved --json. One real run with the smallest settings
(`--quick --pages 64`, about 20 s here) serves the tests that read its output."""
from __future__ import annotations

import json
import math
import os
import pty
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from support import assert_usage_error, run_cli
from uffd_pager import bench
from uffd_pager.bench_progress import Progress
from uffd_pager.bench_report import MARKER, REPORT

STEP = re.compile(r"^uffd-pager bench(?: --store \S+)? \[ *(\d+)/(\d+) \d+:\d\d\] (.+)$")
RUN_TIMEOUT = 240  # seconds for the one small run (about 20 s on this machine)


# --- bench: refusing bad arguments before any work ---------------------------------------------


def _steps(stderr: str) -> list[tuple[int, int, str]]:
    """The progress lines: (step, of steps, what starts)."""
    return [(int(m[1]), int(m[2]), m[3]) for m in map(STEP.match, stderr.splitlines()) if m]


def _refused_at_once(*args: str) -> subprocess.CompletedProcess[str]:
    start = time.monotonic()
    result = run_cli("bench", "--quick", "--pages", "64", *args)
    assert time.monotonic() - start < 20, "it ran before refusing"
    assert not _steps(result.stderr), "it started the run before refusing"
    return result


@pytest.mark.timeout(120)
@pytest.mark.parametrize("option, value, complaint", [
    ("--json", "{tmp}/missing/out.json", "does not exist"),
    ("--json", "{tmp}", "is a directory"),
    # root may write anywhere by the mode bits, so os.access() says yes; sysfs refuses new files all the same
    ("--json", "/sys/kernel/out.json", "not writable"),
    ("--dir", "{tmp}/missing", "does not exist"),
    ("--dir", "/sys/kernel", "not writable"),
    ("--report", "{tmp}/file", "is not a directory"),
    ("--report", "{tmp}/missing/report", "does not exist"),
    ("--report", "/sys/kernel/report", "not writable"),
    ("--report", "{tmp}/project", "not replacing it"),
])
def test_bench_refuses_an_unusable_output_path_before_running(tmp_path: Path, option: str, value: str,
                                                               complaint: str) -> None:
    (tmp_path / "file").write_text("a file, not a directory")
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "README.md").write_text("# a project's own README\n")
    assert_usage_error(_refused_at_once(option, value.format(tmp=tmp_path)), option, complaint)
    assert (tmp_path / "project" / "README.md").read_text() == "# a project's own README\n"
    assert not Path("/sys/kernel/out.json").exists()


@pytest.mark.timeout(60)
def test_bench_json_check_leaves_no_file_behind(tmp_path: Path) -> None:
    # A refused run (bad --pages comes after --json) must not leave the empty file its check made.
    out = tmp_path / "out.json"
    assert_usage_error(run_cli("bench", "--json", str(out), "--pages", "0"), "--pages")
    assert not out.exists()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("pages", ["-4", "0", "many", "1.5", "", "1048577", "99999999999"])
def test_bench_rejects_bad_page_counts(pages: str) -> None:
    assert_usage_error(_refused_at_once("--pages", pages), "--pages", repr(pages))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("args, complaint", [
    (["--from", "{json}"], "needs --report DIR"),
    (["--report", "{tmp}/r", "--from", "{json}", "--quick"], "--quick would not be used"),
    (["--report", "{tmp}/r", "--from", "{json}", "--pages", "64", "--store", "redis"], "--pages, --store"),
    (["--report", "{tmp}/r", "--from", "{tmp}/missing.json"], "cannot read"),
    (["--report", "{tmp}/r", "--from", "{tmp}/not-bench.json"], "not a file that uffd-pager bench --json wrote"),
    (["--report", "{tmp}/r", "--from", "{tmp}/bad-figure.json"], "not a file that uffd-pager bench --json wrote"),
])
def test_bench_from_refuses_what_it_cannot_use(tmp_path: Path, args: list[str], complaint: str) -> None:
    (tmp_path / "not-bench.json").write_text('{"rows": "no"}')
    (tmp_path / "bad-figure.json").write_text(json.dumps({"kernel": "6.18", "pages": 1, "rounds": 1, "rows": [
        {"name": "a", "floor": "a", "p50_us": "fast", "p99_us": 1, "mean_us": 1, "per_s": 1, "unit": "faults/s",
         "samples": 1}]}))
    result = run_cli("bench", *(a.format(tmp=tmp_path, json=tmp_path / "not-bench.json") for a in args))
    assert_usage_error(result, "--from", complaint)
    assert not (tmp_path / "r").exists()


# --- bench: one real run -------------------------------------------------------------------------


@dataclass
class Run:
    stdout: str
    stderr: str
    json: Path
    report: Path


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    out = tmp_path_factory.mktemp("bench")
    json_path, report = out / "run.json", out / "report"
    result = run_cli("bench", "--quick", "--pages", "64", "--json", str(json_path), "--report", str(report),
                     timeout=RUN_TIMEOUT)
    assert result.returncode == 0, result.stderr
    return Run(result.stdout, result.stderr, json_path, report)


@pytest.mark.timeout(RUN_TIMEOUT + 60)
def test_bench_shows_each_step_on_stderr_as_it_starts(small_run: Run) -> None:
    steps = _steps(small_run.stderr)
    total = steps[0][1]
    assert [n for n, _, _ in steps] == list(range(1, total + 1)), "steps missing or out of order"
    assert {t for _, t, _ in steps} == {total}
    names = " ".join(name for _, _, name in steps)
    for case in bench.CASES + bench.SEQUENTIAL_CASES:
        for round_ in (1, 2, 3):
            assert f"round {round_}/3: {case.name}" in names
    assert bench.OOC_OURS in names
    assert re.search(rf"^uffd-pager bench: {total} steps done in \d+:\d\d$", small_run.stderr, re.M)
    # stdout keeps only the table and its notes, for scripts
    assert not _steps(small_run.stdout)
    title, header = small_run.stdout.splitlines()[:2]
    assert title.startswith("uffd-pager bench: 64 random 4 KiB pages x 3 rounds")
    assert header.split()[:3] == ["row", "p50", "us"]


@pytest.mark.timeout(30)
def test_progress_on_a_terminal_rewrites_one_line() -> None:
    main, secondary = pty.openpty()
    with os.fdopen(secondary, "w") as terminal:
        progress = Progress("uffd-pager bench", 2, terminal)
        progress.step("round 1/1: first")
        progress.step("round 1/1: second, " + "x" * 500)
        progress.finish()
    chunks = []
    while True:  # a pty hands out what was written in pieces; EIO once the other side is closed and read
        try:
            chunk = os.read(main, 65536)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(main)
    written = b"".join(chunks).decode()
    assert written.count("\r\x1b[K") == 3
    assert written.count("\n") == 1 and written.endswith("\n"), "a line per step on a terminal"
    assert "x" * 500 not in written, "a step longer than the terminal is wider would wrap"
    assert "2 steps done in" in written


@pytest.mark.timeout(RUN_TIMEOUT + 60)
def test_bench_json_keeps_each_latency_rows_distribution(small_run: Run) -> None:
    def not_json(constant: str) -> None:
        pytest.fail(f"{constant} is not JSON: strict readers refuse the file")

    saved = json.loads(small_run.json.read_text(), parse_constant=not_json)
    assert saved["pages"] == 64 and saved["rounds"] == 3 and saved["notes"]
    rows = {row["name"]: row for row in saved["rows"]}
    assert set(rows) >= {case.name for case in bench.CASES + bench.SEQUENTIAL_CASES + bench.FORK_CASES}
    for row in rows.values():
        cdf = row["cdf_us"]
        if row["unit"] == "MB/s":
            assert cdf == [], "a throughput row has one sample a round: nothing to plot as a CDF"
            continue
        assert len(cdf) == bench.CDF_POINTS and cdf == sorted(cdf), row["name"]
        assert cdf[0] <= row["p50_us"] <= cdf[-1] and cdf[0] <= row["p99_us"] <= cdf[-1]
        assert round(row["p50_us"], 3) in cdf[120:137], f"{row['name']}: the middle quantile is not the p50"
    assert len(small_run.json.read_text()) < 300_000, "the JSON is to stay compact"


def _png_links(markdown: str) -> list[str]:
    return re.findall(r"!\[[^]]*\]\(([^)]+\.png)\)", markdown)


def _assert_plots(report: Path) -> list[str]:
    """The report's Markdown links only PNGs that are there, decode, and are small; returns the links."""
    links = _png_links((report / REPORT).read_text())
    assert links and len(set(links)) == len(links)
    assert sorted(links) == sorted(p.name for p in report.glob("*.png")), "a plot not linked, or a link to none"
    for name in links:
        path = report / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert 0 < path.stat().st_size < 100_000, f"{name}: {path.stat().st_size} bytes: keep plots small"
        with Image.open(path) as image:
            image.load()  # decodes every pixel: a truncated or corrupt file fails here
            assert image.width > 200 and image.height > 100
            darkest, lightest = image.convert("L").getextrema()
            assert darkest < lightest, f"{name} is blank"
    return links


@pytest.mark.timeout(RUN_TIMEOUT + 60)
def test_bench_report_plots_each_fault_row_beside_its_floors(small_run: Run) -> None:
    markdown = (small_run.report / REPORT).read_text()
    assert markdown.startswith(MARKER + "\n# uffd-pager bench: 64 random 4 KiB pages x 3 rounds")
    links = _assert_plots(small_run.report)
    rows = json.loads(small_run.json.read_text())["rows"]
    fault_rows = [row["name"] for row in rows if row["unit"] != "MB/s" and row["floor"] != row["name"]]
    for name in fault_rows:
        assert f"![{name}](cdf-" in markdown, f"no CDF of {name}"
    assert len(links) == len(fault_rows) + 1 and "throughput.png" in links
    for row in rows:
        assert row["name"] in markdown, "the table is in the report"
    assert json.loads(small_run.json.read_text())["notes"][0] in markdown


@pytest.mark.timeout(RUN_TIMEOUT + 60)
def test_bench_report_from_saved_json_is_the_same_without_running(small_run: Run, tmp_path: Path) -> None:
    start = time.monotonic()
    result = run_cli("bench", "--report", str(tmp_path / "again"), "--from", str(small_run.json))
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - start < 30
    assert not _steps(result.stderr) and not result.stdout, "it ran the benchmark"
    assert (tmp_path / "again" / REPORT).read_text() == (small_run.report / REPORT).read_text()
    assert _assert_plots(tmp_path / "again") == _png_links((small_run.report / REPORT).read_text())
    # and again into the same directory: a report replaces the report
    assert run_cli("bench", "--report", str(tmp_path / "again"), "--from", str(small_run.json)).returncode == 0


@pytest.mark.timeout(RUN_TIMEOUT + 60)
def test_bench_report_from_json_saved_before_quantiles_has_the_table_and_bars(small_run: Run,
                                                                              tmp_path: Path) -> None:
    # What --json wrote before this issue (benchmarks/results/ keeps such files): no title, notes or quantiles.
    saved = json.loads(small_run.json.read_text())
    old = {"kernel": saved["kernel"], "pages": saved["pages"], "rounds": saved["rounds"],
           "rows": [{k: v for k, v in row.items() if k != "cdf_us"} for row in saved["rows"]]}
    (tmp_path / "old.json").write_text(json.dumps(old, indent=2))
    # into the directory of a report with CDFs: they go with the report they belonged to
    shutil.copytree(small_run.report, tmp_path / "report")
    result = run_cli("bench", "--report", str(tmp_path / "report"), "--from", str(tmp_path / "old.json"))
    assert result.returncode == 0, result.stderr
    markdown = (tmp_path / "report" / REPORT).read_text()
    assert _assert_plots(tmp_path / "report") == ["throughput.png"]
    assert "no CDFs to plot" in markdown and "64 random 4 KiB pages x 3 rounds" in markdown
    for row in saved["rows"]:
        assert row["name"] in markdown


@pytest.mark.timeout(180)
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs Debian's redis-server (./test.sh installs it)")
@pytest.mark.parametrize("store", ["redis", "redis+unix"])
def test_bench_over_redis_shows_progress_and_reports(tmp_path: Path, store: str) -> None:
    result = run_cli("bench", "--store", store, "--quick", "--pages", "64", "--json", str(tmp_path / "run.json"),
                     "--report", str(tmp_path / "report"), timeout=150)
    assert result.returncode == 0, result.stderr
    steps = _steps(result.stderr)
    assert [n for n, _, _ in steps] == list(range(1, steps[0][1] + 1)) and steps[-1][2].startswith("round 3/3: ")
    assert result.stdout.startswith(f"uffd-pager bench --store {store}: 64 random 4 KiB pages x 3 rounds")
    rows = {row["name"]: row for row in json.loads((tmp_path / "run.json").read_text())["rows"]}
    ours = rows[f"read: uffd_pager over {store}"]
    floor = rows[ours["floor"]]
    assert len(ours["cdf_us"]) == len(floor["cdf_us"]) == bench.CDF_POINTS  # the summed floor too
    links = _assert_plots(tmp_path / "report")
    assert sorted(links) == sorted([f"cdf-read-uffd-pager-over-{store.replace('+', '-')}.png", "throughput.png"])


# --- bench: the printed figures ------------------------------------------------------------------


def _row(name: str, floor: str, p50_us: float, *, unit: str = "faults/s", ratio: float = 1.0) -> bench.Row:
    return bench.Row(name=name, floor=floor, p50_us=p50_us, p99_us=p50_us * 3, mean_us=p50_us * 1.5,
                     per_s=1e6 / p50_us, unit=unit, samples=100, ratio=ratio)


def _cell_spans(line: str) -> list[tuple[int, int]]:
    # cells are two or more spaces apart; a row name has single spaces only
    return [match.span() for match in re.finditer(r"\S+(?: \S+)*", line)]


def test_table_columns_align_for_every_row() -> None:
    rows = [
        _row("read: a floor", "read: a floor", 51.18),
        _row("read: kernel file mmap, a name longer than any before it", "read: a floor", 0.04, ratio=0.0008),
        _row("write-back: ours", "read: a floor", 9.72, unit="MB/s", ratio=2.4),
        _row("fork: with region", "read: a floor", 10137.7, unit="forks/s", ratio=math.nan),
    ]
    header, *lines = bench.format_table(rows)
    assert len({len(line) for line in [header, *lines]}) == 1, "rows of different widths"
    titles = _cell_spans(header)  # row, p50, p99, mean, rate, vs floor: the unit column has no title
    for line in lines:
        cells = _cell_spans(line)
        assert len(cells) == 7, line
        assert cells[0][0] == 0
        for cell, title in zip(cells[1:5], titles[1:5]):
            assert cell[1] == title[1], f"a number out of its column: {line!r}"
        assert cells[5][0] == _cell_spans(lines[0])[5][0], f"a unit out of its column: {line!r}"
        assert cells[6][1] == len(line)
    assert "(floor)" in lines[0] and "<0.01x" in lines[1] and "2.40x" in lines[2] and "n/a" in lines[3]


@pytest.mark.parametrize("value, text", [(1.5, "1.50x"), (0.01, "0.01x"), (0.0008, "<0.01x"), (0.0, "<0.01x"),
                                         (math.nan, "n/a")])
def test_ratio_prints_sanely(value: float, text: str) -> None:
    assert bench.format_ratio(value) == text


def test_ratio_without_a_floor_figure_is_not_a_number() -> None:
    assert math.isnan(bench.ratio(3.0, 0.0)) and bench.ratio(3.0, 2.0) == 1.5


@pytest.mark.parametrize("us, text", [(2.41, "+2.41 us"), (-1.06, "-1.06 us"), (0.0, "+0.00 us")])
def test_signed_difference_prints_one_sign(us: float, text: str) -> None:
    assert bench.format_difference(us) == text


def test_summary_of_an_encrypted_read_faster_than_plain_says_minus() -> None:
    p50 = {bench.OURS: 12.0, "read: uffd_pager encrypted": 10.94}
    rows = {case.name: _row(case.name, case.floor, p50.get(case.name, 5.0), unit=case.unit)
            for case in bench.CASES + bench.FORK_CASES}
    text = "\n".join(bench.format_summary(rows))
    assert "encrypted read fault: p50 -1.06 us over unencrypted" in text
    assert "+-" not in text
