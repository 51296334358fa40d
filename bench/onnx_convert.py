"""Model -> ONNX conversion time per family, loopline's converter against skl2onnx's own, side
by side in one run, with the parity check's worst gap on the reference rows.

Each family is fitted with params.yaml's hyperparameters (its defaults for the other task) on the first 70% of the bundled
Bikeshare hours (as a training's split), for regression and for a three-class version of
the target. Forests are converted twice: by skl2onnx's per-node converter (as loopline did
before, which then put the thresholds back at float64) and by loopline's
(pipelines/model/onnx_forest.py); the other families have one converter.

    python bench/onnx_convert.py [--params params.yaml] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default=str(REPO / "params.yaml"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--families", nargs="+", default=["random_forest", "hist_gradient_boosting", "linear"])
    args = parser.parse_args()

    from skl2onnx.common._registration import _converter_pool
    from sklearn.pipeline import Pipeline

    from pipelines.core.config import load_params
    from pipelines.data.clean import clean_rows
    from pipelines.data.ingest import read_source
    from pipelines.model import onnx_forest
    from pipelines.model.estimators import build_estimator
    from pipelines.model.features import build_preprocessor
    from pipelines.model.onnx_engine import OnnxEngine, convert, parity, string_columns

    skl2onnx_own = {alias: _converter_pool[alias] for alias in (onnx_forest.REGRESSOR, onnx_forest.CLASSIFIER)}
    onnx_forest.register()
    loopline_own = {alias: _converter_pool[alias] for alias in skl2onnx_own}

    base = load_params(args.params)
    table = read_source(base.data.source, base.table_schema, base.data).rows
    frame = clean_rows(table, base.table_schema, base.data, base.clean).rows.to_pandas()
    frame = frame.iloc[: int(len(frame) * 0.7)].reset_index(drop=True)
    features = base.features.columns
    reference = frame[features].sample(1000, random_state=0).reset_index(drop=True)
    demand = frame[base.data.target].to_numpy()
    targets = {
        "regression": demand,
        "classification": np.where(demand > 150, "high", np.where(demand > 40, "mid", "low")),
    }
    print(f"{len(frame)} training rows, {len(reference)} reference rows, best of {args.repeats}")
    print(f"{'family':<24}{'task':<16}{'converter':<10}{'nodes':>9}{'seconds':>9}  parity")
    for family in args.families:
        for task, y in targets.items():
            params = base.model_copy(update={"data": base.data.model_copy(update={"task": task})})
            hyperparams = base.train.hyperparams.get(family, {}) if task == base.data.task else {}
            estimator = build_estimator(family, task, hyperparams, base.train.seed)
            model = Pipeline(
                [("features", build_preprocessor(params.features, params.table_schema)), ("model", estimator)]
            ).fit(frame[features], y)
            trees = getattr(model[-1], "estimators_", None)
            nodes = sum(e.tree_.node_count for e in trees) if trees is not None else 0
            converters = {"skl2onnx": skl2onnx_own, "loopline": loopline_own} if trees is not None else {"-": {}}
            seconds: dict[str, float] = {}
            for name, pool in converters.items():
                _converter_pool.update(pool)
                times = []
                for _ in range(args.repeats):
                    started = time.perf_counter()
                    data = convert(model, features, string_columns(params), task)
                    times.append(time.perf_counter() - started)
                seconds[name] = min(times)
                if name == "skl2onnx":  # its float32 thresholds: loopline put them back at float64 after it
                    shown = "not checked (thresholds left at float32)"
                else:
                    classes = [str(c) for c in getattr(model, "classes_", [])]
                    engine = OnnxEngine(data, features, string_columns(params))
                    checked = parity(engine, model, reference, task, classes)
                    shown = f"{'ok' if checked.ok else 'FAILS'}: {checked.detail.rsplit('; ', 1)[-1].rstrip(')')}"
                print(f"{family:<24}{task:<16}{name:<10}{nodes:>9,}{seconds[name]:>9.2f}  {shown}", flush=True)
            _converter_pool.update(loopline_own)
            if len(seconds) == 2:
                print(f"{'':<40}skl2onnx/loopline = {seconds['skl2onnx'] / seconds['loopline']:.1f}x")


if __name__ == "__main__":
    main()
