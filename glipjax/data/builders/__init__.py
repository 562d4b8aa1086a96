"""TFDS builders, one module per dataset (importing a module registers its builder)."""

import logging


class _NoCustomConfigNotice(logging.Filter):
    """Drops TFDS's "Using custom data configuration" warning, which it logs each time a
    builder is made: every glipjax builder config is made from the run's config."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Using custom data configuration")


logging.getLogger("absl").addFilter(_NoCustomConfigNotice())
