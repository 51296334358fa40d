"""split: train / validation / test, in time order when the data has one.

With `split.order_by` the rows are sorted (stable) by those keys and cut so that training
rows are all earlier than validation rows, which are earlier than test rows: no future
leaks into training. Without it, a seeded shuffle, stratified for classification.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from pipelines.core.config import Params, SplitConfig
from pipelines.core.errors import LooplineError

STAGE = "split"
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Splits:
    train: pd.DataFrame
    val: pd.DataFrame
    test: pd.DataFrame


def split_rows(df: pd.DataFrame, cfg: SplitConfig, target: str, stratify: bool) -> Splits:
    n = len(df)
    n_test = int(round(n * cfg.test_fraction))
    n_val = int(round(n * cfg.val_fraction))
    if min(n_test, n_val, n - n_test - n_val) < 1:
        raise LooplineError(
            STAGE,
            f"{n} rows are too few to split into train/val/test with "
            f"val_fraction={cfg.val_fraction}, test_fraction={cfg.test_fraction}",
        )
    if cfg.order_by:
        ordered = df.sort_values(cfg.order_by, kind="stable").reset_index(drop=True)
        n_train = n - n_val - n_test
        return Splits(
            train=ordered.iloc[:n_train].reset_index(drop=True),
            val=ordered.iloc[n_train : n_train + n_val].reset_index(drop=True),
            test=ordered.iloc[n_train + n_val :].reset_index(drop=True),
        )
    labels = df[target] if stratify else None
    index = np.arange(n)
    try:
        rest, test = train_test_split(index, test_size=n_test, random_state=cfg.seed, stratify=labels)
        rest_labels = labels.iloc[rest] if labels is not None else None
        train, val = train_test_split(rest, test_size=n_val, random_state=cfg.seed, stratify=rest_labels)
    except ValueError as err:  # e.g. a class with a single row cannot be stratified
        raise LooplineError(STAGE, f"cannot make a stratified split on {target!r}: {err}") from None
    return Splits(*(df.iloc[np.sort(i)].reset_index(drop=True) for i in (train, val, test)))


def training_sample(rows: pd.DataFrame, params: Params) -> tuple[pd.DataFrame, str | None]:
    """The training rows a model fits on: every row, or a seeded sample of `train.sample_rows`
    of them (in their order) when there are more; and what was sampled (None: nothing)."""
    limit, seed = params.train.sample_rows, params.train.seed
    if not limit or len(rows) <= limit:
        return rows, None
    keep = np.sort(np.random.default_rng(seed).choice(len(rows), size=limit, replace=False))
    note = f"{limit} of {len(rows)} training rows (train.sample_rows, seed {seed})"
    return rows.iloc[keep].reset_index(drop=True), note


def read_split(params: Params, name: str, stage: str = "train") -> pd.DataFrame:
    """One of the train / val / test splits the split stage wrote, as a DataFrame."""
    from pipelines.core.layout import Layout
    from pipelines.core.storage import read_input

    return read_input(Layout.of(params).split_file(name), stage)
