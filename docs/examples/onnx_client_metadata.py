import json, sys, numpy as np, onnxruntime as ort
from PIL import Image, ImageOps
# python onnx_client_metadata.py model.onnx IMAGE '{"age": 60, "sex": "male", "site": "back"}' [IMAGE METADATA ...]
sess = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
meta = {k: json.loads(v) for k, v in sess.get_modelmeta().custom_metadata_map.items() if k in ("classes", "preprocessing", "temperature", "decision", "metadata")}
spec, s, md = meta["preprocessing"], meta["preprocessing"]["image_size"], meta["metadata"]
for path, given in zip(sys.argv[2::2], map(json.loads, sys.argv[3::2])):
    img = Image.open(path); img.draft("RGB", (s, s))  # JPEG: DCT-domain downscale, as medpipe decodes
    img = ImageOps.exif_transpose(img).convert("RGB").resize((s, s), Image.Resampling[spec["resample"]], reducing_gap=None)
    x = (np.asarray(img, np.float32).transpose(2, 0, 1) / 255 - np.float32(spec["mean"])[:, None, None]) / np.float32(spec["std"])[:, None, None]
    m, at = np.zeros(md["dim"], np.float32), 0  # the encoding metadata_props describe; a field not given: zeros
    for field in md["fields"]:
        value = given.get(field)
        if field == "age":
            if value is not None:
                m[at:at + 2] = 1, (value - md["age_mean"]) / md["age_std"]
            at += 2
        else:
            if value not in (None, "", "unknown"):
                m[at + md[field].index(value.lower())] = 1  # a word outside the vocabulary: ValueError
            at += len(md[field])
    z = sess.run(None, {"image": x[None], "metadata": m[None]})[0][0] / meta["temperature"]
    probs = dict(zip(meta["classes"], (np.exp(z - z.max()) / np.exp(z - z.max()).sum()).tolist()))
    print(json.dumps({"image": path, "label": meta["classes"][int(np.argmax(z + meta["decision"]["offsets"]))], "probabilities": probs}))
