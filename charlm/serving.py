"""A charlm checkpoint as an MLflow pyfunc model, logged on a run and registered as ``charlm-<study>``.

The served model loads ``model.pt`` with :func:`charlm.checkpoint.load` (``weights_only``: loading
it runs no code) and is logged "from code", so nothing in the model is pickled. Requests::

    {"dataframe_records": [{"prompt": "ROMEO:"}], "params": {"chars": 50, "temperature": 0.8}}

``prompt`` is the only input field; ``chars``, ``temperature``, ``top_k`` (0 = off), ``seed`` and
``mode`` (``generate`` | ``score``) are params. ``generate`` answers ``chars`` new characters per
prompt; ``score`` answers the prompt's loss in nats/char (a float). A bad request (an unknown input
field, a negative length, a character outside the vocabulary) raises ``INVALID_PARAMETER_VALUE``,
which the scoring server answers with 400 and a one-line ``reason`` in its JSON body.

The signature declares no input schema on purpose: MLflow's schema enforcement silently drops
input fields it does not know, so the model checks its input itself. Params it does not know are
dropped by MLflow before the model sees the request (a warning in the server's log).
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import mlflow.pyfunc

MAX_CHARS = 10_000  # longest answer one request may ask for: bounds the time a request holds the server
ALIAS = "champion"
PARAMS = {"chars": 200, "temperature": 0.8, "top_k": 0, "seed": 0, "mode": "generate"}
PACKAGE = Path(__file__).resolve().parent
ENTRY = "from mlflow.models import set_model\nfrom charlm.serving import CharlmModel\nset_model(CharlmModel())\n"


def bad_request(reason: str):
    """The error the scoring server turns into 400 with ``reason`` as a one-line JSON field."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    reason = " ".join(reason.split())
    return MlflowException(reason, error_code=INVALID_PARAMETER_VALUE, reason=reason)


def prompts_of(model_input) -> list[str]:
    """The prompts of a request: a DataFrame, a dict of columns, or a list of strings."""
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        fields, rows = list(model_input.columns), model_input.get("prompt", pd.Series(dtype=object))
    elif isinstance(model_input, dict):
        fields, rows = list(model_input), model_input.get("prompt", [])
    else:
        fields, rows = ["prompt"], model_input
    rows = rows.tolist() if hasattr(rows, "tolist") else rows  # numpy / pandas -> python
    rows = [rows] if isinstance(rows, str) else list(rows)
    unknown = [str(f) for f in fields if f != "prompt"]
    if unknown:
        raise bad_request(f"unknown input field(s) {unknown}: the input has one field, 'prompt'; "
                          f"{', '.join(PARAMS)} go in 'params'")
    if "prompt" not in fields:
        raise bad_request("the input needs a 'prompt' field (a string, may be empty)")
    if not all(isinstance(r, str) for r in rows):
        raise bad_request("'prompt' must be a string")
    return [str(r) for r in rows]


def checked_params(params: dict | None) -> dict:
    p = {**PARAMS, **(params or {})}
    for key in ("chars", "top_k", "seed"):
        if int(p[key]) < 0:
            raise bad_request(f"'{key}' must be >= 0, got {p[key]}")
    if int(p["chars"]) > MAX_CHARS:
        raise bad_request(f"'chars' must be <= {MAX_CHARS}, got {p['chars']}")
    if not (math.isfinite(float(p["temperature"])) and float(p["temperature"]) >= 0):
        raise bad_request(f"'temperature' must be a number >= 0 (0 = greedy), got {p['temperature']}")
    if p["mode"] not in ("generate", "score"):
        raise bad_request(f"'mode' must be generate | score, got {p['mode']!r}")
    return p


class CharlmModel(mlflow.pyfunc.PythonModel):
    """Generates from, or scores with, the checkpoint logged as the artifact ``checkpoint``."""

    # predict checks its input itself (see above). Without this, MLflow looks for type hints on
    # predict to validate input against, and warns on every import that there are none.
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        from charlm.api import load

        self.model = load(context.artifacts["checkpoint"], "cpu")

    def predict(self, context, model_input, params=None):
        p = checked_params(params)
        prompts = prompts_of(model_input)
        vocab = self.model.vocab
        for text in prompts:
            missing = vocab.unknown(text)
            if missing:
                raise bad_request(f"character(s) {', '.join(repr(c) for c in missing[:10])} not in the "
                                  f"model's vocabulary of {len(vocab)} characters")
        if p["mode"] == "score":
            if any(len(text) < 2 for text in prompts):
                raise bad_request("mode 'score' needs a prompt of at least 2 characters")
            return [self.model.score(text) for text in prompts]
        return [self.model.generate(text, int(p["chars"]), temperature=float(p["temperature"]),
                                    top_k=int(p["top_k"]) or None, seed=int(p["seed"])) for text in prompts]


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec

    kinds = {int: "long", float: "double", str: "string"}
    return ModelSignature(inputs=None, outputs=None,
                          params=ParamSchema([ParamSpec(k, kinds[type(v)], v) for k, v in PARAMS.items()]))


