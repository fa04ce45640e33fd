import dataclasses

import numpy as np
import pytest
import tensorflow as tf
from conftest import decode_test_model, tiny_config

from algpt2_tf import ALGPT2LMHeadModel
from algpt2_tf.generation import decode_tricks
from algpt2_tf.generation.decode_tricks import DecodeTricks
from algpt2_tf.generation.generator import Generator

EXACT = DecodeTricks.names()


@pytest.fixture(params=["algpt2", "gpt2"], scope="module")
def model(request):
    return decode_test_model(request.param, max_positions=128)


def test_switches_from_text_and_environment():
    tricks = DecodeTricks().with_switches(" growing_cache=0, wide_vectors=0,last_position_head=1 ")
    assert not tricks.growing_cache and not tricks.wide_vectors and tricks.last_position_head
    env = {decode_tricks.ENVIRONMENT_VARIABLE: "wide_vectors=0"}
    assert DecodeTricks.from_environment(env) == dataclasses.replace(DecodeTricks.for_cpu(),
                                                                    wide_vectors=False)
    assert not any(dataclasses.astuple(DecodeTricks().off()))
    with pytest.raises(ValueError, match="unknown decode trick 'fast'"):
        DecodeTricks().with_switches("fast=1")
    with pytest.raises(ValueError, match="give 0 or 1, not 'yes'"):
        DecodeTricks().with_switches("growing_cache=yes")


def test_only_a_decode_loop_runs_a_trick_and_serving_runs_the_same_ones(monkeypatch, tmp_path):
    """The tricks reach the code they change as a `DecodePlan`: training, evaluation and
    `model(...)` never see one; `Generator` and the serving engine trace theirs with the
    tricks they were given (and the environment decides nothing inside the library)."""
    import keras

    from algpt2_tf.serving.batching import BatchEngine

    calls = []
    add_bias = decode_tricks.DecodePlan.add_bias
    monkeypatch.setattr(decode_tricks.DecodePlan, "add_bias",
                        lambda self, x, b: calls.append(self.tricks) or add_bias(self, x, b))
    monkeypatch.setenv(decode_tricks.ENVIRONMENT_VARIABLE, "two_reduction_argmax=0")
    model = ALGPT2LMHeadModel(tiny_config())
    model.compile(optimizer=keras.optimizers.SGD(0.01))
    ids = np.random.default_rng(0).integers(0, 97, (4, 9)).astype("int32")
    model.fit({"input_ids": ids}, epochs=1, batch_size=2, verbose=0)
    model.evaluate({"input_ids": ids}, batch_size=2, verbose=0)
    model({"input_ids": ids})
    assert calls == []
    assert Generator(model).tricks == DecodeTricks.for_cpu()
    Generator(model).generate([[5, 17, 42]], 2)
    assert calls and set(calls) == {DecodeTricks.for_cpu()}
    calls.clear()
    chosen = dataclasses.replace(DecodeTricks(), growing_cache=False)
    engine = BatchEngine(model, max_batch=2, window_s=0.0, tricks=chosen)
    try:
        engine.generate([5, 17, 42], max_new_tokens=2)
    finally:
        engine.close()
    assert calls and set(calls) == {chosen}


def test_exact_tricks_on_give_the_tokens_of_all_tricks_off(monkeypatch):
    """The fast tier's twin of the matrix below: one model, two prompts, 8 tokens through a
    growing cache, every exact trick on against every trick off."""
    from algpt2_tf.generation import generator

    monkeypatch.setattr(generator, "CACHE_SEGMENT", 16)
    model = decode_test_model("algpt2", max_positions=128)
    prompts = [[5, 17, 42], [9, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13]]
    expected = Generator(model, tricks=DecodeTricks().off()).generate(prompts, 8).new_ids
    assert Generator(model, tricks=DecodeTricks()).generate(prompts, 8).new_ids == expected


@pytest.mark.slow
@pytest.mark.parametrize("prompts", [[[5, 17, 42]], [[5, 17, 42], [9, 1, 2, 3, 4, 5, 6, 7, 8]]])
def test_every_exact_trick_on_or_off_gives_the_same_tokens(model, prompts, monkeypatch):
    # A 16-slot first cache: the 16-token padded prompts decode through 32- and
    # 64-slot caches, so the growing cache grows while decoding.
    from algpt2_tf.generation import generator

    monkeypatch.setattr(generator, "CACHE_SEGMENT", 16)
    expected = Generator(model, tricks=DecodeTricks().off()).generate(prompts, 40).new_ids
    variants = [DecodeTricks()] + [dataclasses.replace(DecodeTricks(), **{name: False})
                                   for name in EXACT]
    for tricks in variants:
        assert Generator(model, tricks=tricks).generate(prompts, 40).new_ids == expected, tricks


