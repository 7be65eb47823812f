"""The workflow benchmark's table, PNG plots and markdown report, from its results JSON
(bench/workflows/run.py writes it; ``python render.py results.json`` redraws)."""

from __future__ import annotations

import json
import os
import sys

COLOURS = {"floor": "black", "pool": "tab:green", "shm": "tab:blue", "redis": "tab:red"}


def _ratio(a, b):
    return a / b if a and b else float("nan")


def rows(results) -> list[list[str]]:
    out = [["workflow", "mode", "p50 ms", "p99 ms", "p50 vs floor", "passing", "load p50", "load p99",
            "SLO met", "max rps@SLO", "p50 vs pool", "max vs pool"]]
    for w in results["workflows"]:
        pool = w["modes"].get("pool", {})
        floor = w["modes"].get("floor", {}).get("isolated", {}).get("p50_ms")
        for mode, m in w["modes"].items():
            iso, ld, mx = m["isolated"], m.get("load", {}), m.get("max", {})
            out.append([w["workflow"], mode, f"{iso['p50_ms']:.1f}", f"{iso['p99_ms']:.1f}",
                        f"{iso['p50_ms'] - floor:+.1f} ({iso['p50_ms'] / floor:.2f}×)"
                        if floor and mode != "floor" else "—",
                        f"{iso['passing_share']:.0%}",
                        f"{ld['p50_ms']:.1f}" if ld else "—", f"{ld['p99_ms']:.1f}" if ld else "—",
                        f"{ld['slo_attainment']:.0%}" if ld else "—",
                        f"{mx['max_rps_within_slo']:.1f}" if mx else "—",
                        f"{_ratio(iso['p50_ms'], pool.get('isolated', {}).get('p50_ms')):.1f}×" if pool else "—",
                        f"{_ratio(pool.get('max', {}).get('max_rps_within_slo'), mx.get('max_rps_within_slo')):.1f}×"
                        if mx and pool.get("max") else "—"])
    return out