def requirements() -> list[str]:
    """The packages the served model imports, pinned to what this environment runs."""
    return [f"{name}=={metadata.version(name)}" for name in ("torch", "mlflow", "pyyaml", "pandas")]


@contextlib.contextmanager
def fluent_uri(uri: str):
    """MLflow's fluent API on ``uri`` for a while; the process's setting (and its
    ``MLFLOW_TRACKING_URI``, which ``set_tracking_uri`` rewrites) restored after."""
    from mlflow.tracking._tracking_service import utils

    before, env = getattr(utils, "_tracking_uri", None), os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)
        if env is not None:
            os.environ["MLFLOW_TRACKING_URI"] = env


def plugin_code(checkpoint_path: Path) -> list[str]:
    """The top-level package or module of a plugin model's kind (``examples.my_model:MyModel`` ->
    the folder ``examples``), logged beside charlm so the served model imports it too."""
    import importlib.util

    from charlm import checkpoint
    from charlm.models import BUILTIN

    kind = checkpoint.model_kind(checkpoint_path)
    if kind in BUILTIN:
        return []
    found = importlib.util.find_spec(kind.partition(":")[0].split(".")[0])
    if found.submodule_search_locations:  # a package (a namespace package too): its folder
        return [str(Path(next(iter(found.submodule_search_locations))))]
    return [str(found.origin)]


def log_model(run_id: str, checkpoint_path: Path, uri: str) -> str:
    """Log the checkpoint as a pyfunc model named ``model`` on ``run_id``; returns its model URI."""
    with tempfile.TemporaryDirectory(prefix="charlm-pyfunc-") as tmp, fluent_uri(uri), mlflow.start_run(run_id=run_id):
        entry = Path(tmp) / "charlm_model.py"
        entry.write_text(ENTRY)
        info = mlflow.pyfunc.log_model(
            name="model", python_model=str(entry), artifacts={"checkpoint": str(checkpoint_path)},
            code_paths=[str(PACKAGE), *plugin_code(checkpoint_path)], signature=signature(), pip_requirements=requirements(),
            input_example=({"prompt": ["ROMEO:"]}, {"chars": 40}))
    return info.model_uri


@dataclass(frozen=True)
class Registered:
    name: str
    version: str
    champion: bool  # whether the alias now points at this version
    previous: str | None  # the version the alias pointed at before, if any
    previous_val_loss: float | None
    val_loss: float

    def describe(self) -> str:
        where = f"models:/{self.name}/{self.version}"
        if self.champion:
            before = f" (was version {self.previous}, val {self.previous_val_loss:.4f})" if self.previous else ""
            return f"registered {where}: now @{ALIAS}, val {self.val_loss:.4f}{before}"
        return (f"registered {where}: @{ALIAS} stays on version {self.previous} (val {self.previous_val_loss:.4f} "
                f"<= {self.val_loss:.4f})")


def register(client, name: str, model_uri: str, run_id: str, val_loss: float, tags: dict,
             uri: str) -> Registered:
    """A new version of ``name``; it takes the ``champion`` alias only if its val loss beats the
    current champion's (the ``val_loss`` tag of each version), so test figures never decide."""
    from mlflow.exceptions import MlflowException

    from charlm.tracking import store_lock

    # one `make best` at a time compares and moves the alias; the registry finds a logged model
    # (models:/m-...) through the process's tracking URI, not the client's
    with store_lock(uri), fluent_uri(uri):
        try:
            client.create_registered_model(name, description="charlm models; the alias 'champion' "
                                                             "is the version with the lowest val loss")
        except MlflowException:
            pass  # registered by an earlier run
        version = client.create_model_version(name, model_uri, run_id=run_id,
                                               tags={**{k: str(v) for k, v in tags.items()},
                                                     "val_loss": repr(float(val_loss))}).version
        try:
            current = client.get_model_version_by_alias(name, ALIAS)
        except MlflowException:
            current = None
        old = float(current.tags["val_loss"]) if current and "val_loss" in current.tags else None
        wins = current is None or old is None or float(val_loss) < old
        if wins:
            client.set_registered_model_alias(name, ALIAS, str(version))
    return Registered(name, str(version), wins, str(current.version) if current else None, old, float(val_loss))


def log_and_register(run_id: str, checkpoint_path: Path, study: str, val_loss: float, tags: dict,
                     uri: str) -> Registered:
    """Log the checkpoint on ``run_id`` and register it as ``charlm-<study>``."""
    from charlm import tracking

    model_uri = log_model(run_id, checkpoint_path, uri)
    client = tracking.client(uri)
    return register(client, f"charlm-{study}", model_uri, run_id, val_loss, {"study": study, **tags}, uri)
