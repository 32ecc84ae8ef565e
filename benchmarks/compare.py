"""Compare two runs of the benchmarks figure by figure: a table of old, new and their ratio.

``ci/bench --against REV`` runs each benchmark at REV and at the working tree, one after
the other in the same session (these machines are noisy: figures from different runs do not
compare), then calls this on the two result directories::

    python -m benchmarks.compare bench-results/against-REV bench-results

Every number in both JSON files (outside ``machine``) is a figure. Whether higher or lower is
better is read from its name (rates are ``per_s``; everything else is a time, a size or a
cost); a figure whose direction is unknown gets no verdict. Writes ``compare.json`` too.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks._report import print_table, write_json

__all__ = ["better_if", "compare", "figures", "main"]

#: How much worse than before a figure may get before it is called worse (noise).
TOLERANCE = 0.10

_HIGHER = ("per_s", "tasks_s", "mb_s", "throughput", "speedup", "ratio_vs")
_LOWER = ("_s", "_ms", "seconds", "cpu", "bytes", "_mib", "_mb", "rows")


def figures(data: Any, prefix: str = "") -> Iterator[tuple[str, float]]:
    """Yield ``(dotted.name, value)`` for every number in a benchmark's JSON, but its machine."""
    if isinstance(data, dict):
        for key, value in data.items():
            if key in ("machine", "benchmark"):
                continue
            yield from figures(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            label = value.get("name") or value.get("case") if isinstance(value, dict) else None
            yield from figures(value, f"{prefix}[{label or i}]")
    elif isinstance(data, (int, float)) and not isinstance(data, bool):
        if math.isfinite(data):
            yield prefix, float(data)


def better_if(name: str) -> str | None:
    """``"higher"`` or ``"lower"``: which way a figure called ``name`` is better (None: unknown)."""
    leaf = name.rsplit(".", 1)[-1].lower()
    if any(word in leaf for word in _HIGHER):
        return "higher"
    if any(leaf.endswith(word) or word in leaf for word in _LOWER):
        return "lower"
    return None


def compare(old_dir: Path, new_dir: Path) -> list[dict[str, Any]]:
    """One row per figure present in both runs: its old and new value and their ratio."""
    rows = []
    for new_file in sorted(new_dir.glob("*.json")):
        old_file = old_dir / new_file.name
        if new_file.name == "compare.json" or not old_file.is_file():
            continue
        old = dict(figures(json.loads(old_file.read_text(encoding="utf-8"))))
        new = dict(figures(json.loads(new_file.read_text(encoding="utf-8"))))
        for name, value in new.items():
            if name not in old:
                continue
            before = old[name]
            ratio = value / before if before else float("nan")
            direction = better_if(name)
            verdict = ""
            if direction and math.isfinite(ratio):
                worse = ratio < 1 - TOLERANCE if direction == "higher" else ratio > 1 + TOLERANCE
                better = ratio > 1 + TOLERANCE if direction == "higher" else ratio < 1 - TOLERANCE
                verdict = "worse" if worse else "better" if better else "same"
            rows.append({
                "benchmark": new_file.stem, "figure": name, "old": before, "new": value,
                "ratio": round(ratio, 3) if math.isfinite(ratio) else None,
                "better_if": direction, "verdict": verdict,
            })
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", type=Path, help="result directory of the earlier commit")
    parser.add_argument("new", type=Path, help="result directory of this commit")
    parser.add_argument("--label", default="", help="what the old run is (a commit)")
    args = parser.parse_args(argv)
    rows = compare(args.old, args.new)
    if not rows:
        print(f"no figure is in both {args.old} and {args.new}", file=sys.stderr)
        return 1
    print_table(
        f"this commit against {args.label or args.old} (ratio = new / old; "
        f"'worse' beyond {TOLERANCE:.0%})",
        ["benchmark", "figure", "old", "new", "ratio", "verdict"],
        [[r["benchmark"], r["figure"], r["old"], r["new"], r["ratio"], r["verdict"]]
         for r in rows],
    )
    worse = [r for r in rows if r["verdict"] == "worse"]
    write_json("compare", {"against": args.label, "rows": rows, "worse": len(worse)})
    print(f"[bench] {len(rows)} figures compared, {len(worse)} worse", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
