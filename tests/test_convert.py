"""Hugging Face GPT-2 conversion both ways, against real `transformers` + PyTorch.

Every model here has random LayerNorm gains and biases (and random values in
every other weight, biases included), so no mapping passes by accident.
"""

import json
import os
import shutil
import warnings

import numpy as np
import pytest

from conftest import randomize_weights

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from algpt2_tf import ALGPT2Config, ALGPT2LMHeadModel, convert  # noqa: E402
from algpt2_tf.cli import main  # noqa: E402
from algpt2_tf.convert import safetensors_io  # noqa: E402
from algpt2_tf.tokenizer import GPT2Tokenizer, default_tokenizer_dir  # noqa: E402

VOCAB = 1000
TOL = 1e-4


def hf_gpt2(**overrides):
    """A tiny random `GPT2LMHeadModel` (eval mode) with random LayerNorms."""
    values = dict(n_layer=3, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=32,
                  bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1)
    values.update(overrides)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**values)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ln_" in name or "ln_f" in name:
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if name.endswith("weight") else 0.0))
            elif name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.05)
    return model


def ids_batch(rng, seq=20):
    return rng.integers(0, VOCAB, (2, seq))


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


def our_logits(model, ids):
    return np.asarray(model({"input_ids": ids})["logits"])


def ours_config(**overrides):
    values = dict(vocab_size=VOCAB, max_positions=32, hidden_size=64, num_layers=4, num_heads=4,
                  intermediate_size=96, embedding_size=16, embedding_dropout=0.0,
                  attention_dropout=0.0, residual_dropout=0.0, layer_norm_epsilon=1e-3)
    values.update(overrides)
    return ALGPT2Config(**values)


# ------------------------------------------------------------------ import
@pytest.mark.parametrize("overrides", [
    {},
    {"n_inner": 96, "layer_norm_epsilon": 1e-3},
    {"activation_function": "gelu", "n_layer": 2},
    {"activation_function": "relu", "n_inner": 80},
])
def test_import_matches_transformers(tmp_path, rng, overrides):
    reference = hf_gpt2(**overrides)
    reference.save_pretrained(tmp_path / "hf")
    assert any(k.startswith("transformer.") for k in
               safetensors_io.read_file(str(tmp_path / "hf" / "model.safetensors")))
    model, tokenizer = convert.from_hf(str(tmp_path / "hf"))
    assert tokenizer is None
    assert model.config.embedding_size is None
    assert model.config.num_layer_groups == model.config.num_layers == reference.config.n_layer
    assert model.config.intermediate_size == (reference.config.n_inner or 256)
    ids = ids_batch(rng)
    np.testing.assert_allclose(our_logits(model, ids), hf_logits(reference, ids), atol=TOL, rtol=0)


