"""Patient metadata (age, sex, site) as a model input: ingest keeps it from HAM10000, ISIC and CSV manifests
and never lets dx_type be one; a tiny fused model trains with it; predict, evaluate, serve JSON, the Open
Inference Protocol, batch and ONNX give the in-process prediction; bad values are refused naming the field."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from medpipe.cli import main
from medpipe.config import make_config
from medpipe.data.metadata import MetadataSpec, parse_mapping
from medpipe.errors import ConfigError, MetadataError

TINY = ["--model", "densenet-test", "--image-size", "32", "--batch-size", "8", "--epochs", "2", "--bootstrap", "0",
        "--threads", "1", "--deterministic", "--lr", "0.002", "--warmup-epochs", "0.5"]
GIVEN = {"age": 70, "sex": "male", "site": "face"}


@pytest.fixture(scope="module")
def meta_run(data_dir, tmp_path_factory):
    """A tiny run on the shared synthetic data with every metadata input."""
    run = tmp_path_factory.mktemp("meta_run")
    assert main(["train", "--data", str(data_dir), "--out", str(run), *TINY, "--metadata", "auto"]) == 0
    return run


@pytest.fixture(scope="module")
def predictor(meta_run):
    from medpipe.infer.predictor import Predictor

    return Predictor(meta_run / "model", device="cpu")


def _image(data_dir):
    from medpipe.data.sources import load_records

    table, _ = load_records(data_dir)
    return table.iloc[0]["path"]


# -- ingest ------------------------------------------------------------------------------------------------

def test_ingest_keeps_ham10000_metadata_and_synthetic_metadata_follows_the_class(data_dir):
    from medpipe.data.sources import load_records

    table, _ = load_records(data_dir)
    assert {"age", "sex", "site"} <= set(table.columns)
    assert set(table["sex"]) <= {"male", "female", "unknown"} and (table["site"] != "").all()
    report = json.loads((data_dir / "ingest_report.json").read_text())
    assert report["metadata"]["site"] == len(table)
    from medpipe.data.synthetic import SynthSpec, make_metadata

    rows = make_metadata(SynthSpec(count=600, seed=1))
    age = {dx: np.mean([float(r["age"]) for r in rows if r["dx"] == dx and r["age"]]) for dx in ("nv", "bcc")}
    assert age["bcc"] > age["nv"] + 10  # basal-cell carcinoma: older skin
    face = {dx: np.mean([r["localization"] in ("face", "scalp", "ear", "neck") for r in rows if r["dx"] == dx])
            for dx in ("nv", "bcc")}
    assert face["bcc"] > face["nv"] + 0.2


def test_isic_and_mapped_csv_manifests_keep_metadata(synth_dir, tmp_path):
    from medpipe.data.sources import ingest, load_records

    imgs = []
    for src in sorted(synth_dir.rglob("*.jpg"))[:8]:  # the images must lie under the manifest's folder
        imgs.append(tmp_path / src.name)
        shutil.copy(src, imgs[-1])
    isic = tmp_path / "isic.csv"
    isic.write_text("path,label,age_approx,sex,anatom_site_general,diagnosis_confirm_type\n" + "".join(
        f"{p},{'a' if i % 2 else 'b'},{40 + i},{'female' if i % 2 else 'male'},Head/Neck,histopathology\n"
        for i, p in enumerate(imgs)))
    ingest(isic, tmp_path / "d1", workers=1)
    table, _ = load_records(tmp_path / "d1")
    assert list(table["site"].unique()) == ["head/neck"] and sorted(table["age"].astype(int)) == list(range(40, 48))
    other = tmp_path / "other.csv"
    other.write_text("path,label,patient_age,location,dx_type\n" + "".join(
        f"{p},{'a' if i % 2 else 'b'},{50 + i},back,histo\n" for i, p in enumerate(imgs)))
    ingest(other, tmp_path / "d2", workers=1, metadata_columns="age=patient_age,site=location")
    table, _ = load_records(tmp_path / "d2")
    assert sorted(table["age"].astype(int)) == list(range(50, 58)) and set(table["site"]) == {"back"}
    with pytest.raises(ConfigError, match="no column 'years'"):
        ingest(other, tmp_path / "d3", workers=1, metadata_columns="age=years")


@pytest.mark.parametrize("choice", ["dx_type", "age,dx_type", "diagnosis_confirm_type"])
def test_dx_type_can_never_be_an_input(choice, data_dir, tmp_path, capsys):
    with pytest.raises(ConfigError, match="label leakage"):
        make_config({"metadata": choice}).validate()
    with pytest.raises(ConfigError, match="label leakage"):
        parse_mapping(f"sex={choice.split(',')[-1]}")
    assert main(["train", "--data", str(data_dir), "--out", str(tmp_path / "r"), *TINY, "--metadata", choice]) == 2
    assert "label leakage" in capsys.readouterr().err
    spec = MetadataSpec(("age",))
    with pytest.raises(MetadataError, match="label leakage"):
        spec.encode({"dx_type": "histo"})


def test_encoding_missing_unknown_out_of_vocabulary_and_range():
    spec = MetadataSpec.fit([{"age": "40", "sex": "male", "site": "back"}, {"age": "60", "sex": "female",
                                                                             "site": "unknown"}], ("age", "sex", "site"))
    assert spec.site == ("back",) and spec.dim == 2 + 2 + 1
    assert not spec.encode(None).any() and not spec.encode({"sex": "unknown", "age": ""}).any()
    v = spec.encode({"age": 50, "sex": "female", "site": "back"})
    assert v.tolist() == [1.0, 0.0, 1.0, 0.0, 1.0]
    with pytest.raises(MetadataError, match=r"^site: 'moon' is not in this model's vocabulary \(back, or unknown\)"):
        spec.encode({"site": "moon"})
    with pytest.raises(MetadataError, match="^age: 130 is outside"):
        spec.encode({"age": 130})
    with pytest.raises(MetadataError, match="^age: must be a number"):
        spec.encode({"age": "old"})
    assert MetadataSpec.from_dict(spec.to_dict()) == spec


# -- the model and the package -------------------------------------------------------------------------------

def test_metadata_run_packages_the_spec_and_metadata_moves_the_prediction(meta_run, predictor, data_dir, trained_run):
    from medpipe.package import load_package, read_meta

    assert read_meta(trained_run / "model").metadata is None  # image-only stays the default
    spec = predictor.metadata_spec
    assert spec.fields == ("age", "sex", "site") and "face" in spec.site and predictor.backend == "eager"
    raw = json.loads((meta_run / "model" / "model.json").read_text())["metadata"]
    assert raw["dim"] == spec.dim and raw["sex"] == ["female", "male"]
    img = _image(data_dir)
    pixels = [predictor.spec.read(img)]
    with_md = predictor.probabilities(pixels, metadata=[GIVEN])
    without = predictor.probabilities(pixels)
    assert not np.allclose(with_md, without, atol=1e-5)  # the metadata is used
    np.testing.assert_allclose(without, predictor.probabilities(pixels, metadata=[None]), atol=1e-6)
    model, _ = load_package(meta_run / "model")  # the raw network agrees with the predictor
    import torch
    from medpipe.preprocess import eval_batch

    with torch.no_grad():
        logits = model(eval_batch(pixels, predictor.spec), torch.from_numpy(spec.encode_many([GIVEN])))
    np.testing.assert_allclose(torch.softmax(logits / predictor.temperature, 1).numpy(), with_md, atol=1e-4)


def test_image_only_package_refuses_metadata(trained_run, data_dir):
    from medpipe.infer.predictor import Predictor

    p = Predictor(trained_run / "model", device="cpu", backend="eager")
    with pytest.raises(MetadataError, match="takes the image only"):
        p.probabilities([p.spec.read(_image(data_dir))], metadata=[GIVEN])


# -- predict and evaluate ------------------------------------------------------------------------------------

def test_predict_cli_options_and_csv_equal_in_process(meta_run, predictor, data_dir, tmp_path, capsys):
    img = _image(data_dir)
    want = predictor.predict_files([img], metadata=[GIVEN])[0].probabilities
    assert main(["predict", img, "--model", str(meta_run / "model"), "--device", "cpu", "--json",
                 "--age", "70", "--sex", "male", "--site", "face"]) == 0
    got = json.loads(capsys.readouterr().out.splitlines()[0])["probabilities"]
    assert all(abs(got[c] - want[c]) < 1e-4 for c in want)
    csv = tmp_path / "md.csv"
    csv.write_text(f"image,age,sex,site\n{img.rsplit('/', 1)[-1]},70,male,face\n")
    assert main(["predict", img, "--model", str(meta_run / "model"), "--device", "cpu", "--json",
                 "--metadata-csv", str(csv), "--sex", "female"]) == 0
    got = json.loads(capsys.readouterr().out.splitlines()[0])["probabilities"]
    assert all(abs(got[c] - want[c]) < 1e-4 for c in want)
    # no metadata: the fused model's image-only fallback
    assert main(["predict", img, "--model", str(meta_run / "model"), "--device", "cpu", "--json"]) == 0
    got = json.loads(capsys.readouterr().out.splitlines()[0])["probabilities"]
    nomd = predictor.predict_files([img])[0].probabilities
    assert all(abs(got[c] - nomd[c]) < 1e-4 for c in nomd)


@pytest.mark.parametrize("args, says", [(["--site", "moon"], "site: 'moon' is not in this model's vocabulary"),
                                        (["--age", "130"], "--age"), (["--sex", "7"], "sex: '7'")])
def test_predict_cli_bad_metadata_exits_2_naming_the_field(meta_run, data_dir, args, says, capsys):
    code = main(["predict", _image(data_dir), "--model", str(meta_run / "model"), "--device", "cpu", *args])
    assert code == 2 and says in capsys.readouterr().err


def test_predict_cli_refuses_a_dx_type_column(meta_run, data_dir, tmp_path, capsys):
    csv = tmp_path / "md.csv"
    img = _image(data_dir)
    csv.write_text(f"image,age,dx_type\n{img},70,histo\n")
    assert main(["predict", img, "--model", str(meta_run / "model"), "--metadata-csv", str(csv)]) == 2
    assert "label leakage" in capsys.readouterr().err


def test_evaluate_reads_metadata_from_the_record_table(meta_run, data_dir, tmp_path):
    from medpipe.evaluate import evaluate_package

    shutil.copy(meta_run / "splits.csv", tmp_path / "splits.csv")
    out = evaluate_package(meta_run / "model", data_dir, tmp_path / "rep", splits_csv=tmp_path / "splits.csv",
                           bootstrap=0, backend="eager", device="cpu")
    assert out["metrics"]["metadata_given"] is True
    test_json = json.loads((meta_run / "model" / "model.json").read_text())["metrics"]["test"]
    assert abs(out["metrics"]["macro_auc"] - test_json["macro_auc"]) < 1e-6


# -- serve: SageMaker JSON and the Open Inference Protocol ---------------------------------------------------

@pytest.fixture(scope="module")
def served(meta_run, tmp_path_factory):
    from tests._server import Server

    srv = Server(meta_run / "model", "--backend", "auto", log=tmp_path_factory.mktemp("md_serve") / "serve.log")
    try:
        yield srv.wait_ready()
    finally:
        srv.stop()


def _jpeg(data_dir) -> bytes:
    return open(_image(data_dir), "rb").read()


def test_serve_json_metadata_beside_each_image_equals_in_process(served, predictor, data_dir):
    import base64

    b64 = base64.b64encode(_jpeg(data_dir)).decode()
    want = predictor.predict_bytes([_jpeg(data_dir)], metadata=[GIVEN])[0].probabilities
    plain = predictor.predict_bytes([_jpeg(data_dir)])[0].probabilities
    for body in ({"images": [b64, b64], "metadata": [GIVEN, None]},
                 {"images": [{"b64": b64, "metadata": GIVEN}, {"b64": b64}]}):
        status, _, raw = served.invoke(json.dumps(body).encode(), "application/json")
        assert status == 200, raw
        got = json.loads(raw)["predictions"]
        assert all(abs(got[0]["probabilities"][c] - want[c]) < 1e-4 for c in want)
        assert all(abs(got[1]["probabilities"][c] - plain[c]) < 1e-4 for c in plain)  # none given: the image only
    status, _, raw = served.invoke(_jpeg(data_dir))  # raw bytes: no metadata
    assert status == 200 and abs(json.loads(raw)["predictions"][0]["probabilities"]["nv"] - plain["nv"]) < 1e-4


@pytest.mark.parametrize("values, says", [({"site": "moon"}, "images[0]: site: 'moon' is not in"),
                                          ({"age": 300}, "images[0]: age: 300 is outside"),
                                          ({"dx_type": "histo"}, "label leakage"),
                                          ("old", "metadata[0] must be an object")])
def test_serve_bad_metadata_is_400_naming_the_field(served, data_dir, values, says):
    import base64

    body = {"images": [base64.b64encode(_jpeg(data_dir)).decode()], "metadata": [values]}
    status, _, raw = served.invoke(json.dumps(body).encode(), "application/json")
    assert status == 400 and says in json.loads(raw)["message"], raw


def test_open_inference_protocol_takes_metadata_as_a_second_input(served, predictor, data_dir):
    httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is in the dev extra")
    from tritonclient.utils import InferenceServerException

    client = httpclient.InferenceServerClient(url=f"127.0.0.1:{served.port}", network_timeout=60)
    try:
        md = client.get_model_metadata(predictor.name)
        assert {"name": "metadata", "datatype": "BYTES", "shape": [-1]} in md["inputs"]
        assert json.loads(md["parameters"]["metadata"])["site"] == list(predictor.metadata_spec.site)

        def infer(values):
            img = httpclient.InferInput("image_bytes", [1], "BYTES")
            img.set_data_from_numpy(np.array([_jpeg(data_dir)], dtype=object))
            inp = httpclient.InferInput("metadata", [1], "BYTES")
            inp.set_data_from_numpy(np.array([json.dumps(values)], dtype=object), binary_data=False)
            return client.infer(predictor.name, [img, inp]).as_numpy("probabilities")[0]

        want = predictor.predict_bytes([_jpeg(data_dir)], metadata=[GIVEN])[0].probabilities
        np.testing.assert_allclose(infer(GIVEN), [want[c] for c in predictor.classes], atol=1e-4)
        with pytest.raises(InferenceServerException, match="site: 'moon' is not in this model's vocabulary"):
            infer({"site": "moon"})
    finally:
        client.close()


# -- batch ---------------------------------------------------------------------------------------------------

def test_batch_reads_manifest_metadata_columns(meta_run, predictor, data_dir, tmp_path):
    from medpipe.batch import run_batch
    from medpipe.data.sources import load_records

    table, _ = load_records(data_dir)
    imgs = []
    for p in table["path"][:3]:  # the images must lie under the manifest's folder
        imgs.append(tmp_path / p.rsplit("/", 1)[-1])
        shutil.copy(p, imgs[-1])
    manifest = tmp_path / "in.csv"
    manifest.write_text("path,age_approx,sex,anatom_site_general,dx_type\n"
                        f"{imgs[0].name},70,male,face,histo\n{imgs[1].name},,,,histo\n{imgs[2].name},70,male,moon,\n")
    summary = run_batch(str(meta_run / "model"), str(manifest), str(tmp_path / "out"), backend="eager",
                        device="cpu", workers=1)
    rows = [json.loads(x) for x in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    want = predictor.predict_files([imgs[0], imgs[1]], metadata=[GIVEN, None])
    for row, pred in zip(rows[:2], want):
        assert all(abs(row["probabilities"][c] - pred.probabilities[c]) < 1e-4 for c in predictor.classes)
    assert rows[2]["error"] == "invalid_metadata" and "site: 'moon'" in rows[2]["message"]
    assert summary["errors"] == 1 and summary["predicted"] == 2  # the job went on past the bad row


def test_batch_url_sends_manifest_metadata_to_the_server(served, predictor, data_dir, tmp_path):
    """`medpipe batch --url`: each row's age/sex/site goes beside its image as JSON; the server's answers equal the
    in-process ones; a row without metadata gets the image-only fallback; a bad value is an error row naming it."""
    from medpipe.batch import run_batch
    from medpipe.data.sources import load_records

    table, _ = load_records(data_dir)
    imgs = []
    for p in table["path"][:3]:
        imgs.append(tmp_path / p.rsplit("/", 1)[-1])
        shutil.copy(p, imgs[-1])
    manifest = tmp_path / "in.csv"
    manifest.write_text("path,age_approx,sex,anatom_site_general,dx_type\n"
                        f"{imgs[0].name},70,male,face,histo\n{imgs[1].name},,,,histo\n{imgs[2].name},70,male,moon,\n")
    summary = run_batch(None, str(manifest), str(tmp_path / "out"), url=served.url, retries=1)
    rows = [json.loads(x) for x in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    want = predictor.predict_files([imgs[0], imgs[1]], metadata=[GIVEN, None])
    for row, pred in zip(rows[:2], want):
        assert max(abs(row["probabilities"][c] - pred.probabilities[c]) for c in predictor.classes) < 1e-4
    plain = predictor.predict_files([imgs[0]])[0].probabilities  # the metadata moved the answer: it was sent
    assert max(abs(rows[0]["probabilities"][c] - plain[c]) for c in plain) > 1e-4
    assert rows[2]["error"] == "invalid_metadata" and "site: 'moon'" in rows[2]["message"]
    assert summary["errors"] == 1 and summary["predicted"] == 2 and summary["missing"] == 0


# -- exports -------------------------------------------------------------------------------------------------

def test_onnx_two_inputs_standalone_client_and_torchscript_equal_in_process(meta_run, predictor, data_dir, tmp_path):
    """The ONNX export takes image and metadata (described in metadata_props); the documented client
    (docs/examples/onnx_client_metadata.py) run where medpipe cannot be imported reproduces the Predictor."""
    import subprocess
    import sys
    from pathlib import Path

    import torch

    pytest.importorskip("onnxruntime")
    onnx = tmp_path / "m.onnx"
    assert main(["export", "--model", str(meta_run / "model"), "--format", "onnx", "--out", str(onnx)]) == 0
    client = Path(__file__).resolve().parents[1] / "docs" / "examples" / "onnx_client_metadata.py"
    img = _image(data_dir)
    block = ("import runpy, sys; sys.modules['medpipe'] = None; sys.argv = sys.argv[1:]; "
             "runpy.run_path(sys.argv[0], run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", block, str(client), str(onnx), img, json.dumps(GIVEN), img, "{}"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    got = [json.loads(x) for x in r.stdout.strip().splitlines()]
    for row, values in zip(got, (GIVEN, None)):
        want = predictor.predict_files([img], metadata=[values])[0]
        assert max(abs(row["probabilities"][c] - want.probabilities[c]) for c in predictor.classes) < 1e-4
        assert row["label"] == want.label
    ts = tmp_path / "m.ts"
    assert main(["export", "--model", str(meta_run / "model"), "--format", "torchscript", "--out", str(ts)]) == 0
    from medpipe.preprocess import eval_batch

    x = eval_batch([predictor.spec.read(img)], predictor.spec)
    z = torch.jit.load(str(ts))(x, torch.from_numpy(predictor.metadata_spec.encode_many([GIVEN])))
    want = predictor.predict_files([img], metadata=[GIVEN])[0].probabilities
    np.testing.assert_allclose(torch.softmax(z / predictor.temperature, 1)[0].detach().numpy(),
                               [want[c] for c in predictor.classes], atol=1e-4)


def test_bundle_and_int8_exports_refuse_a_metadata_model_saying_why(meta_run, tmp_path, capsys):
    assert main(["export", "--model", str(meta_run / "model"), "--format", "bundle", "--out", str(tmp_path / "b")]) == 2
    assert "feeds the network one image tensor" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
    assert main(["export", "--model", str(meta_run / "model"), "--format", "onnx-int8",
                 "--out", str(tmp_path / "q.onnx")]) == 2
    assert "patient metadata" in capsys.readouterr().err


# -- SageMaker handler and MLflow pyfunc ---------------------------------------------------------------------

def test_sagemaker_handler_takes_json_metadata(meta_run, predictor, data_dir):
    import base64

    from medpipe.sagemaker.inference import model_fn, transform_fn

    class Context:
        status = 200

        def set_response_status(self, code=200, phrase="", idx=0):
            self.status = code

    model = model_fn(str(meta_run / "model"))
    b64 = base64.b64encode(_jpeg(data_dir)).decode()
    ctx = Context()
    body, _ = transform_fn(model, json.dumps({"images": [b64], "metadata": [GIVEN]}), "application/json",
                           "application/json", ctx)
    got = json.loads(body)["predictions"][0]["probabilities"]
    want = predictor.predict_bytes([_jpeg(data_dir)], metadata=[GIVEN])[0].probabilities
    assert ctx.status == 200 and max(abs(got[c] - want[c]) for c in want) < 1e-4
    body, _ = transform_fn(model, json.dumps({"images": [b64], "metadata": [{"sex": "robot"}]}),
                           "application/json", "application/json", ctx)
    assert ctx.status == 400 and "images[0]: sex: 'robot'" in json.loads(body)["message"]


def test_mlflow_pyfunc_signature_takes_optional_metadata_columns(meta_run, predictor, data_dir, tmp_path):
    mlflow = pytest.importorskip("mlflow")
    import pandas as pd

    from medpipe.track import log_package

    # set_tracking_uri also sets $MLFLOW_TRACKING_URI, which later tests' `--track` would follow: undo both
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        exp = mlflow.create_experiment("metadata", artifact_location=(tmp_path / "artifacts").as_uri())  # not ./mlruns
        with mlflow.start_run(experiment_id=exp):
            info = log_package(meta_run / "model")
        names = [c["name"] for c in json.loads(info.signature.to_dict()["inputs"])]
        assert names == ["image", "age", "sex", "site"]
        model = mlflow.pyfunc.load_model(info.model_uri)
        jpeg = _jpeg(data_dir)
        out = model.predict(pd.DataFrame({"image": [jpeg, jpeg], "age": [70.0, None], "sex": ["male", None],
                                          "site": ["face", None]}))
        for i, values in enumerate((GIVEN, None)):
            want = predictor.predict_bytes([jpeg], metadata=[values])[0].probabilities
            assert max(abs(out[c][i] - want[c]) for c in want) < 1e-4
        out = model.predict(pd.DataFrame({"image": [jpeg]}))  # the image alone still works
        assert abs(out["nv"][0] - predictor.predict_bytes([jpeg])[0].probabilities["nv"]) < 1e-4
        with pytest.raises(MetadataError, match="site: 'moon'"):
            model.predict(pd.DataFrame({"image": [jpeg], "site": ["moon"]}))
    finally:
        mlflow.set_tracking_uri(None)


def test_web_page_offers_the_fields_and_explain_takes_them(served, predictor, data_dir):
    status, _, html = served.request("GET", "/")
    assert status == 200 and b'const METADATA = {"fields": ["age", "sex", "site"]' in html
    status, _, raw = served.request("POST", "/explain?age=70&sex=male&site=face", _jpeg(data_dir),
                                    {"Content-Type": "image/jpeg"})
    want = predictor.predict_bytes([_jpeg(data_dir)], metadata=[GIVEN])[0].probabilities
    got = json.loads(raw)["probabilities"]
    assert status == 200 and max(abs(got[c] - want[c]) for c in want) < 1e-4
    status, _, raw = served.request("POST", "/explain?site=moon", _jpeg(data_dir), {"Content-Type": "image/jpeg"})
    assert status == 400 and "site: 'moon'" in json.loads(raw)["message"]


# -- MetaBlock fusion ----------------------------------------------------------------------------------------

def test_metablock_package_records_its_fusion_and_onnx_torchscript_equal_in_process(data_dir, tmp_path):
    """--metadata-fusion metablock: the metadata gates the DenseNet's feature maps; the package's spec says so,
    and its ONNX (two inputs) and TorchScript exports give the in-process probabilities within 1e-4, with and
    without metadata. A network without a feature trunk to gate is refused naming the option."""
    import onnxruntime as ort
    import torch

    from medpipe.infer.onnx_runtime import INPUT_NAME, METADATA_INPUT_NAME
    from medpipe.infer.predictor import Predictor
    from medpipe.models import create_model
    from medpipe.preprocess import eval_batch

    run = tmp_path / "mb"
    assert main(["train", "--data", str(data_dir), "--out", str(run), *TINY, "--epochs", "1", "--metadata", "auto",
                 "--metadata-fusion", "metablock"]) == 0
    assert json.loads((run / "model" / "model.json").read_text())["metadata"]["fusion"] == "metablock"
    predictor = Predictor(run / "model", device="cpu")
    assert type(predictor.model).__name__ == "MetaBlockFusion"
    img = _image(data_dir)
    x = eval_batch([predictor.spec.read(img)] * 2, predictor.spec).numpy()
    m = predictor.metadata_spec.encode_many([GIVEN, None])
    want = predictor.probabilities([predictor.spec.read(img)] * 2, metadata=[GIVEN, None])
    assert not np.allclose(want[0], want[1], atol=1e-5)  # the metadata moves the prediction
    onnx = tmp_path / "mb.onnx"
    assert main(["export", "--model", str(run / "model"), "--format", "onnx", "--out", str(onnx)]) == 0
    sess = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == [INPUT_NAME, METADATA_INPUT_NAME]
    logits = sess.run(None, {INPUT_NAME: x, METADATA_INPUT_NAME: m})[0]
    np.testing.assert_allclose(torch.softmax(torch.from_numpy(logits) / predictor.temperature, 1).numpy(), want,
                               atol=1e-4)
    ts = tmp_path / "mb.ts"
    assert main(["export", "--model", str(run / "model"), "--format", "torchscript", "--out", str(ts)]) == 0
    z = torch.jit.load(str(ts))(torch.from_numpy(x), torch.from_numpy(m))
    np.testing.assert_allclose(torch.softmax(z / predictor.temperature, 1).detach().numpy(), want, atol=1e-4)
    with pytest.raises(ConfigError, match="metadata_fusion metablock gates a DenseNet's feature maps"):
        create_model("resnet18", 7, metadata_dim=4, fusion="metablock")
    with pytest.raises(ValueError, match="'fusion' must be one of concat, metablock"):
        MetadataSpec.from_dict({**predictor.metadata_spec.to_dict(), "fusion": "sum"})
    assert main(["train", "--data", str(data_dir), "--out", str(tmp_path / "bad"), *TINY, "--metadata", "auto",
                 "--metadata-fusion", "sum"]) == 2


def test_evaluate_reads_missing_table_cells_as_not_given():
    """NaN, None and pandas' NA in the record table are missing values (the field's slots zero), not words
    checked against the vocabulary; a given value is encoded as it is anywhere else."""
    from types import SimpleNamespace

    import pandas as pd

    from medpipe.evaluate import table_metadata

    spec = MetadataSpec.fit([{"age": "40", "sex": "male", "site": "face"}, {"age": "60", "sex": "female",
                                                                            "site": "back"}], ("age", "sex", "site"))
    table = pd.DataFrame({"image_id": ["a", "b", "c", "d"],
                          "age": pd.array([70, None, pd.NA, 50], dtype="Int64"),
                          "sex": pd.array(["male", pd.NA, None, float("nan")], dtype="object"),
                          "site": pd.array(["face", "back", pd.NA, None], dtype="string")})
    got = table_metadata(SimpleNamespace(metadata_spec=spec), table)
    want = [spec.encode(v) for v in ({"age": "70", "sex": "male", "site": "face"}, {"site": "back"}, {},
                                     {"age": "50"})]
    np.testing.assert_array_equal(got, np.stack(want))
    assert not got[2].any()
    with pytest.raises(MetadataError, match="d.*sex"):  # a real word outside the vocabulary is still refused
        table_metadata(SimpleNamespace(metadata_spec=spec), table.assign(sex=["male", "male", "male", "other"]))
