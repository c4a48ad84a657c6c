#!/usr/bin/env python3
"""Build a tiny decoder-only Llama ONNX fixture with a standard exporter.

Produces, under testdata/onnx/:
  tiny-llama.onnx          torch.onnx.export of transformers.LlamaForCausalLM
                           (random deterministic weights, float32, no KV cache,
                           all weights inline, HF parameter names kept)
  config.json              the HF LlamaConfig
  tiny-llama.expected.json onnxruntime logits for a fixed input, plus the
                           max abs diff torch vs onnxruntime and tool versions

Usage:
  pip install torch transformers onnx onnxruntime   # (+ onnxscript for --mode dynamo)
  python scripts/make_onnx_fixture.py [--mode torchscript|dynamo] [--out-dir DIR]

--mode torchscript (default) uses the legacy TorchScript exporter
(dynamo=False) with do_constant_folding=False, which keeps every initializer
named after its HF parameter (e.g. model.layers.0.self_attn.q_proj.weight)
and stored in PyTorch's [out, in] layout (the graph applies a Transpose node
before MatMul).
"""

import argparse
import json
import os
import sys

import numpy as np
import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

import onnx
import onnxruntime as ort

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INPUT_IDS = [[1, 17, 300, 5, 999, 42, 7, 128]]


class LogitsOnly(torch.nn.Module):
    """forward(input_ids) -> logits, without KV cache.

    Holds the HF submodules under their HF attribute names (``model``,
    ``lm_head``) so exported initializer names equal the HF state_dict keys
    (``model.layers.0.self_attn.q_proj.weight`` rather than
    ``model.model.layers...``).  This is LlamaForCausalLM.forward minus the
    loss/cache plumbing.

    The causal mask is built here as an additive float [1, 1, seq, seq] mask
    and passed to the HF model as a 4D mask, which HF uses as-is.  Letting HF
    build it (transformers 5.x masking_utils) traces aten::diff
    (packed-sequence detection), which the TorchScript exporter cannot export.
    """

    def __init__(self, hf):
        super().__init__()
        self.model = hf.model
        self.lm_head = hf.lm_head

    def forward(self, input_ids):
        seq = input_ids.shape[1]
        pos = torch.arange(seq, device=input_ids.device)
        neg = torch.tensor(torch.finfo(torch.float32).min, dtype=torch.float32)
        zero = torch.tensor(0.0, dtype=torch.float32)
        mask = torch.where(pos[None, :] > pos[:, None], neg, zero)[None, None]
        h = self.model(input_ids=input_ids, attention_mask=mask, use_cache=False).last_hidden_state
        return self.lm_head(h)


