"""An experiment spec: the arms to compare, the data, the equal budget, the evaluation.

A spec is a JSON or YAML file (paths in it are relative to the file):

    name: algpt2_vs_gpt2
    base: {preset: gpt2-tiny, overrides: {num_layers: 6}}    # the model every arm starts from
    tokenizer: {vocab_size: 8192}   # train a BPE on the training files; or a folder; or omit (GPT-2)
    train:
      files: [data/*.txt, {path: wiki.valid.raw, wikitext_articles: [0.0, 0.6]}]
      valid_fraction: 0.01          # held out of the training stream (judges learning-rate sweeps)
    budget: {tokens: 819200, seq_len: 128, batch_size: 16}  # every run trains on exactly this
    options: {learning_rate: 0.001, warmup_steps: 40}       # training options of every arm
    evaluation:
      sets: [{name: books, files: [a.txt]}, {name: wiki, files: [...]}]
      seq_len: 128
      stride: 64
    generation: {prompts: ["It was"], max_new_tokens: 48, top_p: 0.9, seed: 0}
    seeds: [0]
    baseline: gpt2
    arms:
      - {name: gpt2, config: {embedding_size: null}, sweep: {learning_rate: [0.0005, 0.001]}}
      - {name: algpt2, config: {num_layer_groups: 1}, seeds: [0, 1]}
      - {name: algpt2_lora8, config: {lora_rank: 8}, learning_rate_from: algpt2}
      - {name: compressed, compress: {from: gpt2, init: average},
         distill: {from: gpt2, weight: 1.0, temperature: 1.0}, learning_rate_from: algpt2}
      - {name: gpt2_4x, config: {embedding_size: null}, tokens: 3276800}  # its own budget
    gap: {teacher: gpt2, scratch: algpt2}   # report the share of this gap each arm closes

An arm overrides config fields (`config`) and training options (`options`);
`sweep` lists learning rates to try (each a run, judged on the validation
split), `learning_rate_from` reuses another arm's chosen rate. An arm's extra
seeds run at its chosen rate. `compress` starts the arm from an earlier
arm's trained model (`compression.compress`: shared blocks from its layers,
SVD embedding, low-rank deltas from the SVD of the residuals when the arm
has `lora_rank`); `distill` trains it against that model too
(`distillation.py`). Both use the earlier arm's run at its chosen learning
rate and first seed. `tokens` gives an arm a budget of its own (a scaling
experiment: the same arm at several budgets, each its own run with its own
schedule); every other arm trains on `budget.tokens`.

A file may hold several documents separated by a line of its own
(`{path: stories.txt, separator: "<|endoftext|>"}`): each document is then
evaluated, or trained on, as a separate text.
"""

import dataclasses
import glob
import json
import os
from typing import Any, Dict, List, Optional

from algpt2_tf.config import ALGPT2Config, list_presets
from algpt2_tf.training.compression import INITS, student_config
from algpt2_tf.training.options import TrainOptions

ARM_OPTIONS = ("learning_rate", "warmup_steps", "schedule", "min_lr_ratio", "weight_decay",
               "optimizer", "clip_norm", "mixed_precision", "jit_compile", "fuse_elementwise",
               "sop")
"""Training options an arm may set (`options`); data and budget are the same for every arm."""
SPEC_OPTIONS = ARM_OPTIONS + ("checkpoint_every", "keep_checkpoints", "log_every")
"""Training options the spec's `options` may set for every arm."""
DEFAULT_SEEDS = (0,)
"""The seeds of a spec, and of its arms, that name none."""
TOP_LEVEL = ("name", "description", "base", "tokenizer", "train", "budget", "options",
             "evaluation", "generation", "seeds", "baseline", "arms", "gap")


def arm_seeds(raw_spec, raw_arm):
    """The seeds an arm of a spec as written (a dict, as in spec.json) trains with."""
    return list(raw_arm.get("seeds", raw_spec.get("seeds", DEFAULT_SEEDS)))


class SpecError(ValueError):
    """A spec that cannot run; the message names the field."""


