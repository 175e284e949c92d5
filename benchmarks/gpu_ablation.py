"""What each fast-path lever buys, and where a train step's time goes.

For ViT-B/16 (224 px, ``--batch``, bf16 compute, ``--prompts`` deep prompts
on the key/value path) it times the train step (and the eval forward) of
model variants that differ in one lever at a time. A variant is
``attention:cast`` then ``name=value`` items:

* ``attention``: XLA's `jax.nn.dot_product_attention` or cuDNN's fused
  flash kernel (padded to even lengths, `vptpc.models.levers.attention`);
  ``auto``: the model's default for the backend;
* ``cast``: the frozen backbone kept in bf16 (`vit.cast_backbone`) or cast
  from float32 inside every step;
* ``name=value``: any `vptpc.models.levers.Levers` or `VisionTransformer`
  field (`vpt_bench.parse_fields`), e.g. ``auto:1:cudnn_multiple=2``,
  ``auto:1:kv_stacked=1`` or ``cudnn:1:pad_tokens=1`` (cuDNN pads q, k, v
  in every block instead of the tokens once), or, for names that start
  with ``xla_``, an XLA option of the variant's compiled programs
  (`parse_xla_options`), e.g. ``auto:1:xla_gpu_graph_min_graph_size=1``.

A row records the named items as ``fields`` and ``xla_options``, so a
caller can run the fastest variant (`pick_levers`; ``device_check.sh``
does, through `pick_lines`, ``vpt_bench.py --model_fields`` and
``XLA_FLAGS``).

After every variant has run once, ``--rounds`` - 1 more rounds time each
again in turn, and a variant's rate is the median over its rounds, so a
drift of the device over the run (clocks, memory) does not fall on one
variant alone. Then, where two or more variants beat the default by over
1%, their named items together are one more variant (`combine_winners`,
``--combine``), timed in rounds of its own alternating with the default,
whose rate in those rounds the row keeps as
``default_img_s_same_rounds``.

Each variant's bf16 logits are compared with a float32 XLA forward of the
same weights (relative L2 error). Then one variant's train step is traced
with `jax.profiler` and its device time is summed per kernel and per kind
(matmul, attention, fusion, ...), the GPU counterpart of
``profile_forward.py``'s table; ``--profile_eval`` traces the same
variant's eval forward at the given prompt counts too. Rows stream to stdout as JSON; ``--out``
gets ``ablation.json`` (rewritten after every phase, so a run cut off by a
timeout keeps what it measured; ``--deadline_s`` skips a phase that would
not end in time) and, at the end, ``ablation.md``::

  python benchmarks/gpu_ablation.py --out=results/bench_gpu_h200
  # dry run on a CPU:
  python benchmarks/gpu_ablation.py --model=testing --image_size=32 \\
      --batch=4 --variants=xla:0,xla:1 --out=/tmp/abl
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import gzip
import json
import os
import tempfile
import time

from vpt_bench import median_seconds, model_kwargs, parse_fields

DEFAULT_VARIANTS = "xla:0,cudnn:0,cudnn:1,xla:1,cudnn:1:pad_tokens=1"


def parse_variant(spec: str) -> tuple[list[str], dict, dict]:
  """A ``--variants`` entry as (positional fields, model fields, XLA options).

  The positional fields are ``attention`` and ``cast``; ``name=value``
  items whose name starts with ``xla_`` are XLA compiler options
  (`parse_xla_options`), the others model fields (`parse_fields`).

  Raises:
    ValueError: not two positional fields, or a bad item (named).
  """
  items = spec.split(":")
  named = [t for t in items if "=" in t]
  positional = [t for t in items if "=" not in t]
  if len(positional) != 2:
    raise ValueError(
      f"variant {spec!r}: expected attention:cast, then name=value items."
    )
  xla = [t for t in named if t.startswith("xla_")]
  return (
    positional,
    parse_fields([t for t in named if not t.startswith("xla_")]),
    parse_xla_options(xla),
  )


def parse_xla_options(items: list[str]) -> dict:
  """``["xla_name=value", ...]`` as ``jax.jit(compiler_options=...)``.

  Any XLA_FLAGS flag is a field of XLA's DebugOptions, and ``jax.jit``
  applies such options per compiled program, so variants that differ in
  a flag are timed in one process, in the same interleaved rounds as the
  model levers (a flag set in XLA_FLAGS needs a process of its own).
  Values stay strings, which XLA parses per the field's type: ``1``,
  ``true`` (bools are ``True`` / ``False`` to XLA; lower case is mapped),
  and comma-separated names for a repeated field such as
  ``xla_gpu_enable_command_buffer`` (an empty value clears it). XLA names
  a misspelled option or a bad value when the program compiles.

  Raises:
    ValueError: an item without ``=`` or not starting with ``xla_``.
  """
  out = {}
  for item in items:
    name, eq, value = item.partition("=")
    if not eq or not name.startswith("xla_"):
      raise ValueError(f"XLA option item {item!r}: expected xla_name=value.")
    out[name] = {"true": "True", "false": "False"}.get(value.lower(), value)
  return out


def xla_flags(options: dict) -> str:
  """`parse_xla_options`' dict as an XLA_FLAGS string for another process."""
  return " ".join(f"--{k}={v}" for k, v in options.items())


