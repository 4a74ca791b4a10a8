"""The saved and the readable forms of a benchmark run: ``bench --json FILE``
and ``bench --report DIR`` (DIR/README.md with PNG plots beside it), from a
run just made or from a saved ``--json`` (``--report DIR --from FILE``).

The plots put every figure beside its floor, as the table does: one latency
CDF per fault row with the CDFs of its floors (a floor's floor too), and one
bar chart of the throughput rows, floors in grey. matplotlib draws them with
its Agg backend, so no display is needed; it is imported only here, and only
for a report (the ``report`` extra)."""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import re
from typing import TYPE_CHECKING, Any

from uffd_pager.bench import Results, Row, format_ratio, format_table

if TYPE_CHECKING:
    from matplotlib.figure import Figure

REPORT = "README.md"
MARKER = "<!-- written by uffd-pager bench --report: a new report replaces it -->"
THROUGHPUT_PLOT = "throughput.png"
DPI = 80  # small PNGs: they are committed in benchmarks/
PNG_COLORS = 64  # a palette of 64 colors keeps a plot's lines and text, at a third of the bytes


def _save(fig: Figure, path: str) -> None:
    import matplotlib.pyplot as plt
    from PIL import Image  # matplotlib's own dependency: it writes PNGs through Pillow

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    buffer.seek(0)
    with Image.open(buffer) as image:
        image.convert("RGB").quantize(colors=PNG_COLORS).save(path, optimize=True)


def _strict(value: Any) -> Any:
    # NaN (a ratio to a floor of 0) is not JSON: strict readers (jq) refuse it, so it is saved as null
    return None if isinstance(value, float) and math.isnan(value) else value


def save_json(results: Results, path: str) -> None:
    """Every row (a latency row with its quantiles, one compact line each) and the notes."""
    rows = [json.dumps({k: _strict(v) for k, v in dataclasses.asdict(row).items()}, allow_nan=False)
            for row in results.rows]
    head = json.dumps({"title": results.title, "kernel": results.kernel, "pages": results.pages,
                       "rounds": results.rounds, "notes": results.notes}, indent=2)[:-2]
    with open(path, "w") as f:
        f.write(head + ',\n  "rows": [\n    ' + ",\n    ".join(rows) + "\n  ]\n}\n")


def load_json(path: str) -> Results:
    """A run saved by --json (older files, without quantiles or notes, too).
    Raises ValueError saying what is wrong with a file that is not one."""
    try:
        with open(path) as f:
            saved = json.load(f)
        known = {f.name for f in dataclasses.fields(Row)}
        rows = [Row(**{k: math.nan if v is None else v for k, v in row.items() if k in known})
                for row in saved["rows"]]
        pages, rounds, kernel = int(saved["pages"]), int(saved["rounds"]), str(saved["kernel"])
        format_table(rows)  # a row missing a field or with a figure that is not a number fails here, not in a plot
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path} is not a file that uffd-pager bench --json wrote ({type(exc).__name__}: {exc})") \
            from None
    title = saved.get("title") or f"uffd-pager bench: {pages} random 4 KiB pages x {rounds} rounds, Linux {kernel}"
    return Results(title=title, rows=rows, notes=list(saved.get("notes", [])), kernel=kernel, pages=pages,
                   rounds=rounds)


