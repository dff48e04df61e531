"""SageMaker: ``env`` (every SM_* variable and /opt/ml path), ``training`` (the script-mode entry),
``inference`` (the inference toolkit's handlers), ``layout`` (the deployable model folder / model.tar.gz)."""
