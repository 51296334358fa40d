"""Random forests to ONNX from scikit-learn's tree arrays, in numpy.

skl2onnx writes a forest node by node in Python and then builds each attribute from a
Python list: about 20 s for the default 200-tree forest (660k nodes), paid by every
training whose best model is a forest. Here the same `TreeEnsembleRegressor` or
`TreeEnsembleClassifier` node is built from every tree's arrays concatenated, and its
attributes are filled straight from them: the same node ids, features, children and leaf
weights skl2onnx writes, with the split thresholds at float64 (`nodes_values_as_tensor`)
and the input seen as float32 first, as scikit-learn's trees see it. The converter is
registered under skl2onnx's own names, so the rest of the graph (the feature transform,
the classifier's outputs and their shapes) stays skl2onnx's.
"""

from __future__ import annotations

import threading

import numpy as np

REGRESSOR, CLASSIFIER = "SklearnRandomForestRegressor", "SklearnRandomForestClassifier"

# The ensembles' large attributes wait here (per thread: one conversion runs in one thread)
# until skl2onnx has assembled and optimised the graph, which copies every node more than
# once; `attach` puts them on the finished graph's nodes.
_waiting = threading.local()


def forest_arrays(forest) -> dict[str, np.ndarray]:
    """Every tree's nodes, concatenated in tree order: tree and node ids, and per node its
    feature, threshold, children (-1 at a leaf) and value rows (n_outputs × n_classes)."""
    trees = [e.tree_ for e in forest.estimators_]
    counts = np.array([t.node_count for t in trees])
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return {
        "tree": np.repeat(np.arange(len(trees)), counts),
        "node": np.arange(counts.sum()) - np.repeat(starts, counts),
        "feature": np.concatenate([t.feature for t in trees]),
        "threshold": np.concatenate([t.threshold for t in trees]).astype("float64"),
        "left": np.concatenate([t.children_left for t in trees]),
        "right": np.concatenate([t.children_right for t in trees]),
        "value": np.concatenate([t.value.reshape(t.node_count, -1) for t in trees]),
    }


def add_ensemble_attributes(node, forest, classifier: bool) -> None:
    """Give a tree ensemble node its trees: the nodes, then each leaf's weights (the
    forest's mean: 1/n_trees each; a classifier's as class fractions, of class 1 only when
    there are two classes, as skl2onnx writes them). Written in place: a node of 660k
    entries is not copied."""
    from onnx import AttributeProto, numpy_helper

    a = forest_arrays(forest)
    branch = a["left"] != -1
    leaf = np.flatnonzero(~branch)
    weights = a["value"][leaf] / len(forest.estimators_)
    if classifier:
        totals = a["value"][leaf].sum(axis=1, keepdims=True)
        weights = weights / np.where(totals == 0, 1.0, totals)
        if weights.shape[1] == 2:
            weights = weights[:, 1:]
    outputs = weights.shape[1]
    prefix = "class" if classifier else "target"
    ints = {
        "nodes_treeids": a["tree"],
        "nodes_nodeids": a["node"],
        "nodes_featureids": np.where(branch, a["feature"], 0),
        "nodes_truenodeids": np.where(branch, a["left"], 0),
        "nodes_falsenodeids": np.where(branch, a["right"], 0),
        f"{prefix}_treeids": np.repeat(a["tree"][leaf], outputs),
        f"{prefix}_nodeids": np.repeat(a["node"][leaf], outputs),
        f"{prefix}_ids": np.tile(np.arange(outputs), len(leaf)),
    }
    for name, values in ints.items():
        node.attribute.add(name=name, type=AttributeProto.INTS).ints.extend(values.astype("int64").tolist())
    modes = np.where(branch, b"BRANCH_LEQ", b"LEAF").tolist()
    node.attribute.add(name="nodes_modes", type=AttributeProto.STRINGS).strings.extend(modes)
    thresholds = numpy_helper.from_array(np.where(branch, a["threshold"], 0.0))
    node.attribute.add(name="nodes_values_as_tensor", type=AttributeProto.TENSOR).t.CopyFrom(thresholds)
    leaf_weights = weights.ravel().astype("float32").tolist()
    node.attribute.add(name=f"{prefix}_weights", type=AttributeProto.FLOATS).floats.extend(leaf_weights)


