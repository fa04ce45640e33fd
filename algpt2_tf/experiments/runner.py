"""Runs an experiment: every arm trained with `train`, evaluated, sampled; resumable.

An experiment folder:

    OUT/spec.json                the spec as run (a rerun must match it)
    OUT/tokenizer/               the BPE trained for it (when the spec asks for one)
    OUT/data/                    derived files (WikiText article shares), OUT/cache/ the token cache
    OUT/configs/ARM.json         each arm's model config
    OUT/arms/ARM/lr-L_seed-S/    one training run (`train`'s run folder) + result.json
    OUT/results.{json,csv,md}, OUT/*.png   the report (`report.write_report`)

A run is finished when its `result.json` exists. Rerunning the same command
skips finished runs and resumes an unfinished one from its last checkpoint
(`train`'s exact resume), so a `kill -9` costs at most one checkpoint
interval.
"""

import csv
import json
import os
import re
import time

import keras

from algpt2_tf.config import ALGPT2Config
from algpt2_tf.experiments.report import best_by_valid_loss, write_report
from algpt2_tf.experiments.spec import SpecError, arm_seeds, load_spec
from algpt2_tf.experiments.text_metrics import text_metrics
from algpt2_tf.runtime.files import (atomic_path, atomic_write_json, atomic_write_text,
                                     expand_files, read_documents, read_json)
from algpt2_tf.saving import load_model
from algpt2_tf.tokenizer import GPT2Tokenizer, train_tokenizer
from algpt2_tf.training.compression import compress_to_run
from algpt2_tf.training.options import TrainOptions

_WIKITEXT_HEADING = re.compile(r"^ = [^=].* = $")


# ------------------------------------------------------------------- data
def wikitext_articles(path):
    """The articles of a WikiText `.raw` file, in order (split at the ` = Title = ` lines)."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    articles, current = [], []
    for line in lines:
        if _WIKITEXT_HEADING.match(line) and current:
            articles.append("\n".join(current))
            current = []
        current.append(line)
    if "".join(current).strip():
        articles.append("\n".join(current))
    return [a for a in articles if a.strip()]


def article_share(articles, share):
    """Articles `[start, end)` of a `[start_fraction, end_fraction]` share (rounded)."""
    start, end = (int(round(f * len(articles))) for f in share)
    return articles[start:end]


def separated_documents(path, separator):
    """The documents of a file whose documents are separated by lines equal to `separator`
    (surrounding spaces ignored), each stripped of the blank lines around it."""
    documents, current = [], []
    for line in next(read_documents([path])).split("\n"):
        if line.strip() == separator.strip():
            documents.append("\n".join(current).strip("\n"))
            current = []
        else:
            current.append(line)
    documents.append("\n".join(current).strip("\n"))
    return [d for d in documents if d.strip()]


def source_texts(source):
    """The documents of one `FileSource`."""
    if source.separator is not None:
        return separated_documents(source.path, source.separator)
    if source.wikitext_articles is None:
        return list(read_documents(expand_files(source.path)))
    return article_share(wikitext_articles(source.path), source.wikitext_articles)


def held_out_texts(spec):
    """`{set name: documents}` of the spec's evaluation sets."""
    return {name: [t for s in sources for t in source_texts(s)]
            for name, sources in spec.eval_sets.items()}


def held_out_metrics(spec, model, tokenizer, eval_texts):
    """`{set: metrics}` of `model` on every evaluation set, with the spec's protocol."""
    from algpt2_tf.evaluation import evaluate_texts  # deferred: imports Keras

    found = {}
    for name, texts in eval_texts.items():
        metrics = evaluate_texts(model, tokenizer, texts, seq_len=spec.eval_seq_len,
                                 stride=spec.eval_stride, batch_size=spec.eval_batch_size,
                                 verbose=0)
        found[name] = {k: metrics[k] for k in (
            "word_perplexity", "bits_per_byte", "token_perplexity", "tokens", "words")}
    return found


def materialize_train_files(spec, data_dir):
    """Paths `train` can read: globs as they are, article shares written as `.jsonl`."""
    paths = []
    for source in spec.train_files:
        if source.wikitext_articles is None and source.separator is None:
            paths.append(source.path)
            continue
        if source.separator is not None:
            name = f"{os.path.basename(source.path)}.documents.jsonl"
        else:
            start, end = source.wikitext_articles
            name = f"{os.path.basename(source.path)}.articles-{start:g}-{end:g}.jsonl"
        path = os.path.join(data_dir, name)
        if not os.path.exists(path):
            os.makedirs(data_dir, exist_ok=True)
            lines = "".join(json.dumps({"text": t}) + "\n" for t in source_texts(source))
            atomic_write_text(path, lines)
        paths.append(path)
    return paths


