"""Strong PyTorch peer for VPT-Deep on ViT-B/16 (GPU): bf16 autocast, SDPA, optional torch.compile.

Two prompt paths, same maths as the official VPT-Deep:
  full: prompt tokens run through every block (official VPT code, what users run)
  kv:   prompts only enter as keys/values, projected once per batch (exact: their outputs
        are discarded by the next block's fresh prompts)
Frozen backbone; SGD(momentum) on prompts + head. Prints one JSON line per (path, what).

The strongest settings a PyTorch user would reach for are flags, each named in the row's "impl":
  --compile_mode max-autotune   Inductor autotuning and CUDA graphs (default: torch.compile's default mode)
  --last_cls_only               the last block computes only the class token's output (all the head reads)
  --bf16_backbone               the frozen backbone stored in bf16 (no per-step weight casts under autocast)

  python benchmarks/torch_peer.py --batch 128 --prompts 100 --paths full,kv --compile
  python benchmarks/torch_peer.py --batch 128 --prompts 0,100 --paths kv --compile \
      --compile_mode max-autotune --last_cls_only --bf16_backbone
A configuration that fails prints a row with "error" and the next one runs. A smoke run on
a CPU: ``python benchmarks/torch_peer.py --device cpu --size 32 --depth 2 --batch 2``.
`benchmarks/device_check.sh` runs it beside vptpc on a GPU.
"""

import argparse
import functools
import json
import math
import time

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
  def __init__(self, dim, heads, mlp):
    super().__init__()
    self.heads = heads
    self.ln1 = nn.LayerNorm(dim, eps=1e-6)
    self.qkv = nn.Linear(dim, 3 * dim)
    self.proj = nn.Linear(dim, dim)
    self.ln2 = nn.LayerNorm(dim, eps=1e-6)
    self.fc1 = nn.Linear(dim, mlp)
    self.fc2 = nn.Linear(mlp, dim)

  def split(self, t):
    b, n, d = t.shape
    return t.view(b, n, self.heads, d // self.heads).transpose(1, 2)

  def forward(self, x, pkv=None, cls_only=False):
    b, n, d = x.shape
    q, k, v = self.qkv(self.ln1(x)).chunk(3, dim=-1)
    if cls_only:  # only the class token's output is read after this block
      q, x, n = q[:, :1], x[:, :1], 1
    q, k, v = self.split(q), self.split(k), self.split(v)
    if (
      pkv is not None
    ):  # prompt keys/values, (1, heads, P, dh) broadcast over batch
      k = torch.cat([pkv[0].expand(b, -1, -1, -1), k], 2)
      v = torch.cat([pkv[1].expand(b, -1, -1, -1), v], 2)
    a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
    x = x + self.proj(a)
    return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))

  def prompt_kv(self, p):
    d = p.shape[-1]
    h = self.ln1(p)[None]
    w, bias = self.qkv.weight, self.qkv.bias
    k = F.linear(h, w[d : 2 * d], bias[d : 2 * d])
    v = F.linear(h, w[2 * d :], bias[2 * d :])
    return self.split(k), self.split(v)


