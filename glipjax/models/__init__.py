"""Flax building blocks of GLIP-style models (one file per block).

Importing this package must never import TensorFlow.
"""
