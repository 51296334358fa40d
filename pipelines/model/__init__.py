"""The model: the feature transform, the estimator families (the PyTorch MLP among them), model files, the ONNX form, evaluation and the train/evaluate stages."""