class PromptedViT(nn.Module):
  def __init__(
    self,
    prompts,
    classes,
    path,
    dim=768,
    depth=12,
    heads=12,
    mlp=3072,
    patch=16,
    size=224,
    last_cls_only=False,
  ):
    super().__init__()
    self.path = path
    self.last_cls_only = last_cls_only
    self.embed = nn.Conv2d(3, dim, patch, patch)
    self.cls = nn.Parameter(torch.zeros(1, 1, dim))
    self.pos = nn.Parameter(
      torch.randn(1, (size // patch) ** 2 + 1, dim) * 0.02
    )
    self.blocks = nn.ModuleList(Block(dim, heads, mlp) for _ in range(depth))
    self.norm = nn.LayerNorm(dim, eps=1e-6)
    for p in self.parameters():
      p.requires_grad_(False)
    bound = math.sqrt(6.0 / (3 * patch * patch + dim))
    self.prompts = nn.Parameter(
      torch.empty(depth, prompts, dim).uniform_(-bound, bound)
    )
    self.head = nn.Linear(dim, classes)

  def forward(self, img):
    x = self.embed(img).flatten(2).transpose(1, 2)
    x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
    n = self.prompts.shape[1]
    last = len(self.blocks) - 1
    if self.path == "kv":
      for i, blk in enumerate(self.blocks):
        x = blk(
          x,
          blk.prompt_kv(self.prompts[i].to(x.dtype)) if n else None,
          cls_only=self.last_cls_only and i == last,
        )
      return self.head(self.norm(x)[:, 0])
    for i, blk in enumerate(self.blocks):
      p = self.prompts[i].to(x.dtype).expand(x.shape[0], -1, -1)
      rest = x[:, 1:] if i == 0 else x[:, 1 + n :]
      x = blk(
        torch.cat([x[:, :1], p, rest], 1),
        cls_only=self.last_cls_only and i == last,
      )
    return self.head(self.norm(x)[:, 0])


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--prompts", default="0,100")
  ap.add_argument("--paths", default="full,kv")
  ap.add_argument("--batch", type=int, default=128)
  ap.add_argument("--classes", type=int, default=100)
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--warmup", type=int, default=3)
  ap.add_argument("--compile", action="store_true")
  ap.add_argument(
    "--compile_mode",
    default="default",
    choices=[
      "default",
      "reduce-overhead",
      "max-autotune",
      "max-autotune-no-cudagraphs",
    ],
  )
  ap.add_argument("--last_cls_only", action="store_true")
  ap.add_argument("--bf16_backbone", action="store_true")
  ap.add_argument("--dtype", default="bfloat16")
  ap.add_argument("--device", default="cuda")
  ap.add_argument("--size", type=int, default=224)
  ap.add_argument("--depth", type=int, default=12)
  a = ap.parse_args()
  dev = a.device
  sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
  impl = "torch-peer" + (
    f"+compile({a.compile_mode})"
    if a.compile and a.compile_mode != "default"
    else "+compile"
    if a.compile
    else ""
  )
  impl += "+cls" if a.last_cls_only else ""
  impl += "+bf16w" if a.bf16_backbone else ""
  torch.backends.cuda.matmul.allow_tf32 = True
  torch.backends.cudnn.allow_tf32 = True
  dt = getattr(torch, a.dtype)
  for n_p in (int(s) for s in a.prompts.split(",")):
    for path in ["full"] if n_p == 0 else a.paths.split(","):
      torch.manual_seed(0)
      model = (
        PromptedViT(
          n_p,
          a.classes,
          path,
          size=a.size,
          depth=a.depth,
          last_cls_only=a.last_cls_only,
        )
        .to(dev)
        .eval()
      )
      if a.bf16_backbone:
        for p in model.parameters():
          if not p.requires_grad:
            p.data = p.data.to(torch.bfloat16)
      trainable = [p for p in model.parameters() if p.requires_grad]
      opt = torch.optim.SGD(trainable, lr=0.1, momentum=0.9)
      fwd = (
        torch.compile(
          model, mode=None if a.compile_mode == "default" else a.compile_mode
        )
        if a.compile
        else model
      )
      x = torch.randn(a.batch, 3, a.size, a.size, device=dev)
      if a.bf16_backbone:
        x = x.to(torch.bfloat16)
      y = torch.randint(0, a.classes, (a.batch,), device=dev)

      # The step's objects are arguments: each configuration binds its own.
      def train_step(opt, fwd, x, y):
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev, dtype=dt, enabled=a.dtype != "float32"):
          loss = F.cross_entropy(fwd(x).float(), y)
        loss.backward()
        opt.step()

      def eval_step(fwd, x):
        with (
          torch.no_grad(),
          torch.autocast(dev, dtype=dt, enabled=a.dtype != "float32"),
        ):
          fwd(x)

      def timed(fn):
        t0 = time.perf_counter()
        for _ in range(a.warmup):
          fn()
        sync()
        warm = time.perf_counter() - t0
        ts = []
        for _ in range(a.steps):
          sync()
          t = time.perf_counter()
          fn()
          sync()
          ts.append(time.perf_counter() - t)
        return sorted(ts)[len(ts) // 2], warm

      steps = (
        ("eval", functools.partial(eval_step, fwd, x)),
        ("train", functools.partial(train_step, opt, fwd, x, y)),
      )
      for what, fn in steps:
        row = {
          "impl": impl,
          "torch": torch.__version__,
          "dtype": a.dtype,
          "batch": a.batch,
          "prompts": n_p,
          "path": path,
          "what": what,
        }
        try:
          s, warm = timed(fn)
          row.update(img_s=round(a.batch / s, 1), warmup_s=round(warm, 1))
        except Exception as e:  # one failing configuration does not end the run
          row.update(error=f"{type(e).__name__}: {str(e)[:300]}")
        print(json.dumps(row), flush=True)
      del model, opt, fwd, steps
      if dev == "cuda":
        torch.cuda.empty_cache()


if __name__ == "__main__":
  main()
