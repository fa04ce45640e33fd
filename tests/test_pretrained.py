"""The shipped pretrained model: found by name, as good as its model card says, deterministic."""

import os

import pytest

from conftest import REPO

from algpt2_tf import ALGPT2LMHeadModel, list_pretrained
from algpt2_tf.cli import main
from algpt2_tf.pretrained import evaluation, held_out_slice, pretrained_dir

NAME = "algpt2-pd-books"


@pytest.fixture(scope="module")
def model():
    return ALGPT2LMHeadModel.from_preset(NAME)


def test_it_ships_under_its_name_within_20_mb():
    assert NAME in list_pretrained()
    folder = pretrained_dir(NAME)
    size = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(folder)
               for f in files)
    assert size <= 20e6
    card = open(os.path.join(folder, "MODEL_CARD.md")).read()
    for section in ("## Model details", "## Training data", "## Training procedure",
                    "## Evaluation", "## Samples", "## Intended use and limitations"):
        assert section in card
    with pytest.raises(ValueError, match="No pretrained model named"):
        pretrained_dir("gpt2-xl-imaginary")


@pytest.mark.parametrize("held_out", ["books", "wiki", "writingprompts"])
def test_held_out_perplexity_matches_the_model_card(model, held_out):
    """The card's CI figure of each held-out set (the first 4,096 tokens, measured when the
    card was written), measured again."""
    from algpt2_tf.evaluation import evaluate_texts
    from algpt2_tf.experiments.runner import held_out_texts
    from algpt2_tf.experiments.spec import load_spec
    from algpt2_tf.saving import load_tokenizer_for

    figures = evaluation(NAME)
    ci = figures["ci_slices"][held_out]
    spec = load_spec(os.path.join(REPO, figures["eval_spec"]))
    for source in spec.eval_sets[held_out]:
        if not os.path.exists(source.path):
            pytest.skip(f"{source.path} is not available")
    tokenizer = load_tokenizer_for(NAME)
    text = held_out_slice(held_out_texts(spec)[held_out], tokenizer, ci["max_tokens"])
    got = evaluate_texts(model, tokenizer, [text], seq_len=ci["seq_len"], stride=ci["stride"],
                         batch_size=ci["batch_size"], verbose=0)
    assert got["tokens"] == ci["tokens"]
    assert abs(got["token_perplexity"] / ci["token_perplexity"] - 1) < 0.01
    card = open(os.path.join(pretrained_dir(NAME), "MODEL_CARD.md")).read()
    assert f"{held_out} {ci['token_perplexity']:.4f}" in card
    if held_out == "books":  # far better than a uniform guess: it learned the books
        assert got["token_perplexity"] < model.config.vocab_size / 20


def test_greedy_generation_is_deterministic_and_the_cli_finds_it(model, capsys):
    from algpt2_tf.saving import load_tokenizer_for

    tokenizer = load_tokenizer_for(NAME)
    first = model.generate(["She opened the door and"], max_new_tokens=16, sampler="greedy",
                           tokenizer=tokenizer).text
    assert first == model.generate(["She opened the door and"], max_new_tokens=16,
                                   sampler="greedy", tokenizer=tokenizer).text
    assert main(["generate", "--model", NAME, "--prompt", "She opened the door and",
                 "--max-new-tokens", "16", "--sampler", "greedy"]) == 0
    assert capsys.readouterr().out.strip() == first[0].strip()