# The bound on a fast path's bf16 logits (relative L2 error against a
# float32 forward of the same weights): a faster variant beyond it is a
# different function, not a lever, so it is never picked or combined.
MAX_LOGITS_ERR = 1e-2


def within_error_bound(row: dict, bound: float = MAX_LOGITS_ERR) -> bool:
  """Whether a train row's measured ``logits_rel_err`` is at most ``bound``.

  A row without a measured error (missing, empty, not a number) is not:
  only what was checked may become what the later stages run.
  """
  try:
    err = float(row.get("logits_rel_err", ""))
  except (TypeError, ValueError):
    return False
  return err <= bound  # False for NaN too


def combine_winners(rows: list[dict], margin: float = 0.01) -> dict | None:
  """The named fields and options of every variant that beat the default.

  ``rows``: train rows (``variant``, ``img_s``, ``fields``,
  ``xla_options``, ``positional``, ``logits_rel_err``); variant 0 is the
  default. Only variants with the default's positional fields take part
  (the others change a lever that is not a named field), and only those
  within `MAX_LOGITS_ERR`. Where two winners set the same name, the
  faster one's value is kept. None unless at least two variants beat the
  default by more than ``margin``: one winner is already measured as it
  is.
  """
  default = next((r for r in rows if r["variant"] == 0), None)
  if default is None:
    return None
  wins = sorted(
    (
      r
      for r in rows
      if r["variant"] != 0
      and within_error_bound(r)
      and r.get("positional") == default.get("positional")
      and r["img_s"] > (1 + margin) * default["img_s"]
    ),
    key=lambda r: r["img_s"],
  )
  if len(wins) < 2:
    return None
  fields, xla = {}, {}
  for r in wins:  # slowest first: a faster winner overwrites a shared name
    fields.update(r.get("fields") or {})
    xla.update(r.get("xla_options") or {})
  return dict(fields=fields, xla_options=xla, of=[r["variant"] for r in wins])


def pick_levers(rows: list[dict], margin: float = 0.01) -> dict | None:
  """The variant the GPU script's later stages run, from the train rows.

  The fastest relative to the default, where it beats the default by
  more than ``margin``; else the default (variant 0); None without a
  default row. A combined variant (`combine_winners`) is compared with
  the default's rate in its own rounds (``default_img_s_same_rounds``),
  every other one with the default's median over the main rounds, so a
  drift of the device between the two sets of rounds decides nothing.
  Only what a caller can pass on is picked: a row must share the
  default's positional fields (its named ``fields`` and ``xla_options``
  go on), and its logits must be within `MAX_LOGITS_ERR`
  (`within_error_bound`).
  """
  rows = [r for r in rows if r.get("what") == "train" and "img_s" in r]
  default = next((r for r in rows if r["variant"] == 0), None)
  if default is None:
    return None

  def gain(r):
    base = r.get("default_img_s_same_rounds") or default["img_s"]
    return r["img_s"] / base

  rivals = [
    r
    for r in rows
    if r["variant"] != 0
    and within_error_bound(r)
    and r.get("positional") == default.get("positional")
  ]
  best = max(rivals, key=gain, default=None)
  return best if best and gain(best) > 1 + margin else default


