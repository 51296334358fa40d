"""split: train / validation / test, in time order when the data has one.

With `split.order_by` the rows are sorted (stable) by those keys and cut so that training
rows are all earlier than validation rows, which are earlier than test rows: no future
leaks into training. Without it, a seeded shuffle, stratified for classification.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from sklearn.model_selection import train_test_split

from pipelines.core.config import Params, SplitConfig
from pipelines.core.errors import LooplineError
from pipelines.core.layout import Layout
from pipelines.core.storage import atomic_folder, require_input, write_parquet
from pipelines.data.parts import PART, PLACE, cluster, parts_of, run_tasks

STAGE = "split"
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Splits:
    train: pd.DataFrame
    val: pd.DataFrame
    test: pd.DataFrame


def split_sizes(n: int, cfg: SplitConfig) -> tuple[int, int, int]:
    """Rows of train, val and test for a table of `n` rows."""
    n_test = int(round(n * cfg.test_fraction))
    n_val = int(round(n * cfg.val_fraction))
    if min(n_test, n_val, n - n_test - n_val) < 1:
        raise LooplineError(
            STAGE,
            f"{n} rows are too few to split into train/val/test with "
            f"val_fraction={cfg.val_fraction}, test_fraction={cfg.test_fraction}",
        )
    return n - n_val - n_test, n_val, n_test


def split_plan(
    n: int, cfg: SplitConfig, keys: pd.DataFrame | None, labels: pd.Series | None
) -> tuple[np.ndarray, np.ndarray]:
    """Where each of `n` rows (in table order) goes: its split (0 train, 1 val, 2 test) and
    its place in that split. With split.order_by, `keys` (those columns) rank the rows, ties
    in table order, and train takes the earliest; without, a seeded shuffle picks them
    (stratified by `labels` when given) and each split keeps table order. Both engines split
    by this plan: the pandas engine on its one table, the Dask engine partition by partition."""
    n_train, n_val, _ = split_sizes(n, cfg)
    if cfg.order_by:
        assert keys is not None
        rank = np.empty(n, dtype=np.int64)
        rank[np.lexsort([_sort_key(keys[c]) for c in reversed(cfg.order_by)])] = np.arange(n)
        split = np.where(rank < n_train, 0, np.where(rank < n_train + n_val, 1, 2)).astype(np.int8)
        return split, rank - np.array([0, n_train, n_train + n_val])[split]
    index = np.arange(n)
    try:
        rest, test = train_test_split(index, test_size=n - n_train - n_val, random_state=cfg.seed, stratify=labels)
        rest_labels = labels.iloc[rest] if labels is not None else None
        train, val = train_test_split(rest, test_size=n_val, random_state=cfg.seed, stratify=rest_labels)
    except ValueError as err:  # e.g. a class with a single row cannot be stratified
        on = f"{labels.name!r}" if labels is not None else "the rows"
        raise LooplineError(STAGE, f"cannot make a stratified split on {on}: {err}") from None
    split = np.zeros(n, dtype=np.int8)
    split[val], split[test] = 1, 2
    place = np.empty(n, dtype=np.int64)
    for s in range(3):
        members = np.flatnonzero(split == s)
        place[members] = np.arange(len(members))
    return split, place


def _sort_key(column: pd.Series) -> np.ndarray:
    """A column as numbers that sort as pandas sorts it: categories in their order, missing last."""
    if isinstance(column.dtype, pd.CategoricalDtype):
        codes = column.cat.codes.to_numpy().astype("float64")
        codes[codes < 0] = np.nan
        return codes
    return column.to_numpy(dtype="float64", na_value=np.nan)


def take_split(df: pd.DataFrame, split: np.ndarray, place: np.ndarray, which: int) -> pd.DataFrame:
    """The rows of `df` that the plan sends to split `which`, in their place's order."""
    members = np.flatnonzero(split == which)
    return df.iloc[members[np.argsort(place[members], kind="stable")]].reset_index(drop=True)


def split_rows(df: pd.DataFrame, cfg: SplitConfig, target: str, stratify: bool) -> Splits:
    keys = df[cfg.order_by] if cfg.order_by else None
    split, place = split_plan(len(df), cfg, keys, df[target] if stratify and not cfg.order_by else None)
    return Splits(*(take_split(df, split, place, which) for which in range(3)))


def training_sample(rows: pd.DataFrame, params: Params) -> tuple[pd.DataFrame, str | None]:
    """The training rows a model fits on: every row, or a seeded sample of `train.sample_rows`
    of them (in their order) when there are more; and what was sampled (None: nothing)."""
    limit, seed = params.train.sample_rows, params.train.seed
    if not limit or len(rows) <= limit:
        return rows, None
    keep = np.sort(np.random.default_rng(seed).choice(len(rows), size=limit, replace=False))
    note = f"{limit} of {len(rows)} training rows (train.sample_rows, seed {seed})"
    return rows.iloc[keep].reset_index(drop=True), note


