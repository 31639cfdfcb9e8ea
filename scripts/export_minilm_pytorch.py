#!/usr/bin/env python3
"""Export all-MiniLM-L6-v2 to ONNX with PyTorch's exporter, the layout benchmarks compare on.

    export_minilm_pytorch.py MODEL_DIR OUT.onnx [--opset 17] [--dynamo]

MODEL_DIR is the sentence-transformers folder (`assets/minilm`: config.json + model.safetensors).
The graph is Hugging Face `BertModel` plus sentence-transformers' mean pooling and L2
normalisation, with outputs `last_hidden_state` and `sentence_embedding` and dynamic batch and
sequence axes, as `optimum`/sentence-transformers exports write it. Needs torch + transformers
(`bash scripts/setup-python.sh export` makes `.venv-export`); CI does not.
"""

import argparse
import sys

import torch
from transformers import BertConfig, BertModel


class SentenceEmbedder(torch.nn.Module):
    def __init__(self, bert: BertModel) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask, token_type_ids):
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)[0]
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        mean = (h * m).sum(1) / torch.clamp(m.sum(1), min=1e-9)
        return h, torch.nn.functional.normalize(mean, p=2, dim=1)


def main() -> None:
    ap = argparse.ArgumentParser(prog="export_minilm_pytorch.py")
    ap.add_argument("model_dir")
    ap.add_argument("out")
    ap.add_argument("--opset", type=int, default=17)
    ap.add_argument("--dynamo", action="store_true", help="use the torch.export-based exporter")
    a = ap.parse_args()
    config = BertConfig.from_pretrained(a.model_dir)
    # Eager attention: the plain MatMul/Softmax/MatMul graph most deployed BERT exports carry.
    config._attn_implementation = "eager"
    try:
        bert = BertModel.from_pretrained(a.model_dir, config=config, add_pooling_layer=False)
    except OSError as e:
        sys.exit(f"export_minilm_pytorch: cannot load {a.model_dir}: {e}")
    model = SentenceEmbedder(bert).eval()
    ids = torch.tensor([[101, 7592, 2088, 2003, 1037, 3231, 102, 0]], dtype=torch.int64)
    mask = (ids != 0).to(torch.int64)
    types = torch.zeros_like(ids)
    axes = {0: "batch", 1: "sequence"}
    with torch.no_grad():
        torch.onnx.export(
            model,
            (ids, mask, types),
            a.out,
            input_names=["input_ids", "attention_mask", "token_type_ids"],
            output_names=["last_hidden_state", "sentence_embedding"],
            dynamic_axes={
                "input_ids": axes,
                "attention_mask": axes,
                "token_type_ids": axes,
                "last_hidden_state": axes,
                "sentence_embedding": {0: "batch"},
            },
            opset_version=a.opset,
            dynamo=a.dynamo,
        )
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
