"""TFDS builders, one module per dataset (importing a module registers its builder)."""