def training_rows(params: Params, stage: str = "train") -> tuple[pd.DataFrame, str | None]:
    """`training_sample` of the training split, read as such: from a split in partitions
    (execution.data: dask) only the sampled rows are read, never the whole split in one frame."""
    import pyarrow.dataset as ds

    path = Layout.of(params).split_file("train")
    limit, seed = params.train.sample_rows, params.train.seed
    if not path.is_dir() or not limit:
        return training_sample(read_split(params, "train", stage), params)
    dataset = ds.dataset(parts_of(require_input(path, stage)), format="parquet")
    n = dataset.count_rows()
    if n <= limit:
        return dataset.to_table().to_pandas(), None
    keep = np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))  # as training_sample picks
    note = f"{limit} of {n} training rows (train.sample_rows, seed {seed})"
    return dataset.take(pa.array(keep)).to_pandas(), note


def read_split(params: Params, name: str, stage: str = "train") -> pd.DataFrame:
    """One of the train / val / test splits the split stage wrote, as a DataFrame."""
    from pipelines.core.layout import Layout
    from pipelines.core.storage import read_input

    return read_input(Layout.of(params).split_file(name), stage)


# --- the stage a partition at a time (execution.data: dask; pipelines/data/parts.py) ----------


def split_partitioned(params: Params) -> dict[str, Any]:
    from pipelines.data.split import SPLITS, split_plan

    layout = Layout.of(params)
    parts = parts_of(require_input(layout.clean, "split"))
    cfg, target = params.split, params.data.target
    stratify = params.data.task == "classification" and not cfg.order_by
    columns = list(cfg.order_by) or ([target] if stratify else [])
    layout.split_file("train").parent.mkdir(parents=True, exist_ok=True)
    with (
        cluster(params) as client,
        tempfile.TemporaryDirectory(prefix=".split-", dir=layout.split_file("train").parent) as scratch,
    ):
        keys = run_tasks(client, _split_keys, [(p, columns) for p in parts], "split", params)
        n = sum(len(k) for k in keys)
        table_keys = pd.concat(keys, ignore_index=True)
        which, place = split_plan(
            n, cfg, table_keys if cfg.order_by else None, table_keys[target] if stratify else None
        )
        sizes = [int((which == s).sum()) for s in range(len(SPLITS))]
        per_part = max(1, math.ceil(n / len(parts)))  # rows in each output part, as many parts as in
        bounds = np.cumsum([0, *(len(k) for k in keys)])
        calls = [
            (p, which[lo:hi], place[lo:hi], per_part, Path(scratch), i)
            for i, (p, lo, hi) in enumerate(zip(parts, bounds[:-1], bounds[1:], strict=True))
        ]
        run_tasks(client, _scatter_part, calls, "split", params)
        with contextlib.ExitStack() as outputs:  # the three splits take their places together
            folders = [outputs.enter_context(atomic_folder(layout.split_file(name))) for name in SPLITS]
            gather = [
                (Path(scratch) / str(s) / str(j), folders[s] / PART.format(j))
                for s in range(len(SPLITS))
                for j in range(math.ceil(sizes[s] / per_part))
            ]
            run_tasks(client, _gather_part, gather, "split", params)
    return dict(zip(SPLITS, sizes, strict=True))


def _split_keys(part: Path, columns: list[str]) -> pd.DataFrame:
    """What the split plan needs of a partition: its key columns (or none: its length)."""
    table = pq.read_table(part, columns=columns)
    return table.to_pandas() if columns else pd.DataFrame(index=range(table.num_rows))


def _scatter_part(part: Path, which: np.ndarray, place: np.ndarray, per_part: int, scratch: Path, index: int) -> None:
    """A partition's rows, each to the output part of its split and place (as pieces the
    output parts gather), with its place to sort by there."""
    rows = pq.read_table(part).append_column(PLACE, pa.array(place))
    target = which.astype(np.int64) * (1 << 40) + place // per_part  # split and output part, as one key
    for key in np.unique(target):
        s, j = divmod(int(key), 1 << 40)
        piece = scratch / str(s) / str(j) / PART.format(index)
        piece.parent.mkdir(parents=True, exist_ok=True)
        write_parquet(rows.filter(pa.array(target == key)), piece)


def _gather_part(pieces: Path, out: Path) -> None:
    """An output part from its pieces, in place order."""
    rows = pa.concat_tables([pq.read_table(p) for p in sorted(pieces.glob("part-*.parquet"))])
    order = pc.sort_indices(rows.column(PLACE))
    write_parquet(rows.take(order).drop_columns([PLACE]), out)
