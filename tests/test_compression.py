"""Compression (shared-block init from a trained GPT-2) and distillation in training."""

import csv
import json
import os
import sys

import numpy as np
import pytest
from conftest import (crash_after_checkpoint_then_rerun, kill_at_first_checkpoint_then_rerun,
                      randomize_weights, tiny_config)

from algpt2_tf import ALGPT2LMHeadModel
from algpt2_tf.cli import main
from algpt2_tf.convert.gpt2_weights import DELTA_OF, LAYER_TENSORS, resolve
from algpt2_tf.saving import load_model
from algpt2_tf.training.compression import compress, student_config, truncated_svd
from algpt2_tf.training.trainer import TrainOptions, train


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ALGPT2_CACHE", str(tmp_path / "cache"))


def random_teacher(rng, **overrides):
    """A GPT-2-mode model with random values in every weight (gains around 1)."""
    values = {"embedding_size": None, "sop_head": False, "num_layers": 3, **overrides}
    values.setdefault("num_layer_groups", values["num_layers"])  # one block per layer
    return randomize_weights(ALGPT2LMHeadModel(tiny_config(**values)), rng)


def logits(model, ids):
    return np.asarray(model({"input_ids": ids})["logits"])


def ids_batch(rng, config):
    return rng.integers(0, config.vocab_size, (2, 12))


def test_svd_embedding_is_exact_when_e_equals_hidden(rng):
    teacher = random_teacher(rng, num_layers=1)
    config = student_config(teacher.config, overrides={"embedding_size": 32, "sop_head": False})
    student = compress(teacher, config)
    ids, positions = ids_batch(rng, config), np.tile(np.arange(12), (2, 1))
    np.testing.assert_allclose(np.asarray(student.embedding(ids, positions)),
                               np.asarray(teacher.embedding(ids, positions)), atol=1e-5)
    # The head is consistent with that factorization: the one-layer model is the teacher.
    np.testing.assert_allclose(logits(student, ids), logits(teacher, ids), atol=1e-4)


@pytest.mark.parametrize("embedding_size", [None, 32])
def test_one_layer_teacher_average_init_gives_the_teachers_logits(rng, embedding_size):
    teacher = random_teacher(rng, num_layers=1)
    config = student_config(teacher.config, overrides={"embedding_size": embedding_size,
                                                       "sop_head": False})
    ids = ids_batch(rng, config)
    np.testing.assert_allclose(logits(compress(teacher, config, "average"), ids),
                               logits(teacher, ids), atol=1e-4)


def test_smaller_e_keeps_the_top_singular_directions(rng):
    teacher = random_teacher(rng)
    config = student_config(teacher.config, overrides={"embedding_size": 8, "sop_head": False})
    student = compress(teacher, config)
    wte = teacher.embedding.token_embeddings.numpy().astype("float64")
    product = (student.embedding.token_embeddings.numpy() @ student.embedding.projection.kernel.numpy())
    best = np.linalg.norm(wte - np.dot(*truncated_svd(wte, 8)))
    assert np.linalg.norm(wte - product) == pytest.approx(best, rel=1e-4)


def test_full_rank_deltas_reproduce_every_teacher_layer(rng):
    teacher = random_teacher(rng)  # 3 layers, hidden 32, MLP 64
    config = student_config(teacher.config, overrides={
        "embedding_size": None, "per_layer_norms": True, "lora_rank": 32, "sop_head": False})
    for init in ("average", "stepwise"):
        student = compress(teacher, config, init)
        for i in range(3):
            for suffix, kernel in DELTA_OF.items():
                path, attribute = LAYER_TENSORS[suffix]
                shared = getattr(resolve(student.blocks[0], path), attribute).numpy()
                adapter = student.adapters[i]
                effective = shared + adapter.lora_a[kernel].numpy() @ adapter.lora_b[kernel].numpy()
                expected = getattr(resolve(teacher.blocks[i], path), attribute).numpy()
                np.testing.assert_allclose(effective, expected, atol=1e-5, err_msg=f"{i} {suffix}")
    # With the biases equal across the teacher's layers, the whole model is the teacher.
    for block in teacher.blocks[1:]:
        for suffix, (path, attribute) in LAYER_TENSORS.items():
            if suffix.endswith(".bias") and not path.endswith("_norm"):
                getattr(resolve(block, path), attribute).assign(
                    getattr(resolve(teacher.blocks[0], path), attribute))
    ids = ids_batch(rng, config)
    np.testing.assert_allclose(logits(compress(teacher, config), ids), logits(teacher, ids),
                               atol=1e-4)


