"""`algpt2 experiment`: spec validation, a tiny two-arm run, skip/resume, the report."""

import copy
import json
import math
import os

import pytest

from algpt2_tf.cli import main
from algpt2_tf.experiments import SpecError, load_spec, parse_spec
from algpt2_tf.experiments.runner import article_share, wikitext_articles
from algpt2_tf.experiments.text_metrics import distinct_n, repeated_ngram_fraction, text_metrics

WIKI = """ 
 = First article = 
 
 Alpha beta gamma . 
 
 = = A section = = 
 
 Delta epsilon . 
 
 = Second article = 
 
 Zeta eta theta . 
 
 = Third article = 
 
 Iota kappa . 
"""


def write_corpus(folder):
    """Small training and evaluation files made from Python's own documentation."""
    from pydoc_data import topics

    names = sorted(topics.topics)
    os.makedirs(folder, exist_ok=True)
    for i, part in enumerate(("train_a", "train_b", "held_out")):
        text = "\n\n".join(topics.topics[k] for k in names[i::7][:12])
        with open(os.path.join(folder, f"{part}.txt"), "w", encoding="utf-8") as f:
            f.write(text)
    with open(os.path.join(folder, "wiki.raw"), "w", encoding="utf-8") as f:
        f.write(WIKI)


def tiny_spec():
    return {
        "name": "tiny",
        "base": {"preset": "algpt2-tiny", "overrides": {
            "hidden_size": 16, "num_heads": 2, "intermediate_size": 32, "num_layers": 2,
            "embedding_size": 8, "max_positions": 32, "sop_head": False}},
        "tokenizer": {"vocab_size": 300},
        "train": {"files": ["data/train_*.txt", {"path": "data/wiki.raw",
                                                 "wikitext_articles": [0.0, 0.67]}],
                  "valid_fraction": 0.1},
        "budget": {"tokens": 1024, "seq_len": 16, "batch_size": 4},
        "options": {"warmup_steps": 2, "checkpoint_every": 8, "log_every": 4},
        "evaluation": {"sets": [{"name": "held_out", "files": ["data/held_out.txt"]},
                                {"name": "wiki", "files": [{"path": "data/wiki.raw",
                                                            "wikitext_articles": [0.67, 1.0]}]}],
                       "seq_len": 16, "stride": 8},
        "generation": {"prompts": ["The", "A list"], "max_new_tokens": 6},
        "baseline": "gpt2",
        "arms": [
            {"name": "gpt2", "config": {"embedding_size": None, "num_layer_groups": 2},
             "sweep": {"learning_rate": [0.0001, 0.01]}},
            {"name": "algpt2_lora", "config": {"lora_rank": 2, "per_layer_norms": True},
             "learning_rate_from": "gpt2", "seeds": [0, 1]},
        ],
    }


def write_spec(folder, spec, name="spec.json"):
    path = os.path.join(folder, name)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(spec, f)
    return path


# ------------------------------------------------------------------ pieces
def test_text_metrics_by_hand():
    assert distinct_n(["a b a b"], 1) == 0.5
    assert distinct_n(["a b a b"], 2) == 2 / 3
    assert distinct_n([""], 3) == 0.0
    assert repeated_ngram_fraction(["a b c d a b c d"], 4) == 1 / 5  # "a b c d" again at the end
    assert repeated_ngram_fraction(["a b c d", "a b c d"], 4) == 0.0  # counted within a text
    stats = text_metrics(["x y", "x y z w"], lengths_in_tokens=[3, 5])
    assert stats["mean_length_words"] == 3.0 and stats["mean_length_tokens"] == 4.0
    assert stats["distinct_1"] == 4 / 6


def test_interval_means_undo_keras_running_means():
    from algpt2_tf.experiments.report import interval_means

    losses = [9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0]  # one per step; epochs of 4 steps
    logged = []
    for step in (2, 4, 6, 8):  # logged every 2 steps: the mean since the epoch began
        start = (step - 1) // 4 * 4
        logged.append([step * 10, sum(losses[start:step]) / (step - start)])
    assert interval_means(logged, 10, 4) == [[20, 8.5], [40, 6.5], [60, 4.5], [80, 2.5]]