@dataclasses.dataclass
class FileSource:
    """A training or evaluation file: a glob, or one WikiText file cut to a
    share of its articles (`wikitext_articles: [start, end]`, fractions)."""

    path: str
    wikitext_articles: Optional[List[float]] = None
    separator: Optional[str] = None  # a line that separates the file's documents

    def describe(self):
        if self.separator is not None:
            return f"{self.path} (documents separated by {self.separator!r})"
        if self.wikitext_articles is None:
            return self.path
        start, end = self.wikitext_articles
        return f"{self.path} (articles {start:.0%}-{end:.0%})"


@dataclasses.dataclass
class Arm:
    name: str
    config: Dict[str, Any]
    options: Dict[str, Any]
    seeds: List[int]
    sweep: Optional[List[float]] = None
    learning_rate_from: Optional[str] = None
    compress: Optional[Dict[str, Any]] = None  # {"from": arm, "init": "average"|"stepwise"}
    distill: Optional[Dict[str, Any]] = None  # {"from": arm, "weight": A, "temperature": T}
    tokens: Optional[int] = None  # the arm's own training budget (None: the spec's)


@dataclasses.dataclass
class ExperimentSpec:
    name: str
    description: str
    base_config: ALGPT2Config
    tokenizer: Any  # None (GPT-2), a folder, or {"vocab_size": N, "min_frequency": M}
    train_files: List[FileSource]
    valid_fraction: float
    tokens: int
    seq_len: int
    batch_size: int
    options: Dict[str, Any]
    eval_sets: Dict[str, List[FileSource]]
    eval_seq_len: int
    eval_stride: int
    eval_batch_size: int
    generation: Dict[str, Any]
    baseline: str
    arms: List[Arm]
    gap: Optional[Dict[str, str]]  # {"teacher": arm, "scratch": arm}
    source: Dict[str, Any]  # the spec as read: what a rerun must match

    @property
    def steps(self):
        return self.tokens // (self.seq_len * self.batch_size)

    def arm_steps(self, arm):
        """Optimizer steps of `arm`: its own `tokens` budget, or the spec's."""
        return (arm.tokens or self.tokens) // (self.seq_len * self.batch_size)

    def arm(self, name):
        return next(a for a in self.arms if a.name == name)


# ------------------------------------------------------------------ reading
def load_spec(path):
    """Reads and validates a spec file; raises `SpecError` naming the problem.

    Everything is checked here, before anything trains: fields, presets,
    config values of every arm, files, arm names and references.
    """
    if not os.path.isfile(path):
        raise SpecError(f"Spec file not found: {path}")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        if path.endswith((".yaml", ".yml")):
            import yaml  # deferred: imports PyYAML

            raw = yaml.safe_load(text)
        else:
            raw = json.loads(text)
    except Exception as e:  # yaml.YAMLError or json.JSONDecodeError
        raise SpecError(f"{path} is not valid {'YAML' if path.endswith(('.yaml', '.yml')) else 'JSON'}: {e}") from None
    return parse_spec(raw, os.path.dirname(os.path.abspath(path)))


def _mapping(value, where, allowed):
    if not isinstance(value, dict):
        raise SpecError(f"{where} must be a mapping, got {type(value).__name__}.")
    unknown = sorted(set(value) - set(allowed))
    if unknown:
        raise SpecError(f"{where}: unknown field(s) {', '.join(unknown)} "
                        f"(known: {', '.join(allowed)}).")
    return value


def _positive_int(value, where):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise SpecError(f"{where} must be a positive integer, got {value!r}.")
    return value


def _seeds(value, where):
    if (not isinstance(value, list) or not value
            or any(isinstance(s, bool) or not isinstance(s, int) for s in value)
            or len(set(value)) != len(value)):
        raise SpecError(f"{where} must be a non-empty list of distinct integers, got {value!r}.")
    return value