def test_group_init_average_and_stepwise(rng):
    teacher = random_teacher(rng, num_layers=4)
    config = student_config(teacher.config, overrides={"num_layer_groups": 2, "sop_head": False,
                                                       "embedding_size": 16})
    kernels = [b.mlp_in.kernel.numpy() for b in teacher.blocks]
    average, stepwise = compress(teacher, config, "average"), compress(teacher, config, "stepwise")
    np.testing.assert_allclose(average.blocks[1].mlp_in.kernel.numpy(),
                               (kernels[2] + kernels[3]) / 2, atol=1e-6)
    np.testing.assert_allclose(stepwise.blocks[1].mlp_in.kernel.numpy(), kernels[2], atol=1e-6)


def test_student_config_keeps_the_teachers_shape(rng):
    teacher = random_teacher(rng)
    config = student_config(teacher.config, preset="algpt2", overrides={"embedding_size": 16})
    assert (config.hidden_size, config.num_layers, config.num_layer_groups) == (32, 3, 1)
    assert config.embedding_size == 16 and config.sop_head  # the preset's sharing, overridden
    with pytest.raises(ValueError, match=r"embedding_size \(128\) exceeds the hidden size"):
        student_config(teacher.config, preset="algpt2")  # E = 128 for a 32-wide teacher
    with pytest.raises(ValueError, match="hidden_size"):
        student_config(teacher.config, overrides={"hidden_size": 64})
    with pytest.raises(ValueError, match="the teacher only 3"):
        student_config(teacher.config, overrides={"num_layers": 6, "embedding_size": 16})


# ------------------------------------------------------------- the command
@pytest.fixture
def teacher_run(tmp_path, rng):
    """A saved GPT-2-mode teacher (GPT-2 vocabulary, random weights) in a run folder."""
    teacher = random_teacher(rng, vocab_size=50257, max_positions=64)
    (tmp_path / "teacher").mkdir()
    teacher.save(str(tmp_path / "teacher" / "model.keras"))
    return str(tmp_path / "teacher")