def test_wikitext_articles_split_at_top_level_headings(tmp_path):
    write_corpus(tmp_path)
    articles = wikitext_articles(str(tmp_path / "wiki.raw"))
    assert [a.strip().splitlines()[0].strip() for a in articles] == [
        "= First article =", "= Second article =", "= Third article ="]
    assert "A section" in articles[0]  # second-level headings stay inside their article
    assert article_share(articles, [0.0, 0.67]) == articles[:2]
    assert article_share(articles, [0.67, 1.0]) == articles[2:]


def test_separated_documents_split_at_the_separator_line(tmp_path):
    from algpt2_tf.experiments.runner import separated_documents

    path = tmp_path / "stories.txt"
    path.write_text("One story.\n\n<|endoftext|>\n\nTwo\nlines.\n <|endoftext|> \n\n\n")
    assert separated_documents(str(path), "<|endoftext|>") == ["One story.", "Two\nlines."]


# -------------------------------------------------------------- validation
def _mutations():
    def arm(spec, i):
        return spec["arms"][i]

    return {
        "unknown top-level field": (lambda s: s.update(trainng={}), "unknown field"),
        "unknown config field": (lambda s: arm(s, 1)["config"].update(lora=2), "lora"),
        "unknown preset": (lambda s: s["base"].update(preset="gpt5"), "unknown preset 'gpt5'"),
        "missing file": (lambda s: s["train"]["files"].append("data/nope.txt"), "nope.txt"),
        "arm overrides nothing": (lambda s: s["arms"].append({"name": "same"}), "overrides nothing"),
        "two arms with one name": (lambda s: s["arms"].append(dict(arm(s, 1))), "Two arms"),
        "bad config value": (lambda s: arm(s, 1)["config"].update(group_order="zigzag"),
                             "group_order"),
        "bad option": (lambda s: arm(s, 1).update(options={"optimizer": "sgd"}), "optimizer"),
        "arm changes the budget": (lambda s: arm(s, 1).update(options={"seq_len": 8}), "seq_len"),
        "unknown lr source": (lambda s: arm(s, 1).update(learning_rate_from="bert"), "bert"),
        "sweep without validation split": (lambda s: s["train"].update(valid_fraction=0),
                                           "valid_fraction"),
        "baseline not an arm": (lambda s: s.update(baseline="gpt3"), "gpt3"),
        "budget below one batch": (lambda s: s["budget"].update(tokens=10), "one batch"),
        "compress from an unknown arm": (lambda s: arm(s, 1).update(compress={"from": "bert"}),
                                         "compress.from: 'bert' is not an earlier arm"),
        "compress from a later arm": (lambda s: arm(s, 0).update(compress={"from": "algpt2_lora"}),
                                      "'algpt2_lora' is not an earlier arm"),
        "compress across shapes": (lambda s: (arm(s, 1)["config"].update(intermediate_size=48),
                                              arm(s, 1).update(compress={"from": "gpt2"})),
                                   "intermediate_size (48) differs"),
        "bad compress init": (lambda s: arm(s, 1).update(compress={"from": "gpt2", "init": "x"}),
                              "compress.init"),
        "negative distill weight": (lambda s: arm(s, 1).update(
            distill={"from": "gpt2", "weight": -1}), "distill.weight"),
        "gap names no arm": (lambda s: s.update(gap={"teacher": "gpt2", "scratch": "x"}),
                             "gap.scratch"),
        "arm budget below one batch": (lambda s: arm(s, 1).update(tokens=32), "arm 'algpt2_lora'"
                                       ".tokens is less than one batch"),
        "arm budget not an integer": (lambda s: arm(s, 1).update(tokens=1e6),
                                      "tokens must be a positive integer"),
        "separator of two lines": (lambda s: s["train"]["files"].append(
            {"path": "data/held_out.txt", "separator": "a\nb"}), "separator must be one"),
        "separator and articles": (lambda s: s["train"]["files"].append(
            {"path": "data/wiki.raw", "separator": "x", "wikitext_articles": [0, 1]}),
            "not both"),
    }