def pick_lines(path: str, margin: float = 0.01) -> list[str]:
  """`pick_levers` of an ``ablation.json`` as the script's three lines.

  Lines: the named fields for ``vpt_bench.py --model_fields``; the same as
  ``--config.model.*`` overrides where the config has the key (booleans
  as True/False); the XLA options as XLA_FLAGS. ``-`` stands for an empty
  line (all three without a default row).
  """
  from vptpc import config_util

  with open(path) as f:
    best = pick_levers(json.load(f)["rows"], margin)
  if best is None:
    return ["-", "-", "-"]
  model = config_util.base_config().model
  fields = best.get("fields") or {}

  def as_cfg(k, v):
    return bool(v) if isinstance(model[k], bool) else v

  return [
    ",".join(f"{k}={v}" for k, v in fields.items()) or "-",
    " ".join(
      f"--config.model.{k}={as_cfg(k, v)}"
      for k, v in fields.items()
      if k in model
    )
    or "-",
    xla_flags(best.get("xla_options") or {}) or "-",
  ]


def kind_of(name: str) -> str:
  """A kernel's kind, from its CUDA or XLA fusion name."""
  n = name.lower()
  if any(k in n for k in ("sdpa", "flash", "fmha", "cudnn::fusion")):
    return "attention (cuDNN)"
  if any(k in n for k in ("implicit_gemm", "convolution", "nhwc")):
    return "convolution (patch embedding)"
  if any(k in n for k in ("gemm", "cublas", "cutlass", "xmma", "nvjet", "dot")):
    return "matmul"
  if "memcpy" in n or "memset" in n:
    return "copy / memset"
  if "transpose" in n:
    return "transpose"
  if "pad" in n or "slice" in n:
    return "pad / slice"
  return "fusion / elementwise"


def kinds_table(prof_rows: list[dict]) -> tuple[list[dict], float]:
  """Per-kind milliseconds per step and share, from `kernel_table` rows."""
  by_kind = collections.Counter()
  for r in prof_rows:
    by_kind[kind_of(r["kernel"])] += r["ms_per_step"]
  ms = sum(by_kind.values())
  return [
    dict(kind=k, ms_per_step=round(v, 3), pct=round(100 * v / ms, 1))
    for k, v in by_kind.most_common()
  ], ms


def stream_events(trace_dir: str) -> list[dict]:
  """The device kernels ("X" events on the GPU's stream lines) of a trace."""
  paths = glob.glob(
    os.path.join(trace_dir, "plugins", "profile", "*", "*.trace.json.gz")
  )
  if not paths:
    return []
  with gzip.open(sorted(paths)[-1]) as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  names, threads = {}, {}
  for e in events:
    if e.get("ph") == "M" and e.get("name") == "process_name":
      names[e["pid"]] = e["args"]["name"]
    if e.get("ph") == "M" and e.get("name") == "thread_name":
      threads[(e["pid"], e.get("tid"))] = e["args"]["name"]
  dev = {p for p, n in names.items() if "/device:" in n and "GPU" in n.upper()}
  # Kernels live on the "Stream" lines; "XLA Ops"/"XLA Modules" lines
  # summarise the same time and would count it twice.
  streams = {
    k for k, n in threads.items() if k[0] in dev and "stream" in n.lower()
  }
  if not streams:
    streams = {
      k
      for k, n in threads.items()
      if k[0] in dev and not n.lower().startswith("xla")
    }
  return [
    e
    for e in events
    if e.get("ph") == "X" and (e.get("pid"), e.get("tid")) in streams
  ]