def check_report_directory(path: str) -> None:
    """Raises ValueError unless `path` is a directory or can be one, and
    holds no README.md but an earlier report (`--report .` in a project
    must not replace the project's README)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{path!r} is not a directory")
    report = os.path.join(path, REPORT)
    if os.path.exists(report):
        with open(report, errors="replace") as f:
            if f.readline().rstrip("\n") != MARKER:
                raise ValueError(f"{report!r} exists and is not a report of uffd-pager bench: not replacing it")


def require_matplotlib() -> None:
    """Raises ModuleNotFoundError naming the fix, before a run whose report could not be drawn."""
    try:
        import matplotlib  # noqa: F401
    except ModuleNotFoundError:
        raise ModuleNotFoundError("--report draws its plots with matplotlib, which is not installed: "
                                  "pip install 'uffd_pager[report]'") from None


def _floors(row: Row, by_name: dict[str, Row]) -> list[Row]:
    """The row's floor, that floor's floor, ... (a floor is its own floor)."""
    chain: list[Row] = []
    while row.floor != row.name and row.floor in by_name and by_name[row.floor] not in chain:
        row = by_name[row.floor]
        chain.append(row)
    return chain


def _file_name(row: Row) -> str:
    return "cdf-" + re.sub(r"[^a-z0-9]+", "-", row.name.lower()).strip("-") + ".png"


def _plot_cdf(row: Row, floors: list[Row], path: str) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.2), dpi=DPI)
    for curve, style in zip([c for c in (row, *floors) if c.cdf_us], ("-", "--", ":", "-.")):
        levels = [i / (len(curve.cdf_us) - 1) for i in range(len(curve.cdf_us))]
        ax.step(curve.cdf_us, levels, style, where="post", label=f"{curve.name} (p50 {curve.p50_us:.2f} us)")
    ax.set_xscale("log")
    ax.set_xlabel("latency (us, log scale)")
    ax.set_ylabel("fraction at most")
    ax.set_ylim(0, 1.01)
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(f"{row.name}: p50 {format_ratio(row.ratio)} its floor", fontsize=9)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    _save(fig, path)


def _plot_throughput(rows: list[Row], by_name: dict[str, Row], path: str) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.9 + 0.32 * len(rows)), dpi=DPI)
    positions = range(len(rows))[::-1]  # the table's order, top down
    floor = [row.floor == row.name for row in rows]
    ax.barh(positions, [row.per_s for row in rows], color=["0.65" if f else "tab:blue" for f in floor])
    ax.set_yticks(list(positions), [row.name for row in rows], fontsize=7)
    for y, row, is_floor in zip(positions, rows, floor):
        text = f"{row.per_s:.0f} MB/s"
        if is_floor:
            text += " (floor)"
        elif row.floor in by_name:
            # The table's ratio is of time per page; a bar reads as throughput, its inverse.
            floor_row = by_name[row.floor]
            text += (f" = {format_ratio(1 / row.ratio if row.ratio else math.nan)} "
                     f"{'its floor' if floor_row.floor == floor_row.name else floor_row.name}")
        ax.text(row.per_s, y, " " + text, va="center", fontsize=6)
    values = [row.per_s for row in rows if row.per_s > 0]
    if values and max(values) > 20 * min(values):
        ax.set_xscale("log")
        ax.set_xlim(right=max(values) * 300)  # room for the labels right of the longest bar
    else:
        ax.set_xlim(right=max(values, default=1) * 1.6)
    ax.set_xlabel("MB/s" + (" (log scale)" if ax.get_xscale() == "log" else "") + "; grey: a floor")
    ax.grid(True, axis="x", which="both", alpha=0.3)
    fig.tight_layout()
    _save(fig, path)


def _links(markdown: str) -> list[str]:
    return re.findall(r"!\[[^]]*\]\(([^)/]+\.png)\)", markdown)


def write_report(results: Results, directory: str) -> str:
    """DIR/README.md and its PNGs (replacing an earlier report's); returns the Markdown file's path."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, whatever $MPLBACKEND or $DISPLAY say
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, REPORT)
    if os.path.exists(path):  # an earlier report (check_report_directory): its plots go with it
        with open(path) as f:
            for name in _links(f.read()):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(directory, name))
    by_name = {row.name: row for row in results.rows}
    lines = [MARKER, f"# {results.title}", "", "Every figure beside its floor from the same run: the machine's speed drifts "
             "from hour to hour, so compare only figures of one run.", "", "```",
             *format_table(results.rows), "```", ""]
    if results.notes:
        lines += ["```", *results.notes, "```", ""]
    latency = [row for row in results.rows if row.unit != "MB/s" and row.floor != row.name]
    lines += ["## Latency", ""]
    if not any(row.cdf_us for row in latency):
        lines += ["This run was saved without its latency distributions (a `--json` file written before they were "
                  "kept): no CDFs to plot.", ""]
    else:
        lines += ["The distribution of each row's latencies (the fraction of them at most x), beside its floors "
                  "from the same run.", ""]
        for row in latency:
            if row.cdf_us:
                _plot_cdf(row, _floors(row, by_name), os.path.join(directory, _file_name(row)))
                lines += [f"![{row.name}]({_file_name(row)})", ""]
    throughput = [row for row in results.rows if row.unit == "MB/s"]
    if throughput:
        _plot_throughput(throughput, by_name, os.path.join(directory, THROUGHPUT_PLOT))
        lines += ["## Throughput", "", "The median round of each throughput row, beside its floor.", "",
                  f"![throughput]({THROUGHPUT_PLOT})", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path
