"""Save and load the fitted model pipeline with skops, trusting only the types it needs.

skops refuses to instantiate types that are not trusted. We never trust everything: the
allowlist below names exactly what loopline's pipelines contain, and a file that asks for
anything else is refused with the offending types named (a tampered or foreign file).
skops names objects by their memory address and stamps the zip with the time; we renumber
the addresses in order of appearance and fix the timestamps, and leave out the one fact of
the fitting machine a model keeps (HistGradientBoosting's bin mapper records how many OpenMP
threads it was fitted with), so the same model always gives the same bytes, whatever the
machine's load: `dvc repro` outputs and their hashes stay reproducible.
"""

from __future__ import annotations

import io
import re
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines import MOVED
from pipelines.core.errors import LooplineError
from pipelines.core.storage import read_json, write_bytes, write_json

if TYPE_CHECKING:
    import pandas as pd

    from pipelines.core.config import Params

MODEL_FILE = "model.skops"
META_FILE = "model.json"

# Every type loopline's pipelines contain, for every family and task. skops is imported
# without its default list of all scikit-learn estimators (see `skops_io`), so these are
# the only classes a model file may instantiate.
MODEL_TYPES = frozenset(
    {
        "numpy.dtype",
        "pipelines.model.boosting.XGBoostClassifier",
        "pipelines.model.boosting.XGBoostRegressor",
        "pipelines.model.features.CyclicalEncoder",
        "pipelines.model.torch_model.TorchMLPClassifier",
        "pipelines.model.torch_model.TorchMLPRegressor",
        "sklearn.compose._column_transformer.ColumnTransformer",
        "sklearn.ensemble._forest.RandomForestClassifier",
        "sklearn.ensemble._forest.RandomForestRegressor",
        "sklearn.ensemble._hist_gradient_boosting.gradient_boosting.HistGradientBoostingClassifier",
        "sklearn.ensemble._hist_gradient_boosting.gradient_boosting.HistGradientBoostingRegressor",
        "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
        "sklearn.impute._base.SimpleImputer",
        "sklearn.linear_model._logistic.LogisticRegression",
        "sklearn.linear_model._ridge.Ridge",
        "sklearn.pipeline.Pipeline",
        "sklearn.preprocessing._data.StandardScaler",
        "sklearn.preprocessing._encoders.OneHotEncoder",
        "sklearn.preprocessing._label.LabelEncoder",
        "sklearn.tree._classes.DecisionTreeClassifier",
        "sklearn.tree._classes.DecisionTreeRegressor",
        "sklearn.tree._tree.Tree",
        "xgboost.core.Booster",
    }
)
# With the same classes as models logged before pipelines/ had its parts name them
# (pipelines.features.CyclicalEncoder ...): the old paths import as aliases (pipelines/__init__.py).
TRUSTED_TYPES = MODEL_TYPES | {
    f"{old}{name.removeprefix(new)}" for old, new in MOVED.items() for name in MODEL_TYPES if name.startswith(new + ".")
}


def skops_io():
    """`skops.io`, imported without building its default trust list: at import it walks every
    scikit-learn module (importing torch on the way) to list all estimators, 2-4 s in every
    process that loads a model, for a list loopline never relies on: every load passes
    TRUSTED_TYPES instead."""
    import sys

    if "skops.io" in sys.modules:
        return sys.modules["skops.io"]
    import sklearn.utils

    every_estimator = sklearn.utils.all_estimators
    sklearn.utils.all_estimators = lambda *args, **kwargs: []
    try:
        import skops.io
    finally:
        sklearn.utils.all_estimators = every_estimator
    return skops.io


_ID = re.compile(r'(?<="__id__": )\d+|\b\d+(?=\.npy\b)')


def _canonical_zip(data: bytes) -> bytes:
    with zipfile.ZipFile(io.BytesIO(data)) as src:
        schema = src.read("schema.json").decode("utf-8")
        number: dict[str, str] = {}
        for match in _ID.finditer(schema):
            number.setdefault(match.group(), str(len(number) + 1))
        renamed = _ID.sub(lambda m: number[m.group()], schema)
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w") as dst:
            for info in src.infolist():
                stem, dot, ext = info.filename.partition(".")
                name = number.get(stem, stem) + dot + ext
                fixed = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
                fixed.compress_type = info.compress_type
                fixed.external_attr = info.external_attr
                body = renamed.encode("utf-8") if info.filename == "schema.json" else src.read(info.filename)
                dst.writestr(fixed, body)
    return out.getvalue()


@contextmanager
def _without_fit_environment(model: Any) -> Iterator[None]:
    """Set aside, for the dump, what the fit's environment left in the model: the thread
    count of a HistGradientBoosting bin mapper (used while fitting only; None is its default)."""
    steps = model.steps if hasattr(model, "steps") else [(None, model)]
    mappers = [step._bin_mapper for _, step in steps if hasattr(step, "_bin_mapper")]
    kept = [m.n_threads for m in mappers]
    for mapper in mappers:
        mapper.n_threads = None
    try:
        yield
    finally:
        for mapper, threads in zip(mappers, kept, strict=True):
            mapper.n_threads = threads


def dumps_model(model: Any) -> bytes:
    sio = skops_io()
    with _without_fit_environment(model):
        return _canonical_zip(sio.dumps(model))


def loads_model(data: bytes, source: str = "model") -> Any:
    sio = skops_io()
    try:
        needed = set(sio.get_untrusted_types(data=data))
    except (zipfile.BadZipFile, KeyError, ValueError) as err:
        raise LooplineError("model", f"{source} is not a skops model file: {err}") from None
    refused = sorted(needed - TRUSTED_TYPES)
    if refused:
        raise LooplineError(
            "model", f"{source} asks to load types outside loopline's allowlist {refused}; refusing to load it"
        )
    return sio.loads(data, trusted=sorted(needed))


def save_model(model: Any, meta: dict[str, Any], model_dir: str | Path) -> None:
    model_dir = Path(model_dir)
    write_bytes(dumps_model(model), model_dir / MODEL_FILE)
    write_json(meta, model_dir / META_FILE)


def load_model(model_dir: str | Path) -> tuple[Any, dict[str, Any]]:
    model_dir = Path(model_dir)
    path = model_dir / MODEL_FILE
    if not path.is_file():
        raise LooplineError("model", f"{path} does not exist; run the train stage first")
    return loads_model(path.read_bytes(), str(path)), read_json(model_dir / META_FILE)


def model_metadata(
    params: Params, family: str, model: Any, train_rows: pd.DataFrame, hyperparams: dict[str, Any]
) -> dict[str, Any]:
    """What a saved or registered model needs beside its weights: the task, the input
    columns, the naive baseline (to report beside its metrics) and the class labels."""
    from pipelines.core.metrics import naive_baseline

    return {
        "task": params.data.task,
        "target": params.data.target,
        "features": params.features.columns,
        "family": family,
        "hyperparams": hyperparams,
        "baseline": naive_baseline(train_rows[params.data.target], params.data.task),
        "train_rows": len(train_rows),
        "classes": [str(c) for c in getattr(model, "classes_", [])],
    }