def kernel_table(events: list[dict], steps: int) -> tuple[list[dict], float]:
  """Device kernel time per name from `stream_events`; (rows, ms/step)."""
  total = collections.Counter()
  count = collections.Counter()
  for e in events:
    name = e.get("name", "")
    total[name] += float(e.get("dur", 0.0))
    count[name] += 1
  busy = sum(total.values())
  rows = [
    dict(
      kernel=k[:90],
      kind=kind_of(k),
      ms_per_step=round(v / 1e3 / steps, 3),
      pct=round(100 * v / busy, 1) if busy else 0.0,
      calls_per_step=round(count[k] / steps, 1),
    )
    for k, v in total.most_common()
  ]
  return rows, busy / 1e3 / steps


def idle_gaps(
  events: list[dict], steps: int, short_us: float = 20.0, top: int = 12
) -> dict:
  """Where the device ran no kernel between the first and the last one.

  Kernels on all streams are merged into busy intervals; the uncovered
  time is split at ``short_us``: short gaps are most likely launch
  latency between the kernels of one program (what CUDA graphs / XLA's
  command buffers remove), long ones the host between two calls (its
  dispatch, the benchmark's synchronisation). Milliseconds and counts are
  per step; ``longest`` lists the ``top`` longest gaps (all steps) with
  the kernel that followed each.
  """
  spans = sorted(
    (
      float(e["ts"]),
      float(e["ts"]) + float(e.get("dur", 0.0)),
      e.get("name", ""),
    )
    for e in events
    if "ts" in e
  )
  if not spans:
    return {}
  # [start, end, the kernel that opens the interval]
  merged = [list(spans[0])]
  for start, end, name in spans[1:]:
    if start <= merged[-1][1]:
      merged[-1][1] = max(merged[-1][1], end)
    else:
      merged.append([start, end, name])
  gaps = [
    (b[0] - a[1], b[2]) for a, b in zip(merged[:-1], merged[1:], strict=True)
  ]
  short = [g for g, _ in gaps if g < short_us]
  long_ = [g for g, _ in gaps if g >= short_us]
  per = 1e3 * steps
  return dict(
    span_ms=round((merged[-1][1] - merged[0][0]) / per, 4),
    busy_ms=round(sum(e - s for s, e, _ in merged) / per, 4),
    short_gap_ms=round(sum(short) / per, 4),
    short_gaps=round(len(short) / steps, 1),
    long_gap_ms=round(sum(long_) / per, 4),
    long_gaps=round(len(long_) / steps, 1),
    short_us=short_us,
    # The longest gaps and the kernel each one waited for: a gap inside a
    # step points at what the host or a synchronisation holds up.
    longest=[
      dict(us=round(g, 1), before=name[:90])
      for g, name in sorted(gaps, key=lambda x: -x[0])[:top]
    ],
  )


def gaps_sentence(gaps: dict, per: str = "step") -> str:
  """`idle_gaps` in words, for the tables ('' without a trace)."""
  if not gaps:
    return ""
  return (
    f"From the first kernel to the last, {gaps['span_ms']:.2f} ms per {per}: "
    f"kernels {gaps['busy_ms']:.2f}, {gaps['short_gaps']:g} gaps under "
    f"{gaps['short_us']:g} µs {gaps['short_gap_ms']:.2f}, "
    f"{gaps['long_gaps']:g} longer gaps {gaps['long_gap_ms']:.2f}."
  )


def trace_kernels(fn, n: int) -> tuple[list[dict], float, dict]:
  """`kernel_table` and `idle_gaps` of ``n`` calls of ``fn`` (compiled)."""
  import jax

  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d, create_perfetto_trace=True):
      for _ in range(n):
        fn()
    events = stream_events(d)
  return (*kernel_table(events, n), idle_gaps(events, n))


