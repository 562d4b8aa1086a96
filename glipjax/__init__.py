"""glipjax: GLIP-style grounded language-image models in JAX/Flax."""

__version__ = "0.1.0"
