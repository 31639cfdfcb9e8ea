"""Runs the official tritonclient (KServe v2 / Open Inference Protocol) against `slimnn serve`.

    tritonclient_check.py HTTP_HOST:PORT GRPC_HOST:PORT MODEL CASES_DIR OUT_DIR

CASES_DIR/<case>/<input>.npy are the requests; each answer is written as
OUT_DIR/<protocol>/<case>/<output>.npy for the Rust test to compare with `slimnn run`.
Protocols: http (binary tensors), http_json (JSON tensors), http_async (all cases in flight at
once, so the server batches them), grpc. Bad gRPC requests print one JSON line each with the
status code the server answered.
"""
import json
import os
import sys

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

http_url, grpc_url, model, cases_dir, out_dir = sys.argv[1:6]
cases = sorted(os.listdir(cases_dir))


def load(case):
    d = os.path.join(cases_dir, case)
    return {f[:-4]: np.load(os.path.join(d, f)) for f in sorted(os.listdir(d))}


def inputs_for(mod, feeds, binary=True):
    out = []
    for name, arr in feeds.items():
        i = mod.InferInput(name, list(arr.shape), "INT64")
        if mod is httpclient:
            i.set_data_from_numpy(arr, binary_data=binary)
        else:
            i.set_data_from_numpy(arr)
        out.append(i)
    return out


def save(proto, case, result, names):
    d = os.path.join(out_dir, proto, case)
    os.makedirs(d, exist_ok=True)
    for n in names:
        np.save(os.path.join(d, n + ".npy"), result.as_numpy(n))


h = httpclient.InferenceServerClient(url=http_url, concurrency=len(cases))
g = grpcclient.InferenceServerClient(url=grpc_url)
assert h.is_server_live() and h.is_server_ready() and h.is_model_ready(model)
assert g.is_server_live() and g.is_server_ready() and g.is_model_ready(model)
meta = h.get_model_metadata(model)
names = [o["name"] for o in meta["outputs"]]
gmeta = g.get_model_metadata(model)
assert [o.name for o in gmeta.outputs] == names, gmeta

for case in cases:
    feeds = load(case)
    save("http", case, h.infer(model, inputs_for(httpclient, feeds)), names)
    json_outputs = [httpclient.InferRequestedOutput(n, binary_data=False) for n in names]
    save("http_json", case, h.infer(model, inputs_for(httpclient, feeds, False), outputs=json_outputs), names)
    save("grpc", case, g.infer(model, inputs_for(grpcclient, feeds)), names)

pending = [(case, h.async_infer(model, inputs_for(httpclient, load(case)))) for case in cases]
for case, p in pending:
    save("http_async", case, p.get_result(), names)

# Bad gRPC requests: each must be refused with a clear status, not a crash.
feeds = load(cases[0])


def grpc_error(label, inputs, model_name=model):
    try:
        g.infer(model_name, inputs)
        print(json.dumps({"case": label, "status": "OK"}))
    except InferenceServerException as e:
        print(json.dumps({"case": label, "status": e.status(), "message": e.message()}))


wrong = grpcclient.InferInput("input_ids", list(feeds["input_ids"].shape), "FP32")
wrong.set_data_from_numpy(feeds["input_ids"].astype(np.float32))
grpc_error("wrong_dtype", [wrong] + inputs_for(grpcclient, feeds)[1:])
grpc_error("missing_input", inputs_for(grpcclient, feeds)[:2])
flat = grpcclient.InferInput("input_ids", [feeds["input_ids"].size], "INT64")
flat.set_data_from_numpy(feeds["input_ids"].reshape(-1))
grpc_error("wrong_shape", [flat] + inputs_for(grpcclient, feeds)[1:])
grpc_error("unknown_model", inputs_for(grpcclient, feeds), "no-such-model")
print("tritonclient: done")
