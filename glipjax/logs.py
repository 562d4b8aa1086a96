"""Console logging for the command-line tools.

TensorFlow and Orbax import absl, which takes over Python's root logger at level
WARNING, so `logging.basicConfig` alone shows none of glipjax's INFO messages (the mesh,
"resumed from step N", warm starts). `to_console` gives the "glipjax" loggers their own
handler on stderr at INFO; other libraries keep their levels.
"""

from __future__ import annotations

import logging

HANDLER_NAME = "glipjax-console"


def to_console(level: int = logging.INFO) -> None:
    """Shows glipjax's messages from `level` up on stderr, once however often it is called."""
    logger = logging.getLogger("glipjax")
    for handler in [h for h in logger.handlers if h.get_name() == HANDLER_NAME]:
        logger.removeHandler(handler)
    handler = logging.StreamHandler()
    handler.set_name(HANDLER_NAME)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
