"""SageMaker contract in medpipe's own environment: /opt/ml emulation, the deployable layout, the
handlers' error answers, Ground Truth references. The real toolkits, TorchServe and the SDK are
exercised in tests/test_sagemaker_toolkits.py."""

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from medpipe.sagemaker.env import load_env
from medpipe.sagemaker.training import parse_hyperparameter_args

ROOT = Path(__file__).resolve().parents[1]
LAYOUT_TOP = {"weights.safetensors", "model.json", "code"}


def _tree(base: Path, synth_dir: Path | None):
    (base / "input" / "config").mkdir(parents=True)
    (base / "input" / "data" / "train").mkdir(parents=True)
    if synth_dir is not None:
        shutil.copytree(synth_dir, base / "input" / "data" / "train" / "ham", ignore=shutil.ignore_patterns("*.zip"))
    hps = {"epochs": "1", "image-size": "32", "batch-size": "8", "bootstrap": "20",
           "sagemaker_program": "\"sagemaker_entry.py\"", "sagemaker_submit_directory": "\"s3://b/k\""}
    (base / "input" / "config" / "hyperparameters.json").write_text(json.dumps(hps))
    (base / "input" / "config" / "resourceconfig.json").write_text(json.dumps({"current_host": "algo-1",
                                                                               "hosts": ["algo-1"]}))
    env = {**os.environ, "SAGEMAKER_BASE_DIR": str(base), "SM_MODEL_DIR": str(base / "model"),
           "SM_OUTPUT_DATA_DIR": str(base / "output" / "data"), "SM_CHANNELS": json.dumps(["train"]),
           "SM_CHANNEL_TRAIN": str(base / "input" / "data" / "train"), "SM_HOSTS": json.dumps(["algo-1"]),
           "SM_CURRENT_HOST": "algo-1", "SM_NUM_GPUS": "0", "MEDPIPE_SM_WORK": str(base.parent / "work"),
           "SM_HPS": json.dumps(hps), "OMP_NUM_THREADS": "1"}
    return env


def test_hyperparameter_parsing():
    hp = parse_hyperparameter_args(["--epochs", "3", "--lr", "0.01", "--imbalance", "focal", "--deterministic",
                                    "--image-size=64"])
    assert hp == {"epochs": 3, "lr": 0.01, "imbalance": "focal", "deterministic": True, "image_size": 64}


