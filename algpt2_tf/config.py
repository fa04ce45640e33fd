"""`ALGPT2Config`: the typed, validated description of one model, and its presets.

GPT-2 is the special case `embedding_size=None` (no factorization) and
`num_layer_groups == num_layers` (no sharing). The presets are JSON files in
`algpt2_tf/configs/`, shipped as package data.
"""

import dataclasses
import json
import os
from importlib import resources
from typing import Optional

ACTIVATIONS = ("gelu", "gelu_exact", "relu")
"""Supported MLP activations. `gelu` is GPT-2's tanh approximation."""

GROUP_ORDERS = ("sequence", "cycle", "cycle_rev")
"""How `num_layer_groups` blocks are assigned to the layers (see `ALGPT2Config.block_of_layer`)."""

PROJECTION_INITS = ("normal", "fan_in")
"""How the factorization projections start (see `layers.embedding.projection_initializer`)."""


@dataclasses.dataclass
class ALGPT2Config:
    """Hyperparameters of an ALGPT2 (or GPT-2) model.

    Args:
        vocab_size: number of token ids.
        max_positions: the longest sequence the model accepts.
        hidden_size: width of the residual stream.
        num_layers: number of decoder layers applied (virtual layers).
        num_heads: attention heads; must divide `hidden_size`.
        intermediate_size: MLP width; `None` means `4 * hidden_size`.
        embedding_size: width E of the factorized token/position tables, or
            `None` for GPT-2's hidden-sized tables with no projection.
        num_layer_groups: number of distinct decoder blocks. 1 means every
            layer shares one block; `num_layers` means no sharing.
        tie_word_embeddings: the softmax reuses the token table (transposed).
            Only `True` is supported: it is what makes the head cheap.
        tie_projection: the output hidden->E projection reuses the transpose of
            the input E->hidden projection instead of owning its weights.
        embedding_dropout: dropout after the embedding.
        attention_dropout: dropout on the attention probabilities.
        residual_dropout: dropout on each residual branch.
        layer_norm_epsilon: LayerNorm epsilon.
        activation: MLP activation, one of `ACTIVATIONS`.
        initializer_range: standard deviation of the normal initializer.
        projection_init: how the factorization's two projections (E -> hidden
            in, hidden -> E out) start: `normal` (stddev `initializer_range`,
            as every other kernel) or `fan_in` (stddev `1 / sqrt(fan_in)`:
            they keep the scale, so hidden states start at the tables' scale
            and the softmax sees unit-scale features, as in GPT-2). See
            `layers/embedding.py`.
        sop_head: add the sentence-order-prediction head.
        sop_loss_weight: weight of the SOP loss in the training loss.
        group_order: which block each layer runs when there are several:
            `sequence` (block i // layers_per_group: 0 0 1 1 2 2), `cycle`
            (0 1 2 0 1 2) or `cycle_rev` (the last round reversed: 0 1 2 2 1 0),
            after Takase & Kiyono (2021), "Lessons on Parameter Sharing across
            Layers in Transformers".
        per_layer_norms: each virtual layer owns the two LayerNorms of the
            block it runs (relaxed sharing; see `layers/adapter.py`).
        lora_rank: rank of the per-virtual-layer low-rank deltas on the block's
            four kernels (0: none), as in Relaxed Recursive Transformers
            (Bae et al., 2024). The deltas start at zero.

    Example:
    >>> config = ALGPT2Config.from_preset("algpt2-tiny")
    >>> config.hidden_size
    128
    """

    vocab_size: int = 50257
    max_positions: int = 1024
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: Optional[int] = None
    embedding_size: Optional[int] = 128
    num_layer_groups: int = 1
    tie_word_embeddings: bool = True
    tie_projection: bool = False
    embedding_dropout: float = 0.1
    attention_dropout: float = 0.1
    residual_dropout: float = 0.1
    layer_norm_epsilon: float = 1e-5
    activation: str = "gelu"
    initializer_range: float = 0.02
    projection_init: str = "normal"
    sop_head: bool = False
    sop_loss_weight: float = 1.0
    group_order: str = "sequence"
    per_layer_norms: bool = False
    lora_rank: int = 0

    def __post_init__(self):
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self):
        """Raises `ValueError` naming the first invalid field."""
        for name in ("vocab_size", "max_positions", "hidden_size", "num_layers",
                     "num_heads", "intermediate_size", "num_layer_groups"):
            _check_positive_int(name, getattr(self, name))
        if self.embedding_size is not None:
            _check_positive_int("embedding_size", self.embedding_size)
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by "
                f"num_heads ({self.num_heads}).")
        if self.num_layers % self.num_layer_groups:
            raise ValueError(
                f"num_layers ({self.num_layers}) must be divisible by "
                f"num_layer_groups ({self.num_layer_groups}).")
        for name in ("embedding_dropout", "attention_dropout", "residual_dropout"):
            rate = getattr(self, name)
            if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
                raise ValueError(f"{name} must be a number in [0, 1), got {rate!r}.")
        for name in ("layer_norm_epsilon", "initializer_range"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}.")
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"activation must be one of {ACTIVATIONS}, got {self.activation!r}.")
        for name in ("tie_word_embeddings", "tie_projection", "sop_head", "per_layer_norms"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}.")
        if not self.tie_word_embeddings:
            raise ValueError("tie_word_embeddings=False is not supported: the softmax is "
                             "always tied to the token table.")
        if self.tie_projection and self.embedding_size is None:
            raise ValueError("tie_projection=True needs a factorized embedding "
                             "(embedding_size must not be None).")
        if (isinstance(self.sop_loss_weight, bool)
                or not isinstance(self.sop_loss_weight, (int, float))
                or self.sop_loss_weight < 0):
            raise ValueError(
                f"sop_loss_weight must be a non-negative number, got {self.sop_loss_weight!r}.")

        if self.projection_init not in PROJECTION_INITS:
            raise ValueError(f"projection_init must be one of {PROJECTION_INITS}, "
                             f"got {self.projection_init!r}.")
        if self.group_order not in GROUP_ORDERS:
            raise ValueError(
                f"group_order must be one of {GROUP_ORDERS}, got {self.group_order!r}.")
        if isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int) or self.lora_rank < 0:
            raise ValueError(f"lora_rank must be a non-negative integer, got {self.lora_rank!r}.")

    # -------------------------------------------------------------- derived
    @property
    def head_size(self):
        return self.hidden_size // self.num_heads

    @property
    def layers_per_group(self):
        return self.num_layers // self.num_layer_groups

    @property
    def factorized(self):
        return self.embedding_size is not None

    @property
    def has_layer_adapters(self):
        """Whether each virtual layer owns parameters (`per_layer_norms`, `lora_rank`)."""
        return self.per_layer_norms or self.lora_rank > 0

    def block_of_layer(self, layer_index):
        """The index of the block that virtual layer `layer_index` runs (see `group_order`)."""
        groups = self.num_layer_groups
        if self.group_order == "sequence":
            return layer_index // self.layers_per_group
        if self.group_order == "cycle_rev" and layer_index >= self.num_layers - groups:
            return groups - 1 - layer_index % groups  # the last round, reversed
        return layer_index % groups

    def num_parameters(self):
        """The model's parameter count, computed from the shapes alone.

        Equal to `ALGPT2LMHeadModel(config).count_params()` (tested), but
        instant, so `algpt2 info` can report the billion-parameter presets.
        """
        h, v, e = self.hidden_size, self.vocab_size, self.embedding_size or self.hidden_size
        count = v * e + self.max_positions * e
        if self.factorized:
            count += e * h + h  # input projection E -> hidden
            if self.tie_projection:
                count += e  # the output projection keeps only its bias
            else:
                count += h * e + e  # output projection hidden -> E
        i = self.intermediate_size
        norms = 2 * h + 2 * h  # attention and MLP LayerNorms
        block = (h * 3 * h + 3 * h  # fused q, k, v
                 + h * h + h  # attention output
                 + h * i + i + i * h + h)  # MLP
        if not self.per_layer_norms:
            block += norms
        count += self.num_layer_groups * block
        per_layer = norms if self.per_layer_norms else 0
        # Rank-r deltas: A [in, r] and B [r, out] on q/k/v, attention output, MLP in, MLP out.
        per_layer += self.lora_rank * ((h + 3 * h) + (h + h) + (h + i) + (i + h))
        count += self.num_layers * per_layer
        count += 2 * h  # final LayerNorm
        if self.sop_head:
            count += h * 2 + 2  # 2-way classifier on the final-normalized state
        return count

    # ------------------------------------------------------------ serialization
    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values):
        """Builds a config from a dict, rejecting unknown keys by name."""
        if not isinstance(values, dict):
            raise ValueError(f"A config must be a JSON object, got {type(values).__name__}.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown config field(s): {', '.join(unknown)}.")
        return cls(**values)

    def to_json_file(self, path):
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")

    @classmethod
    def from_json_file(cls, path):
        try:
            with open(path, encoding="utf-8") as f:
                values = json.load(f)
        except FileNotFoundError:
            raise ValueError(f"Config file not found: {path}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"Config file {path} is not valid JSON: {e}") from None
        return cls.from_dict(values)

    @classmethod
    def from_preset(cls, name):
        """Loads a shipped preset such as `"algpt2"` or `"gpt2-tiny"`."""
        if name not in list_presets():
            raise ValueError(
                f"Unknown preset {name!r}. Available presets: {', '.join(list_presets())}.")
        with _preset_dir().joinpath(f"{name}.json").open(encoding="utf-8") as f:
            return cls.from_dict(json.load(f))


def _check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def _preset_dir():
    return resources.files("algpt2_tf").joinpath("configs")


_SIZE_ORDER = {"tiny": 0, "": 1, "medium": 2, "large": 3, "xl": 4}


def _preset_order(name):
    family, _, size = name.partition("-")
    return (family != "algpt2", _SIZE_ORDER.get(size, 5), name)


def list_presets():
    """Names of the shipped presets: ALGPT2 sizes first, then the GPT-2 baselines."""
    return sorted((os.path.splitext(p.name)[0] for p in _preset_dir().iterdir()
                   if p.name.endswith(".json")), key=_preset_order)
