"""PyTorch reference for VPT-Deep on ViT-B/16, for side-by-side speed comparisons.

The implementation a PyTorch user would write: the prompt tokens of every block run through
attention and the MLP (as in the official VPT code), attention uses
torch.nn.functional.scaled_dot_product_attention, the backbone is frozen, and SGD updates the
prompts and the linear head. Needs only `torch`. Prints one JSON line.

  python benchmarks/torch_vpt_ref.py --prompts 100 --batch 8

`benchmarks/vpt_bench.py --torch_ref` runs it beside vptpc on the same CPU.
"""

import argparse
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

  def forward(self, x):
    b, n, d = x.shape
    q, k, v = (
      self.qkv(self.ln1(x))
      .view(b, n, 3, self.heads, d // self.heads)
      .permute(2, 0, 3, 1, 4)
    )
    a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
    x = x + self.proj(a)
    return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class PromptedViT(nn.Module):
  def __init__(
    self,
    prompts,
    classes,
    dim=768,
    depth=12,
    heads=12,
    mlp=3072,
    patch=16,
    size=224,
  ):
    super().__init__()
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
    for i, blk in enumerate(self.blocks):
      p = self.prompts[i].expand(x.shape[0], -1, -1)
      rest = x[:, 1:] if i == 0 else x[:, 1 + n :]
      x = blk(torch.cat([x[:, :1], p, rest], 1))
    return self.head(self.norm(x)[:, 0])


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--prompts", type=int, default=100)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--classes", type=int, default=100)
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--warmup", type=int, default=2)
  a = ap.parse_args()
  torch.manual_seed(0)
  model = PromptedViT(a.prompts, a.classes).eval()
  trainable = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.SGD(trainable, lr=0.1, momentum=0.9)
  x = torch.randn(a.batch, 3, 224, 224)
  y = torch.randint(0, a.classes, (a.batch,))

  def train_step():
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()

  def timed(fn):
    for _ in range(a.warmup):
      fn()
    t = time.perf_counter()
    for _ in range(a.steps):
      fn()
    return (time.perf_counter() - t) / a.steps

  train_s = timed(train_step)
  with torch.no_grad():
    eval_s = timed(lambda: model(x))
  print(
    json.dumps(
      {
        "impl": "pytorch-reference",
        "torch": torch.__version__,
        "prompts": a.prompts,
        "batch": a.batch,
        "threads": torch.get_num_threads(),
        "train_img_s": round(a.batch / train_s, 3),
        "eval_img_s": round(a.batch / eval_s, 3),
      }
    )
  )


if __name__ == "__main__":
  main()
