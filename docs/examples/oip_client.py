import sys, numpy as np, tritonclient.http as httpclient
url, model, image = sys.argv[1:4]   # e.g. 127.0.0.1:8080 densenet121-ham lesion.jpg (model: the package's name)
client = httpclient.InferenceServerClient(url)
inp = httpclient.InferInput("image_bytes", [1], "BYTES")
inp.set_data_from_numpy(np.array([open(image, "rb").read()], dtype=object))
res = client.infer(model, [inp])
print(res.as_numpy("label")[0].decode(), res.as_numpy("probabilities")[0].tolist())