def test_unprefixed_checkpoint_with_mask_buffers_imports(tmp_path, rng):
    """Old-style keys: no `transformer.` prefix, `attn.bias` / `attn.masked_bias` buffers, lm_head stored."""
    from safetensors.torch import save_file

    reference = hf_gpt2()
    reference.save_pretrained(tmp_path / "hf")
    state = {k[len("transformer."):]: v.contiguous() for k, v in reference.state_dict().items()
             if k.startswith("transformer.")}
    for n in range(3):
        state[f"h.{n}.attn.bias"] = torch.tril(torch.ones(1, 1, 32, 32))
        state[f"h.{n}.attn.masked_bias"] = torch.tensor(-1e4)
    state["lm_head.weight"] = state["wte.weight"].clone()
    os.remove(tmp_path / "hf" / "model.safetensors")
    save_file(state, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
    model, _ = convert.from_hf(str(tmp_path / "hf"))
    ids = ids_batch(rng)
    np.testing.assert_allclose(our_logits(model, ids), hf_logits(reference, ids), atol=TOL, rtol=0)


def test_sharded_bfloat16_checkpoint_imports(tmp_path, rng):
    reference = hf_gpt2().to(torch.bfloat16)
    reference.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    assert os.path.isfile(tmp_path / "hf" / safetensors_io.INDEX_FILE)
    model, _ = convert.from_hf(str(tmp_path / "hf"))
    ids = ids_batch(rng)
    expected = hf_logits(reference.float(), ids)  # the same bf16 values, run in float32
    np.testing.assert_allclose(our_logits(model, ids), expected, atol=TOL, rtol=0)


def test_cli_import_writes_a_run_folder_that_the_tools_use(tmp_path, rng, capsys):
    reference = hf_gpt2(vocab_size=50257, bos_token_id=50256, eos_token_id=50256, n_layer=2)
    reference.save_pretrained(tmp_path / "hf")
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(os.path.join(default_tokenizer_dir(), name), tmp_path / "hf" / name)
    out = tmp_path / "runs" / "imported"
    assert main(["convert", "--from-hf", str(tmp_path / "hf"), "--out", str(out)]) == 0
    assert "Imported a 2-layer, 64-wide GPT-2" in capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["config.json", "converted_from.json", "model.keras",
                                       "tokenizer"]
    assert ALGPT2Config.from_json_file(str(out / "config.json")).num_layers == 2
    model = ALGPT2LMHeadModel.from_preset(str(out))
    ids = rng.integers(0, 50257, (2, 12))
    np.testing.assert_allclose(our_logits(model, ids), hf_logits(reference, ids), atol=TOL, rtol=0)
    # generate and evaluate read the run folder (model + its tokenizer).
    assert main(["generate", "--model", str(out), "--prompt", "Hello", "--max-new-tokens", "3",
                 "--sampler", "greedy"]) == 0
    assert capsys.readouterr().out.startswith("Hello")
    (tmp_path / "text.txt").write_text("The quick brown fox jumps over the lazy dog. " * 4)
    assert main(["evaluate", "--model", str(out), "--files", str(tmp_path / "text.txt"),
                 "--seq-len", "16", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] > 0
    # The same folder as a Hugging Face one, loaded the keras-hub way.
    direct = ALGPT2LMHeadModel.from_preset(str(tmp_path / "hf"))
    np.testing.assert_array_equal(our_logits(direct, ids), our_logits(model, ids))


def test_tokenizer_json_only_is_imported(tmp_path):
    tokenizer = GPT2Tokenizer()
    hf_gpt2(vocab_size=50257).save_pretrained(tmp_path / "hf")
    tokenizer.save(str(tmp_path / "tok"))
    shutil.copy(tmp_path / "tok" / "tokenizer.json", tmp_path / "hf" / "tokenizer.json")
    _, imported = convert.from_hf(str(tmp_path / "hf"))
    text = "Hello  world!\n\nThe quick   brown fox's 123 <|endoftext|>"
    assert imported.encode(text) == tokenizer.encode(text)
    assert imported.eos_id == tokenizer.eos_id


# ------------------------------------------------------------------ export
def test_round_trip_gives_the_original_tensors(tmp_path):
    reference = hf_gpt2(n_inner=96, layer_norm_epsilon=1e-3)
    reference.save_pretrained(tmp_path / "hf")
    model, _ = convert.from_hf(str(tmp_path / "hf"))
    report = convert.to_hf(model, str(tmp_path / "back"))
    assert report.tied and report.parameters == report.source_parameters
    back = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "back"))
    original, converted = reference.state_dict(), back.state_dict()
    assert set(original) == set(converted)
    for name, tensor in original.items():
        assert torch.equal(tensor, converted[name]), name
    written = json.loads((tmp_path / "back" / "config.json").read_text())
    assert written["n_inner"] == 96 and written["layer_norm_epsilon"] == 1e-3


@pytest.mark.parametrize("overrides", [
    {"tie_projection": False},
    {"tie_projection": True},
    {"num_layer_groups": 2},
    {"num_layer_groups": 2, "group_order": "cycle_rev", "per_layer_norms": True},
    {"lora_rank": 4, "activation": "gelu_exact"},
    {"embedding_size": 48, "tie_projection": True, "sop_head": True},
])
def test_algpt2_exports_exactly(tmp_path, rng, overrides):
    model = randomize_weights(ALGPT2LMHeadModel(ours_config(**overrides)), rng)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = convert.to_hf(model, str(tmp_path / "hf"))
    assert any("sop_head" in str(w.message) for w in caught) == bool(overrides.get("sop_head"))
    assert not report.tied
    c, h, i = model.config, 64, 96
    per_layer = 4 * h * h + 2 * h * i + 9 * h + i  # LayerNorms, attention, MLP
    expanded = 2 * c.vocab_size * h + c.max_positions * h + 2 * h + c.num_layers * per_layer
    assert report.parameters == expanded  # wte + lm_head + wpe + ln_f + the layers
    assert 0 < report.head_bias_error < 1e-5  # the output bias was folded, and measured
    exported = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "hf")).eval()
    ids = ids_batch(rng)
    np.testing.assert_allclose(hf_logits(exported, ids), our_logits(model, ids), atol=TOL, rtol=0)