def test_entry_script_emulated_opt_ml(synth_dir, tmp_path):
    base = tmp_path / "opt_ml"
    env = _tree(base, synth_dir)
    # SageMaker passes hyperparameters as sorted --key value arguments
    args = ["--batch-size", "8", "--bootstrap", "20", "--epochs", "1", "--image-size", "32", "--model", "densenet-test",
            "--sagemaker_program", "sagemaker_entry.py"]
    r = subprocess.run([sys.executable, str(ROOT / "sagemaker_entry.py"), *args], env=env, capture_output=True,
                       text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "epoch=1 train_loss=" in r.stdout and " val_auc=" in r.stdout
    # SM_MODEL_DIR is the deployable layout itself: SageMaker tars it; no tarball inside it
    model = base / "model"
    assert {p.name for p in model.iterdir()} == LAYOUT_TOP
    assert (model / "code" / "inference.py").is_file() and (model / "code" / "medpipe" / "sagemaker").is_dir()
    assert not list(model.rglob("*.tar.gz"))
    assert (base / "output" / "data" / "report" / "report.md").is_file()
    assert (base / "output" / "data" / "ingest_report.json").is_file()
    assert (base / "checkpoints" / "last.pt").is_file()
    assert not (base / "output" / "failure").exists()


def test_entry_script_failure_file(tmp_path):
    base = tmp_path / "opt_ml"
    env = _tree(base, None)  # an empty train channel
    r = subprocess.run([sys.executable, str(ROOT / "sagemaker_entry.py"), "--epochs", "1"], env=env,
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode != 0
    reason = (base / "output" / "failure").read_text()
    assert reason and len(reason) <= 1024 and "train" in reason


def test_bad_hyperparameter_fails_with_reason(synth_dir, tmp_path):
    base = tmp_path / "opt_ml"
    env = _tree(base, synth_dir)
    r = subprocess.run([sys.executable, str(ROOT / "sagemaker_entry.py"), "--epochz", "1"], env=env,
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode != 0
    assert "epochz" in (base / "output" / "failure").read_text()


def test_load_env_reads_files_and_honours_base_dir(tmp_path):
    base = tmp_path / "ml"
    env = _tree(base, None)
    env = {k: v for k, v in env.items() if not k.startswith("SM_")}
    sm = load_env(env)
    assert sm.base == base and sm.model_dir == base / "model" and sm.checkpoint_dir == base / "checkpoints"
    assert sm.hosts == ["algo-1"] and sm.current_host == "algo-1" and sm.is_primary
    assert sm.hyperparameters["epochs"] == 1 and sm.channels == {"train": base / "input" / "data" / "train"}
    alias = {k: v for k, v in env.items() if k != "SAGEMAKER_BASE_DIR"} | {"MEDPIPE_SM_BASE": str(base)}
    assert load_env(alias).channels == sm.channels  # the older variable still works
    # the estimator's checkpoint_local_path, passed as the hyperparameter of the same name
    hps = json.loads((base / "input" / "config" / "hyperparameters.json").read_text())
    hps["checkpoint-local-path"] = json.dumps(str(tmp_path / "ckpt"))
    (base / "input" / "config" / "hyperparameters.json").write_text(json.dumps(hps))
    assert load_env(env).checkpoint_dir == tmp_path / "ckpt"


# -- the deployable layout -----------------------------------------------------------------------------


def _members(tar_path: Path) -> dict[str, bytes]:
    with tarfile.open(tar_path) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf.getmembers() if m.isfile()}


def test_package_folder_and_tarball_hold_the_same_files(trained_run, tmp_path):
    from medpipe.cli import main

    pkg = trained_run / "model"
    assert main(["package", "--model", str(pkg), "--out", str(tmp_path / "model.tar.gz")]) == 0
    assert main(["package", "--model", str(pkg), "--out", str(tmp_path / "layout")]) == 0
    members = _members(tmp_path / "model.tar.gz")
    on_disk = {p.relative_to(tmp_path / "layout").as_posix(): p.read_bytes()
               for p in (tmp_path / "layout").rglob("*") if p.is_file()}
    assert members == on_disk
    assert {n.split("/")[0] for n in members} == LAYOUT_TOP  # at the top level, no folder prefix
    assert not [n for n in members if n.endswith((".tar.gz", ".pyc"))]
    assert members["weights.safetensors"] == (pkg / "weights.safetensors").read_bytes()
    reqs = members["code/requirements.txt"].decode()
    lines = [ln.split("#")[0].strip() for ln in reqs.splitlines() if ln.split("#")[0].strip()]
    assert lines and not [ln for ln in lines if ln.lower().startswith("torch")]
    assert reqs == (ROOT / "src/medpipe/sagemaker/requirements.txt").read_text()  # the one list
    # the repository's requirements.txt (training container) includes the same list
    assert "-r src/medpipe/sagemaker/requirements.txt" in (ROOT / "requirements.txt").read_text()
    # a non-empty folder is not overwritten
    assert main(["package", "--model", str(pkg), "--out", str(tmp_path / "layout")]) == 2


class FakeContext:
    """What the toolkit's Transformer hands a handler: system_properties and set_response_status."""

    def __init__(self, gpu_id=None):
        self.system_properties = {"gpu_id": gpu_id, "model_dir": "/opt/ml/model"}
        self.status = None

    def set_response_status(self, code=200, phrase="", idx=0):
        self.status = (code, phrase)


@pytest.fixture(scope="module")
def handler_model(trained_run):
    from medpipe.sagemaker.inference import model_fn

    return model_fn(str(trained_run / "model"), FakeContext(gpu_id=0))


def test_handlers_answer_client_errors_with_status_and_json(handler_model, data_dir):
    import pandas as pd
    from PIL import Image

    from medpipe.sagemaker.inference import transform_fn

    image = Path(pd.read_csv(data_dir / "records.csv")["path"].iloc[0]).read_bytes()
    ctx = FakeContext()
    body, ctype = transform_fn(handler_model, image, "image/jpeg", "application/json", ctx)
    assert ctx.status is None and ctype == "application/json"
    probs = json.loads(body)["predictions"][0]["probabilities"]
    assert abs(sum(probs.values()) - 1) < 1e-4 and set(probs) == set(handler_model.classes)
    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, format="GIF")
    many = json.dumps({"images": ["AAAA"] * 17}).encode()
    pickled = io.BytesIO()
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    cases = [(image[: len(image) // 2], "image/jpeg", "application/json", 400),  # truncated JPEG
             (gif.getvalue(), "image/jpeg", "application/json", 415),
             (gif.getvalue(), "image/gif", "application/json", 415),
             (image, "image/jpeg", "application/xml", 406),
             (many, "application/json", "application/json", 413),
             (pickled.getvalue(), "application/x-npy", "application/json", 400)]
    for payload, content_type, accept, status in cases:
        ctx = FakeContext()
        body, ctype = transform_fn(handler_model, payload, content_type, accept, ctx)
        err = json.loads(body)
        assert ctx.status[0] == status, (content_type, accept, body)
        assert ctype == "application/json" and set(err) == {"error", "message", "request_id"}
        assert "Traceback" not in body and "/" not in err["message"].replace("application/", "").replace(
            "image/", "").replace("text/", "")
    csv, ctype = transform_fn(handler_model, image, "image/jpeg", "text/csv", FakeContext())
    assert ctype == "text/csv" and csv.startswith("index,label,class_index,akiec")


def test_handlers_unexpected_failure_is_a_500_without_traceback(handler_model, monkeypatch, caplog):
    import medpipe.sagemaker.inference as handlers
    from medpipe.sagemaker.inference import transform_fn

    def boom(*a, **k):
        raise RuntimeError("secret /internal/path")

    monkeypatch.setattr(handlers, "decode_item", boom)
    ctx = FakeContext()
    body, _ = transform_fn(handler_model, b"\xff\xd8\xff", "image/jpeg", None, ctx)
    assert ctx.status == (500, "internal_error") and "secret" not in body and "Traceback" not in body
    assert "secret /internal/path" in caplog.text  # the operator still sees it in the log


def test_model_fn_device_from_worker_context(monkeypatch):
    import torch

    from medpipe.sagemaker.inference import device_for

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert device_for(FakeContext(gpu_id=3)) == "cuda:3"  # each TorchServe worker its own GPU
    assert device_for(FakeContext(gpu_id=None)) == "cpu" and device_for(None) == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device_for(FakeContext(gpu_id=0)) == "cpu"


def test_extracted_tarball_imports_its_vendored_medpipe(trained_run, data_dir, tmp_path):
    """The extracted model.tar.gz alone (code/ on the path, as the toolkit sets it) serves a request."""
    import pandas as pd

    from medpipe.sagemaker.layout import build_tarball

    build_tarball(trained_run / "model", tmp_path / "model.tar.gz")
    with tarfile.open(tmp_path / "model.tar.gz") as tf:
        tf.extractall(tmp_path / "opt_ml_model", filter="data")
    image = pd.read_csv(data_dir / "records.csv")["path"].iloc[0]
    script = f"""
import json, sys
import inference, medpipe
assert medpipe.__file__.startswith({str(tmp_path)!r}), medpipe.__file__  # the vendored copy
model = inference.model_fn({str(tmp_path / 'opt_ml_model')!r})
body, ctype = inference.transform_fn(model, open(sys.argv[1], 'rb').read(), 'image/jpeg', 'application/json')
assert ctype == 'application/json' and json.loads(body)['predictions'][0]['label'] in model.classes
print('ok', model.backend)
"""
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "opt_ml_model" / "code")}
    r = subprocess.run([sys.executable, "-c", script, image], capture_output=True, text=True, env=env,
                       cwd=tmp_path, timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]
    assert "ok onnx" in r.stdout  # ONNX Runtime on CPU, as medpipe serve --backend auto


# -- Ground Truth references ----------------------------------------------------------------------------


def _gt_line(ref: str, label: str = "nv", attr: str = "skin-label", **extra) -> str:
    index = ["nv", "mel"].index(label)
    return json.dumps({"source-ref": ref, attr: index, f"{attr}-metadata": {"class-name": label}, **extra})


@pytest.fixture()
def s3_tree(data_dir, tmp_path):
    import pandas as pd

    rows = pd.read_csv(data_dir / "records.csv").head(4)
    root = tmp_path / "s3"
    (root / "bucket" / "imgs").mkdir(parents=True)
    names = []
    for p in rows["path"]:
        shutil.copy(p, root / "bucket" / "imgs" / Path(p).name)
        names.append(Path(p).name)
    outside = tmp_path / "outside.jpg"
    shutil.copy(rows["path"].iloc[0], outside)
    (root / "bucket" / "imgs" / "link.jpg").symlink_to(outside)
    return root, names, outside


def test_groundtruth_s3_refs_confined_to_s3_root(s3_tree, tmp_path):
    from medpipe.data.sources import ingest

    root, names, outside = s3_tree
    enc = str(outside).replace("/", "%2F")
    lines = [_gt_line(f"s3://bucket/imgs/{n}", label=["nv", "mel"][i % 2]) for i, n in enumerate(names)]
    lines += [_gt_line(f"s3://bucket/{enc}"),                      # %2F-encoded absolute key
              _gt_line(f"s3://bucket/imgs/%2E%2E/%2E%2E/x.jpg"),   # encoded ..
              _gt_line("s3://bucket/imgs/link.jpg")]                # symlink under the root pointing out
    manifest = tmp_path / "gt.manifest"
    manifest.write_text("\n".join(lines) + "\n")
    report = ingest(manifest, tmp_path / "out", s3_root=str(root), workers=1)
    assert report["records"] == len(names)
    bad = [d for d in report["defects"] if d["reason"] == "bad_source_ref"]
    assert len(bad) == 3 and all("refused" in d["detail"] for d in bad)
    assert report["label_attribute"] == "skin-label"


def test_chained_manifest_needs_a_label_attribute(s3_tree, tmp_path):
    from medpipe.data.sources import IngestError, ingest, load_records

    root, names, _ = s3_tree
    lines = []
    for i, n in enumerate(names):  # a second labelling job run on the first job's output manifest
        obj = json.loads(_gt_line(f"s3://bucket/imgs/{n}", label="nv" if i % 2 else "mel"))
        obj.update({"review": i % 2, "review-metadata": {"class-name": "bcc" if i % 2 else "df"}})
        lines.append(json.dumps(obj))
    manifest = tmp_path / "chained.manifest"
    manifest.write_text("\n".join(lines) + "\n")
    with pytest.raises(IngestError, match="'review'.*'skin-label'.*--label-attribute"):
        ingest(manifest, tmp_path / "a", s3_root=str(root), workers=1)
    assert not (tmp_path / "a" / "records.csv").exists()
    report = ingest(manifest, tmp_path / "b", s3_root=str(root), label_attribute="review", workers=1)
    assert report["label_attribute"] == "review"
    assert set(load_records(tmp_path / "b")[0]["label"]) == {"bcc", "df"}


def test_batch_reads_a_groundtruth_manifest_with_s3_root(s3_tree, trained_run, tmp_path):
    from medpipe.cli import main

    root, names, outside = s3_tree
    lines = [_gt_line(f"s3://bucket/imgs/{n}") for n in names]
    lines += [_gt_line("s3://bucket/" + str(outside).replace("/", "%2F")), _gt_line("s3://bucket/imgs/link.jpg")]
    manifest = tmp_path / "in.manifest"
    manifest.write_text("\n".join(lines) + "\n")
    rc = main(["batch", "--model", str(trained_run / "model"), "--input", str(manifest), "--output",
               str(tmp_path / "out"), "--s3-root", str(root), "--backend", "eager", "--device", "cpu"])
    assert rc == 0
    rows = [json.loads(x) for x in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert sum("error" not in r for r in rows) == len(names)
    assert [r["error"] for r in rows if "error" in r] == ["outside_input_root"] * 2


def test_offline_layout_installs_from_vendored_wheels_only(trained_run, tmp_path):
    """The offline form's requirements use --no-index with the vendored wheels; the vendored set is what
    the list needs except torch and what only torch needs (the container has them)."""
    from medpipe.sagemaker.layout import not_torch_closure, write_layout

    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "monai-1.5.2-py3-none-any.whl").write_bytes(b"wheel")
    out = write_layout(trained_run / "model", tmp_path / "layout", wheels=wheels)
    reqs = (out / "code" / "requirements.txt").read_text().splitlines()
    assert "--no-index" in reqs and "--find-links ./wheels" in reqs
    assert (out / "code" / "wheels" / "monai-1.5.2-py3-none-any.whl").is_file()

    def item(name, requires=(), requested=False):
        return {"requested": requested, "metadata": {"name": name, "version": "1", "requires_dist": list(requires)}}

    report = [item("monai", ["torch>=2.4.1", "numpy<3,>=1.24"], True), item("torch", ["sympy", "filelock"]),
              item("sympy", ["mpmath"]), item("mpmath"), item("filelock"), item("numpy"),
              item("pandas", ["numpy>=1.26", "tzdata; python_version >= '3'", "pytest; extra == 'test'"], True),
              item("tzdata"), item("pytest")]
    assert [i["metadata"]["name"] for i in not_torch_closure(report)] == ["monai", "numpy", "pandas", "tzdata"]


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda(), reason="needs a CUDA device")
def test_model_fn_on_the_worker_gpu(trained_run, data_dir):
    """On a GPU instance each TorchServe worker's model sits on the GPU its context names (CUDA graphs)."""
    import pandas as pd
    import torch

    from medpipe.infer.predictor import Predictor
    from medpipe.sagemaker.inference import model_fn, transform_fn

    gpu = torch.cuda.device_count() - 1
    model = model_fn(str(trained_run / "model"), FakeContext(gpu_id=gpu))
    assert model.device == torch.device(f"cuda:{gpu}") and model.backend == "cudagraph"
    image = Path(pd.read_csv(data_dir / "records.csv")["path"].iloc[0]).read_bytes()
    body, _ = transform_fn(model, image, "image/jpeg", None, FakeContext())
    got = json.loads(body)["predictions"][0]["probabilities"]
    ref = json.loads(transform_fn(Predictor(trained_run / "model", device="cpu", backend="eager"), image,
                                  "image/jpeg", None, FakeContext())[0])["predictions"][0]["probabilities"]
    assert max(abs(got[c] - ref[c]) for c in ref) < 5e-3