def op_types(generator, batch):
    function = generator._function(128, one_row=batch == 1)  # cache lengths 64, 128
    concrete = function.get_concrete_function(
        tf.zeros([batch, 16], tf.int32), tf.ones([batch, 16], tf.int32), tf.constant(4),
        tf.constant(1.0), tf.constant(1), tf.constant(1.0), tf.constant(1.0), tf.constant(0),
        tf.zeros([0], tf.int32))
    types = []
    graphs = [concrete.graph] + list(concrete.graph._functions.values())
    for graph in graphs:
        graph = getattr(graph, "graph", graph)
        types += [op.type for op in graph.get_operations()]
    return types


# A trick's switch changes the same ops in either shape: `gpt2` in the slow tier.
@pytest.mark.parametrize("model", ["algpt2", pytest.param("gpt2", marks=pytest.mark.slow)],
                         indirect=True)
def test_switches_change_the_traced_graph(model):
    def without(name):
        return op_types(Generator(model, tricks=dataclasses.replace(DecodeTricks(), **{name: False})), 1)

    def conds(types):
        return types.count("If") + types.count("StatelessIf")

    on = op_types(Generator(model, tricks=DecodeTricks()), 1)
    assert "ArgMax" not in on and "ArgMax" in without("two_reduction_argmax")
    assert on.count("Neg") > without("bias_as_subtraction").count("Neg")
    assert conds(on) > conds(without("row_major_copies"))  # one-row or not, per product
    assert conds(op_types(Generator(model, tricks=DecodeTricks()), 2)) == conds(
        without("row_major_copies"))  # larger batches: no copies
    assert on.count("While") > without("growing_cache").count("While")  # a loop per length


def test_row_major_copies_serve_one_row_products_only(rng, monkeypatch):
    model = ALGPT2LMHeadModel(tiny_config())
    model({"input_ids": np.zeros((1, 4), "int32")})
    layer = model.blocks[0].mlp_in
    used = []
    matmul = decode_tricks.RowMajorCopy.matmul
    monkeypatch.setattr(decode_tricks.RowMajorCopy, "matmul",
                        lambda self, *a: used.append(self) or matmul(self, *a))
    for rows in (1, 3):
        x = rng.standard_normal((rows, 1, 32)).astype("float32")

        @tf.function(jit_compile=True)
        def run(x):
            return layer(x, plan=decode_tricks.DecodePlan(model, DecodeTricks(), one_row=True))

        np.testing.assert_allclose(run(x).numpy(), layer(x).numpy(), rtol=1e-6, atol=1e-6)
    assert len(used) == 2
    assert decode_tricks.DecodePlan(model, DecodeTricks(), one_row=False).copies == {}


def test_int8_models_decode_the_same_with_and_without_tricks():
    model = ALGPT2LMHeadModel(tiny_config(initializer_range=0.2))
    model({"input_ids": np.zeros((1, 4), "int32")})
    model.quantize("int8")
    prompts = [[5, 17, 42]]
    assert (Generator(model).generate(prompts, 20).new_ids
            == Generator(model, tricks=DecodeTricks().off()).generate(prompts, 20).new_ids)


def test_host_writes_attend_as_the_written_cache_and_return_the_new_slot(rng):
    """The TFLite export's attention (`DecodePlan(host_writes=True)`): the cache is read, never
    written; one step attends over its slots and the new key as the XLA loop's attention over
    the cache with the new slot written, and returns the new keys and values to write."""
    from algpt2_tf.layers.attention import CausalSelfAttention
    from algpt2_tf.model import attention_bias

    layer = CausalSelfAttention(hidden_size=16, num_heads=2)
    batch, slots, slot = 2, 8, 5
    x = rng.normal(size=(batch, 1, 16)).astype("float32")
    # Slots past the new one hold stale values: the mask must hide them.
    cache = [rng.normal(size=(batch, 2, slots, 8)).astype("float32") for _ in range(2)]
    visible = np.arange(slots) <= slot
    visible = np.stack([visible, visible & (np.arange(slots) >= 2)])  # row 1: left-padded
    written_out, (keys, values) = layer(x, attention_bias(np.array([slot], "int32"), visible),
                                        cache=cache, cache_index=slot)
    host = decode_tricks.DecodePlan(None, DecodeTricks().off(), host_writes=True)
    beside = np.concatenate([visible & (np.arange(slots) < slot), np.ones((batch, 1), bool)], 1)
    out, (new_keys, new_values) = layer(x, attention_bias(np.array([slots], "int32"), beside),
                                        cache=cache, cache_index=slots, plan=host)
    np.testing.assert_allclose(np.asarray(out), np.asarray(written_out), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(new_keys)[:, :, 0], np.asarray(keys)[:, :, slot])
    np.testing.assert_array_equal(np.asarray(new_values)[:, :, 0],
                                  np.asarray(values)[:, :, slot])
    with pytest.raises(ValueError, match="one query per row"):
        two = attention_bias(np.array([slots, slots + 1], "int32"), beside)
        layer(np.concatenate([x, x], 1), two, cache=cache, cache_index=slots, plan=host)