# ---------------------------------------------------------------- the plan
def run_dir_name(learning_rate, seed):
    return f"lr-{learning_rate:g}_seed-{seed}"


def default_learning_rate(spec, arm):
    return float(arm.options.get("learning_rate",
                                 spec.options.get("learning_rate", TrainOptions.learning_rate)))


def extends(stored, source):
    """Whether spec `source` only adds to spec `stored`: arms appended at the end,
    seeds appended to an arm's `seeds`; nothing else changed, so every finished
    run still belongs to its arm."""
    old_arms, new_arms = stored.get("arms", []), source.get("arms", [])
    if {**stored, "arms": None} != {**source, "arms": None} or len(new_arms) < len(old_arms):
        return False
    for old, new in zip(old_arms, new_arms):
        old_seeds, new_seeds = arm_seeds(stored, old), arm_seeds(source, new)
        if ({**old, "seeds": None} != {**new, "seeds": None}
                or new_seeds[:len(old_seeds)] != old_seeds):
            return False
    return True


class Experiment:
    """One experiment folder: the spec, its tokenizer and data, and its runs.

    Args:
        spec: an `ExperimentSpec`.
        out: the experiment folder.
        log: where progress lines go.
        verbose: the Keras progress display of training (0, 1 or 2).
    """

    def __init__(self, spec, out, log=print, verbose=1):
        self.spec = spec
        self.out = out
        self.log = log
        self.verbose = verbose

    # ---------------------------------------------------------------- setup
    def check_folder(self):
        """Creates OUT with spec.json, or checks that OUT holds this same spec.

        A spec that only appends arms or seeds to the stored one extends the
        experiment (`extends`): spec.json is updated and the finished runs are
        kept. Any other change is refused: finished runs would no longer match
        their spec.
        """
        path = os.path.join(self.out, "spec.json")
        if os.path.exists(path):
            stored = read_json(path)
            if stored == self.spec.source:
                return
            if not extends(stored, self.spec.source):
                raise SpecError(f"{self.out} holds a different experiment (spec.json differs in more "
                                "than appended arms or seeds). Use another --out, or the same spec "
                                "to resume.")
            self.log(f"Extending {self.out}: arms or seeds were added to its spec")
            atomic_write_json(path, self.spec.source)
            return
        if os.path.isdir(self.out) and os.listdir(self.out):
            raise SpecError(f"{self.out} is not empty and holds no experiment (no spec.json).")
        os.makedirs(self.out, exist_ok=True)
        atomic_write_json(path, self.spec.source)

    def tokenizer_dir(self):
        """The tokenizer folder of every arm (`None`: the shipped GPT-2 BPE)."""
        wanted = self.spec.tokenizer
        if wanted is None or isinstance(wanted, str):
            return wanted
        directory = os.path.join(self.out, "tokenizer")
        if not os.path.exists(os.path.join(directory, "tokenizer.json")):
            texts = [t for s in self.spec.train_files for t in source_texts(s)]
            self.log(f"Training a {wanted['vocab_size']}-id BPE on the training files -> {directory}")
            with atomic_path(directory) as tmp:
                train_tokenizer(texts, wanted["vocab_size"], tmp,
                                min_frequency=wanted["min_frequency"])
        return directory

    def arm_config(self, arm, vocab_size):
        """Writes and returns the path of the arm's config (the tokenizer's vocabulary size)."""
        values = {**self.spec.base_config.to_dict(), **arm.config, "vocab_size": vocab_size}
        if arm.config.get("intermediate_size") is None and "hidden_size" in arm.config:
            values["intermediate_size"] = None  # follow the arm's hidden size
        config = ALGPT2Config.from_dict(values)
        os.makedirs(os.path.join(self.out, "configs"), exist_ok=True)
        path = os.path.join(self.out, "configs", f"{arm.name}.json")
        if not os.path.exists(path):
            atomic_write_json(path, config.to_dict())
        return path, config

    # ------------------------------------------------------------------ runs
    def run(self):
        """Trains, evaluates and samples every run that has no result yet; returns all results."""
        spec = self.spec
        self.check_folder()
        tokenizer_dir = self.tokenizer_dir()
        tokenizer = GPT2Tokenizer(tokenizer_dir)
        train_files = materialize_train_files(spec, os.path.join(self.out, "data"))
        eval_texts = held_out_texts(spec)
        self.tokenizer, self.eval_texts = tokenizer, eval_texts
        self.chosen = chosen = {}  # arm -> its learning rate
        self.train_args = {}  # arm -> what _train needs besides the rate and seed
        results = []
        for number, arm in enumerate(spec.arms, 1):
            config_path, config = self.arm_config(arm, tokenizer.vocab_size)
            if arm.sweep:
                rates = arm.sweep
            elif arm.learning_rate_from:
                rates = [chosen[arm.learning_rate_from]]
            else:
                rates = [default_learning_rate(spec, arm)]
            self.log(f"[{number}/{len(spec.arms)}] arm {arm.name}: {config.num_parameters():,} "
                     f"parameters, learning rate{'s' if len(rates) > 1 else ''} "
                     f"{', '.join(f'{r:g}' for r in rates)}, seeds {arm.seeds}")
            started = time.time()
            train_args = (config_path, config, tokenizer_dir, train_files)
            self.train_args[arm.name] = train_args
            first = [self._train(arm, rate, arm.seeds[0], *train_args) for rate in rates]
            best = best_by_valid_loss(first)
            chosen[arm.name] = best["learning_rate"]
            # Only the chosen rate is evaluated and run with the other seeds.
            more = [best] + [self._train(arm, best["learning_rate"], seed, *train_args)
                             for seed in arm.seeds[1:]]
            more = [self._evaluate(r, tokenizer, eval_texts, train_args) for r in more]
            first = [r for r in first if r["learning_rate"] != best["learning_rate"]]
            results.extend(first + more)
            summary = ", ".join(f"{name} word ppl {more[0]['eval'][name]['word_perplexity']:.2f}"
                                for name in eval_texts)
            self.log(f"[{number}/{len(spec.arms)}] arm {arm.name} done in "
                     f"{time.time() - started:.0f} s: learning rate {best['learning_rate']:g}"
                     f"{' (best valid loss of the sweep)' if arm.sweep else ''}; {summary}")
        return results

    def _train(self, arm, learning_rate, seed, config_path, config, tokenizer_dir, train_files):
        """Trains one run (or finds it trained); returns its result (no evaluation yet)."""
        # Deferred: imports TensorFlow, Keras.
        from algpt2_tf.training.trainer import TrainOptions, train

        spec = self.spec
        steps = spec.arm_steps(arm)
        run_dir = os.path.join(self.out, "arms", arm.name, run_dir_name(learning_rate, seed))
        result_path = os.path.join(run_dir, "result.json")
        if os.path.exists(result_path):
            self.log(f"  {arm.name} lr {learning_rate:g} seed {seed}: trained earlier, skipped")
            return read_json(result_path)
        values = {**spec.options, **arm.options, "learning_rate": learning_rate}
        extra = {}
        if arm.compress:
            init_dir, extra["compress"] = self._compressed_init(arm, config)
            values["init_model"], config_path = init_dir, None
        if arm.distill:
            values.update(teacher=self._model_dir(arm.distill["from"]),
                          distill_weight=arm.distill["weight"],
                          distill_temperature=arm.distill["temperature"])
            extra["distill"] = dict(arm.distill)
        options = TrainOptions(
            out=run_dir, preset=None, config=config_path, train_files=train_files,
            valid_fraction=spec.valid_fraction, tokenizer=tokenizer_dir,
            cache_dir=os.path.join(self.out, "cache"), seq_len=spec.seq_len,
            batch_size=spec.batch_size, steps=steps, seed=seed, verbose=self.verbose,
            **values)
        self.log(f"  {arm.name} lr {learning_rate:g} seed {seed}: training {steps} steps")
        keras.backend.clear_session()
        started = time.time()
        summary = train(options, log=lambda line: self.log("  " + line))
        seconds = time.time() - started
        trained_tokens = (steps - summary["resumed_from"]) * spec.seq_len * spec.batch_size
        result = {
            "arm": arm.name, "learning_rate": learning_rate, "seed": seed,
            "parameters": config.num_parameters(),
            "non_embedding_parameters": non_embedding_parameters(config),
            "training_tokens": steps * spec.seq_len * spec.batch_size, "steps": steps,
            "resumed_from_step": summary["resumed_from"],
            "train_seconds": seconds,
            "tokens_per_second": trained_tokens / seconds if trained_tokens else None,
            **training_curve(os.path.join(run_dir, "metrics.csv"), spec.seq_len * spec.batch_size),
            **extra,
        }
        atomic_write_json(result_path, result)
        return result

    def _model_dir(self, name):
        """The run folder of arm `name` at its chosen rate and first seed, with its model
        (trained again, and evaluated again, if it was trained in another checkout)."""
        arm = self.spec.arm(name)
        run_dir = os.path.join(self.out, "arms", name, run_dir_name(self.chosen[name],
                                                                    arm.seeds[0]))
        if not os.path.exists(os.path.join(run_dir, "model.keras")):
            self.log(f"  {name}: its model is needed here and is missing: training it again")
            if os.path.exists(os.path.join(run_dir, "result.json")):
                os.remove(os.path.join(run_dir, "result.json"))
            result = self._train(arm, self.chosen[name], arm.seeds[0], *self.train_args[name])
            self._evaluate(result, self.tokenizer, self.eval_texts, self.train_args[name])
        return run_dir

    def _compressed_init(self, arm, config):
        """`(folder, summary)` of the arm's student as `compression.compress` initializes it
        from its teacher arm's model, evaluated before any training (`ARM/init/`)."""
        from algpt2_tf.causal_lm import ALGPT2LMHeadModel  # deferred: imports TensorFlow, Keras

        teacher = arm.compress["from"]
        init_dir = os.path.join(self.out, "arms", arm.name, "init")
        teacher_dir = self._model_dir(teacher)
        if not os.path.exists(os.path.join(init_dir, "model.keras")):
            self.log(f"  {arm.name}: initializing from {teacher} ({arm.compress['init']})")
            keras.backend.clear_session()
            compress_to_run(teacher_dir, init_dir, preset=None, overrides=config.to_dict(),
                            init=arm.compress["init"], log=lambda line: self.log("  " + line))
        eval_path = os.path.join(init_dir, "init_eval.json")
        if not os.path.exists(eval_path):
            self.log(f"  {arm.name}: evaluating the initialized student")
            model = load_model(init_dir, ALGPT2LMHeadModel)
            atomic_write_json(eval_path, self._held_out_metrics(model, self.tokenizer,
                                                                self.eval_texts))
        return init_dir, {**arm.compress, "init_eval": read_json(eval_path)}

    def _held_out_metrics(self, model, tokenizer, eval_texts):
        return held_out_metrics(self.spec, model, tokenizer, eval_texts)

    def _evaluate(self, result, tokenizer, eval_texts, train_args):
        """Adds held-out metrics and generation statistics to a trained run's result."""
        from algpt2_tf.causal_lm import ALGPT2LMHeadModel  # deferred: imports TensorFlow, Keras

        if "eval" in result:
            return result
        spec = self.spec
        arm, rate, seed = spec.arm(result["arm"]), result["learning_rate"], result["seed"]
        run_dir = os.path.join(self.out, "arms", arm.name, run_dir_name(rate, seed))
        if not os.path.exists(os.path.join(run_dir, "model.keras")):
            # Trained in another checkout (only result.json is kept in git): train it again.
            os.remove(os.path.join(run_dir, "result.json"))
            result = self._train(arm, rate, seed, *train_args)
        self.log(f"  {result['arm']} lr {result['learning_rate']:g} seed {result['seed']}: "
                 "evaluating and sampling")
        keras.backend.clear_session()
        model = load_model(run_dir, ALGPT2LMHeadModel)
        result = dict(result, eval=self._held_out_metrics(model, tokenizer, eval_texts))
        gen = spec.generation
        if gen["prompts"]:
            output = model.generate(gen["prompts"], max_new_tokens=gen["max_new_tokens"],
                                    sampler="top_p", top_p=gen["top_p"],
                                    temperature=gen["temperature"], seed=gen["seed"],
                                    tokenizer=tokenizer)
            continuations = [text[len(prompt):] for prompt, text in zip(gen["prompts"], output.text)]
            result["generation"] = text_metrics(continuations, [len(n) for n in output.new_ids])
            result["samples"] = [{"prompt": p, "continuation": c}
                                 for p, c in zip(gen["prompts"], continuations)]
        atomic_write_json(os.path.join(run_dir, "result.json"), result)
        return result


