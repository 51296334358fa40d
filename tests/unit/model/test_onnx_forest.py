"""The forest converter writes the nodes and leaf weights skl2onnx writes, from numpy, and
its graph answers as the fitted forest does, thresholds included."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.ensemble import RandomForestClassifier, RandomForestRegressor


def _skl2onnx_attributes(forest, classifier: bool) -> dict[str, list]:
    """What skl2onnx's own per-node loop writes for the same forest."""
    from skl2onnx.common.tree_ensemble import (
        add_tree_to_attribute_pairs,
        get_default_tree_classifier_attribute_pairs,
        get_default_tree_regressor_attribute_pairs,
    )

    pairs = (
        get_default_tree_classifier_attribute_pairs() if classifier else get_default_tree_regressor_attribute_pairs()
    )
    for i, tree in enumerate(forest.estimators_):
        add_tree_to_attribute_pairs(
            pairs, classifier, tree.tree_, i, 1.0 / len(forest.estimators_), 0, classifier, False, dtype=np.float64
        )
    return pairs


def _written(forest, classifier: bool) -> dict[str, np.ndarray]:
    from onnx import NodeProto, helper, numpy_helper

    from pipelines.model.onnx_forest import add_ensemble_attributes

    node = NodeProto()
    add_ensemble_attributes(node, forest, classifier)
    values = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return {k: numpy_helper.to_array(v) if hasattr(v, "dims") else np.asarray(v) for k, v in values.items()}


@pytest.mark.parametrize("classes", [0, 2, 3])
def test_the_nodes_and_leaf_weights_are_those_skl2onnx_writes(classes):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(400, 5))
    if classes:
        y = rng.integers(0, classes, size=400)
        forest = RandomForestClassifier(n_estimators=7, min_samples_leaf=3, random_state=0).fit(x, y)
    else:
        forest = RandomForestRegressor(n_estimators=7, min_samples_leaf=3, random_state=0).fit(x, x[:, 0] * 3 + x[:, 1])
    classifier = bool(classes)
    theirs, ours = _skl2onnx_attributes(forest, classifier), _written(forest, classifier)
    prefix = "class" if classifier else "target"
    for name in [
        "nodes_treeids",
        "nodes_nodeids",
        "nodes_featureids",
        "nodes_truenodeids",
        "nodes_falsenodeids",
        f"{prefix}_treeids",
        f"{prefix}_nodeids",
        f"{prefix}_ids",
    ]:
        np.testing.assert_array_equal(ours[name], np.asarray(theirs[name]), err_msg=name)
    assert [m.decode() for m in ours["nodes_modes"]] == theirs["nodes_modes"]
    np.testing.assert_allclose(ours[f"{prefix}_weights"], np.asarray(theirs[f"{prefix}_weights"]), rtol=1e-6)
    # The thresholds are the forest's own float64 values (skl2onnx's are float32 stand-ins).
    thresholds = np.concatenate([e.tree_.threshold for e in forest.estimators_])
    branch = ours["nodes_modes"] != b"LEAF"
    np.testing.assert_array_equal(ours["nodes_values_as_tensor"][branch], thresholds[branch])


def test_a_forest_graph_sends_a_value_on_its_threshold_the_way_the_forest_does():
    """Inputs placed exactly on the split thresholds, and just beside them in float32."""
    import pandas as pd
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import FunctionTransformer

    from pipelines.model.onnx_engine import OnnxEngine, convert

    rng = np.random.default_rng(5)
    x = pd.DataFrame({"a": rng.normal(size=300), "b": rng.normal(size=300)})
    model = Pipeline(
        [
            ("features", FunctionTransformer(feature_names_out="one-to-one")),
            ("model", RandomForestRegressor(n_estimators=5, random_state=0)),
        ]
    ).fit(x, x["a"] - 2 * x["b"])
    forest = model[-1]
    thresholds = np.concatenate([e.tree_.threshold[e.tree_.children_left != -1] for e in forest.estimators_])
    edges = np.concatenate([thresholds, np.nextafter(thresholds.astype("float32"), np.float32(np.inf))])
    probe = pd.DataFrame({"a": edges, "b": rng.permutation(edges)})
    engine = OnnxEngine(convert(model, ["a", "b"], set(), "regression"), ["a", "b"], set())
    onnx = engine.run(engine.feeds({c: probe[c].to_numpy() for c in probe}))
    np.testing.assert_allclose(onnx.ravel(), model.predict(probe), rtol=1e-5, atol=1e-6)