@pytest.mark.parametrize("case", list(_mutations()))
def test_spec_errors_exit_2_before_anything_trains(case, tmp_path, capsys):
    write_corpus(tmp_path / "data")
    mutate, message = _mutations()[case]
    spec = copy.deepcopy(tiny_spec())
    mutate(spec)
    out = tmp_path / "out"
    assert main(["experiment", "run", write_spec(tmp_path, spec), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "algpt2 experiment: error:" in err and message in err
    assert not out.exists()


def test_yaml_specs_and_their_errors(tmp_path):
    import yaml

    write_corpus(tmp_path / "data")
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(tiny_spec()))
    spec = load_spec(str(path))
    assert [a.name for a in spec.arms] == ["gpt2", "algpt2_lora"] and spec.steps == 16
    path.write_text("name: [unclosed")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(str(path))


def test_the_shipped_spec_is_valid():
    from conftest import REPO, shared_file

    shared_file("pd-books")
    spec = load_spec(os.path.join(REPO, "experiments", "algpt2_vs_gpt2.json"))
    gpt2 = spec.arm("gpt2")
    assert gpt2.sweep and spec.baseline == "gpt2" and len(gpt2.seeds) == 2
    assert len(spec.arm("algpt2").seeds) == 2
    # The held-out books are not in the training files.
    held_out = {os.path.basename(s.path) for s in spec.eval_sets["books"]}
    assert len(held_out) == 2
    assert not held_out & {os.path.basename(s.path) for s in spec.train_files}


def test_the_shipped_compression_spec_is_valid():
    from conftest import REPO, shared_file

    shared_file("pd-books")
    spec = load_spec(os.path.join(REPO, "experiments", "compress_gpt2.json"))
    assert spec.gap == {"teacher": "gpt2_teacher", "scratch": "algpt2_scratch"}
    lora = spec.arm("compressed_lora32_distill")
    assert lora.compress == {"from": "gpt2_teacher", "init": "average"}
    assert lora.distill["from"] == "gpt2_teacher" and lora.config == {"lora_rank": 32}


def test_parse_spec_resolves_paths_against_the_spec_folder(tmp_path):
    write_corpus(tmp_path / "data")
    spec = parse_spec(tiny_spec(), str(tmp_path))
    assert spec.train_files[0].path == os.path.join(str(tmp_path), "data/train_*.txt")
    with pytest.raises(SpecError, match="train_"):
        parse_spec(tiny_spec(), str(tmp_path / "elsewhere"))


def test_appending_arms_extends_a_folder_and_any_other_change_is_refused(tmp_path):
    from algpt2_tf.experiments.runner import Experiment

    write_corpus(tmp_path / "data")
    out = str(tmp_path / "out")
    logged = []
    Experiment(parse_spec(tiny_spec(), str(tmp_path)), out, log=logged.append).check_folder()
    stored = json.loads((tmp_path / "out" / "spec.json").read_text())
    longer = tiny_spec()
    longer["arms"].append({"name": "shared", "config": {"embedding_size": None},
                           "learning_rate_from": "gpt2"})
    Experiment(parse_spec(longer, str(tmp_path)), out, log=logged.append).check_folder()
    assert json.loads((tmp_path / "out" / "spec.json").read_text()) == longer != stored
    assert logged[-1].endswith("arms or seeds were added to its spec")
    more_seeds = copy.deepcopy(longer)
    more_seeds["arms"][0]["seeds"] = [0, 1]  # the spec's default [0], then one more
    Experiment(parse_spec(more_seeds, str(tmp_path)), out).check_folder()
    assert json.loads((tmp_path / "out" / "spec.json").read_text()) == more_seeds
    longer = more_seeds
    for change in ("an edited arm", "a dropped arm", "another budget", "a dropped seed"):
        other = copy.deepcopy(longer)
        if change == "an edited arm":
            other["arms"][0]["sweep"]["learning_rate"] = [0.001, 0.003]
            other["arms"].append({"name": "more", "config": {"lora_rank": 4}})
        elif change == "a dropped arm":
            other["arms"] = other["arms"][:1]
        elif change == "another budget":
            other["budget"]["tokens"] = 2048
            other["arms"].append({"name": "more", "config": {"lora_rank": 4}})
        else:
            other["arms"][0]["seeds"] = [1]
        with pytest.raises(SpecError, match="holds a different experiment"):
            Experiment(parse_spec(other, str(tmp_path)), out).check_folder()
        assert json.loads((tmp_path / "out" / "spec.json").read_text()) == longer, change


def test_a_scaling_experiment_its_report_and_its_quality_judges(tmp_path):
    """`tokens` gives an arm its own steps (and cosine schedule); a `separator` file is
    evaluated as separate documents; `experiment scaling` reports each family's ratio to
    the baseline family at every budget; `experiment quality` judges every run's samples
    with two trained models. Tiny runs of two arms, both at twice the spec's budget (the
    report's choices and fits on more runs and budgets:
    `test_scaling_rows_keep_each_familys_best_rate_and_fit_its_trend`)."""
    write_corpus(tmp_path / "data")
    held_out = (tmp_path / "data" / "held_out.txt").read_text()
    (tmp_path / "data" / "stories.txt").write_text(held_out.replace("\n\n", "\n<|endoftext|>\n", 3))
    spec = tiny_spec()
    spec["budget"]["tokens"] = 256  # 4 steps of 4 x 16
    spec["evaluation"]["sets"] = [{"name": "stories", "files": [
        {"path": "data/stories.txt", "separator": "<|endoftext|>"}]}]
    spec["arms"] = [{"name": "base_2x", "options": {"learning_rate": 0.01}, "tokens": 512},
                    {"name": "norms_2x", "config": {"per_layer_norms": True},
                     "options": {"learning_rate": 0.01}, "tokens": 512}]
    spec["baseline"] = "base_2x"
    opening = " ".join(held_out.split()[:3])
    spec["generation"] = {"prompts": [opening, "Not in any held-out text at all"],
                          "max_new_tokens": 4}
    out = tmp_path / "out"
    spec_path = write_spec(tmp_path, spec)
    assert main(["experiment", "run", spec_path, "--out", str(out), "--verbose", "0"]) == 0
    runs = {r["arm"]: r for r in json.loads((out / "results.json").read_text())["runs"]}
    assert (runs["base_2x"]["steps"], runs["base_2x"]["training_tokens"]) == (8, 512)  # not 4, 256
    # The separator lines are not text of the set: fewer words than the file has.
    words = len((tmp_path / "data" / "stories.txt").read_text().split())
    assert runs["base_2x"]["eval"]["stories"]["words"] == words - 3

    assert main(["experiment", "scaling", str(out), "--baseline", "base", "--out",
                 str(tmp_path / "report")]) == 0
    report = json.loads((tmp_path / "report" / "scaling.json").read_text())
    rows = {(r["family"], r["tokens"]): r for r in report["rows"]}
    assert rows[("base", 512)]["sets"]["stories"]["ratio"] == 1.0
    expected = (runs["norms_2x"]["eval"]["stories"]["word_perplexity"]
                / runs["base_2x"]["eval"]["stories"]["word_perplexity"])
    assert rows[("norms", 512)]["sets"]["stories"]["ratio"] == pytest.approx(expected)
    assert (tmp_path / "report" / "ratio_vs_tokens.png").stat().st_size > 0
    assert "| norms | 2x | 512 |" in (tmp_path / "report" / "scaling.md").read_text()

    assert main(["experiment", "quality", str(out), "--spec", spec_path, "--judges", "base_2x",
                 "norms_2x", "--baseline", "base", "--out", str(tmp_path / "report")]) == 0
    quality = json.loads((tmp_path / "report" / "quality.json").read_text())
    from algpt2_tf.experiments.quality import gaps_at_equal_perplexity

    assert main(["experiment", "quality", str(out), "--spec", spec_path, "--judges", "base_2x",
                 "--equal-on", "nothing", "--out", str(tmp_path / "report")]) == 2
    assert quality["baseline"] == "base" and quality["gaps"] == json.loads(json.dumps(
        gaps_at_equal_perplexity(quality["rows"], ["base_2x", "norms_2x"], ["stories"], "base")))
    assert quality["groups"] == {"stories": [0]}  # the second prompt opens no held-out text
    assert len(quality["rows"]) == 2  # a row a run
    for row in quality["rows"]:
        assert set(row["judges"]) == {"base_2x", "norms_2x"}
        assert row["judges"]["base_2x"]["stories"] > 1
    text = (tmp_path / "report" / "quality.md").read_text()
    assert f"**Prompt:** {opening}" in text and (tmp_path / "report" / "quality.png").exists()


def test_scaling_rows_keep_each_familys_best_rate_and_fit_its_trend():
    """Of a family's runs at one budget, the one with the lowest validation loss stands for
    it (the rates tried are listed); each other family gets its ratio to the baseline family
    at every budget and a power-law fit over the budgets (two points: no error estimate)."""
    from algpt2_tf.experiments.scaling import fits, scaling_rows

    arms = [("base_1x", 256, 0.01, 3.0, 100.0), ("base_2x", 512, 0.01, 2.5, 80.0),
            ("base_2x_lr0.05", 512, 0.05, 2.4, 70.0), ("norms_1x", 256, 0.01, 3.1, 120.0),
            ("norms_2x", 512, 0.01, 2.6, 77.0)]
    spec = {"budget": {"seq_len": 16, "batch_size": 4}, "options": {}, "seeds": [0],
            "baseline": "base_1x",
            "arms": [{"name": name} for name, *_ in arms]}
    results = [{"arm": name, "seed": 0, "learning_rate": rate, "valid_loss": loss,
                "training_tokens": tokens, "parameters": 1000, "non_embedding_parameters": 500,
                "train_seconds": 1.0, "eval": {"stories": {"word_perplexity": ppl,
                                                           "bits_per_byte": 1.0}}}
               for name, tokens, rate, loss, ppl in arms]
    rows = {(r["family"], r["tokens"]): r for r in scaling_rows(spec, results, "base")}
    assert rows[("base", 512)]["arm"] == "base_2x_lr0.05"  # validation loss 2.4 < 2.5
    assert rows[("base", 512)]["learning_rates_tried"] == [[0.01, 2.5], [0.05, 2.4]]
    assert rows[("norms", 256)]["sets"]["stories"]["ratio"] == pytest.approx(1.2)
    assert rows[("norms", 512)]["sets"]["stories"]["ratio"] == pytest.approx(1.1)
    fit = fits(list(rows.values()), "base")["norms"]["stories"]
    assert fit["points"] == 2 and fit["slope_se"] is None
    assert fit["slope"] == pytest.approx(math.log(1.1 / 1.2) / math.log(2))
    assert "base" not in fits(list(rows.values()), "base")


def test_generative_perplexity_scores_the_continuation_only():
    """The judge's perplexity of a continuation equals exp(mean NLL) of its tokens given
    the prompt, computed by hand from the full logits."""
    import math

    import numpy as np

    from algpt2_tf import ALGPT2LMHeadModel
    from algpt2_tf.experiments.quality import generative_perplexity
    from conftest import tiny_config

    class Ids:  # a tokenizer of single characters
        def encode(self, text):
            return [ord(c) % 97 for c in text]

    model = ALGPT2LMHeadModel(tiny_config(initializer_range=0.5))
    got = generative_perplexity(model, Ids(), ["ab", "xyz"], ["cd", "w"])
    full = Ids().encode("abcd")
    logits = np.asarray(model({"input_ids": np.array([full])})["logits"][0], np.float64)
    log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                                keepdims=True)) - logits.max(-1, keepdims=True)
    nll = -(log_probs[1, full[2]] + log_probs[2, full[3]]) / 2
    assert got["per_sample"][0] == pytest.approx(math.exp(nll), rel=1e-4)
    assert got["tokens"] == 3


