"""Input data: the bundled shapes generator (numpy + PIL) and TFDS builders.

Importing this package does not import TensorFlow; glipjax.data.builders does.
"""