def test_compress_command_reports_perplexity_at_init(tmp_path, teacher_run, capsys):
    from pydoc_data import topics

    # One short text: each of the three models scores all of it over a 50,257-word softmax
    # (the twelve-file corpus: this test 19.7 s -> 5.9 alone on an Intel Xeon).
    (tmp_path / "eval.txt").write_text(topics.topics["assert"], encoding="utf-8")
    out = tmp_path / "student"
    assert main(["compress", "--teacher", teacher_run, "--overrides", '{"embedding_size": 16}',
                 "--lora-rank", "4", "--eval-files", str(tmp_path / "eval.txt"), "--seq-len",
                 "32", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Wrote a compressed student" in printed and "init average" in printed
    rows = {line.split("|")[1].strip(): line for line in printed.splitlines()
            if line.startswith("| ") and "---" not in line}
    assert {"teacher", "student", "random_init"} <= set(rows)
    report = json.loads((out / "compress.json").read_text())
    assert report["lora_rank"] == 4
    assert set(report["evaluation"]) == {"teacher", "student", "random_init"}
    student = load_model(str(out), ALGPT2LMHeadModel)
    assert student.config.embedding_size == 16 and student.config.lora_rank == 4
    assert report["student_parameters"] == student.count_params()


@pytest.mark.parametrize("args, message", [
    (["--overrides", '{"num_layers": 9, "embedding_size": 16}'], "the teacher only 3"),
    (["--overrides", '{"hidden_size": 64}'], "hidden_size"),
    (["--overrides", "[1]"], "JSON object"),
    (["--overrides", '{"embedding_size": 64}'], "embedding_size"),
])
def test_compress_bad_input_exits_2(tmp_path, teacher_run, capsys, args, message):
    out = tmp_path / "student"
    assert main(["compress", "--teacher", teacher_run, "--out", str(out), *args]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_missing_teacher_exits_2(tmp_path, corpus, capsys):
    assert main(["compress", "--teacher", str(tmp_path / "nope"), "--out",
                 str(tmp_path / "s")]) == 2
    assert "No teacher model at" in capsys.readouterr().err
    assert main(["train", "--preset", "gpt2-tiny", "--teacher", str(tmp_path / "nope"),
                 "--train-files", corpus, "--out", str(tmp_path / "run")]) == 2
    assert "No teacher model at" in capsys.readouterr().err
    assert not (tmp_path / "run").exists() and not (tmp_path / "s").exists()


# ------------------------------------------------------------ distillation
def student_options(tmp_path, init_model, corpus, out, **kw):
    values = dict(out=str(tmp_path / out), preset=None, init_model=init_model, train_files=[corpus],
                  seq_len=32, batch_size=4, steps=8, learning_rate=3e-3, warmup_steps=2,
                  checkpoint_every=4, keep_checkpoints=2, log_every=2, verbose=0, seed=7)
    values.update(kw)
    return TrainOptions(**values)


def test_distillation_with_weight_zero_equals_plain_training(tmp_path, teacher_run, corpus):
    plain = train(student_options(tmp_path, teacher_run, corpus, "plain"), log=lambda *_: None)
    zero = train(student_options(tmp_path, teacher_run, corpus, "zero", teacher=teacher_run,
                                 distill_weight=0.0), log=lambda *_: None)
    for a, b in zip(load_model(plain["model"], ALGPT2LMHeadModel).get_weights(), load_model(zero["model"], ALGPT2LMHeadModel).get_weights()):
        np.testing.assert_array_equal(a, b)
    rows = list(csv.DictReader(open(tmp_path / "zero" / "metrics.csv")))
    assert all(float(r["distill_loss"]) > 0 for r in rows if r.get("lm_loss"))
    plain_rows = list(csv.DictReader(open(tmp_path / "plain" / "metrics.csv")))
    assert not any(r.get("distill_loss") for r in plain_rows)


def test_teacher_as_its_own_student_has_zero_kl(tmp_path, teacher_run, corpus):
    """The student starts as the teacher (--init-model = the teacher): the first KL is 0."""
    train(student_options(tmp_path, teacher_run, corpus, "self", teacher=teacher_run, steps=1,
                          log_every=1, distill_temperature=2.0), log=lambda *_: None)
    row = next(csv.DictReader(open(tmp_path / "self" / "metrics.csv")))
    assert abs(float(row["distill_loss"])) < 1e-6
    assert float(row["loss"]) == pytest.approx(float(row["lm_loss"]), abs=1e-5)


def test_a_bf16_teacher_distills_too(tmp_path, teacher_run, corpus):
    train(student_options(tmp_path, teacher_run, corpus, "bf16", teacher=teacher_run, steps=2,
                          log_every=1, teacher_precision="bf16"), log=lambda *_: None)
    rows = list(csv.DictReader(open(tmp_path / "bf16" / "metrics.csv")))
    # The student starts as the teacher: the KL is only bf16's rounding of the teacher.
    assert 0 <= float(rows[0]["distill_loss"]) < 1e-2


def test_distillation_resumes_exactly_after_a_crash(tmp_path, teacher_run, corpus, monkeypatch):
    """The fast tier's twin of the `kill -9` test below: a distilling run dies in-process right
    after its first checkpoint; the same options resume to the weights of an unbroken run."""
    distill = dict(teacher=teacher_run, distill_weight=0.5, distill_temperature=2.0)
    full = train(student_options(tmp_path, teacher_run, corpus, "full", **distill),
                 log=lambda *_: None)
    part = crash_after_checkpoint_then_rerun(
        lambda: train(student_options(tmp_path, teacher_run, corpus, "part", **distill),
                      log=lambda *_: None), tmp_path / "part", monkeypatch)
    assert part["resumed_from"] == 4
    for a, b in zip(load_model(full["model"], ALGPT2LMHeadModel).get_weights(),
                    load_model(part["model"], ALGPT2LMHeadModel).get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.slow
def test_distillation_resume_after_kill_is_exact(tmp_path, teacher_run, corpus):
    steps = 24
    full = train(student_options(tmp_path, teacher_run, corpus, "full", teacher=teacher_run,
                                 steps=steps, distill_weight=0.5, distill_temperature=2.0),
                 log=lambda *_: None)
    part = tmp_path / "part"
    cmd = [sys.executable, "-m", "algpt2_tf.cli", "train", "--init-model", teacher_run,
           "--teacher", teacher_run, "--distill-weight", "0.5", "--distill-temperature", "2.0",
           "--train-files", corpus, "--out", str(part), "--seq-len", "32", "--batch-size", "4",
           "--steps", str(steps), "--learning-rate", "3e-3", "--warmup-steps", "2",
           "--checkpoint-every", "4", "--keep-checkpoints", "2", "--log-every", "2",
           "--verbose", "0", "--seed", "7"]
    done = kill_at_first_checkpoint_then_rerun(cmd, part)
    assert "Resuming from step" in done.stdout and "distilling" in done.stdout
    for a, b in zip(load_model(full["model"], ALGPT2LMHeadModel).get_weights(), load_model(str(part), ALGPT2LMHeadModel).get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_vocabulary_mismatch_is_refused(tmp_path, teacher_run, corpus, capsys, rng):
    small = random_teacher(rng)  # vocab 97
    (tmp_path / "small").mkdir()
    small.save(str(tmp_path / "small" / "model.keras"))
    assert main(["train", "--init-model", teacher_run, "--teacher", str(tmp_path / "small"),
                 "--train-files", corpus, "--seq-len", "32", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "vocab_size 97, the student 50257" in err
    assert not (tmp_path / "run").exists()
    # Same size, another tokenizer: refused too.
    from pydoc_data import topics

    from algpt2_tf.tokenizer import train_tokenizer

    other = tmp_path / "other_teacher"
    other.mkdir()
    random_teacher(rng, vocab_size=50257, max_positions=64).save(str(other / "model.keras"))
    train_tokenizer(list(topics.topics.values())[:50], 300, str(other / "tokenizer"))
    assert main(["train", "--init-model", teacher_run, "--teacher", str(other), "--train-files",
                 corpus, "--seq-len", "32", "--out", str(tmp_path / "run")]) == 2
    assert "another tokenizer" in capsys.readouterr().err
    assert main(["train", "--preset", "gpt2-tiny", "--distill-weight", "0.5", "--train-files",
                 corpus, "--out", str(tmp_path / "run")]) == 2
    assert "need --teacher" in capsys.readouterr().err


# ------------------------------------------------------------- the harness
@pytest.mark.slow
def test_experiment_with_compressed_and_distilled_arms(tmp_path, capsys):
    from test_experiments import tiny_spec, write_corpus, write_spec

    write_corpus(tmp_path / "data")
    spec = tiny_spec()
    spec["generation"] = {"prompts": []}  # sampling is tested elsewhere; this test is about arms
    spec["arms"] = [
        {"name": "teacher", "config": {"embedding_size": None, "num_layer_groups": 2},
         "options": {"learning_rate": 0.01}},
        {"name": "scratch", "options": {"learning_rate": 0.01}},
        {"name": "distilled", "config": {"lora_rank": 4},
         "compress": {"from": "teacher", "init": "stepwise"},
         "distill": {"from": "teacher", "temperature": 2.0}, "learning_rate_from": "scratch"},
    ]
    spec["baseline"] = "teacher"
    spec["gap"] = {"teacher": "teacher", "scratch": "scratch"}
    out = tmp_path / "out"
    assert main(["experiment", "run", write_spec(tmp_path, spec), "--out", str(out),
                 "--verbose", "0"]) == 0
    printed = capsys.readouterr().out
    assert "distilled: initializing from teacher (stepwise)" in printed
    rows = {r["arm"]: r for r in json.loads((out / "results.json").read_text())["arms"]}
    assert set(rows["distilled"]["compress"]["init_eval"]) == {"held_out", "wiki"}
    assert rows["distilled"]["distill"] == {"from": "teacher", "weight": 1.0, "temperature": 2.0}
    assert rows["teacher"]["eval"]["wiki"]["gap_closed"] == 1.0
    assert rows["scratch"]["eval"]["wiki"]["gap_closed"] == 0.0
    run = json.loads((out / "arms" / "distilled" / "lr-0.01_seed-0" / "run.json").read_text())
    assert run["teacher"].endswith(os.path.join("teacher", "lr-0.01_seed-0"))
    assert run["init_model"].endswith(os.path.join("distilled", "init"))
    table = (out / "results.md").read_text()
    assert "| distilled | 6,728 | 0.687 | stepwise from teacher | teacher (weight 1, T 2) |" in table
    # A later checkout keeps result.json files only: a student that must be trained again
    # gets its teacher's model trained again first.
    import shutil

    shutil.rmtree(out / "arms" / "teacher" / "lr-0.01_seed-0" / "checkpoints")
    os.remove(out / "arms" / "teacher" / "lr-0.01_seed-0" / "model.keras")
    shutil.rmtree(out / "arms" / "distilled")
    assert main(["experiment", "run", write_spec(tmp_path, spec), "--out", str(out),
                 "--verbose", "0"]) == 0
    printed = capsys.readouterr().out
    assert "teacher: its model is needed here and is missing: training it again" in printed
    assert (out / "arms" / "distilled" / "lr-0.01_seed-0" / "result.json").exists()
