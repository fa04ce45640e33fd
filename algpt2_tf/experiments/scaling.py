"""The scaling report: how each arm's perplexity ratio to a baseline moves with training tokens.

A scaling experiment runs every model family at several budgets, one arm per
(family, budget), named `FAMILY_<N>x` and given its budget with `tokens`
(`experiments/scaling.json`). An arm `FAMILY_<N>x_lr<R>` is the same family and
budget at another learning rate (a re-sweep appended to a finished experiment):
of a family budget's arms, the one with the lowest validation loss stands for it
(as a sweep chooses), and the table says its rate. `write_scaling_report(OUT, baseline)` reads the
experiment folder (as `report.summarize` does: each arm at its chosen rate, the
mean over its seeds) and writes, into `OUT/scaling/` or `dest`:

- `scaling.md` / `scaling.json`: per family and budget, every evaluation set's
  word perplexity, bits per byte and ratio to the baseline family at the same
  budget (± half the spread over seeds, where an arm has several);
- the fitted trend per family and set, `log(ratio) = a + b log(tokens)` (a
  power law in tokens) by least squares with the standard error of the slope,
  and the budgets where it crosses 1.2x and 1.05x (with the range the slope's
  standard error gives);
- `ratio_vs_tokens.png`: the ratios against tokens (log x), one panel per set,
  measured points and fitted lines.

Example:

    >>> family_and_budget("shared_mlp672_16x")
    ('shared_mlp672', 16)
    >>> family_and_budget("gpt2_lamb_16x_lr0.01")
    ('gpt2_lamb', 16)
    >>> fit = fit_power_law([1e6, 4e6, 16e6], [1.5, 1.3, 1.15])
    >>> round(fit["slope"], 3), f"{crossing(fit, 1.05):.1e}"
    (-0.096, '4.0e+07')
"""

import math
import os
import re
import statistics

from algpt2_tf.experiments.report import load_results, summarize
from algpt2_tf.runtime.files import atomic_path, atomic_write_json, atomic_write_text

TARGETS = (1.2, 1.05)
_BUDGET = re.compile(r"^(?P<family>.+)_(?P<multiple>\d+)x(_lr[0-9.e-]+)?$")


def family_and_budget(arm):
    """`(family, multiple)` of an arm named `FAMILY_<N>x` (or `FAMILY_<N>x_lr<R>`, the same at
    another learning rate), or `(arm, None)`."""
    match = _BUDGET.match(arm)
    return (match["family"], int(match["multiple"])) if match else (arm, None)


def fit_power_law(tokens, ratios):
    """Least squares of `log(ratio) = a + b log(tokens)`.

    Returns `{"intercept", "slope", "slope_se", "points"}`; `slope_se` is None
    with two points (no degree of freedom left) and the fit is None with fewer.
    """
    points = [(math.log(t), math.log(r)) for t, r in zip(tokens, ratios) if r and r > 0]
    if len(points) < 2:
        return None
    xs, ys = zip(*points)
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx
    intercept = my - slope * mx
    se = None
    if len(points) > 2:
        residual = sum((y - intercept - slope * x) ** 2 for x, y in points)
        se = math.sqrt(residual / (len(points) - 2) / sxx)
    return {"intercept": intercept, "slope": slope, "slope_se": se, "points": len(points)}


def crossing(fit, target, slope=None):
    """The budget (tokens) where the fitted ratio equals `target`, or None when the
    fit never gets there (a flat or rising trend)."""
    slope = fit["slope"] if slope is None else slope
    if slope >= 0:
        return None
    return math.exp((math.log(target) - fit["intercept"]) / slope)