# ----------------------------------------------------------------- a run
@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    import io
    from contextlib import redirect_stdout

    folder = tmp_path_factory.mktemp("experiment")
    write_corpus(folder / "data")
    spec_path = write_spec(folder, tiny_spec())
    out = folder / "out"
    printed = io.StringIO()
    with redirect_stdout(printed):
        assert main(["experiment", "run", spec_path, "--out", str(out), "--verbose", "0"]) == 0
    return spec_path, out, printed.getvalue()


@pytest.mark.slow
def test_run_writes_results_and_plots(finished):
    _, out, printed = finished
    for name in ("results.json", "results.csv", "results.md", "loss.png", "ppl_vs_params.png"):
        assert (out / name).stat().st_size > 0, name
    assert "[1/2] arm gpt2:" in printed and "[2/2] arm algpt2_lora done" in printed
    results = json.loads((out / "results.json").read_text())
    rows = {r["arm"]: r for r in results["arms"]}
    assert set(rows) == {"gpt2", "algpt2_lora"} and not results["missing_arms"]
    # The sweep picks the rate with the lower validation loss; the next arm reuses it.
    sweep = rows["gpt2"]["sweep"]
    best_rate = min(sweep, key=lambda pair: pair[1])[0]
    assert rows["gpt2"]["learning_rate"] == best_rate == rows["algpt2_lora"]["learning_rate"]
    assert rows["algpt2_lora"]["seeds"] == [0, 1]
    assert rows["gpt2"]["eval"]["held_out"]["word_perplexity_ratio"] == 1.0
    assert rows["algpt2_lora"]["parameters"] < rows["gpt2"]["parameters"]
    lora = rows["algpt2_lora"]
    assert lora["eval"]["wiki"]["word_perplexity_spread"] is not None  # two seeds
    assert 0 <= lora["generation"]["distinct_1"] <= 1 and lora["generation"]["mean_length_tokens"] > 0
    table = (out / "results.md").read_text()
    assert "| algpt2_lora (seeds 0, 1) |" in table and "(swept)" in table
    # Only the chosen rate is evaluated; every run has a training curve.
    runs = results["runs"]
    assert len(runs) == 4
    assert sum("eval" in r for r in runs) == 3
    csv_lines = (out / "results.csv").read_text().splitlines()
    assert len(csv_lines) == 3 and csv_lines[0].startswith("arm,learning_rate")


