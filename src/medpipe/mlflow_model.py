"""The medpipe package as an MLflow pyfunc model ("models from code": MLflow runs this file to build the
model, nothing is pickled). Logged by :func:`medpipe.track.log_package`.

The MLflow model carries ``weights.safetensors`` and ``model.json`` unchanged as the artifact ``package``
and their sha256 in its model config; loading refuses a package whose files differ, then the
:class:`~medpipe.infer.predictor.Predictor` loads it (which checks the weights against model.json again).

    model = mlflow.pyfunc.load_model("runs:/RUN_ID/model")
    model.predict(pd.DataFrame({"image": [open("x.jpg", "rb").read()]}))   # label + one column per class
    mlflow models serve -m runs:/RUN_ID/model --env-manager local          # JSON: base64 in the image column

A package that takes patient metadata has the optional columns ``age``, ``sex`` and ``site`` in its signature
(empty / NaN: not given); a value outside the model's vocabulary or range raises naming the row and field.
"""

from __future__ import annotations

import base64
from pathlib import Path

import mlflow
import pandas as pd

from medpipe.infer.predictor import Predictor
from medpipe.utils import sha256_file


class MedpipeModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        pkg = Path(context.artifacts["package"])
        expected = (context.model_config or {}).get("sha256", {})
        if not expected:
            raise ValueError("this MLflow model has no package hashes in its model config; refusing to load it")
        for name, digest in expected.items():
            if not (pkg / name).is_file() or sha256_file(pkg / name) != digest:
                raise ValueError(f"the medpipe package's {name} differs from the one logged (sha256 mismatch)")
        self.predictor = Predictor(pkg)

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        images = model_input["image"] if isinstance(model_input, pd.DataFrame) else model_input
        data = [base64.b64decode(x) if isinstance(x, str) else bytes(x) for x in images]
        preds = self.predictor.predict_bytes(data, metadata=self._metadata(model_input, len(data)))
        rows = [{"label": p.label, **{c: float(p.probabilities[c]) for c in self.predictor.classes}} for p in preds]
        return pd.DataFrame(rows, columns=["label", *self.predictor.classes])

    def _metadata(self, model_input, n: int) -> list | None:
        """Each row's {field: value} from the signature's optional metadata columns (NaN: not given)."""
        spec = self.predictor.metadata_spec
        if spec is None or not isinstance(model_input, pd.DataFrame):
            return None
        cols = [f for f in spec.fields if f in model_input.columns]
        if not cols:
            return None
        table = model_input[cols].astype(object).where(model_input[cols].notna(), None)
        return [{k: v for k, v in row.items() if v is not None} for row in table.to_dict("records")][:n]


mlflow.models.set_model(MedpipeModel())
