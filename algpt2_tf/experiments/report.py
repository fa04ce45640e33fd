"""The report of an experiment folder, rebuilt from what is on disk.

`write_report(OUT)` reads `OUT/spec.json` and every `OUT/arms/*/*/result.json`
and writes `results.json`, `results.csv`, `results.md`, `loss.png` (training
loss against training tokens, every arm on one chart) and `ppl_vs_params.png`
(held-out word perplexity against parameter count). An arm is reported at its
chosen learning rate (the lowest validation loss of its sweep), as the mean
over its seeds, with the spread (max - min) where it has several.
"""

import csv
import glob
import io
import math
import os
import shutil
import statistics

from algpt2_tf.experiments.spec import arm_seeds
from algpt2_tf.runtime.files import atomic_path, atomic_write_json, atomic_write_text, read_json
from algpt2_tf.training.options import TrainOptions

GENERATION_COLUMNS = ("distinct_1", "distinct_2", "distinct_3", "repeated_4gram_fraction",
                      "mean_length_tokens")


def load_results(out):
    """`(spec source, results of every finished run)`."""
    spec_path = os.path.join(out, "spec.json")
    if not os.path.exists(spec_path):
        raise FileNotFoundError(f"{out} holds no experiment (no spec.json).")
    results = [read_json(p) for p in sorted(glob.glob(os.path.join(out, "arms", "*", "*",
                                                                   "result.json")))]
    return read_json(spec_path), results


def best_by_valid_loss(runs):
    """The run with the lowest validation loss (a missing or non-finite loss ranks last):
    how a learning-rate sweep is decided, by the runner and in the report alike."""
    def key(run):
        loss = run.get("valid_loss")
        return math.inf if loss is None or not math.isfinite(loss) else loss

    return min(runs, key=key)


def interval_means(curve, tokens_per_step, steps_per_epoch):
    """Turns Keras' logged losses into the mean loss of each logging interval.

    Keras logs the mean loss since the start of the epoch (here: since the
    last checkpoint), a curve that jumps at every epoch boundary. With
    equal-sized batches the mean over steps k1+1..k2 of an epoch is
    `(k2 m2 - k1 m1) / (k2 - k1)`.

    Args:
        curve: `[tokens, logged loss]` pairs, in step order.
        tokens_per_step: tokens of one optimizer step.
        steps_per_epoch: the checkpoint interval.
    """
    points, previous = [], None
    for tokens, mean in curve:
        step = round(tokens / tokens_per_step)
        within = (step - 1) % steps_per_epoch + 1
        if previous is None or previous[0] >= within:  # the first row of an epoch
            points.append([tokens, mean])
        else:
            k1, m1 = previous
            points.append([tokens, (within * mean - k1 * m1) / (within - k1)])
        previous = (within, mean)
    return points