@pytest.mark.slow
def test_rerun_skips_finished_runs_and_resumes_an_unfinished_one(finished, capsys):
    spec_path, out, _ = finished
    run_dir = out / "arms" / "algpt2_lora"
    seed1 = next(run_dir.glob("*_seed-1"))
    before = json.loads((seed1 / "result.json").read_text())
    # As if killed after the checkpoint at step 8 of 16: no result, no model, no last checkpoint.
    (seed1 / "result.json").unlink()
    (seed1 / "model.keras").unlink()
    (seed1 / "checkpoints" / "ckpt-00000016.npz").unlink()
    assert main(["experiment", "run", spec_path, "--out", str(out), "--verbose", "0"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("trained earlier, skipped") == 3
    assert "Resuming from step 8" in printed
    after = json.loads((seed1 / "result.json").read_text())
    assert after["resumed_from_step"] == 8
    assert after["valid_loss"] == pytest.approx(before["valid_loss"], abs=1e-5)
    assert after["eval"]["wiki"]["word_perplexity"] == pytest.approx(
        before["eval"]["wiki"]["word_perplexity"], rel=1e-4)


@pytest.mark.slow
def test_report_rebuilds_from_disk_and_a_changed_spec_is_refused(finished, tmp_path, capsys):
    spec_path, out, _ = finished
    table = (out / "results.md").read_text()
    (out / "results.md").unlink()
    (out / "loss.png").unlink()
    assert main(["experiment", "report", str(out), "--copy-to", str(tmp_path / "published")]) == 0
    assert (out / "results.md").read_text() == table and (out / "loss.png").exists()
    assert sorted(os.listdir(tmp_path / "published")) == [
        "loss.png", "ppl_vs_params.png", "results.csv", "results.json", "results.md", "spec.json"]
    changed = tiny_spec()
    changed["budget"]["tokens"] = 2048
    other = write_spec(os.path.dirname(spec_path), changed, "changed.json")
    assert main(["experiment", "run", other, "--out", str(out)]) == 2
    assert "holds a different experiment" in capsys.readouterr().err
    assert main(["experiment", "report", str(tmp_path)]) == 2
