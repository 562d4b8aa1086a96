"""The command-line tools' console logging."""

from __future__ import annotations

import logging

from glipjax import logs


def test_glipjax_info_reaches_stderr_once_and_other_libraries_keep_their_level(capsys):
    logs.to_console()
    logs.to_console()  # a second call replaces the handler, not doubles it
    logging.getLogger("glipjax.train").info("resumed from step %d", 7)
    logging.getLogger("orbax").info("a library's note")
    err = capsys.readouterr().err
    assert err.count("glipjax.train: resumed from step 7") == 1
    assert "a library's note" not in err
