"""emgd.models: shipped decoder models (ONNX + model card) and the scripts that build them."""
