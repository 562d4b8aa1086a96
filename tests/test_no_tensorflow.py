"""The model, converter, prediction and export must work where TensorFlow (and torch) are absent."""

import pkgutil
import subprocess
import sys

import glipjax
import glipjax.models

# Modules that may import TensorFlow: the data pipeline, the commands that feed on it,
# and evaluators that read TFDS datasets.
TF_ALLOWED = (
    "glipjax.data", "glipjax.train", "glipjax.evaluate", "glipjax.pseudo_label",
    "glipjax.eval.shapes", "glipjax.eval.datasets", "glipjax.eval.odinw",
)


def _tf_free_modules() -> list[str]:
    names = [m.name for m in pkgutil.walk_packages(glipjax.__path__, "glipjax.")]
    return sorted(n for n in names if not any(n == a or n.startswith(a + ".") for a in TF_ALLOWED))


def test_model_modules_do_not_import_tensorflow():
    modules = _tf_free_modules()
    assert "glipjax.models.layers" in modules and "glipjax.train_state" in modules
    code = "import sys\n" + "".join(f"import {m}\n" for m in modules) + (
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tensorflow_datasets', 'torch'))\n"
        "assert not bad, bad[:5]\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
