import json, sys, numpy as np, onnxruntime as ort
from PIL import Image, ImageOps
sess = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
meta = {k: json.loads(v) for k, v in sess.get_modelmeta().custom_metadata_map.items() if k in ("classes", "preprocessing", "temperature", "decision")}
spec, s = meta["preprocessing"], meta["preprocessing"]["image_size"]
for path in sys.argv[2:]:
    img = Image.open(path); img.draft("RGB", (s, s))  # JPEG: DCT-domain downscale, as medpipe decodes
    img = ImageOps.exif_transpose(img).convert("RGB").resize((s, s), Image.Resampling[spec["resample"]], reducing_gap=None)
    x = (np.asarray(img, np.float32).transpose(2, 0, 1) / 255 - np.float32(spec["mean"])[:, None, None]) / np.float32(spec["std"])[:, None, None]
    z = sess.run(None, {"image": x[None]})[0][0] / meta["temperature"]
    probs = dict(zip(meta["classes"], (np.exp(z - z.max()) / np.exp(z - z.max()).sum()).tolist()))
    # the label under the package's decision rule: argmax(log(probabilities) + offsets) = argmax(z + offsets)
    print(json.dumps({"image": path, "label": meta["classes"][int(np.argmax(z + meta["decision"]["offsets"]))], "probabilities": probs}))