def _mean_spread(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (max(values) - min(values) if len(values) > 1 else None)


def summarize(spec, results):
    """One row per arm (in spec order) at its chosen learning rate; arms with no result are left out."""
    tokens_per_step = spec["budget"]["seq_len"] * spec["budget"]["batch_size"]
    steps_per_epoch = (spec.get("options") or {}).get("checkpoint_every",
                                                      TrainOptions.checkpoint_every)
    rows = []
    for arm in spec["arms"]:
        runs = [r for r in results if r["arm"] == arm["name"]]
        if not runs:
            continue
        first_seed = arm_seeds(spec, arm)[0]
        candidates = [r for r in runs if r["seed"] == first_seed] or runs
        best = best_by_valid_loss(candidates)
        chosen = [r for r in runs if r["learning_rate"] == best["learning_rate"] and "eval" in r]
        if not chosen:
            continue  # trained, not evaluated yet
        best = next((r for r in chosen if r["seed"] == best["seed"]), chosen[0])
        row = {"arm": arm["name"], "learning_rate": best["learning_rate"],
               "learning_rate_source": ("sweep" if arm.get("sweep") else
                                        f"from {arm['learning_rate_from']}"
                                        if arm.get("learning_rate_from") else "fixed"),
               "seeds": sorted(r["seed"] for r in chosen),
               "parameters": best["parameters"],
               "non_embedding_parameters": best["non_embedding_parameters"],
               "training_tokens": best["training_tokens"],
               "sweep": sorted([r["learning_rate"], r.get("valid_loss")] for r in candidates)
               if arm.get("sweep") else None}
        for key in ("train_seconds", "tokens_per_second", "final_train_loss", "valid_loss"):
            row[key], row[key + "_spread"] = _mean_spread([r.get(key) for r in chosen])
        row["eval"] = {}
        for name in best["eval"]:
            entry = {}
            for key in ("word_perplexity", "bits_per_byte"):
                entry[key], entry[key + "_spread"] = _mean_spread(
                    [r["eval"][name][key] for r in chosen])
            row["eval"][name] = entry
        if "generation" in best:
            row["generation"] = {k: _mean_spread([r["generation"].get(k) for r in chosen])[0]
                                 for k in GENERATION_COLUMNS}
        row["curve"] = interval_means(best.get("curve", []), tokens_per_step, steps_per_epoch)
        row["compress"] = best.get("compress")  # with "init_eval": held-out figures before training
        row["distill"] = best.get("distill")
        rows.append(row)
    baseline = next((r for r in rows if r["arm"] == spec["baseline"]), None)
    for row in rows:
        row["parameter_ratio"] = row["parameters"] / baseline["parameters"] if baseline else None
        for name, entry in row["eval"].items():
            base = baseline["eval"].get(name) if baseline else None
            entry["word_perplexity_ratio"] = (entry["word_perplexity"] / base["word_perplexity"]
                                              if base else None)
            entry["bits_per_byte_ratio"] = (entry["bits_per_byte"] / base["bits_per_byte"]
                                            if base else None)
    _gap_closed(spec, rows)
    return rows


def _gap_closed(spec, rows):
    """`entry["gap_closed"]`: the share of the word-perplexity gap between the
    spec's `gap.scratch` and `gap.teacher` arms that an arm closes (0 = no
    better than scratch, 1 = as good as the teacher)."""
    gap = spec.get("gap")
    by_name = {r["arm"]: r for r in rows}
    if not gap or gap["teacher"] not in by_name or gap["scratch"] not in by_name:
        return
    teacher, scratch = by_name[gap["teacher"]], by_name[gap["scratch"]]
    for row in rows:
        for name, entry in row["eval"].items():
            high = scratch["eval"][name]["word_perplexity"]
            low = teacher["eval"][name]["word_perplexity"]
            entry["gap_closed"] = ((high - entry["word_perplexity"]) / (high - low)
                                   if high != low else None)


def compression_table(spec, rows):
    """The table of a spec with a `gap`: each arm's parameters against the teacher's,
    how it started and trained, and the gap it closes on each evaluation set."""
    gap = spec["gap"]
    teacher = next((r for r in rows if r["arm"] == gap["teacher"]), None)
    if teacher is None:
        return ""
    sets = list(teacher["eval"])
    header = ["arm", "params", "params vs teacher", "init", "distill"]
    for name in sets:
        header += [f"{name} word ppl at init", f"{name} word ppl", f"{name} gap closed"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        compress, distill = r.get("compress"), r.get("distill")
        cells = [r["arm"], f"{r['parameters']:,}", _fmt(r["parameters"] / teacher["parameters"], 3),
                 f"{compress['init']} from {compress['from']}" if compress else "random",
                 f"{distill['from']} (weight {distill['weight']:g}, T {distill['temperature']:g})"
                 if distill else "-"]
        for name in sets:
            init_eval = (compress or {}).get("init_eval", {}).get(name)
            entry = r["eval"][name]
            cells += [_fmt(init_eval["word_perplexity"]) if init_eval else "-",
                      _fmt(entry["word_perplexity"], 2, entry["word_perplexity_spread"]),
                      _fmt(entry.get("gap_closed"), 2)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(value, digits=2, spread=None):
    if value is None:
        return "-"
    text = f"{value:,.{digits}f}"
    return text + (f" ± {spread / 2:.{digits}f}" if spread else "")


def markdown_table(spec, rows):
    sets = list(rows[0]["eval"]) if rows else []
    header = ["arm", "lr", "params", "non-emb params", "params vs baseline", "train tokens",
              "wall s", "tok/s", "train loss", "valid loss"]
    for name in sets:
        header += [f"{name} word ppl", f"{name} ppl ratio", f"{name} bpb"]
    header += ["distinct-1/2/3", "rep-4", "len"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lr = f"{r['learning_rate']:g}" + {"sweep": " (swept)"}.get(r["learning_rate_source"], "")
        cells = [r["arm"] + (f" (seeds {', '.join(map(str, r['seeds']))})" if len(r["seeds"]) > 1
                             else ""),
                 lr, f"{r['parameters']:,}", f"{r['non_embedding_parameters']:,}",
                 _fmt(r["parameter_ratio"], 3), f"{r['training_tokens']:,}",
                 _fmt(r["train_seconds"], 0), _fmt(r["tokens_per_second"], 0),
                 _fmt(r["final_train_loss"], 3, r["final_train_loss_spread"]),
                 _fmt(r["valid_loss"], 3, r["valid_loss_spread"])]
        for name in sets:
            e = r["eval"][name]
            cells += [_fmt(e["word_perplexity"], 2, e["word_perplexity_spread"]),
                      _fmt(e["word_perplexity_ratio"], 3),
                      _fmt(e["bits_per_byte"], 3, e["bits_per_byte_spread"])]
        g = r.get("generation")
        if g:
            cells += [f"{g['distinct_1']:.2f}/{g['distinct_2']:.2f}/{g['distinct_3']:.2f}",
                      f"{g['repeated_4gram_fraction']:.3f}", f"{g['mean_length_tokens']:.1f}"]
        else:
            cells += ["-", "-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(out, log=print):
    """Writes the report files of experiment folder `out`; returns the summary rows."""
    spec, results = load_results(out)
    rows = summarize(spec, results)
    missing = [a["name"] for a in spec["arms"] if a["name"] not in {r["arm"] for r in rows}]
    atomic_write_json(os.path.join(out, "results.json"),
                      {"name": spec["name"], "baseline": spec["baseline"], "arms": rows,
                       "runs": [{k: v for k, v in r.items() if k not in ("curve", "valid_curve")}
                                for r in results],
                       "missing_arms": missing})
    atomic_write_text(os.path.join(out, "results.csv"), _csv(rows))
    text = [f"# {spec['name']}", ""]
    if spec.get("description"):
        text += [spec["description"].strip(), ""]
    text += [markdown_table(spec, rows), "",
             f"Baseline: `{spec['baseline']}`. Ratios are word perplexity / the baseline's. "
             "lr: the learning rate; (swept) marks the best of the arm's sweep on the validation "
             "split of the training text, never on the evaluation sets. ± is half the spread "
             "(max - min) over seeds. rep-4: the share of repeated 4-grams; len: mean "
             "continuation length in tokens."]
    if spec.get("gap") and rows:
        text += ["", f"Compression: the gap between `{spec['gap']['scratch']}` (trained from "
                 f"scratch) and its teacher `{spec['gap']['teacher']}`, and the share of it each "
                 "arm closes (word perplexity; 1 = as good as the teacher). 'at init': the "
                 "compressed student before any training.", "", compression_table(spec, rows)]
    sweeps = [r for r in rows if r["sweep"]]
    if sweeps:
        text += ["", "Learning-rate sweeps (validation loss at seed "
                 f"{spec.get('seeds', [0])[0]}):", "", "| arm | " + " | ".join(
                     "lr / valid loss" for _ in range(max(len(r["sweep"]) for r in sweeps)))
                 + " |", "|---|" + "---|" * max(len(r["sweep"]) for r in sweeps)]
        for r in sweeps:
            text.append(f"| {r['arm']} | " + " | ".join(
                f"{lr:g}: {_fmt(loss, 4)}" for lr, loss in r["sweep"]) + " |")
    if missing:
        text += ["", f"Not run yet: {', '.join(missing)}."]
    atomic_write_text(os.path.join(out, "results.md"), "\n".join(text) + "\n")
    if rows:
        _plots(out, rows)
    log(f"Report: {os.path.join(out, 'results.md')} ({len(rows)} arms, {len(results)} runs"
        f"{'; not run yet: ' + ', '.join(missing) if missing else ''})")
    return rows


def _csv(rows):
    sets = list(rows[0]["eval"]) if rows else []
    fields = ["arm", "learning_rate", "seeds", "parameters", "non_embedding_parameters",
              "parameter_ratio", "training_tokens", "train_seconds", "tokens_per_second",
              "final_train_loss", "valid_loss"]
    for name in sets:
        fields += [f"{name}_word_perplexity", f"{name}_word_perplexity_spread",
                   f"{name}_word_perplexity_ratio", f"{name}_bits_per_byte"]
    fields += list(GENERATION_COLUMNS)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        flat = {k: r[k] for k in fields if k in r}
        flat["seeds"] = " ".join(map(str, r["seeds"]))
        for name in sets:
            for key in ("word_perplexity", "word_perplexity_spread", "word_perplexity_ratio",
                        "bits_per_byte"):
                flat[f"{name}_{key}"] = r["eval"][name][key]
        flat.update(r.get("generation") or {})
        writer.writerow(flat)
    return buffer.getvalue()


def _plots(out, rows):
    import matplotlib  # deferred: imports matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: imports matplotlib

    fig, ax = plt.subplots(figsize=(10, 5.5))
    styles = ("-", "--", ":", "-.")  # the colour cycle has 10 colours: past 10 arms, a new dash
    for i, r in enumerate(rows):
        if r["curve"]:
            tokens, loss = zip(*r["curve"])
            ax.plot(tokens, loss, styles[i // 10 % len(styles)], label=r["arm"])
    ax.set_xlabel("training tokens")
    ax.set_ylabel("training loss (nats/token, mean of each logging interval)")
    ax.set_title("Training loss")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, os.path.join(out, "loss.png"))
    plt.close(fig)

    sets = list(rows[0]["eval"])
    fig, axes = plt.subplots(1, len(sets), figsize=(5 * len(sets), 4.5), squeeze=False)
    for ax, name in zip(axes[0], sets):
        for r in rows:
            ax.scatter(r["parameters"], r["eval"][name]["word_perplexity"])
            ax.annotate(r["arm"], (r["parameters"], r["eval"][name]["word_perplexity"]),
                        fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("parameters")
        ax.set_ylabel("held-out word perplexity")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, os.path.join(out, "ppl_vs_params.png"))
    plt.close(fig)


def _save(fig, path):
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, dpi=110)


def copy_report(out, destination):
    """Copies the report files (not the runs) to `destination`, e.g. `experiments/results/NAME`."""
    os.makedirs(destination, exist_ok=True)
    for name in ("results.json", "results.csv", "results.md", "loss.png", "ppl_vs_params.png",
                 "spec.json"):
        if os.path.exists(os.path.join(out, name)):
            shutil.copyfile(os.path.join(out, name), os.path.join(destination, name))
    return destination

