"""Every `algpt2` command the README and docs/ show runs (the slow tier; its fast twin,
`test_docs.py`, parses them all with the real command line).

The pages' commands run in page order in one working folder, as a user would type them
there: the files they name are made first (small ones: `make_the_files_they_name`), a
command that would train for minutes gets `SHRINK`'s arguments appended (argparse keeps
the last value, so the command's flags and their meaning are the page's), and each command
must exit 0. A page's commands run in one fresh Python (the CLI's `main`, in order), or one
process each where they choose a backend (`--backend` is a process setting). What cannot run
here is in `RUN_ELSEWHERE`, with the test that runs it.
"""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, SHARED_DATA, gpt2_tiny_config, tiny_config
from test_docs import PAGES, shown_commands

SHRINK = {
    ("train",): ["--steps", "2"],
}
"""Arguments appended to a command that starts with the key (steps, not the recipe)."""

RUN_ELSEWHERE = {
    ("serve",): "runs until stopped: tests/test_serving.py and tests/test_openai_api.py start it",
    ("client",): "needs a running server: tests/test_serving.py runs it against one",
    ("experiment", "run"): "hours of training: tests/test_experiments.py runs a small spec",
    ("launch",): "two JAX processes of the full preset: tests/test_distributed.py launches two JAX "
                 "processes training with --distribute jax-data-parallel, kills one and resumes",
    ("experiment", "quality"): "needs the judges' weights (not in git): tests/test_experiments.py "
                               "runs the quality step on a small experiment",
}

TEXT = ("The old house stood at the end of the lane, and nobody had lived in it for years. "
        "She opened the door and looked inside; the rooms were cold and the windows were dark. ")


def _write(path, text):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def make_the_files_they_name(work):
    """The inputs the pages' commands read, small: text files, a Hugging Face GPT-2 folder,
    a teacher model, a run of the comparison experiment, the scaling experiment's results."""
    from algpt2_tf import ALGPT2LMHeadModel
    from algpt2_tf.convert import to_hf
    from algpt2_tf.tokenizer import GPT2Tokenizer

    for name in ("held_out.txt", "pydoc_sample.txt", "wiki.valid.raw", "corpus/a.txt"):
        _write(os.path.join(work, name), TEXT * 40)
    for name in ("books/a.txt", "books/b.txt"):  # 5% of them holds a batch of 8 x 256 tokens
        _write(os.path.join(work, name), TEXT * 600)
    _write(os.path.join(work, "more", "c.jsonl"),
           "".join(json.dumps({"text": TEXT * 5}) + "\n" for _ in range(8)))
    gpt2 = ALGPT2LMHeadModel(gpt2_tiny_config(vocab_size=50257, max_positions=128))
    to_hf(gpt2, os.path.join(work, "hf", "gpt2-small"), GPT2Tokenizer())
    os.makedirs(os.path.join(work, "runs", "gpt2-teacher"))  # as wide as the student's E=128
    ALGPT2LMHeadModel(gpt2_tiny_config(vocab_size=50257, max_positions=128, hidden_size=128)).save(
        os.path.join(work, "runs", "gpt2-teacher", "model.keras"))
    GPT2Tokenizer().save(os.path.join(work, "runs", "gpt2-teacher", "tokenizer"))  # as a run has
    comparison = os.path.join(work, "experiments", "runs", "algpt2_vs_gpt2", "arms", "algpt2",
                              "lr-0.004_seed-0")
    os.makedirs(comparison)
    ALGPT2LMHeadModel(tiny_config(vocab_size=50257, max_positions=64)).save(
        os.path.join(comparison, "model.keras"))
    subprocess.run(["cp", "-r", os.path.join(REPO, "experiments", "runs", "scaling"),
                    os.path.join(work, "experiments", "runs", "scaling")], check=True)
    if os.path.isdir(SHARED_DATA):  # the pages name ../shared/data/...
        os.symlink(os.path.dirname(SHARED_DATA), os.path.join(os.path.dirname(work), "shared"))


def _matches(argv, key):
    """Whether the command (after a leading `--backend NAME`) starts with the words `key`."""
    words = argv[2:] if argv[:1] == ["--backend"] else argv
    return words[:len(key)] == list(key)


def planned():
    """`(page, line, argv, reason)` of every command shown; `reason` when it runs elsewhere."""
    plan = []
    for page in PAGES:
        for number, argv in shown_commands(page):
            reason = next((why for key, why in RUN_ELSEWHERE.items() if _matches(argv, key)), None)
            extra = next((more for key, more in SHRINK.items() if _matches(argv, key)), [])
            uses_shared = any("../shared/" in a for a in argv)
            if uses_shared and not os.path.isdir(SHARED_DATA):
                reason = "its data (../shared/data) is absent here"
            plan.append((os.path.relpath(page, REPO), number, argv + extra, reason))
    return plan


DRIVER = """
import json, sys
from algpt2_tf.cli import main
for argv in json.loads(sys.argv[1]):
    print("@@ algpt2 " + " ".join(argv), flush=True)
    code = main(argv)
    print(f"@@ exit {code}", flush=True)
    if code:
        sys.exit(code)
"""


def _run(commands, work, env):
    """Runs `commands` (lists of argv) in one fresh Python, or one each when they choose a
    backend; returns `(exit code, output)` of the first that fails, or `(0, output)`."""
    groups = ([[c] for c in commands] if any(c[:1] == ["--backend"] for c in commands)
              else [commands])
    output = ""
    for group in groups:
        done = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(group)], cwd=work, env=env,
                              capture_output=True, text=True, timeout=900)
        output += done.stdout + done.stderr
        if done.returncode:
            return done.returncode, output
    return 0, output


@pytest.mark.slow
def test_every_command_the_pages_show_runs(tmp_path):
    work = str(tmp_path / "work")
    os.makedirs(work)
    make_the_files_they_name(work)
    env = dict(os.environ, ALGPT2_CACHE=str(tmp_path / "cache"), PYTHONPATH=REPO)
    plan = planned()
    elsewhere = [(page, number, reason) for page, number, _, reason in plan if reason]
    assert len(elsewhere) <= 8, elsewhere  # the exceptions stay few
    for page in dict.fromkeys(page for page, *_ in plan):
        commands = [argv for p, _, argv, reason in plan if p == page and not reason]
        if not commands:
            continue
        code, output = _run(commands, work, env)
        assert code == 0, f"{page}: a shown command failed (exit {code}):\n{output[-4000:]}"
    # What the main job and the export page promise is there.
    assert os.path.isfile(os.path.join(work, "runs", "demo", "model.keras"))
    assert os.path.isdir(os.path.join(work, "saved_models", "demo-keras", "1"))
    assert os.path.isfile(os.path.join(work, "runs", "gpt2-small", "model.keras"))


def test_the_plan_runs_almost_every_command():
    """The fast half: what the slow test would run, and why the rest runs elsewhere."""
    plan = planned()
    assert len(plan) >= 25
    assert sum(1 for *_, reason in plan if reason is None) >= 20
    for page, number, argv, reason in plan:
        if _matches(argv, ("train",)):
            assert argv[-2:] == ["--steps", "2"], (page, number)