def _files(value, base_dir, where):
    if not isinstance(value, list) or not value:
        raise SpecError(f"{where} must be a non-empty list of files.")
    sources = []
    for i, item in enumerate(value):
        here = f"{where}[{i}]"
        if isinstance(item, str):
            source = FileSource(os.path.join(base_dir, os.path.expanduser(item)))
            if not glob.glob(source.path):
                raise SpecError(f"{here}: no file matches {source.path}.")
        else:
            _mapping(item, here, ("path", "wikitext_articles", "separator"))
            if "path" not in item:
                raise SpecError(f"{here} needs a 'path'.")
            separator = item.get("separator")
            if separator is not None and (not isinstance(separator, str) or not separator.strip()
                                          or "\n" in separator):
                raise SpecError(f"{here}.separator must be one non-empty line of text, "
                                f"got {separator!r}.")
            if separator is not None and item.get("wikitext_articles") is not None:
                raise SpecError(f"{here}: give wikitext_articles or separator, not both.")
            share = item.get("wikitext_articles")
            if share is not None and not (
                    isinstance(share, list) and len(share) == 2
                    and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in share)
                    and 0 <= share[0] < share[1] <= 1):
                raise SpecError(f"{here}.wikitext_articles must be [start, end] with "
                                f"0 <= start < end <= 1, got {share!r}.")
            source = FileSource(os.path.join(base_dir, os.path.expanduser(item["path"])),
                                [float(x) for x in share] if share is not None else None,
                                separator)
            if not os.path.isfile(source.path):
                raise SpecError(f"{here}: file not found: {source.path}.")
        sources.append(source)
    return sources


def _options(value, where, allowed):
    _mapping(value, where, allowed)
    # Type and range checks are TrainOptions' own (see resolve_options).
    try:
        TrainOptions(out="-", **value).validate()
    except (TypeError, ValueError) as e:
        raise SpecError(f"{where}: {e}") from None
    return dict(value)


def _base_config(value):
    _mapping(value, "base", ("preset", "overrides"))
    preset = value.get("preset")
    if preset not in list_presets():
        raise SpecError(f"base.preset: unknown preset {preset!r} "
                        f"(available: {', '.join(list_presets())}).")
    overrides = value.get("overrides") or {}
    return _config_with(ALGPT2Config.from_preset(preset).to_dict(), overrides, "base.overrides")


def _config_with(values, overrides, where):
    if not isinstance(overrides, dict):
        raise SpecError(f"{where} must be a mapping of config fields.")
    try:
        return ALGPT2Config.from_dict({**values, **overrides})
    except (TypeError, ValueError) as e:
        raise SpecError(f"{where}: {e}") from None


