"""How fast this CPU could encode and read prompts at best, whatever the implementation.

Issue 14's speed targets (encoding ≥ 1,500 tokens/s; a 384-token prompt read in ≤ 450 ms) were
set on another machine.  Whether they can be met here is a question of arithmetic: every token
read passes through each block's four weight products (query/key/value, output, gate/up,
down; fused as the runtime runs them), and those products alone take a measurable time.  This
script times exactly those products: the shipped model's own layers of one block, made ready
by the runtime (``for_inference``: float32 or bfloat16, whichever this CPU's runtime chooses;
int8 encoding products too, ``quantize_encoding``, where the quantized kernels exist), at the
row counts the product uses, and turns them into:

- **encoding ceiling**: tokens/s if encoding did nothing but the products of the blocks up to
  the last memory layer (no attention, norms, memory search or store);
- **prefill floor**: the time a 384-token prompt's products take over all blocks, plus the
  output head for its last position.  (The runtime reads prompts in the product precision;
  the int8 line says what int8 prompts would at best gain, at the bits-per-token cost
  measured in ``docs/benchmarks.md``.)

Attention alone was 35% of encoding's profile (``docs/benchmarks.md``), so a real implementation
stays well inside these bounds.  A dense 2,048-cube product gives the CPU's matrix-product rate
for reference.

    python benchmarks/ceiling.py --out /tmp/ceiling.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from mtlsp_model.runtime import encoding, for_inference, quantize_encoding
from mtlsp_model.weights import load_weights
from torch import nn


def _median_s(f, repeats: int) -> float:
    f()  # warm-up: first calls pack weights and allocate
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def block_products(block: nn.Module) -> list[nn.Module]:
    """One block's products as the runtime runs them (after ``for_inference`` fused them)."""
    return [block.attn.qkv, block.attn.o_proj, block.mlp.gate_up, block.mlp.down]


def products_s(layers: list[nn.Module], rows: int, int8: bool, repeats: int) -> float:
    """Median seconds for one pass of ``rows`` rows through every layer of ``layers``."""
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(rows, layer.w.shape[1], generator=gen).to(layer.w.dtype) for layer in layers]

    def run() -> None:
        with torch.inference_mode(), (encoding() if int8 else contextlib.nullcontext()):
            for layer, x in zip(layers, inputs, strict=True):
                layer(x)

    return _median_s(run, repeats)


def dense_gflops(repeats: int) -> float:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    return 2 * 2048**3 / _median_s(lambda: a @ b, repeats) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--piece", type=int, default=1024, help="rows of one encoding pass (the Encoder's pieces)")
    ap.add_argument("--prompt", type=int, default=384)
    a = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("MTLSP_THREADS", os.cpu_count() or 1)))

    loaded = load_weights(None)  # the shipped default: its architecture, memory layers and weights
    model, cfg = for_inference(loaded.model, torch.device("cpu")), loaded.model.cfg
    layers = block_products(model.blocks[0])
    macs = sum(layer.w.numel() for layer in layers)
    out: dict = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
                   f"torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "product_dtype": str(layers[0].w.dtype).removeprefix("torch."),
        "dense_gflops": round(dense_gflops(a.repeats), 1),
        "encode_layers": cfg.encode_layers,
        "layers": cfg.n_layer,
        "block_mflop_per_token": round(2 * macs / 1e6, 2),
    }
    head = products_s([model.lm_head], 1, False, a.repeats)  # the last position's scores
    variants = {"product precision": False}
    try:
        quantize_encoding(model, loaded.tokenizer, loaded.info["base_folder"])
        variants["int8 encoding products"] = True
    except (RuntimeError, AttributeError, NotImplementedError):  # no quantized engine in this torch
        pass
    for name, int8 in variants.items():
        enc = products_s(layers, a.piece, int8, a.repeats)
        pre = products_s(layers, a.prompt, int8, a.repeats)
        out[name] = {
            "block_products_gflops": round(2 * macs * a.piece / enc / 1e9, 1),
            "encoding_ceiling_tok_s": round(a.piece / (enc * cfg.encode_layers)),
            "prefill_floor_ms": round(1e3 * (pre * cfg.n_layer + head), 1),
        }
    text = json.dumps(out, indent=2)
    print(text)
    a.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