def build_model():
    config = LlamaConfig(
        vocab_size=1024,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        attention_bias=False,
        mlp_bias=False,
        hidden_act="silu",
        use_cache=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(config, attn_implementation="eager",
                                          dtype=torch.float32)
    # HF initialises every RMSNorm weight to exactly 1.0.  The TorchScript
    # exporter deduplicates initializers with identical contents, which would
    # collapse all norm weights into one initializer plus Identity nodes (and
    # all-ones weights would also hide gain-handling bugs).  Perturb them
    # deterministically so every norm keeps its own, distinct initializer.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
    model = model.to(torch.float32).eval()
    return model


def export(wrapper, path, mode):
    dummy = torch.tensor(INPUT_IDS, dtype=torch.int64)
    if mode == "torchscript":
        torch.onnx.export(
            wrapper,
            (dummy,),
            path,
            input_names=["input_ids"],
            output_names=["logits"],
            dynamic_axes={"input_ids": {1: "seq"}, "logits": {1: "seq"}},
            opset_version=17,
            do_constant_folding=False,
            export_params=True,
            dynamo=False,
        )
    elif mode == "dynamo":
        seq = torch.export.Dim("seq", min=1, max=256)
        prog = torch.onnx.export(
            wrapper,
            (dummy,),
            input_names=["input_ids"],
            output_names=["logits"],
            dynamic_shapes={"input_ids": {1: seq}},
            dynamo=True,
            external_data=False,
        )
        prog.save(path, external_data=False)
    else:
        raise SystemExit(f"unknown mode {mode}")
    # Re-save to guarantee a single self-contained file (no external data).
    m = onnx.load(path, load_external_data=True)
    onnx.save_model(m, path, save_as_external_data=False)
    for f in os.listdir(os.path.dirname(path)):
        if f.endswith(".onnx.data"):
            os.remove(os.path.join(os.path.dirname(path), f))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", default="torchscript", choices=["torchscript", "dynamo"])
    ap.add_argument("--out-dir", default=os.path.join(REPO, "testdata", "onnx"))
    args = ap.parse_args()

    os.makedirs(args.out_dir, exist_ok=True)
    onnx_path = os.path.join(args.out_dir, "tiny-llama.onnx")
    json_path = os.path.join(args.out_dir, "tiny-llama.expected.json")

    torch.set_num_threads(1)
    model = build_model()
    model.config.to_json_file(os.path.join(args.out_dir, "config.json"))
    wrapper = LogitsOnly(model).eval()

    ids = torch.tensor(INPUT_IDS, dtype=torch.int64)
    with torch.no_grad():
        torch_logits = wrapper(ids).float().numpy()
        hf_logits = model(ids, use_cache=False).logits.float().numpy()
        wdiff = float(np.max(np.abs(torch_logits - hf_logits)))
        print(f"wrapper vs plain HF LlamaForCausalLM max abs diff: {wdiff:.3e}")
        assert wdiff < 1e-5, wdiff
        export(wrapper, onnx_path, args.mode)

    # --- inspect the graph -------------------------------------------------
    m = onnx.load(onnx_path)
    onnx.checker.check_model(m)
    print(f"exporter mode: {args.mode}; opset: "
          f"{[(o.domain or 'ai.onnx', o.version) for o in m.opset_import]}")
    print("inputs :", [(i.name, [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim])
                      for i in m.graph.input])
    print("outputs:", [(o.name, [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim])
                      for o in m.graph.output])
    print(f"initializers ({len(m.graph.initializer)}):")
    for t in m.graph.initializer:
        print(f"  {t.name:55s} {list(t.dims)!s:15s} "
              f"{onnx.TensorProto.DataType.Name(t.data_type)}"
              f"{'  (external)' if t.data_location == onnx.TensorProto.EXTERNAL else ''}")
    n_const = sum(1 for n in m.graph.node if n.op_type == "Constant")
    print(f"Constant nodes: {n_const}; op types: "
          f"{sorted(set(n.op_type for n in m.graph.node))}")

    # --- onnxruntime reference ---------------------------------------------
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])
    (ort_logits,) = sess.run(["logits"], {"input_ids": ids.numpy()})
    assert ort_logits.shape == (1, len(INPUT_IDS[0]), 1024), ort_logits.shape
    diff = float(np.max(np.abs(ort_logits - torch_logits)))
    print(f"max abs diff torch vs onnxruntime: {diff:.3e}")

    # dynamic seq axis sanity check: a prefix must give the same logits
    (ort_prefix,) = sess.run(["logits"], {"input_ids": ids[:, :3].numpy()})
    pdiff = float(np.max(np.abs(ort_prefix - ort_logits[:, :3])))
    print(f"prefix(3) vs full logits max abs diff (causality/dynamic axis): {pdiff:.3e}")

    out = {
        "input_ids": INPUT_IDS[0],
        "logits": [[float(x) for x in row] for row in ort_logits[0]],
        "torch_logits_max_abs_diff_vs_onnxruntime": diff,
        "exporter": {"mode": args.mode,
                     "dynamo": args.mode == "dynamo",
                     "do_constant_folding": False if args.mode == "torchscript" else None},
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": ort.__version__,
            "numpy": np.__version__,
        },
    }
    with open(json_path, "w") as f:
        json.dump(out, f)
        f.write("\n")
    for p in (onnx_path, json_path, os.path.join(args.out_dir, "config.json")):
        print(f"{p}: {os.path.getsize(p)} bytes")


if __name__ == "__main__":
    main()
