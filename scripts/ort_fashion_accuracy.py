"""Test accuracy of an exported Fashion-MNIST model (input `image` [N,1,28,28]) in ONNX Runtime,
with the normalisation slimnn's loader uses (training-set mean and std of pixels / 255).

    .venv/bin/python scripts/ort_fashion_accuracy.py runs/lenet5/model.onnx [assets/fashion-mnist]
"""
import gzip
import sys

import numpy as np
import onnxruntime as ort


def idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def main():
    model = sys.argv[1]
    root = sys.argv[2] if len(sys.argv) > 2 else "assets/fashion-mnist"
    train = idx(f"{root}/train-images-idx3-ubyte.gz").astype(np.float64) / 255.0
    mean, std = train.mean(), train.std()
    test = (idx(f"{root}/t10k-images-idx3-ubyte.gz").astype(np.float64) / 255.0 - mean) / std
    labels = idx(f"{root}/t10k-labels-idx1-ubyte.gz")
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    x = test.astype(np.float32).reshape(-1, 1, 28, 28)
    logits = np.concatenate([sess.run(None, {"image": x[i : i + 1000]})[0] for i in range(0, len(x), 1000)])
    print(f"onnxruntime {ort.__version__}: {model}: test accuracy {(logits.argmax(1) == labels).mean():.4f}")


if __name__ == "__main__":
    main()