def scaling_rows(spec, results, baseline):
    """Per (family, budget): parameters, seeds, tokens and per-set figures with ratios to
    `baseline`'s family at the same budget."""
    rows = summarize(spec, results)
    by_key, tried = {}, {}
    for row in rows:
        family, multiple = family_and_budget(row["arm"])
        key = (family, row["training_tokens"])
        tried.setdefault(key, []).append([row["learning_rate"], row.get("valid_loss")])
        held = by_key.get(key)
        if held is None or (row.get("valid_loss") or math.inf) < (held.get("valid_loss")
                                                                   or math.inf):
            by_key[key] = dict(row, family=family, multiple=multiple)
    out = []
    for (family, tokens), row in sorted(by_key.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        base = by_key.get((baseline, tokens))
        sets = {}
        for name, entry in row["eval"].items():
            ratio = spread = None
            if base is not None and name in base["eval"]:
                ratio = entry["word_perplexity"] / base["eval"][name]["word_perplexity"]
                if entry.get("word_perplexity_spread"):
                    spread = entry["word_perplexity_spread"] / base["eval"][name]["word_perplexity"]
            sets[name] = {"word_perplexity": entry["word_perplexity"],
                          "word_perplexity_spread": entry.get("word_perplexity_spread"),
                          "bits_per_byte": entry["bits_per_byte"],
                          "ratio": ratio, "ratio_spread": spread}
        out.append({"family": family, "arm": row["arm"], "multiple": row["multiple"],
                    "learning_rate": row["learning_rate"],
                    "learning_rates_tried": sorted(tried[(family, tokens)]),
                    "tokens": tokens, "parameters": row["parameters"],
                    "parameter_ratio": (row["parameters"] / base["parameters"]
                                        if base is not None else None),
                    "seeds": row["seeds"], "train_seconds": row["train_seconds"],
                    "sets": sets, "generation": row.get("generation")})
    return out


def fits(rows, baseline):
    """`{family: {set: fit with its crossings}}` for every family but the baseline."""
    found = {}
    for family in sorted({r["family"] for r in rows} - {baseline}):
        mine = [r for r in rows if r["family"] == family]
        for name in mine[0]["sets"]:
            points = [(r["tokens"], r["sets"][name]["ratio"]) for r in mine
                      if r["sets"][name]["ratio"] is not None]
            fit = fit_power_law(*zip(*points)) if len(points) >= 2 else None
            if fit is None:
                continue
            fit["crossings"] = {}
            for target in TARGETS:
                latest = max(points)[1]
                if latest <= target:
                    fit["crossings"][str(target)] = {"tokens": None, "already_below": True}
                    continue
                low = high = None
                if fit["slope_se"] is not None:
                    steeper = crossing(fit, target, fit["slope"] - fit["slope_se"])
                    flatter = crossing(fit, target, fit["slope"] + fit["slope_se"])
                    low, high = steeper, flatter
                fit["crossings"][str(target)] = {"tokens": crossing(fit, target),
                                                 "low": low, "high": high,
                                                 "already_below": False}
            found.setdefault(family, {})[name] = fit
    return found


def _tokens(value):
    if value is None:
        return "never (flat or rising)"
    return f"{value:.2e}"


def _rates(row):
    tried = row.get("learning_rates_tried") or []
    if len(tried) < 2:
        return f"{row['learning_rate']:g}"
    return f"{row['learning_rate']:g} (of " + ", ".join(
        f"{rate:g}: {loss:.3f}" if loss is not None else f"{rate:g}" for rate, loss in tried) + ")"


def markdown(spec, rows, trends, baseline):
    sets = list(rows[0]["sets"]) if rows else []
    header = ["family", "budget", "train tokens", "params", "params vs baseline", "lr", "seeds"]
    for name in sets:
        header += [f"{name} word ppl", f"{name} bpb", f"{name} ratio"]
    lines = [f"# {spec['name']}: perplexity ratio to {baseline} against training tokens", "",
             spec.get("description", ""), "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["family"], f"{r['multiple']}x" if r["multiple"] else "-", f"{r['tokens']:,}",
                 f"{r['parameters']:,}",
                 f"{r['parameter_ratio']:.3f}" if r["parameter_ratio"] else "-",
                 _rates(r), ", ".join(map(str, r["seeds"]))]
        for name in sets:
            entry = r["sets"][name]
            ppl = f"{entry['word_perplexity']:,.1f}"
            if entry["word_perplexity_spread"]:
                ppl += f" ± {entry['word_perplexity_spread'] / 2:,.1f}"
            ratio = "-" if entry["ratio"] is None else f"{entry['ratio']:.3f}"
            if entry["ratio_spread"]:
                ratio += f" ± {entry['ratio_spread'] / 2:.3f}"
            cells += [ppl, f"{entry['bits_per_byte']:.3f}", ratio]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Ratios are word perplexity / the baseline family's at the same budget; ± is half "
              "the spread over seeds (one seed: no ±). lr: the learning rate of the run shown; "
              "where several were tried (validation loss in brackets), the lowest validation "
              "loss is shown.", "",
              "## Fitted trends: log(ratio) = a + b log(tokens)", "",
              "| family | set | points | slope b | ± se | reaches 1.2x at | reaches 1.05x at |",
              "|---|---|---|---|---|---|---|"]
    for family, per_set in trends.items():
        for name, fit in per_set.items():
            cells = [family, name, str(fit["points"]), f"{fit['slope']:.3f}",
                     "-" if fit["slope_se"] is None else f"{fit['slope_se']:.3f}"]
            for target in TARGETS:
                c = fit["crossings"][str(target)]
                if c["already_below"]:
                    cells.append("already below")
                    continue
                text = _tokens(c["tokens"])
                if c.get("low") is not None or c.get("high") is not None:
                    text += f" ({_tokens(c['low'])} to {_tokens(c['high'])})"
                cells.append(text)
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "A fit through two or three budgets says where a trend points, not where it "
              "will go: the ranges come from the slope's standard error alone (one degree of "
              "freedom with three points), and a crossing far beyond the largest budget is an "
              "extrapolation."]
    return "\n".join(lines) + "\n"


