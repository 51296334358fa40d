"""Candidate search: each configured model family, then seeded Optuna trials over `search.space`.

Candidates are ranked on the validation rows by the promotion metric. Only the best fitted
model is kept in memory; every candidate is reported through `on_candidate`, which the
training run uses to log a nested MLflow run per candidate and to show progress. This
module and what it imports are the code a fitted model depends on (the training
fingerprint): what logs, shows or alerts stays with the caller.

The fits run where `execution:` says (pipelines/training/runners.py), a round at a time: the first
round holds every family and Optuna's start-up trials (sampled from the seed alone, so they
need no earlier result), each later round `search.trials_per_round` trials. Results are told
to the study in trial order, so a round's outcome never depends on which worker finished
first: the same params give the same candidates on any runner.

With `search.storage` the study outlives the process: each finished candidate is stored
with what it scored, and a search started again on the same splits, code and params (the
same study name) keeps them and runs only the rest. The restored best model is fitted again
(its seed makes it the same model).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd

from pipelines.core.config import ParamRange, Params
from pipelines.core.metrics import naive_baseline
from pipelines.training.runners import Fit, Fitted

STARTUP_TRIALS = 10  # TPE samples this many trials at random (from the seed) before modelling results
ATTR = "loopline"  # the user attribute a stored trial keeps its candidate in


@dataclass
class Candidate:
    name: str
    family: str
    hyperparams: dict[str, Any]
    val: dict[str, float]
    fit_seconds: float
    worker: str = ""
    restored: bool = False  # finished by an earlier search of the same stored study
    model: Any = field(default=None, repr=False)  # kept for the best candidate only

    def stored(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in ("model", "restored")}


def _suggest(trial, name: str, r: ParamRange) -> Any:
    if r.choices is not None:
        return trial.suggest_categorical(name, r.choices)
    assert r.low is not None and r.high is not None  # ParamRange's check: low/high or choices
    integer = r.integer if r.integer is not None else float(r.low).is_integer() and float(r.high).is_integer()
    if integer:
        return trial.suggest_int(name, int(r.low), int(r.high), log=r.log)
    return trial.suggest_float(name, float(r.low), float(r.high), log=r.log)


def search_candidates(
    params: Params,
    train: pd.DataFrame,
    val: pd.DataFrame,
    on_candidate: Callable[[Candidate], None] = lambda c: None,
    study_name: str | None = None,
    warn: Callable[[str], Any] = print,
) -> tuple[Candidate, list[Candidate]]:
    """Train every candidate; return the best one (with its model) and all of them. The
    study is kept in search.storage under `study_name` when both are given (the training
    flow names it after the training fingerprint); else in memory, as a back-test's
    trainings on other data with the same params need."""
    from pipelines.training.runners import runner_for

    metric, higher = params.metric
    baseline = naive_baseline(train[params.data.target], params.data.task)
    candidates: list[Candidate] = []
    best: Candidate | None = None

    def record(candidate: Candidate) -> None:
        nonlocal best
        on_candidate(candidate)
        candidates.append(candidate)
        value = candidate.val[metric]
        if best is None or (value > best.val[metric] if higher else value < best.val[metric]):
            if best is not None:
                best.model = None
            best = candidate
        else:
            candidate.model = None

    with runner_for(params, train, val, baseline) as runner:
        _search(params, runner.map, record, study_name, warn)
    assert best is not None  # SearchConfig guarantees at least one candidate
    if best.model is None:  # restored from the stored study: fit it again, from its seed
        from pipelines.training.runners import fit_and_score

        best.model = fit_and_score(params, Fit(best.name, best.family, best.hyperparams), train, val, baseline).model
    return best, candidates


def _search(
    params: Params,
    fit: Callable[[list[Fit]], Iterator[Fitted]],
    record: Callable[[Candidate], None],
    study_name: str | None,
    warn: Callable[[str], Any],
) -> None:
    stored_study = bool(params.search.storage and study_name)
    study = _study(params, study_name, stored_study, warn) if (params.search.n_trials or stored_study) else None
    stored = study.user_attrs if study is not None else {}
    families: list[Fit] = []
    for family in params.search.families:
        if f"family:{family}" not in stored:
            families.append(Fit(family, family, dict(params.train.hyperparams.get(family, {}))))
    done = {c.name: c for c in _restored(study)}

    def report(fits: list[Fit], results: Iterator[Fitted]) -> Iterator[Candidate]:
        for unit, result in zip(fits, results, strict=False):
            yield Candidate(
                unit.name, unit.family, unit.hyperparams, result.val, result.seconds, result.worker, model=result.model
            )

    trials = _ask(params, study) if study is not None else []
    fresh = report([*families, *(f for _, f in trials)], fit([*families, *(f for _, f in trials)]))
    try:
        for family in params.search.families:  # in params order, restored or new
            candidate = _restored_family(stored, family) or next(fresh)
            record(candidate)
            if study is not None and not candidate.restored:
                study.set_user_attr(f"family:{family}", candidate.stored())
        for c in sorted(done.values(), key=lambda c: int(c.name.split("-")[1])):
            record(c)
        while trials:
            assert study is not None
            for (trial, _), candidate in zip(trials, fresh, strict=True):
                record(candidate)
                _tell(study, trial, candidate, params.metric[0], warn)
            trials = _ask(params, study)
            fresh = report([f for _, f in trials], fit([f for _, f in trials]))
    except BaseException:
        if study is not None:  # a stored study must not keep this search's trials running forever
            from optuna.trial import TrialState

            for trial, _ in trials:
                study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
        raise


def _tell(study, trial, candidate: Candidate, metric: str, warn: Callable[[str], Any]) -> None:
    """Store a finished trial; one another search of the study marked failed (it found it
    running and took its place) stays theirs, and this search goes on."""
    from optuna.exceptions import UpdateFinishedTrialError

    try:
        trial.set_user_attr(ATTR, candidate.stored())
        study.tell(trial, candidate.val[metric])
    except UpdateFinishedTrialError:
        warn(
            f"search.storage: trial {trial.number} of study {study.study_name} was finished by another search "
            "of the same study meanwhile; its result is kept by this search only"
        )


def _study(params: Params, name: str | None, stored: bool, warn: Callable[[str], Any]):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    _, higher = params.metric
    storage = _storage(params.search.storage) if stored else None
    existing = 0
    if storage is not None:
        try:
            existing = len(optuna.load_study(study_name=name, storage=storage).trials)
        except KeyError:
            existing = 0
    # A resumed study draws on from where the stored trials left off, not from the seed again.
    sampler = optuna.samplers.TPESampler(seed=params.search.seed + existing, n_startup_trials=STARTUP_TRIALS)
    study = optuna.create_study(
        study_name=name,
        storage=storage,
        sampler=sampler,
        direction="maximize" if higher else "minimize",
        load_if_exists=True,
    )
    stale = _fail_running(study)
    if stale:
        warn(
            f"search.storage: trials {stale} of study {name} were left running by a search that stopped; marked failed"
        )
    return study


def _storage(spec: str):
    """None (in memory), an SQLAlchemy URL as it is, or a journal file at a path."""
    if not spec:
        return None
    if "://" in spec:
        return spec
    from pathlib import Path

    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    Path(spec).parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(spec))


def _fail_running(study) -> list[int]:
    from optuna.trial import TrialState

    running = [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING))]
    for number in running:
        study.tell(number, state=TrialState.FAIL, skip_if_finished=True)
    return running


def _restored(study) -> list[Candidate]:
    if study is None:
        return []
    from optuna.trial import TrialState

    return [
        Candidate(**t.user_attrs[ATTR], restored=True)
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if ATTR in t.user_attrs
    ]


def _restored_family(stored: dict[str, Any], family: str) -> Candidate | None:
    attrs = stored.get(f"family:{family}")
    return Candidate(**attrs, restored=True) if attrs else None


def _ask(params: Params, study) -> list[tuple[Any, Fit]]:
    """The next round's trials, asked and sampled in trial order: every start-up trial still
    to come at once (TPE draws them from its seed alone), then `trials_per_round`."""
    from optuna.trial import TrialState

    finished = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    remaining = params.search.n_trials - finished
    if remaining <= 0:
        return []
    size = STARTUP_TRIALS - finished if finished < STARTUP_TRIALS else params.search.trials_per_round
    space = params.search.space
    round_: list[tuple[Any, Fit]] = []
    for _ in range(min(size, remaining)):
        trial = study.ask()
        family = trial.suggest_categorical("family", sorted(space))
        hyperparams = dict(params.train.hyperparams.get(family, {}))
        for key, r in space[family].items():
            hyperparams[key] = _suggest(trial, f"{family}.{key}", r)
        round_.append((trial, Fit(f"trial-{trial.number}", family, hyperparams)))
    return round_
