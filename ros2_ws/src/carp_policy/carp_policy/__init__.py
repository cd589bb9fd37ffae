"""carp_policy: Learning: CARP tokenizer and transformer, observation encoders, datasets, training, ONNX export and engine, policy families (CARP, CoA, DP-C), policy node."""
