"""Keras layers of ALGPT2; this package imports nothing else of `algpt2_tf`."""

from algpt2_tf.layers.adapter import LayerAdapter
from algpt2_tf.layers.attention import CausalSelfAttention
from algpt2_tf.layers.block import DecoderBlock
from algpt2_tf.layers.embedding import FactorizedEmbedding
from algpt2_tf.layers.heads import SOPHead, TiedLMHead
from algpt2_tf.layers.linear import Linear

__all__ = ["CausalSelfAttention", "DecoderBlock", "FactorizedEmbedding", "LayerAdapter", "Linear", "SOPHead",
           "TiedLMHead"]