def table(results) -> str:
    settings = results.get("settings", {})
    lines = [f"== workflows ({', '.join(results['machine']['gpus']) or 'CPU only'}, {results['machine']['cpus']} cores, "
             f"{settings.get('cpus', '?')} threads per container, {results['date']})",
             "p50/p99 = one request at a time; passing = time in getting and putting tensors on the "
             "critical path (of parallel branches, the slowest), as a share of the mean latency; "
             "load = open-loop arrivals; SLO per workflow below; 'vs floor' = ms above the floor mode's "
             "p50 (the same workflow with data passing taken out) and how many times it; 'vs pool' = "
             "this mode's number over the pool's (p50: how much slower; max: how much less the mode carries)"]
    body = rows(results)
    widths = [max(len(r[i]) for r in body) for i in range(len(body[0]))]
    for r in body:
        lines.append("  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
    for w in results["workflows"]:
        lines.append(f"{w['workflow']}: SLO {w['slo_ms']:.0f} ms; outputs identical across modes: "
                     f"{w['identical_outputs']}")
        gets = w["modes"].get("pool", {}).get("isolated", {}).get("gets")
        if gets:
            rest = gets["in_functions_ms"] - gets["in_controller_ms"]
            lines.append(f"{w['workflow']}: the pool's {gets['gets']:.0f} gets a request took "
                         f"{gets['in_functions_ms']:.2f} ms in the functions: copying "
                         f"{gets['copying_ms']:.2f}, the controller's control "
                         f"{gets['in_controller_ms'] - gets['copying_ms']:.2f}, socket, wake-ups and "
                         f"client {rest:.2f}")
    return "\n".join(lines)


def write(results, out: str) -> None:
    plots = plot(results, out)
    lines = ["# Workflow benchmark", "",
             f"- date: {results['date']}", f"- command: `{results['command']}`",
             f"- machine: {json.dumps(results['machine'])}", "",
             "```", table(results), "```", ""]
    lines += [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots]
    with open(os.path.join(out, "report.md"), "w") as file:
        file.write("\n".join(lines) + "\n")


def plot(results, out: str) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    paths = []
    for w in results["workflows"]:
        name = w["workflow"]
        fig, ax = plt.subplots(figsize=(6, 4))
        for mode, m in w["modes"].items():
            for key, style in (("isolated", "-"), ("load", "--")):
                values = sorted(m.get(key, {}).get("latencies_ms", []))
                if values:
                    ax.plot(values, [(i + 1) / len(values) for i in range(len(values))], style,
                            color=COLOURS.get(mode), label=f"{mode} {key}")
        ax.axvline(w["slo_ms"], color="grey", linestyle=":", label="SLO")
        ax.set_xscale("log")
        ax.set(xlabel="end-to-end latency (ms)", ylabel="fraction of requests", title=f"{name}: latency CDF")
        ax.legend(fontsize=7)
        paths.append(_save(fig, out, f"{name}-cdf.png"))

        if any("max" in m for m in w["modes"].values()):
            fig, ax = plt.subplots(figsize=(6, 4))
            for mode, m in w["modes"].items():
                trials = sorted(m.get("max", {}).get("trials", []), key=lambda t: t["rate"])
                if trials:
                    ax.plot([t["offered_rps"] for t in trials], [t["p99_ms"] for t in trials], "o-",
                            color=COLOURS.get(mode), label=f"{mode} p99")
            ax.axhline(w["slo_ms"], color="grey", linestyle=":", label="SLO")
            ax.set_yscale("log")
            ax.set(xlabel="offered load (requests/s)", ylabel="p99 latency (ms)", title=f"{name}: latency vs load")
            ax.legend(fontsize=7)
            paths.append(_save(fig, out, f"{name}-load.png"))

        fig, ax = plt.subplots(figsize=(8, 1.6 + 0.6 * len(w["modes"])))
        for row, (mode, m) in enumerate(w["modes"].items()):
            left = 0.0
            for number, stage in enumerate(w["stages"], 1):
                parts = m["isolated"]["stages"].get(stage)
                if not parts:
                    continue
                start = left
                for key, colour, hatch in (("compute_s", "tab:gray", ""), ("passing_s", COLOURS.get(mode), "//"),
                                           ("platform_s", "tab:olive", "..")):
                    width = parts[key] * 1e3
                    ax.barh(row, width, left=left, color=colour, hatch=hatch, edgecolor="white", linewidth=0.3)
                    left += width
                ax.text((start + left) / 2, row + 0.42, str(number), ha="center", va="bottom", fontsize=6)
        ax.set_yticks(range(len(w["modes"])), list(w["modes"]))
        import matplotlib.patches as patches
        parts = [patches.Patch(facecolor="tab:gray", label="compute"),
                 patches.Patch(facecolor="white", edgecolor="black", hatch="//", label="data passing (mode's colour)"),
                 patches.Patch(facecolor="tab:olive", hatch="..", label="platform (HTTP, runtime)")]
        stages = [patches.Patch(facecolor="none", edgecolor="none", label=f"{n} {s}")
                  for n, s in enumerate(w["stages"], 1)]
        ax.legend(handles=parts + stages, fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        ax.set(xlabel="ms per request, stages in order (numbered above each bar),\n"
                      "parallel branches one after another",
               title=f"{name}: per-stage breakdown")
        paths.append(_save(fig, out, f"{name}-stages.png"))
    return paths


def _save(fig, out, name) -> str:
    path = os.path.join(out, name)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")     # the legends beside the axes too
    import matplotlib.pyplot as plt
    plt.close(fig)
    return path


if __name__ == "__main__":
    with open(sys.argv[1]) as file:
        data = json.load(file)
    write(data, os.path.dirname(os.path.abspath(sys.argv[1])))
    print(table(data))
