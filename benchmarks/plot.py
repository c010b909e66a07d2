"""Plots and tables from a ``make bench`` results JSON.

    python benchmarks/plot.py [results.json] [--markdown]

Writes, next to the JSON: ``patch_match.png`` (log-log time and peak memory vs N, one line per
provider; solid: real features, dashed: random) and ``feature_swap.png`` (the same per swap level).
``--markdown`` prints the tables used in docs/benchmarks.md: best-of-rounds times, ratios against
the peers, and every skipped case with its reason.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHAPE_ORDER = {"train": 0, "cufed5": 1, "1080p": 2}
LEVEL_ORDER = {"relu3_1": 0, "relu2_1": 1, "relu1_1": 2, None: 3}


def default_json() -> Path:
    sys.path.insert(0, str(HERE.parent))
    from srntt_core.cli.machine import machine_name

    return HERE / "results" / machine_name() / "bench.json"


def load(path: Path) -> tuple[list[dict], dict]:
    doc = json.loads(path.read_text())
    rows = []
    for b in doc["benchmarks"]:
        info, stats = b["extra_info"], b["stats"]
        rows.append({
            "op": b["group"].split()[0],
            "provider": info["backend"],
            "shape": info["shape_name"],
            "shape_text": info["shape"],
            "features": info["features"],
            "level": info.get("level"),
            "n": info["n_query"],
            "min": stats["min"],
            "median": stats["median"],
            "rounds": stats["rounds"],
            "gflops": info.get("gflops"),
            "gbps": info.get("gbps"),
            "peak_mb": info.get("peak_mem_mb"),
            "load": info.get("load_1m"),
            "agreement": info.get("index_agreement"),
            "device": info.get("device"),
        })
    return rows, doc.get("srntt", {})


def _series(rows, op, level=None):
    """{(provider, features): [(n, seconds, peak_mb), ...]} sorted by n."""
    out = defaultdict(list)
    for r in rows:
        if r["op"] == op and (level is None or r["level"] == level):
            out[(r["provider"], r["features"])].append((r["n"], r["min"], r["peak_mb"]))
    return {k: sorted(v) for k, v in out.items()}


def _draw(ax_time, ax_mem, series, colors):
    for (provider, features), pts in sorted(series.items()):
        real = features == "real"
        style = dict(color=colors[provider], linestyle="-" if real else "--", marker="o",
                     markerfacecolor=colors[provider] if real else "none", label=f"{provider} ({features})")
        ax_time.plot([p[0] for p in pts], [p[1] for p in pts], **style)
        mem = [(p[0], p[2]) for p in pts if p[2]]
        if mem:
            ax_mem.plot([m[0] for m in mem], [m[1] for m in mem], **style)
    for ax, label in ((ax_time, "time per call (s, best of rounds)"), (ax_mem, "peak extra memory (MB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("N = query patches = key patches")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)


def plot(rows, meta, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Colours per op, so that each figure's providers are told apart.
    cmap = plt.get_cmap("tab10")
    colors = {}
    for op in ("patch_match", "feature_swap"):
        for i, p in enumerate(sorted({r["provider"] for r in rows if r["op"] == op})):
            colors.setdefault(op, {})[p] = cmap(i % 10)
    machine = meta.get("machine", rows[0]["device"] if rows else "?")
    written = []
    if any(r["op"] == "patch_match" for r in rows):
        fig, (a, b) = plt.subplots(1, 2, figsize=(13, 5))
        _draw(a, b, _series(rows, "patch_match"), colors["patch_match"])
        a.legend(fontsize=7)
        fig.suptitle(f"patch_match, 3x3 patches, 256 channels, one reference - {machine}")
        fig.tight_layout()
        written.append(out_dir / "patch_match.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    levels = sorted({r["level"] for r in rows if r["op"] == "feature_swap"}, key=LEVEL_ORDER.get)
    if levels:
        fig, axes = plt.subplots(2, len(levels), figsize=(5.5 * len(levels), 9), squeeze=False)
        for j, level in enumerate(levels):
            _draw(axes[0][j], axes[1][j], _series(rows, "feature_swap", level), colors["feature_swap"])
            axes[0][j].set_title(level)
        axes[0][0].legend(fontsize=7)
        fig.suptitle(f"feature_swap (reduce=mean) - {machine}")
        fig.tight_layout()
        written.append(out_dir / "feature_swap.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written


# ---------------------------------------------------------------------------------------------
# markdown

def _fmt_time(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def _ratio(num, den) -> str:
    return f"{num / den:.2f}x" if num and den else "-"


def _table(rows, op, peers, key_extra):
    groups = defaultdict(dict)
    for r in rows:
        if r["op"] == op:
            key = (SHAPE_ORDER.get(r["shape"], 9), r["shape"], r["features"],
                   LEVEL_ORDER[r["level"]], r["level"])
            groups[key][r["provider"]] = r
    head = ["shape", "features"] + (["level"] if op == "feature_swap" else []) + [
        "provider", "best", "median", "rounds", key_extra[0], "peak MB"] + [f"{p} / this" for p in peers]
    if op == "patch_match":
        head.append("index = cpu")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in sorted(groups):
        by = groups[key]
        for provider, r in sorted(by.items(), key=lambda kv: kv[1]["min"]):
            cells = [f"{r['shape']} ({r['shape_text']})", r["features"]]
            if op == "feature_swap":
                cells.append(r["level"])
            extra = r.get(key_extra[1])
            cells += [provider, _fmt_time(r["min"]), _fmt_time(r["median"]), str(r["rounds"]),
                      f"{extra:.1f}" if extra is not None else "-",
                      f"{r['peak_mb']:.0f}" if r["peak_mb"] is not None else "-"]
            cells += [_ratio(by[p]["min"], r["min"]) if p in by else "-" for p in peers]
            if op == "patch_match":
                cells.append(f"{r['agreement']:.4f}" if r["agreement"] is not None else "-")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# The speed goals: (op, peer, minimum speed-up of the cpu backend over the peer)
GOALS = [("patch_match", "faiss", 3.0), ("feature_swap", "ttsr_fold", 10.0),
         ("feature_swap", "python_loop", 100.0)]


def goals(rows, backend="cpu") -> str:
    """The cpu backend's speed-up over each goal's peer, per shape / features / level."""
    index = {(r["op"], r["shape"], r["features"], r["level"], r["provider"]): r for r in rows}
    lines = ["| goal | shape | features | level | cpu | peer | speed-up | holds |",
             "|---|---|---|---|---|---|---|---|"]

    def order(kv):
        return SHAPE_ORDER.get(kv[0][1], 9), kv[0][2], LEVEL_ORDER[kv[0][3]]

    for op, peer, target in GOALS:
        for (o, shape, features, level, provider), r in sorted(index.items(), key=order):
            if o != op or provider != backend or (o, shape, features, level, peer) not in index:
                continue
            p = index[(o, shape, features, level, peer)]
            ratio = p["min"] / r["min"]
            lines.append(f"| {op} vs {peer} >= {target:g}x | {shape} | {features} | {level or '-'} | "
                         f"{_fmt_time(r['min'])} | {_fmt_time(p['min'])} | {ratio:.2f}x | "
                         f"{'yes' if ratio >= target else 'no'} |")
    return "\n".join(lines)


def markdown(rows, meta) -> str:
    out = []
    if meta:
        out.append(f"Machine `{meta.get('machine')}` ({meta.get('device')}, torch {meta.get('torch')}, "
                   f"{meta.get('threads')} threads); load average at start "
                   f"{', '.join(f'{x:.2f}' for x in meta.get('load_average_start', []))}, at end "
                   f"{', '.join(f'{x:.2f}' for x in meta.get('load_average_end', []))}; "
                   f"1080p mode: {meta.get('large_mode')}.\n")
    out.append("### goals (speed-up = peer's best time / cpu's best time)\n")
    out.append(goals(rows))
    out.append("\n### patch_match\n")
    out.append(_table(rows, "patch_match", ["faiss", "ttsr_bmm", "srntt_conv2d"], ("GFLOP/s", "gflops")))
    out.append("\n### feature_swap\n")
    out.append(_table(rows, "feature_swap", ["ttsr_fold", "python_loop", "torch"], ("GB/s", "gbps")))
    out.append("\n### texture_swap (whole swap stage)\n")
    out.append(_table(rows, "texture_swap", ["ttsr", "srntt", "torch"], ("GFLOP/s", "gflops")))
    skipped = meta.get("skipped", [])
    if skipped:
        reasons = defaultdict(list)
        for s in skipped:
            reasons[s["reason"]].append(s["name"])
        out.append("\n### skipped\n")
        out.append("| reason | cases |\n|---|---|")
        for reason, names in reasons.items():
            out.append(f"| {reason} | {len(names)}: {', '.join(f'`{n}`' for n in names[:6])}"
                       f"{' ...' if len(names) > 6 else ''} |")
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", nargs="?", type=Path,
                        help="results JSON (default: results/<this machine>/bench.json)")
    parser.add_argument("--markdown", action="store_true", help="print the markdown tables")
    args = parser.parse_args(argv)
    path = args.json or default_json()
    rows, meta = load(path)
    for p in plot(rows, meta, path.parent):
        print(f"wrote {p}", file=sys.stderr)
    if args.markdown:
        print(markdown(rows, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