def plot(rows, trends, baseline, path):
    import matplotlib  # deferred: imports matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: imports matplotlib

    sets = list(rows[0]["sets"]) if rows else []
    families = sorted({r["family"] for r in rows} - {baseline})
    fig, axes = plt.subplots(1, max(1, len(sets)), figsize=(5 * max(1, len(sets)), 4),
                             squeeze=False)
    for ax, name in zip(axes[0], sets):
        for i, family in enumerate(families):
            mine = [r for r in rows if r["family"] == family and r["sets"][name]["ratio"]]
            if not mine:
                continue
            color = f"C{i}"
            ax.errorbar([r["tokens"] for r in mine], [r["sets"][name]["ratio"] for r in mine],
                        yerr=[(r["sets"][name]["ratio_spread"] or 0) / 2 for r in mine],
                        fmt="o", color=color, label=family, capsize=3)
            fit = trends.get(family, {}).get(name)
            if fit:
                lo, hi = min(r["tokens"] for r in mine), max(r["tokens"] for r in mine) * 4
                xs = [lo * (hi / lo) ** (k / 40) for k in range(41)]
                ax.plot(xs, [math.exp(fit["intercept"] + fit["slope"] * math.log(x)) for x in xs],
                        "-", color=color, alpha=0.6)
        for target in TARGETS:
            ax.axhline(target, color="grey", linestyle=":", linewidth=0.8)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("training tokens")
        ax.set_title(name)
    axes[0][0].set_ylabel(f"word perplexity / {baseline}'s (log)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def write_scaling_report(out, baseline, dest=None, log=print):
    """Writes `scaling.md`, `scaling.json` and `ratio_vs_tokens.png` of the experiment
    folder `out` into `dest` (default `out`); returns the rows."""
    spec, results = load_results(out)
    rows = scaling_rows(spec, results, baseline)
    if not any(r["family"] == baseline for r in rows):
        raise ValueError(f"No arm of family {baseline!r} has results in {out}.")
    trends = fits(rows, baseline)
    dest = dest or out
    os.makedirs(dest, exist_ok=True)
    atomic_write_json(os.path.join(dest, "scaling.json"),
                      {"baseline": baseline, "rows": rows, "fits": trends})
    atomic_write_text(os.path.join(dest, "scaling.md"), markdown(spec, rows, trends, baseline))
    plot(rows, trends, baseline, os.path.join(dest, "ratio_vs_tokens.png"))
    log(f"Scaling report: {os.path.join(dest, 'scaling.md')} ({len(rows)} family budgets)")
    return rows
