"""Compiled inference: the whole fitted pipeline (feature transform and estimator) as one
ONNX graph, run by ONNX Runtime.

`compile_model` converts a model once per model version, when training logs the best
candidate: `model.onnx` and the reference rows it was checked on go into the MLflow model's
directory, and `loopline package` copies both into the Bento, so nothing converts at start
or per request. Every family converts: the scikit-learn ones through skl2onnx (with
converters written here for loopline's `CyclicalEncoder` and for a float64 `SimpleImputer`),
and the PyTorch MLP through `torch.onnx`, joined to the converted feature transform.
Numeric inputs stay float64 and tree thresholds are put back at float64, so a value sitting
on a threshold goes the way the fitted model sends it.

`OnnxEngine` runs the graph with an explicit thread budget (one intra-op thread by default)
on plain numpy columns: a request needs no DataFrame. `parity` compares it with the Python
model on the reference rows; the service serves ONNX only when they agree.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# Predictions of the compiled graph must match the Python model's within this: regression
# |onnx - python| <= ATOL + RTOL * |python|; classification: the same labels, probabilities
# within PROBA_ATOL. (Thresholds are float64, leaf values float32: errors are ~1e-6 relative.)
RTOL = 1e-4
ATOL = 1e-4
PROBA_ATOL = 1e-4
OPSET = 18
ML_OPSET = 3

PROBABILITIES = "probabilities"
VARIABLE = "variable"


class ConversionError(Exception):
    """The model has no ONNX form (the message says which part and why)."""


def _int_missing_flags() -> None:
    """skl2onnx 1.20 passes HistGradientBoosting's per-node "missing goes left" flags to
    onnx as numpy booleans, which protobuf 7 refuses in an integer list ("Expected an int,
    got a boolean"). Its tree helper is wrapped to hand them over as ints."""
    import skl2onnx.common.tree_ensemble as trees

    if getattr(trees.add_node, "loopline", False):
        return
    add_node = trees.add_node

    def add_node_with_int_flags(*args, nodes_missing_value_tracks_true=0, **kwargs):
        return add_node(*args, nodes_missing_value_tracks_true=int(nodes_missing_value_tracks_true), **kwargs)

    add_node_with_int_flags.loopline = True  # type: ignore[attr-defined]
    trees.add_node = add_node_with_int_flags


def _register_double_imputer() -> None:
    """skl2onnx writes SimpleImputer as ai.onnx.ml's Imputer, which ONNX Runtime runs on
    float32 only. loopline's graphs are float64 (see `convert`), so its imputers become
    "where the value is NaN, the fitted statistic" in standard ops."""
    from skl2onnx import update_registered_converter
    from skl2onnx.algebra.onnx_ops import OnnxIsNaN, OnnxWhere
    from sklearn.impute import SimpleImputer

    def shape(operator) -> None:
        operator.outputs[0].type = operator.inputs[0].type.__class__(
            [operator.inputs[0].get_first_dimension(), len(operator.raw_operator.statistics_)]
        )

    def convert(scope, operator, container) -> None:
        imputer = operator.raw_operator
        if imputer.add_indicator or not (
            isinstance(imputer.missing_values, float) and np.isnan(imputer.missing_values)
        ):
            raise ConversionError("SimpleImputer: only NaN as the missing value, without indicator columns")
        [x] = operator.inputs
        opv = container.target_opset
        fill = np.asarray(imputer.statistics_, dtype="float64").reshape(1, -1)
        OnnxWhere(OnnxIsNaN(x, op_version=opv), fill, x, op_version=opv, output_names=operator.outputs[:1]).add_to(
            scope, container
        )

    update_registered_converter(SimpleImputer, "SklearnImputer", shape, convert, overwrite=True)


def _register_cyclical() -> None:
    from onnx import TensorProto
    from skl2onnx import update_registered_converter
    from skl2onnx.algebra.onnx_ops import (
        OnnxCast,
        OnnxConcat,
        OnnxCos,
        OnnxDiv,
        OnnxIsNaN,
        OnnxLabelEncoder,
        OnnxMul,
        OnnxRound,
        OnnxSin,
        OnnxWhere,
    )
    from skl2onnx.common.data_types import DoubleTensorType

    from pipelines.model.features import DECIMALS, CyclicalEncoder

    def shape(operator) -> None:
        n = operator.inputs[0].get_first_dimension()
        columns = sum(i.get_second_dimension() or 1 for i in operator.inputs)
        operator.outputs[0].type = DoubleTensorType([n, 2 * columns])

    def convert(scope, operator, container) -> None:
        encoder = operator.raw_operator
        opv = container.target_opset
        [x] = operator.inputs
        if encoder.categories is not None:
            position = OnnxLabelEncoder(
                x,
                keys_strings=[str(c) for c in encoder.categories],
                values_floats=[float(i) for i in range(len(encoder.categories))],
                default_float=float("nan"),
                op_version=ML_OPSET,
            )
            position = OnnxCast(position, to=TensorProto.DOUBLE, op_version=opv)
        else:
            position = OnnxCast(x, to=TensorProto.DOUBLE, op_version=opv)
        angle = OnnxMul(position, np.array([2.0 * np.pi / encoder.period]), op_version=opv)
        both = OnnxConcat(OnnxSin(angle, op_version=opv), OnnxCos(angle, op_version=opv), axis=1, op_version=opv)
        scale = np.array([10.0**DECIMALS])  # np.round(x, d) is rint(x * 10**d) / 10**d; Round is rint
        both = OnnxDiv(OnnxRound(OnnxMul(both, scale, op_version=opv), op_version=opv), scale, op_version=opv)
        out = OnnxWhere(
            OnnxIsNaN(both, op_version=opv), np.array([0.0]), both, op_version=opv, output_names=operator.outputs[:1]
        )
        out.add_to(scope, container)

    update_registered_converter(CyclicalEncoder, "LooplineCyclicalEncoder", shape, convert, overwrite=True)


def _torch_graph(estimator, n_in: int):
    """The MLP's module as ONNX (torch.onnx), input `features` float32 [N, n_in]."""
    import tempfile
    from pathlib import Path

    import onnx
    import torch

    from pipelines.model.torch_model import build_module

    module = build_module(n_in, list(estimator.hidden_sizes), estimator.dropout, estimator.n_outputs_)
    module.load_state_dict(estimator.state_dict())
    module.eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mlp.onnx"
        torch.onnx.export(
            module,
            (torch.zeros(2, n_in),),
            str(path),
            input_names=["features"],
            output_names=["raw"],
            dynamic_axes={"features": {0: "n"}, "raw": {0: "n"}},
            opset_version=OPSET,
            dynamo=False,  # the TorchScript exporter: a plain MLP needs nothing more, and no onnxscript
        )
        return onnx.load(str(path))


def _with_torch_head(prep, estimator, task: str):
    """The converted feature transform joined to the MLP, with its output transform:
    target scaling for regression, softmax for classification."""
    import onnx
    from onnx import TensorProto, helper

    prep = onnx.compose.add_prefix(prep, "prep_", rename_inputs=False)
    [transformed] = [o.name for o in prep.graph.output]
    n_in = int(estimator.n_features_in_)
    mlp = onnx.compose.add_prefix(_torch_graph(estimator, n_in), "mlp_")
    # the feature transform gives float64: the MLP takes float32
    cast = helper.make_node("Cast", [transformed], ["mlp_features_in"], to=TensorProto.FLOAT)
    prep.graph.node.append(cast)
    del prep.graph.output[:]
    prep.graph.output.append(helper.make_tensor_value_info("mlp_features_in", TensorProto.FLOAT, [None, n_in]))
    del mlp.opset_import[:]
    mlp.opset_import.append(helper.make_opsetid("", OPSET))
    mlp.ir_version = prep.ir_version
    joined = onnx.compose.merge_models(prep, mlp, io_map=[("mlp_features_in", "mlp_features")])
    graph = joined.graph
    raw = graph.output[0].name
    nodes = [helper.make_node("Cast", [raw], ["raw64"], to=TensorProto.DOUBLE)]
    if task == "regression":
        graph.initializer.extend(
            [
                helper.make_tensor("y_scale", TensorProto.DOUBLE, [], [float(estimator.y_scale_)]),
                helper.make_tensor("y_mean", TensorProto.DOUBLE, [], [float(estimator.y_mean_)]),
            ]
        )
        nodes += [
            helper.make_node("Mul", ["raw64", "y_scale"], ["scaled"]),
            helper.make_node("Add", ["scaled", "y_mean"], [VARIABLE]),
        ]
        out = helper.make_tensor_value_info(VARIABLE, TensorProto.DOUBLE, [None, 1])
    else:
        nodes.append(helper.make_node("Softmax", ["raw64"], [PROBABILITIES], axis=1))
        out = helper.make_tensor_value_info(PROBABILITIES, TensorProto.DOUBLE, [None, len(estimator.classes_)])
    graph.node.extend(nodes)
    del graph.output[:]
    graph.output.append(out)
    onnx.checker.check_model(joined)
    return joined


def _register_xgboost() -> None:
    """XGBoost's estimators (pipelines/model/boosting.py) through onnxmltools' converter, inside
    skl2onnx's graph of the whole pipeline."""
    from onnxmltools.convert.xgboost.operator_converters.XGBoost import convert_xgboost
    from skl2onnx import update_registered_converter
    from skl2onnx.common.shape_calculator import (
        calculate_linear_classifier_output_shapes,
        calculate_linear_regressor_output_shapes,
    )

    from pipelines.model.boosting import XGBoostClassifier, XGBoostRegressor

    update_registered_converter(
        XGBoostRegressor, "LooplineXGBoostRegressor", calculate_linear_regressor_output_shapes, convert_xgboost
    )
    update_registered_converter(
        XGBoostClassifier,
        "LooplineXGBoostClassifier",
        calculate_linear_classifier_output_shapes,
        convert_xgboost,
        options={"nocl": [True, False], "zipmap": [True, False, "columns"]},
    )


def _float32_tree_inputs(onx) -> None:
    """XGBoost compares float32 features with float32 thresholds: its ensembles' input is cast
    to float32 first, so a float64 value that rounds onto a threshold goes where XGBoost
    sends it (a float64 comparison would send it the other way)."""
    from onnx import TensorProto, helper

    graph = onx.graph
    casts = []
    for node in graph.node:
        if node.domain == "ai.onnx.ml" and node.op_type in ("TreeEnsembleRegressor", "TreeEnsembleClassifier"):
            source = node.input[0]
            node.input[0] = f"{source}_float32_for_{node.name}"
            casts.append((node.name, helper.make_node("Cast", [source], [node.input[0]], to=TensorProto.FLOAT)))
    for name, cast in casts:
        position = next(i for i, n in enumerate(graph.node) if n.name == name)
        graph.node.insert(position, cast)


def _tree_outputs_as_double(onx) -> None:
    """The tree ensembles read float64 inputs and compare them with float64 thresholds, but
    ONNX Runtime's ai.onnx.ml opset-3 ensembles only emit float32, while skl2onnx declares
    their outputs float64 for a float64 graph. Each such output is emitted as float32 and
    cast to float64 under its original name."""
    from onnx import TensorProto, helper

    graph = onx.graph
    declared = {v.name: v.type.tensor_type.elem_type for v in [*graph.output, *graph.value_info]}
    fixed = []
    for node in graph.node:
        if node.domain == "ai.onnx.ml" and node.op_type in ("TreeEnsembleRegressor", "TreeEnsembleClassifier"):
            index = 0 if node.op_type == "TreeEnsembleRegressor" else 1  # the scores (the classifier's 0 is labels)
            name = node.output[index]
            if declared.get(name, TensorProto.DOUBLE) != TensorProto.DOUBLE:
                continue
            node.output[index] = f"{name}_float32"
            fixed.append(helper.make_node("Cast", [f"{name}_float32"], [name], to=TensorProto.DOUBLE))
    for cast in fixed:
        position = next(i for i, n in enumerate(graph.node) if cast.input[0] in n.output)
        graph.node.insert(position + 1, cast)


def _exact_thresholds(onx, estimator) -> None:
    """skl2onnx writes HistGradientBoosting's split thresholds as float32 attributes, but the
    model compares float64 values with float64 thresholds: a threshold at a data value (an
    hour's cosine, say) sends that value left, and compared with the threshold rounded to
    float32 the same value can go right. The thresholds are put back at float64
    (`nodes_values_as_tensor`), after checking that each rounds to what skl2onnx wrote for
    that tree and node, so no node can be matched to the wrong one. (Forests are written
    with float64 thresholds from the start: pipelines/model/onnx_forest.py.)"""
    from onnx import helper, numpy_helper

    if not hasattr(estimator, "_predictors"):
        return
    exact = [np.asarray(p.nodes["num_threshold"], dtype="float64") for it in estimator._predictors for p in it]
    for node in list(onx.graph.node):
        if node.domain != "ai.onnx.ml" or not node.op_type.startswith("TreeEnsemble"):
            continue
        attrs = {a.name: a for a in node.attribute}
        trees, ids = np.asarray(attrs["nodes_treeids"].ints), np.asarray(attrs["nodes_nodeids"].ints)
        written = np.asarray(attrs["nodes_values"].floats, dtype="float32")
        branch = np.asarray(attrs["nodes_modes"].strings) != b"LEAF"
        starts = np.concatenate([[0], np.cumsum([len(t) for t in exact])[:-1]])
        values = np.where(branch, np.concatenate(exact)[starts[trees] + ids], 0.0)
        if not np.allclose(values[branch].astype("float32"), written[branch], rtol=1e-6, atol=1e-7):
            raise ConversionError(f"{type(estimator).__name__}: the converted trees do not match the model's nodes")
        node.attribute.remove(attrs["nodes_values"])
        node.attribute.append(helper.make_attribute("nodes_values_as_tensor", numpy_helper.from_array(values)))


def convert(model, features: Sequence[str], strings: set[str], task: str) -> bytes:
    """The fitted pipeline as ONNX bytes: one input per feature column ([N, 1]; float64, or
    string for the columns in `strings`); output `variable` (regression, [N, 1]) or
    `probabilities` ([N, classes] in the model's class order). Raises ConversionError."""
    try:
        from skl2onnx import convert_sklearn
        from skl2onnx.common.data_types import DoubleTensorType, StringTensorType
    except ImportError as err:
        raise ConversionError(f"skl2onnx is not installed: {err}") from None
    from pipelines.model import onnx_forest
    from pipelines.model.torch_model import _TorchMLP

    onnx_forest.register()
    _register_cyclical()
    _register_double_imputer()
    _int_missing_flags()
    initial = [(c, StringTensorType([None, 1]) if c in strings else DoubleTensorType([None, 1])) for c in features]
    opsets = {"": OPSET, "ai.onnx.ml": ML_OPSET}
    estimator = model[-1]
    try:
        if isinstance(estimator, _TorchMLP):
            prep = convert_sklearn(model[:-1], initial_types=initial, target_opset=opsets)
            onx = _with_torch_head(prep, estimator, task)
        else:
            options = {id(estimator): {"zipmap": False}} if task == "classification" else None
            onnx_forest.forget()
            boosted = type(estimator).__module__ == "pipelines.model.boosting"
            if boosted:
                _register_xgboost()
            onx = convert_sklearn(model, initial_types=initial, target_opset=opsets, options=options)
            onnx_forest.attach(onx)
            _exact_thresholds(onx, estimator)
            if boosted:
                _float32_tree_inputs(onx)
            _tree_outputs_as_double(onx)
    except ImportError as err:  # skl2onnx and torch.onnx raise many types
        raise ConversionError(f"{type(estimator).__name__}: {type(err).__name__}: {str(err).splitlines()[0]}") from None
    return onx.SerializeToString()


ONNX_FILE = "model.onnx"  # beside model.skops in the logged model and in the Bento
PARITY_FILE = "parity.parquet"  # the reference rows the parity check runs on
PARITY_ROWS = 1000


def string_columns(params) -> set[str]:
    """The feature columns the graph takes as strings (schema type `category`)."""
    return {c for c in params.features.columns if params.table_schema.columns[c].type == "category"}


def compile_model(model, params, rows) -> tuple[dict[str, bytes], str]:
    """The files to log beside a fitted model (its ONNX form and the reference rows it was
    checked on), and a line saying what became of the conversion. Nothing is logged for a
    model that does not convert or disagrees with its Python form on those rows."""
    import io
    import time

    features, task = params.features.columns, params.data.task
    sample = rows[features]
    if len(sample) > PARITY_ROWS:
        sample = sample.sample(PARITY_ROWS, random_state=params.train.seed).sort_index()
    sample = sample.reset_index(drop=True)
    started = time.perf_counter()
    try:
        data = convert(model, features, string_columns(params), task)
    except ConversionError as err:
        return {}, f"no ONNX form: {err}"
    seconds = time.perf_counter() - started
    classes = [str(c) for c in getattr(model, "classes_", [])]
    checked = parity(OnnxEngine(data, features, string_columns(params)), model, sample, task, classes)
    if not checked.ok:
        return {}, f"no ONNX form: converted, but {checked.detail}"
    buffer = io.BytesIO()
    sample.to_parquet(buffer, index=False)
    return {
        ONNX_FILE: data,
        PARITY_FILE: buffer.getvalue(),
    }, f"{ONNX_FILE}: converted in {seconds:.2f} s; {checked.detail}"


class OnnxEngine:
    """An ONNX Runtime session over a converted model, with `threads` intra-op threads and
    no inter-op pool: the thread budget is the session's, whatever the environment says."""

    def __init__(self, data: bytes, features: Sequence[str], strings: set[str], threads: int = 1):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        self.session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        self.features = list(features)
        self.strings = strings
        self.output = self.session.get_outputs()[-1].name  # variable, or probabilities

    def feeds(self, columns: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Each feature's values (a list, array or Series) as the graph's [N, 1] input."""
        out = {}
        for c in self.features:
            values = columns[c]
            if c in self.strings:
                array = np.asarray(values, dtype=object).astype(str).reshape(-1, 1)
            else:
                array = np.asarray(values, dtype="float64").reshape(-1, 1)
            out[c] = array
        return out

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """Regression: [N] predictions; classification: [N, classes] probabilities."""
        [out] = self.session.run([self.output], feeds)
        return out[:, 0] if self.output == VARIABLE else out


@dataclass(frozen=True)
class Parity:
    ok: bool
    rows: int
    worst: float  # the largest difference found (absolute, or of a probability)
    detail: str


def parity(engine: OnnxEngine, model, frame, task: str, classes: Sequence[str]) -> Parity:
    """The engine against the Python model on `frame` (the model's reference rows)."""
    rows = len(frame)
    if rows == 0:
        return Parity(False, 0, float("nan"), "no reference rows to check parity on")
    out = engine.run(engine.feeds({c: frame[c].to_numpy() for c in engine.features}))
    if task == "regression":
        expected = np.asarray(model.predict(frame[engine.features]), dtype="float64")
        gap = np.abs(out - expected)
        bad = gap > ATOL + RTOL * np.abs(expected)
        worst = float(gap.max())
        rule = f"|onnx - python| <= {ATOL:g} + {RTOL:g}·|python|"
    else:
        expected = np.asarray(model.predict_proba(frame[engine.features]), dtype="float64")
        gap = np.abs(out - expected).max(axis=1)
        labels = np.asarray(classes)[out.argmax(axis=1)] != np.asarray(model.predict(frame[engine.features])).astype(
            str
        )
        bad = (gap > PROBA_ATOL) | labels
        worst = float(gap.max())
        rule = f"same labels, probabilities within {PROBA_ATOL:g}"
    if bad.any():
        return Parity(
            False, rows, worst, f"{int(bad.sum())} of {rows} reference rows differ beyond {rule} (worst {worst:.3g})"
        )
    return Parity(True, rows, worst, f"{rows} reference rows agree ({rule}; worst {worst:.3g})")