def _as_float32(scope, operator, container) -> str:
    """The input rounded to float32 and back: a forest compares float32(x) with its
    float64 thresholds."""
    from onnx import TensorProto

    x = operator.inputs[0].full_name
    narrow, wide = scope.get_unique_variable_name(f"{x}_as_float32"), scope.get_unique_variable_name(f"{x}_via_float32")
    container.add_node("Cast", x, narrow, name=scope.get_unique_operator_name("Cast"), to=TensorProto.FLOAT)
    container.add_node("Cast", narrow, wide, name=scope.get_unique_operator_name("Cast"), to=TensorProto.DOUBLE)
    return wide


def _wait(node: str, forest, classifier: bool) -> None:
    if not hasattr(_waiting, "nodes"):
        _waiting.nodes = {}
    _waiting.nodes[node] = (forest, classifier)


def forget() -> None:
    """Drop what an earlier conversion in this thread left waiting (one that failed)."""
    getattr(_waiting, "nodes", {}).clear()


def attach(onx) -> None:
    """Give the forest nodes of a converted graph their trees (see `_waiting`)."""
    waiting = getattr(_waiting, "nodes", {})
    for node in onx.graph.node:
        if node.name in waiting:
            forest, classifier = waiting.pop(node.name)
            add_ensemble_attributes(node, forest, classifier)
    if waiting:
        names = ", ".join(waiting)
        waiting.clear()
        raise RuntimeError(f"forest nodes {names} were not found in the converted graph")


def register() -> None:
    """Put these converters in place of skl2onnx's for both forests (its own is kept for
    the options loopline never asks for: decision paths, leaves, multi-output classes)."""
    from skl2onnx.common._registration import get_converter

    global _registered
    with _registering:  # two threads converting at once: skl2onnx's converters are captured once
        if not _registered:
            _register(get_converter(REGRESSOR), get_converter(CLASSIFIER))
            _registered = True


def _register(regressor, classifier) -> None:
    """Register the two converters; `regressor` and `classifier` are skl2onnx's own."""
    from skl2onnx.common._registration import register_converter
    from skl2onnx.common.utils_classifier import get_label_classes

    def unusual(scope, operator) -> bool:
        options = scope.get_options(operator.raw_operator, {"decision_path": False, "decision_leaf": False})
        return bool(options["decision_path"] or options["decision_leaf"]) or operator.raw_operator.n_outputs_ != 1

    def convert_regressor(scope, operator, container):
        if unusual(scope, operator):
            return regressor._fct(scope, operator, container)
        container.add_node(
            "TreeEnsembleRegressor",
            _as_float32(scope, operator, container),
            operator.outputs[0].full_name,
            op_domain="ai.onnx.ml",
            op_version=3,
            name=scope.get_unique_operator_name("TreeEnsembleRegressor"),
            n_targets=1,
            post_transform="NONE",
        )
        _wait(container.nodes[-1].name, operator.raw_operator, classifier=False)

    def convert_classifier(scope, operator, container):
        options = scope.get_options(operator.raw_operator, {"raw_scores": False})
        if unusual(scope, operator) or options["raw_scores"]:
            return classifier._fct(scope, operator, container)
        classes = get_label_classes(scope, operator.raw_operator)
        labels = (
            {"classlabels_strings": [str(c) for c in classes]}
            if all(isinstance(c, str) for c in classes)
            else {"classlabels_int64s": [int(c) for c in classes]}
        )
        container.add_node(
            "TreeEnsembleClassifier",
            _as_float32(scope, operator, container),
            [operator.outputs[0].full_name, operator.outputs[1].full_name],
            op_domain="ai.onnx.ml",
            op_version=3,
            name=scope.get_unique_operator_name("TreeEnsembleClassifier"),
            post_transform="NONE",
            **labels,
        )
        _wait(container.nodes[-1].name, operator.raw_operator, classifier=True)

    register_converter(REGRESSOR, convert_regressor, overwrite=True, options=regressor.get_allowed_options())
    register_converter(CLASSIFIER, convert_classifier, overwrite=True, options=classifier.get_allowed_options())


_registered = False
_registering = threading.Lock()
