"""charlm: find the best character-level language model for a text, tracked in MLflow.

The Python API (``charlm/api.py``; the command line calls the same functions)::

    import charlm
    charlm.train("experiments/gpt.yaml", {"train.max_steps": 500})
    charlm.sweep("sweeps/smoke.yaml")
    model = charlm.best("sweeps/smoke.yaml").load()
    model.generate("ROMEO:", chars=100)
"""

from charlm.api import Model, best, load, sweep, train

__all__ = ["Model", "best", "load", "sweep", "train"]
__version__ = "0.1.0"