def main():
  """Command-line entry point; the module docstring says what it measures or writes."""
  t_proc = time.perf_counter()  # --deadline_s counts from here
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default="results/ablation")
  ap.add_argument("--model", default="B/16")
  ap.add_argument("--image_size", type=int, default=224)
  ap.add_argument("--batch", type=int, default=128)
  ap.add_argument("--prompts", type=int, default=100)
  ap.add_argument("--dtype", default="bfloat16")
  ap.add_argument(
    "--variants",
    default=DEFAULT_VARIANTS,
    help="attention:cast[:name=value...] per variant, comma-separated",
  )
  ap.add_argument("--eval_variants", default="0,2", help="variant indices")
  ap.add_argument(
    "--profile",
    type=int,
    default=2,
    help="variant to trace (-1: the fastest train step, after the rounds)",
  )
  ap.add_argument(
    "--profile_eval",
    default="",
    help="prompt counts whose eval forward of --profile is traced too",
  )
  ap.add_argument("--iters", type=int, default=10)
  ap.add_argument(
    "--rounds", type=int, default=3, help="timing rounds over the variants"
  )
  ap.add_argument("--top", type=int, default=20, help="kernels listed")
  ap.add_argument(
    "--combine",
    type=int,
    default=1,
    help="1: time the named levers of all variants that beat the default "
    "together as one more variant (combine_winners)",
  )
  ap.add_argument(
    "--combine_margin",
    type=float,
    default=0.01,
    help="how much faster than the default a winner is (a negative value "
    "combines every variant: the CPU dry run's way to run that path)",
  )
  ap.add_argument(
    "--budget_s", type=float, default=240.0, help="no new variant after this"
  )
  ap.add_argument(
    "--deadline_s",
    type=float,
    default=0.0,
    help="seconds from the start by which the files must be written (0: "
    "no deadline): a phase estimated not to fit is skipped and says so; "
    "ablation.json is rewritten after every phase either way, so a run "
    "killed by a timeout keeps what it measured",
  )
  ap.add_argument(
    "--reclassify",
    default="",
    help="print the per-kind table of a saved ablation.json and exit",
  )
  a = ap.parse_args()
  if a.reclassify:
    from table import print_rows

    with open(a.reclassify) as f:
      prof = json.load(f)["profile"]
    kinds, ms = kinds_table(prof)
    print(f"{ms:.2f} ms of kernels per step\n")
    print_rows(kinds)
    print()
    print_rows([dict(r, kind=kind_of(r["kernel"])) for r in prof[: a.top]])
    return

  import jax
  import jax.numpy as jnp
  import numpy as np
  from table import print_rows

  from vptpc import optim, steps
  from vptpc import prompts as pr
  from vptpc.models import vit
  from vptpc.models.levers import Levers

  dev = jax.devices()[0]
  device = f"{dev.platform}:{dev.device_kind}"
  dtype = jnp.dtype(a.dtype)
  cfg = vit.get_model_config(a.model, num_classes=100)
  base = vit.create_model(cfg)
  params = vit.init_params(base, jax.random.key(0), a.image_size)
  frozen, head = vit.split_head(jax.device_get(params))

  def make_prompts(n):
    return pr.init_prompts(
      jax.random.key(1),
      num_prompts=n,
      hidden_size=cfg.hidden_size,
      patch_size=cfg.patch_size,
      num_layers=cfg.num_layers,
    )

  def eval_forward(model, jit_kw=None):
    return jax.jit(
      lambda fz, x, p: model.apply({"params": vit.merge_head(fz, head)}, x, p),
      **(jit_kw or {}),
    )

  prompts = make_prompts(a.prompts)
  rng = np.random.default_rng(0)
  b, size = a.batch, a.image_size
  data = jax.device_put(
    {
      "image": rng.normal(size=(b, size, size, 3)).astype(np.float32),
      "label": rng.integers(0, 100, b).astype(np.int32),
      "mask": np.ones(b, bool),
    },
    dev,
  )
  sched = optim.create_lr_schedule(
    base_lr=0.1,
    batch_size=b,
    steps_per_epoch=1,
    total_epochs=100,
    warmup_epochs=0,
  )
  opt = optim.create_optimizer(sched, weight_decay=1e-4)
  x32 = data["image"][: min(b, 32)]
  ref_model = vit.create_model(cfg, kv_only=True, levers=Levers("xla"))
  with jax.default_matmul_precision("highest"):  # no TF32 in the reference
    ref = jax.jit(ref_model.apply)({"params": params}, x32, prompts)
  ref = np.asarray(ref, np.float64)
  rows, steps_fns, models = [], {}, {}
  variants = [parse_variant(v) for v in a.variants.split(",")]
  eval_idx = {int(i) for i in a.eval_variants.split(",") if i}

  def run_variant(i, positional, fields, xla, label=""):
    """Compiles and times variant ``i`` once; a failure is an error row."""
    attn, cast = positional
    name = label + (
      f"attention={attn} cast={cast}"
      + "".join(f" {k}={v}" for k, v in {**fields, **xla}.items())
    )
    jit_kw = {"compiler_options": xla} if xla else {}
    try:
      model = vit.create_model(
        cfg,
        dtype=dtype,
        kv_only=True,
        **model_kwargs(fields, "" if attn == "auto" else attn),
      )
      fz = vit.cast_backbone(frozen, dtype) if cast == "1" else frozen
      fz = jax.device_put(fz, dev)
      logits = jax.jit(model.apply, **jit_kw)(
        {"params": vit.merge_head(fz, head)}, x32, prompts
      )
      err = float(
        np.linalg.norm(np.asarray(logits, np.float64) - ref)
        / np.linalg.norm(ref)
      )
      step = jax.jit(
        steps.make_train_step(model, opt, sched),
        donate_argnums=(0,),
        **jit_kw,
      )
      # Host copies: the step donates the state's buffers.
      state = jax.device_put(
        jax.device_get(
          steps.create_train_state({"prompts": prompts, "head": head}, opt)
        ),
        dev,
      )
      box = [state]
      key = jax.random.key(0)

      def once(step=step, fz=fz, box=box, key=key):
        box[0], m = step(box[0], fz, data, key)
        jax.block_until_ready(m)

      t = time.perf_counter()
      once()
      compile_s = time.perf_counter() - t
      s = median_seconds(once, 2, a.iters)
      row = dict(
        variant=i,
        name=name,
        levers=dataclasses.asdict(model.levers),
        positional=list(positional),
        fields=fields,
        xla_options=xla,
        prompts=a.prompts,
        what="train",
        img_s=round(b / s, 1),
        img_s_rounds=[round(b / s, 1)],
        logits_rel_err=f"{err:.1e}",
        first_call_s=round(compile_s, 1),
        device=device,
      )
      rows.append(row)
      print(json.dumps(row), flush=True)
      steps_fns[i] = (once, row)
      models[i] = (model, fz, jit_kw)
      if i in eval_idx:
        fwd = eval_forward(model, jit_kw)
        for n_p in sorted({0, a.prompts}):
          p = prompts if n_p else None
          s = median_seconds(
            lambda f=fwd, fz=fz, p=p: jax.block_until_ready(
              f(fz, data["image"], p)
            ),
            2,
            a.iters,
          )
          row = dict(
            variant=i,
            name=name,
            prompts=n_p,
            what="eval",
            img_s=round(b / s, 1),
            logits_rel_err="",
            first_call_s="",
            device=device,
          )
          rows.append(row)
          print(json.dumps(row), flush=True)
    except Exception as e:  # noqa: BLE001 - a failed variant is a result
      row = dict(variant=i, name=name, what="error", error=str(e)[:300])
      rows.append(row)
      print(json.dumps(row), flush=True)

  os.makedirs(a.out, exist_ok=True)
  # Filled in as the phases below run; `save` writes what is known so far.
  state = dict(
    profiled_variant=None, profile=[], gaps={}, eval_profiles={}, complete=False
  )

  def save():
    """Writes ablation.json (atomically) with the rows and profiles so far."""
    path = os.path.join(a.out, "ablation.json")
    with open(path + ".tmp", "w") as f:
      json.dump(
        {
          "rows": rows,
          "profiled_variant": state["profiled_variant"],
          "profile": state["profile"],
          "kinds": kinds_table(state["profile"])[0],
          "gaps": state["gaps"],
          "eval_profiles": state["eval_profiles"],
          "complete": state["complete"],
        },
        f,
        indent=1,
      )
    os.replace(path + ".tmp", path)

  def fits(what: str, need_s: float) -> bool:
    """Whether ``what``, estimated at ``need_s``, ends before the deadline."""
    if a.deadline_s <= 0:
      return True
    left = a.deadline_s - (time.perf_counter() - t_proc)
    if left >= need_s:
      return True
    print(
      f"{what} skipped: {left:.0f}s left of --deadline_s={a.deadline_s:g},"
      f" about {need_s:.0f}s needed",
      flush=True,
    )
    return False

  def compile_s(of=None) -> float:
    """The slowest first call among the train rows (of ``of``), or 5 s."""
    done = [
      r["first_call_s"]
      for _, r in steps_fns.values()
      if of is None or r["variant"] in of
    ]
    return max(done, default=5.0)

  def rounds_s(fns, n) -> float:
    """Seconds ``n`` timing rounds of ``fns`` take, from their rates."""
    return n * sum((a.iters + 1) * b / r["img_s"] for _, r in fns)

  t_start = time.perf_counter()  # the budget covers the variants only
  for i, (positional, fields, xla) in enumerate(variants):
    if time.perf_counter() - t_start > a.budget_s:
      print(f"budget reached; skipping variants from {i}", flush=True)
      break
    # The default always runs: every comparison needs it.
    if i and not fits(f"variant {i} and later", 1.5 * compile_s() + 5):
      break
    run_variant(i, positional, fields, xla)
    save()

  def time_rounds(fns, n):
    for _ in range(n):
      for once, row in fns:
        row["img_s_rounds"].append(
          round(b / median_seconds(once, 1, a.iters), 1)
        )

  fns = list(steps_fns.values())
  if fits("the timing rounds", rounds_s(fns, a.rounds - 1) + 5):
    time_rounds(fns, a.rounds - 1)
  for _, row in steps_fns.values():
    row["img_s"] = round(float(np.median(row["img_s_rounds"])), 1)
  save()
  # Winners' named levers together, timed against the default again in
  # rounds of their own (the picker in device_check.sh may pick it).
  both = combine_winners(
    list(r for _, r in steps_fns.values()), a.combine_margin
  )
  if (
    a.combine
    and both
    and 0 in steps_fns
    and fits(
      "the winners together",
      1.5 * compile_s(both["of"])
      + rounds_s([steps_fns[0]] * 2, max(a.rounds - 1, 1))
      + 5,
    )
  ):
    i = len(variants)
    base_pos = steps_fns[0][1]["positional"]
    run_variant(
      i,
      base_pos,
      both["fields"],
      both["xla_options"],
      label=f"winners {both['of']} together: ",
    )
    if i in steps_fns:
      steps_fns[i][1]["combined_from"] = both["of"]
      default_row = dict(steps_fns[0][1], img_s_rounds=[])
      time_rounds(
        [steps_fns[i], (steps_fns[0][0], default_row)], max(a.rounds - 1, 1)
      )
      row = steps_fns[i][1]
      row["img_s"] = round(float(np.median(row["img_s_rounds"])), 1)
      # The default, timed in the same rounds: the fair comparison.
      row["default_img_s_same_rounds"] = round(
        float(np.median(default_row["img_s_rounds"])), 1
      )
    save()
  for _, row in steps_fns.values():
    if a.rounds > 1:
      print(json.dumps(dict(row, what="train (median of rounds)")), flush=True)
  if a.profile < 0 and steps_fns:  # the fastest train step, once known
    a.profile = max(steps_fns, key=lambda i: steps_fns[i][1]["img_s"])
  if a.profile in steps_fns and fits("the profile", 15):
    state["profiled_variant"] = a.profile
    try:
      state["profile"], _, state["gaps"] = trace_kernels(
        steps_fns[a.profile][0], 3
      )
    except Exception as e:  # noqa: BLE001
      print(f"profile failed: {e}", flush=True)
    save()
  # The eval forward's kernels: the train step's profile mixes forward and
  # backward, and the eval goals (share of peak, ratio to the peer) are
  # about the forward alone.
  eval_profiles = state["eval_profiles"]  # filled below, saved as it grows
  if a.profile in models and a.profile_eval:
    model, fz, jit_kw = models[a.profile]
    fwd = eval_forward(model, jit_kw)
    for n_p in (int(v) for v in a.profile_eval.split(",")):
      if n_p in (0, a.prompts):
        p = prompts if n_p else None
      else:
        p = make_prompts(n_p)

      def ev(fwd=fwd, fz=fz, p=p):
        jax.block_until_ready(fwd(fz, data["image"], p))

      if not fits(f"the eval profile at {n_p} prompts", compile_s() + 10):
        break
      try:
        ev()  # compile outside the trace
        e_rows, e_ms, e_gaps = trace_kernels(ev, 5)
      except Exception as e:  # noqa: BLE001
        print(f"eval profile ({n_p} prompts) failed: {e}", flush=True)
        continue
      eval_profiles[n_p] = dict(
        ms=round(e_ms, 3),
        profile=e_rows,
        kinds=kinds_table(e_rows)[0],
        gaps=e_gaps,
      )
      save()
      print(
        json.dumps(
          dict(what="eval profile", prompts=n_p, ms_per_batch=round(e_ms, 3))
        ),
        flush=True,
      )
  state["complete"] = True
  save()
  import contextlib
  import io

  buf = io.StringIO()
  with contextlib.redirect_stdout(buf):
    print(
      f"Device: {device}; {a.model} {size} px, batch {b}, {a.dtype}, "
      f"key/value path. jax {jax.__version__}.\n"
    )
    print_rows(
      [
        {
          k: r.get(k, "")
          for k in (
            "variant",
            "name",
            "prompts",
            "what",
            "img_s",
            "img_s_rounds",
            "logits_rel_err",
            "first_call_s",
            "error",
          )
        }
        for r in rows
      ]
    )

    def print_profile(title, kinds, rows, gaps, per):
      print(
        f"\n{title}, traced: {sum(k['ms_per_step'] for k in kinds):.2f} ms "
        f"of kernels per {per}. {gaps_sentence(gaps, per)}\n"
      )
      print_rows(kinds)
      print()
      print_rows(rows[: a.top])
      if gaps.get("longest"):
        print("\nThe longest gaps (µs) and the kernel each one waited for:\n")
        print_rows(gaps["longest"])

    if state["profile"]:
      name = steps_fns[a.profile][1]["name"]
      print_profile(
        f"Train step of variant {a.profile} ({name})",
        kinds_table(state["profile"])[0],
        state["profile"],
        state["gaps"],
        "step",
      )
    for n_p, ep in eval_profiles.items():
      if ep["profile"]:  # none in a CPU dry run's trace
        print_profile(
          f"Eval forward of variant {a.profile}, {n_p} prompts",
          ep["kinds"],
          ep["profile"],
          ep["gaps"],
          f"batch of {b}",
        )
  with open(os.path.join(a.out, "ablation.md"), "w") as f:
    f.write(buf.getvalue())
  print(buf.getvalue())


if __name__ == "__main__":
  main()
