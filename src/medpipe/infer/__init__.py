"""Inference: the predictor (the one door to a trained model), its backends, the wire protocol (every codec and writer), the HTTP client and Grad-CAM."""