def non_embedding_parameters(config):
    """Parameters outside the token and position tables (Kaplan et al.'s model size)."""
    width = config.embedding_size or config.hidden_size
    return config.num_parameters() - (config.vocab_size + config.max_positions) * width


def training_curve(metrics_path, tokens_per_step):
    """The final training loss, the validation loss and the loss curve from `metrics.csv`.

    Keras logs the mean loss since the start of the epoch (an epoch is one
    checkpoint interval): the curve keeps those values as logged, and the
    report turns them into per-interval means (`report.interval_means`).
    """
    curve, valid_curve = [], []
    with open(metrics_path, newline="") as f:
        for row in csv.DictReader(f):
            tokens = int(float(row["step"])) * tokens_per_step
            if row.get("lm_loss"):
                curve.append([tokens, float(row["lm_loss"])])
            if row.get("val_lm_loss"):
                valid_curve.append([tokens, float(row["val_lm_loss"])])
    return {"final_train_loss": curve[-1][1] if curve else None,
            "valid_loss": valid_curve[-1][1] if valid_curve else None,
            "curve": curve, "valid_curve": valid_curve}


def run_experiment(spec_path, out, log=print, verbose=1):
    """`algpt2 experiment run`: validates the spec, runs what is missing, writes the report."""
    spec = load_spec(spec_path)
    Experiment(spec, out, log=log, verbose=verbose).run()
    return write_report(out, log=log)
