"""Candidate search: each configured model family, then seeded Optuna trials over `search.space`.

Candidates are ranked on the validation rows by the promotion metric. Only the best fitted
model is kept in memory; every candidate is reported through `on_candidate`, which the
training flow uses to log a nested MLflow run per candidate.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from pipelines.config import ParamRange, Params
from pipelines.evaluate import naive_baseline, score
from pipelines.train import build_model, fit_model


@dataclass
class Candidate:
    name: str
    family: str
    hyperparams: dict[str, Any]
    val: dict[str, float]
    fit_seconds: float
    model: Any = field(default=None, repr=False)  # kept for the best candidate only


def _suggest(trial, name: str, r: ParamRange) -> Any:
    if r.choices is not None:
        return trial.suggest_categorical(name, r.choices)
    assert r.low is not None and r.high is not None  # ParamRange's check: low/high or choices
    integer = r.integer if r.integer is not None else float(r.low).is_integer() and float(r.high).is_integer()
    if integer:
        return trial.suggest_int(name, int(r.low), int(r.high), log=r.log)
    return trial.suggest_float(name, float(r.low), float(r.high), log=r.log)


def search_candidates(
    params: Params, train: pd.DataFrame, val: pd.DataFrame, on_candidate: Callable[[Candidate], None] = lambda c: None
) -> tuple[Candidate, list[Candidate]]:
    """Train every candidate; return the best one (with its model) and all of them."""
    metric, higher = params.metric
    baseline = naive_baseline(train[params.data.target], params.data.task)
    candidates: list[Candidate] = []
    best: Candidate | None = None

    def better(a: float, b: float) -> bool:
        return a > b if higher else a < b

    def run(name: str, family: str, hyperparams: dict[str, Any]) -> Candidate:
        nonlocal best
        started = time.perf_counter()
        model = fit_model(build_model(params, family, hyperparams), train, params)
        seconds = time.perf_counter() - started
        val_metrics, _ = score(model, val, params.features.columns, params.data.target, params.data.task, baseline)
        candidate = Candidate(name, family, hyperparams, val_metrics, seconds, model)
        on_candidate(candidate)
        candidates.append(candidate)
        if best is None or better(val_metrics[metric], best.val[metric]):
            if best is not None:
                best.model = None
            best = candidate
        else:
            candidate.model = None
        return candidate

    from pipelines.threads import training_slot

    with training_slot():  # counted as one training for the whole search, not per fit
        _search(params, run)
    assert best is not None  # SearchConfig guarantees at least one candidate
    return best, candidates


def _search(params: Params, run: Callable[[str, str, dict[str, Any]], Candidate]) -> None:
    metric, higher = params.metric
    for family in params.search.families:
        run(family, family, dict(params.train.hyperparams.get(family, {})))

    if params.search.n_trials:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        space = params.search.space
        study = optuna.create_study(
            direction="maximize" if higher else "minimize", sampler=optuna.samplers.TPESampler(seed=params.search.seed)
        )

        def objective(trial) -> float:
            family = trial.suggest_categorical("family", sorted(space))
            hyperparams = dict(params.train.hyperparams.get(family, {}))
            for key, r in space[family].items():
                hyperparams[key] = _suggest(trial, f"{family}.{key}", r)
            return run(f"trial-{trial.number}", family, hyperparams).val[metric]

        study.optimize(objective, n_trials=params.search.n_trials)
