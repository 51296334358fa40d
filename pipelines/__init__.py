"""loopline's domain, in six parts, each importing only the parts below it:

    training     the candidate search, where its fits run, the training run, DDP
    monitoring   drift, labels, the policy, the monitoring run, estimates, the dashboard, the prediction log
    registry     the MLflow store, champion and challenger, promotion evidence, lineage, reproduce, model cards
    model        features, estimators, the PyTorch MLP, model files, the ONNX form, evaluation
    data         ingest, clean, the schema's rules, validation, split, arriving batches
    core         params, errors, the data catalog, names, storage, metrics, fingerprints, processes, ...

Stored models name their classes by module path. Versions logged before these parts existed
name the flat layout's modules (pipelines.features, pipelines.torch_model, ...): those names
still import, as aliases of the modules that hold the classes now, so old models keep loading.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

# Modules of the flat layout whose classes stored artifacts name: skops models
# (CyclicalEncoder, the PyTorch MLP) and the pickled performance estimator.
MOVED = {
    "pipelines.features": "pipelines.model.features",
    "pipelines.torch_model": "pipelines.model.torch_model",
    "pipelines.estimate": "pipelines.monitoring.estimate",
}


class _OldPaths(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports an old module path as a module holding the same objects as the new one (the
    same classes, so isinstance checks hold)."""

    def find_spec(self, fullname, path, target=None):
        return importlib.util.spec_from_loader(fullname, self) if fullname in MOVED else None

    def exec_module(self, module) -> None:
        moved = importlib.import_module(MOVED[module.__name__])
        module.__dict__.update({k: v for k, v in vars(moved).items() if not k.startswith("__")})


if not any(isinstance(finder, _OldPaths) for finder in sys.meta_path):
    sys.meta_path.append(_OldPaths())
