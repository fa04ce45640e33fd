"""`ALGPT2LMHeadModel`: the causal-LM task, the backbone plus generation and loading.

keras-hub splits a model into a backbone (the network) and a task (what a user does with
it); so do we. `model.ALGPT2Backbone` is the network and its training loss and imports
nothing of generation, conversion or saving; this class adds `generate` (one entry point to
every decode engine) and `from_preset` (a pretrained name, a run folder, a Hugging Face
folder or an architecture preset). Both classes save the same file: `saving.load_model(path,
cls)` loads it as either.
"""

import os

import keras

from algpt2_tf import convert
from algpt2_tf.config import ALGPT2Config, list_presets
from algpt2_tf.convert.hf_config import config_from_hf, read_hf_config
from algpt2_tf.export import litert_engine
from algpt2_tf.generation import generator
from algpt2_tf.model import ALGPT2Backbone
from algpt2_tf.pretrained import list_pretrained
from algpt2_tf.saving import load_model

ENGINES = ("xla", "litert")
"""`generate`'s decode engines: the compiled Keras model, or its LiteRT build."""


@keras.saving.register_keras_serializable(package="algpt2_tf")
class ALGPT2LMHeadModel(ALGPT2Backbone):
    """ALBERT-style GPT-2 for causal language modelling: `ALGPT2Backbone` (the
    network, `fit`, `evaluate`, `quantize`) plus `generate` and `from_preset`.

    Args:
        config: an `ALGPT2Config` (or its dict form).

    Example:
    >>> model = ALGPT2LMHeadModel(ALGPT2Config.from_preset("algpt2-tiny"))
    >>> out = model.generate([[464, 3290]], max_new_tokens=4, stop_ids=[])
    >>> len(out.new_ids[0])
    4
    """

    def generate(self, prompts, max_new_tokens=32, sampler="greedy", seed=None, tokenizer=None,
                 engine="xla", quantize="none", **kwargs):
        """Generates text or ids with one of the decode engines.

        Args:
            prompts, max_new_tokens, sampler, seed, tokenizer, **kwargs: see
                `algpt2_tf.generation.generator.generate` (on torch and JAX the XLA engine is
                `algpt2_tf.generation.host_loop`).
            engine: "xla" (the compiled Keras model) or "litert" (its LiteRT builds of 1, 2
                or 4 rows, made once per set of weights and cached: `litert_engine`; the same
                tokens for a float32 build; int8 `algpt2` at batch 1 decodes 3.5x the XLA
                path's tokens/s, `benchmarks/README.md`).
            quantize: the LiteRT build's weights, "none" (float32), "int8" or "int4"
                (`algpt2_tf.export.int4`).

        Returns:
            A `GenerationOutput` (with `text` when the prompts were strings).
        """
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}.")
        if engine == "xla" and quantize != "none":
            raise ValueError("quantize applies to engine='litert'; for the Keras model, use "
                             "model.quantize('int8').")
        decoder = litert_engine.ModelDecoder(self, quantize) if engine == "litert" else None
        return generator.generate(self, prompts, max_new_tokens=max_new_tokens, sampler=sampler,
                                   seed=seed, tokenizer=tokenizer, decoder=decoder, **kwargs)

    @classmethod
    def from_preset(cls, preset, load_weights=True):
        """Loads a model the keras-hub way, from a name or a local folder.

        Args:
            preset: a shipped pretrained model's name
                (`algpt2_tf.list_pretrained()`), a run folder or `.keras`
                file of ours, a Hugging Face GPT-2 folder (`config.json` +
                `model.safetensors`, converted on the fly by
                `algpt2_tf.convert.from_hf`), or an architecture preset's
                name (`algpt2_tf.list_presets()`).
            load_weights: `False` gives a freshly initialized model of the
                preset's (or folder's) config. Architecture presets carry no
                weights, so their names need `load_weights=False`.

        Example:
        >>> ALGPT2LMHeadModel.from_preset("algpt2-tiny", load_weights=False).config.hidden_size
        128
        """
        if preset in list_presets():
            if load_weights:
                raise ValueError(f"Preset {preset!r} is an architecture without weights: pass "
                                 f"load_weights=False for a freshly initialized model, a "
                                 f"pretrained model's name ({', '.join(list_pretrained())}), or "
                                 f"a folder (a run of ours, or a Hugging Face GPT-2).")
            return cls(ALGPT2Config.from_preset(preset))
        if (os.path.isdir(preset) and not os.path.isfile(os.path.join(preset, "model.keras"))
                and convert.is_hf_folder(preset)):
            if not load_weights:
                return cls(config_from_hf(read_hf_config(preset)))
            return convert.from_hf(preset, cls)[0]
        if not os.path.exists(preset) and preset not in list_pretrained():
            raise ValueError(f"{preset!r} is neither a preset ({', '.join(list_presets())}) nor "
                             f"an existing folder or .keras file.")
        model = load_model(preset, cls)
        return model if load_weights else cls(model.config)
