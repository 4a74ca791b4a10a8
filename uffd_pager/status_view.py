"""`uffd-pager status` for a person: the daemon's `status` reply as a few
lines and two aligned tables (tenants, regions). `--json` prints the reply
itself, for scripts."""
from __future__ import annotations

from typing import Any, Sequence

from uffd_pager.uffd import PAGE_SIZE

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def format_bytes(n: int) -> str:
    """1536 -> "1.5 KiB", 4194304 -> "4 MiB": whole numbers stay exact."""
    value, unit = float(n), 0
    while value >= 1024 and unit < len(_UNITS) - 1:
        value /= 1024
        unit += 1
    return f"{value:.0f} {_UNITS[unit]}" if value == int(value) else f"{value:.1f} {_UNITS[unit]}"


def aligned(rows: Sequence[Sequence[str]], right: set[int]) -> list[str]:
    """The rows' lines, each column as wide as its widest cell; the columns
    in `right` (numbers) aligned to the right."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.rjust(w) if i in right else cell.ljust(w)
                      for i, (cell, w) in enumerate(zip(row, widths))).rstrip() for row in rows]


def format_status(status: dict[str, Any]) -> str:
    fetches = status.get("fetches", {})
    lines = [
        f"pager pid {status['pid']}: {status['connections']} connections, {status['regions']} regions, "
        f"{status['stores']} stores open, {status['open_fds']} descriptors, {status['tasks']} tasks, "
        f"RSS {format_bytes(status['rss_kib'] * 1024)}, internal errors {status['internal_errors']}",
        f"remote fetches: {fetches.get('pages', 0)} pages read, {fetches.get('shared', 0)} faults shared a read, "
        f"{fetches.get('retries', 0)} retries, {fetches.get('in_flight', 0)} pages in flight "
        f"({fetches.get('native', 0)} pages placed by the C path)",
        "",
    ]
    tenants = status.get("tenants", [])
    if tenants:
        rows = [("tenant uid", "regions", "mapped", "connections", "pids")]
        rows += [(str(t["uid"]), str(t["regions"]), format_bytes(t["mapped"]), str(t["connections"]),
                  " ".join(map(str, t["pids"])) + (" ..." if t["connections"] > len(t["pids"]) else "") or "-")
                 for t in tenants]
        lines += aligned(rows, right={0, 1, 2, 3})
    else:
        lines.append("no tenants")
    lines.append("")
    regions = status.get("region_list", [])
    if regions:
        # Resident and dirty in bytes, as size is: pages would hide the scale.
        rows = [("region", "pid", "uid", "store", "size", "resident", "dirty", "faults", "errors", "tracking",
                 "forked from")]
        rows += [(str(r["id"]), str(r["pid"]), str(r["uid"]),
                  r["store"] + (" (encrypted)" if r["encrypted"] else ""), format_bytes(r["size"]),
                  format_bytes(r["resident_pages"] * PAGE_SIZE), format_bytes(r["dirty_pages"] * PAGE_SIZE),
                  str(r["faults"]), str(r["errors"]), r["tracking"],
                  "-" if r["parent"] is None else str(r["parent"])) for r in regions]
        lines += aligned(rows, right={0, 1, 2, 4, 5, 6, 7, 8})
    else:
        lines.append("no regions")
    return "\n".join(lines)