def test_export_writes_a_tokenizer_transformers_loads(tmp_path, rng, capsys):
    model = randomize_weights(ALGPT2LMHeadModel(ours_config(vocab_size=50257, sop_head=True)), rng)
    run = tmp_path / "run"
    run.mkdir()
    model.save(str(run / "model.keras"))
    GPT2Tokenizer().save(str(run / "tokenizer"))
    assert main(["convert", "--to-hf", str(run), "--out", str(tmp_path / "hf")]) == 0
    printed = capsys.readouterr()
    assert "untied lm_head" in printed.out and "dropped: sop_head" in printed.out
    assert printed.err.strip() == ("algpt2 convert: warning: A GPT-2 checkpoint has no sop_head: "
                                   "it is not exported (the language model is, exactly).")
    assert {"config.json", "model.safetensors", "generation_config.json", "vocab.json",
            "merges.txt", "tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(tmp_path / "hf"))
    loaded = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    text = "Hello  world!\n\nThe quick   brown fox's 123 \t ok<|endoftext|>"
    assert loaded(text)["input_ids"] == GPT2Tokenizer().encode(text)
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == loaded.eos_token_id == 50256
    exported = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "hf")).eval()
    ids = rng.integers(0, 50257, (1, 10))
    np.testing.assert_allclose(hf_logits(exported, ids), our_logits(model, ids), atol=TOL, rtol=0)


# ------------------------------------------------------------- bad input
def _break(folder, case):
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    weights = folder / "model.safetensors"
    if case == "model_type":
        config["model_type"] = "llama"
    elif case == "scale_attn_by_inverse_layer_idx":
        config["scale_attn_by_inverse_layer_idx"] = True
    elif case == "activation_function":
        config["activation_function"] = "swish"
    elif case == "bin_only":
        os.rename(weights, folder / "pytorch_model.bin")
    elif case in ("missing", "wrong_shape", "unexpected", "untied"):
        tensors = safetensors_io.read_file(str(weights))
        if case == "missing":
            del tensors["transformer.h.1.mlp.c_fc.bias"]
        elif case == "wrong_shape":
            tensors["transformer.h.0.attn.c_attn.weight"] = tensors[
                "transformer.h.0.attn.c_attn.weight"][:, :-3]
        elif case == "unexpected":
            tensors["transformer.h.0.crossattention.c_attn.weight"] = np.zeros((2, 2), "float32")
        else:
            tensors["lm_head.weight"] = tensors["transformer.wte.weight"] + 1
        safetensors_io.write_file(str(weights), tensors, metadata={"format": "pt"})
    elif case == "n_layer":
        config["n_layer"] = 5
    config_path.write_text(json.dumps(config))


@pytest.mark.parametrize("case, message", [
    ("model_type", "model_type is 'llama'"),
    ("scale_attn_by_inverse_layer_idx", "scale_attn_by_inverse_layer_idx=true"),
    ("activation_function", "activation_function 'swish'"),
    ("bin_only", "pytorch_model.bin but no model.safetensors"),
    ("missing", "missing tensor 'h.1.mlp.c_fc.bias'"),
    ("wrong_shape", "tensor 'h.0.attn.c_attn.weight' has shape (64, 189)"),
    ("unexpected", "h.0.crossattention.c_attn.weight"),
    ("untied", "lm_head.weight differs from wte.weight"),
    ("n_layer", "missing tensor 'h.3.ln_1.weight'"),
])
def test_bad_checkpoints_exit_2_and_write_nothing(tmp_path, capsys, case, message):
    hf_gpt2().save_pretrained(tmp_path / "hf")
    _break(tmp_path / "hf", case)
    out = tmp_path / "out"
    assert main(["convert", "--from-hf", str(tmp_path / "hf"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "algpt2 convert: error:" in err and message in err, err
    assert not out.exists()
    assert [p for p in os.listdir(tmp_path) if p not in ("hf",)] == []


def test_existing_output_is_never_touched(tmp_path, capsys):
    hf_gpt2().save_pretrained(tmp_path / "hf")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["convert", "--from-hf", str(tmp_path / "hf"), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert os.listdir(out) == ["keep.txt"]
    assert main(["convert", "--to-hf", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2
    assert "No model at" in capsys.readouterr().err


def test_from_preset_names_and_folders(tmp_path):
    fresh = ALGPT2LMHeadModel.from_preset("gpt2-tiny", load_weights=False)
    assert fresh.config.embedding_size is None
    with pytest.raises(ValueError, match="Preset 'gpt2-tiny' is an architecture without weights"):
        ALGPT2LMHeadModel.from_preset("gpt2-tiny")
    with pytest.raises(ValueError, match="neither a preset"):
        ALGPT2LMHeadModel.from_preset(str(tmp_path / "missing"))
    hf_gpt2(n_layer=2).save_pretrained(tmp_path / "hf")
    assert ALGPT2LMHeadModel.from_preset(str(tmp_path / "hf"), load_weights=False).config.num_layers == 2