def parse_spec(raw, base_dir="."):
    """Validates a spec given as a dict (see `load_spec`)."""
    raw = _mapping(raw, "the spec", TOP_LEVEL)
    for key in ("name", "base", "train", "budget", "evaluation", "arms", "baseline"):
        if key not in raw:
            raise SpecError(f"The spec needs a '{key}' field.")
    name = raw["name"]
    if not isinstance(name, str) or not name.strip():
        raise SpecError("name must be a non-empty string.")
    base_config = _base_config(raw["base"])

    tokenizer = raw.get("tokenizer")
    if isinstance(tokenizer, str):
        tokenizer = os.path.join(base_dir, tokenizer)
        if not os.path.isfile(os.path.join(tokenizer, "vocab.json")):
            raise SpecError(f"tokenizer: no vocab.json in {tokenizer}.")
    elif tokenizer is not None:
        _mapping(tokenizer, "tokenizer", ("vocab_size", "min_frequency"))
        if isinstance(tokenizer.get("vocab_size"), bool) or not isinstance(
                tokenizer.get("vocab_size"), int) or tokenizer["vocab_size"] < 257:
            raise SpecError(f"tokenizer.vocab_size must be an integer >= 257, "
                            f"got {tokenizer.get('vocab_size')!r}.")
        tokenizer = {"vocab_size": tokenizer["vocab_size"],
                     "min_frequency": _positive_int(tokenizer.get("min_frequency", 2),
                                                    "tokenizer.min_frequency")}

    train = _mapping(raw["train"], "train", ("files", "valid_fraction"))
    train_files = _files(train.get("files"), base_dir, "train.files")
    valid_fraction = train.get("valid_fraction", 0.0)
    if isinstance(valid_fraction, bool) or not isinstance(valid_fraction, (int, float)) or not (
            0 <= valid_fraction <= 0.5):
        raise SpecError(f"train.valid_fraction must be in [0, 0.5], got {valid_fraction!r}.")

    budget = _mapping(raw["budget"], "budget", ("tokens", "seq_len", "batch_size"))
    for key in ("tokens", "seq_len", "batch_size"):
        _positive_int(budget.get(key), f"budget.{key}")
    if budget["tokens"] < budget["seq_len"] * budget["batch_size"]:
        raise SpecError("budget.tokens is less than one batch (seq_len x batch_size).")
    if budget["seq_len"] > base_config.max_positions:
        raise SpecError(f"budget.seq_len ({budget['seq_len']}) exceeds the base config's "
                        f"max_positions ({base_config.max_positions}).")
    options = _options(raw.get("options") or {}, "options", SPEC_OPTIONS)

    evaluation = _mapping(raw["evaluation"], "evaluation", ("sets", "seq_len", "stride",
                                                            "batch_size"))
    sets = evaluation.get("sets")
    if not isinstance(sets, list) or not sets:
        raise SpecError("evaluation.sets must be a non-empty list of {name, files}.")
    eval_sets = {}
    for i, item in enumerate(sets):
        _mapping(item, f"evaluation.sets[{i}]", ("name", "files"))
        set_name = item.get("name")
        if not isinstance(set_name, str) or not set_name or set_name in eval_sets:
            raise SpecError(f"evaluation.sets[{i}].name must be a new non-empty string, "
                            f"got {set_name!r}.")
        eval_sets[set_name] = _files(item.get("files"), base_dir, f"evaluation.sets[{i}].files")
    eval_seq_len = _positive_int(evaluation.get("seq_len", budget["seq_len"]), "evaluation.seq_len")
    eval_stride = _positive_int(evaluation.get("stride", eval_seq_len // 2), "evaluation.stride")
    if eval_seq_len > base_config.max_positions or eval_stride > eval_seq_len:
        raise SpecError("evaluation: need stride <= seq_len <= the base config's max_positions.")

    generation = _mapping(raw.get("generation") or {}, "generation",
                          ("prompts", "max_new_tokens", "top_p", "temperature", "seed"))
    generation = {"prompts": generation.get("prompts", []),
                  "max_new_tokens": generation.get("max_new_tokens", 48),
                  "top_p": generation.get("top_p", 0.9),
                  "temperature": generation.get("temperature", 1.0),
                  "seed": generation.get("seed", 0)}
    if not isinstance(generation["prompts"], list) or not all(
            isinstance(p, str) and p for p in generation["prompts"]):
        raise SpecError("generation.prompts must be a list of non-empty strings.")
    _positive_int(generation["max_new_tokens"], "generation.max_new_tokens")

    seeds = _seeds(raw.get("seeds", list(DEFAULT_SEEDS)), "seeds")
    arms = _arms(raw["arms"], base_config, seeds, budget)
    if any(a.sweep for a in arms) and not valid_fraction:
        raise SpecError("A learning-rate sweep is judged on held-out training text: set "
                        "train.valid_fraction > 0.")
    baseline = raw["baseline"]
    if baseline not in [a.name for a in arms]:
        raise SpecError(f"baseline {baseline!r} is not an arm.")
    gap = raw.get("gap")
    if gap is not None:
        _mapping(gap, "gap", ("teacher", "scratch"))
        for key in ("teacher", "scratch"):
            if gap.get(key) not in [a.name for a in arms]:
                raise SpecError(f"gap.{key}: {gap.get(key)!r} is not an arm.")
    source = json.loads(json.dumps(raw))
    return ExperimentSpec(
        name=name, description=raw.get("description", ""), base_config=base_config,
        tokenizer=tokenizer, train_files=train_files, valid_fraction=float(valid_fraction),
        tokens=budget["tokens"], seq_len=budget["seq_len"], batch_size=budget["batch_size"],
        options=options, eval_sets=eval_sets, eval_seq_len=eval_seq_len, eval_stride=eval_stride,
        eval_batch_size=_positive_int(evaluation.get("batch_size", 16), "evaluation.batch_size"),
        generation=generation, baseline=baseline, arms=arms, gap=gap, source=source)


def _arms(value, base_config, default_seeds, budget):
    if not isinstance(value, list) or not value:
        raise SpecError("arms must be a non-empty list.")
    arms = []
    for i, item in enumerate(value):
        where = f"arms[{i}]"
        _mapping(item, where, ("name", "config", "options", "seeds", "sweep", "learning_rate_from",
                               "compress", "distill", "tokens"))
        name = item.get("name")
        if not isinstance(name, str) or not name or not all(c.isalnum() or c in "-_." for c in name):
            raise SpecError(f"{where}.name must be a non-empty string of letters, digits, "
                            f"'-', '_' or '.', got {name!r}.")
        where = f"arm {name!r}"
        if name in [a.name for a in arms]:
            raise SpecError(f"Two arms are named {name!r}.")
        config = item.get("config") or {}
        _config_with(base_config.to_dict(), config, f"{where}.config")
        options = _options(item.get("options") or {}, f"{where}.options", ARM_OPTIONS)
        sweep = item.get("sweep")
        if sweep is not None:
            _mapping(sweep, f"{where}.sweep", ("learning_rate",))
            rates = sweep.get("learning_rate")
            if (not isinstance(rates, list) or len(rates) < 2
                    or any(isinstance(r, bool) or not isinstance(r, (int, float)) or r <= 0
                           for r in rates) or len(set(rates)) != len(rates)):
                raise SpecError(f"{where}.sweep.learning_rate must list two or more distinct "
                                "positive rates.")
            sweep = [float(r) for r in rates]
        source = item.get("learning_rate_from")
        if source is not None and source not in [a.name for a in arms]:
            raise SpecError(f"{where}.learning_rate_from: {source!r} is not an earlier arm.")
        if sum(x is not None for x in (sweep, source, options.get("learning_rate"))) > 1:
            raise SpecError(f"{where}: give at most one of sweep, learning_rate_from and "
                            "options.learning_rate.")
        compress, distill = _compress(item, arms, base_config, where), _distill(item, arms, where)
        if (not config and not options and sweep is None and source is None and not compress
                and not distill and item.get("tokens") is None):
            raise SpecError(f"{where} overrides nothing: it would repeat the base model.")
        seeds = _seeds(item.get("seeds", default_seeds), f"{where}.seeds")
        tokens = item.get("tokens")
        if tokens is not None:
            _positive_int(tokens, f"{where}.tokens")
            if tokens < budget["seq_len"] * budget["batch_size"]:
                raise SpecError(f"{where}.tokens is less than one batch (seq_len x batch_size).")
        arms.append(Arm(name, dict(config), options, seeds, sweep, source, compress, distill,
                        tokens))
    return arms


def _earlier_arm(value, arms, where):
    found = next((a for a in arms if a.name == value), None)
    if found is None:
        raise SpecError(f"{where}: {value!r} is not an earlier arm.")
    return found


def _compress(item, arms, base_config, where):
    """`compress: {from, init}`, checked against the teacher arm's shape."""
    value = item.get("compress")
    if value is None:
        return None
    _mapping(value, f"{where}.compress", ("from", "init"))
    teacher = _earlier_arm(value.get("from"), arms, f"{where}.compress.from")
    init = value.get("init", "average")
    if init not in INITS:
        raise SpecError(f"{where}.compress.init must be one of {INITS}, got {init!r}.")
    # The student is checked as `algpt2 compress` checks it (shape, depth, E).
    theirs = _config_with(base_config.to_dict(), teacher.config, f"arm {teacher.name!r}.config")
    try:
        student_config(theirs, preset=None,
                       overrides={**base_config.to_dict(), **(item.get("config") or {})})
    except ValueError as e:
        raise SpecError(f"{where}.compress from {teacher.name!r}: {e}") from None
    return {"from": teacher.name, "init": init}


def _distill(item, arms, where):
    value = item.get("distill")
    if value is None:
        return None
    _mapping(value, f"{where}.distill", ("from", "weight", "temperature"))
    teacher = _earlier_arm(value.get("from"), arms, f"{where}.distill.from")
    weight, temperature = value.get("weight", 1.0), value.get("temperature", 1.0)
    for key, number, low in (("weight", weight, 0.0), ("temperature", temperature, None)):
        if isinstance(number, bool) or not isinstance(number, (int, float)) or (
                number < 0 if low is not None else number <= 0):
            kind = "non-negative" if low is not None else "positive"
            raise SpecError(f"{where}.distill.{key} must be a {kind} number, got {number!r}.")
    return {"from": teacher.name, "weight": float(weight), "temperature": float(temperature)}
