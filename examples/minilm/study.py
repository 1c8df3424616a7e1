"""The study: does LoRA-Pro train MiniLM better than a well-tuned LoRA? (issue 17)

One setting where full fine-tuning beats a tuned LoRA (``SETTING``), a list of
arms (a method plus what else it trains, its rank and its length), and phases
that each add runs:

* ``grid``: every competing arm on its own lr grid, seed 0 (protocol (c)).
* ``seeds``: every arm at its chosen lr, the other seeds (protocol (a)).
* ``paper``: every arm at full FT's chosen lr, the other seeds (protocol (b)).
* ``heldout``: full FT, LoRA and factored at their validation-loss lr, the other seeds.
* ``teacher``: the optimisation-limited task of teacher.py, grids then seeds.
* ``decomp``: the shares of the full-FT gap: biases and LayerNorms, rank, length.
* ``capacity``: long LoRA runs at several lrs until the loss plateaus.
* ``tangent``: the rank sweep with the gradient probe and the full-FT update's spectrum.

Each finished run is appended to ``runs.jsonl``, so a stopped study resumes
where it stopped; ``summarize`` turns the file into ``study_summary.json``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from examples.minilm.experiment import Config
from examples.minilm.runner import Comparison
from lorapro_jax.pairs import normalise_path

# The hard setting of compare.py (experiment.HARD): the top two layers, rank 2,
# 120 steps of batch 16. Full FT beats LoRA there, and LoRA run 4x as long beats
# full FT, so the gap is optimisation rather than capacity (issue 17).
SETTING: dict[str, Any] = {"train_layers": 2, "rank": 2, "steps": 120}
SEEDS = (0, 1, 2, 3, 4)
# Fewer seeds where the 2-core budget of one session runs out (issue 17 asks for
# 5; the study says where it has fewer): protocol (b) and the decomposition.
PAPER_SEEDS = (0, 1, 2)
DECOMP_SEEDS = (0, 1, 2)
HALF_DECADE = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
LOW = (3e-5, 1e-4, 3e-4, 1e-3, 3e-3)


@dataclasses.dataclass(frozen=True)
class Arm:
  """One trained configuration: a method of experiment.py and its overrides."""

  name: str
  method: str
  grid: tuple[float, ...] = ()  # its own lr grid (competing arms only)
  rank: int | None = None  # None: SETTING's
  trainable: str = ""  # Config.trainable
  steps_factor: int = 1
  grad_every: int = 0
  eval_every: int = 0
  objective: str = "contrastive"  # "distill": the teacher task (teacher.py)

  def config(self, base: Config) -> Config:
    return dataclasses.replace(
      base,
      objective=self.objective,
      rank=self.rank or base.rank,
      trainable=self.trainable,
      steps=base.steps * self.steps_factor,
      grad_every=self.grad_every,
      eval_every=self.eval_every,
    )


# Protocols (a)-(c): the competing methods, each with a grid of five lrs half a
# decade apart, placed so that the known optimum of the earlier runs is interior.
COMPETITORS = (
  Arm("full_ft", "full_ft", LOW),
  Arm("lora", "lora", HALF_DECADE),
  Arm("rslora", "rslora", HALF_DECADE),
  Arm("scaled_gd", "scaled_gd", HALF_DECADE),
  Arm("lorapro_eff", "lorapro_eff", HALF_DECADE),
  Arm("lorapro_full", "lorapro_full", LOW),
  Arm("lorapro_fact", "lorapro_fact", LOW),
)
# The decomposition of the full-FT gap (each at its parent's chosen lr).
DECOMP = (
  ("full_ft_kernels", Arm("full_ft_kernels", "full_ft", trainable="kernels"), "full_ft"),
  ("lora_extra", Arm("lora_extra", "lora", trainable="extra"), "lora"),
  (
    "lorapro_fact_extra",
    Arm("lorapro_fact_extra", "lorapro_fact", trainable="extra"),
    "lorapro_fact",
  ),
  ("lora_r8", Arm("lora_r8", "lora", rank=8), "lora"),
  ("lora_x4", Arm("lora_x4", "lora", steps_factor=4), "lora"),
)
LONG_FACTOR = 8
CAPACITY = Arm("lora_long", "lora", steps_factor=LONG_FACTOR, eval_every=60)
CAPACITY_LR_FACTORS = (1 / math.sqrt(10), 1.0)  # × LoRA's chosen lr: long runs favour smaller
TANGENT_RANKS = (2, 8)
# The teacher task: the LoRA-type methods (LoRA-Pro full mode trains like the
# factored mode, within 1% on every problem measured, and is left out for time).
# Grids as in the main task; the factored mode's best there was at 1e-4, the
# edge of the half-decade grid first used here, so it gets the lower grid.
TEACHER = tuple(
  Arm(f"teacher_{a.name}", a.method, a.grid, objective="distill")
  for a in COMPETITORS
  if a.name in ("lora", "scaled_gd", "lorapro_eff", "lorapro_fact")
)
TEACHER_SEEDS = SEEDS
ARMS = {a.name: a for a in COMPETITORS} | {a.name: a for _, a, _ in DECOMP}
ARMS[CAPACITY.name] = CAPACITY
ARMS.update({a.name: a for a in TEACHER})
for _r in TANGENT_RANKS:
  for _m in ("lora", "lorapro_fact"):
    ARMS[f"{_m}_probe_r{_r}"] = Arm(f"{_m}_probe_r{_r}", _m, rank=_r, grad_every=20)
# Held-out selection: these arms also run at the lr with the lowest seed-0
# validation loss (full FT overfits the training pairs at its train-loss lr).
HELDOUT_ARMS = ("full_ft", "lora", "lorapro_fact")
PHASES = ("grid", "seeds", "paper", "heldout", "teacher", "decomp", "tangent", "capacity")


def base_config(**overrides) -> Config:
  """The study's Config: SETTING, fixed-set evaluation at the end of each run."""
  kw = dict(
    SETTING,
    methods=("full_ft", "lora", "lora_long"),
    lrs={"full_ft": (1.0,), "lora": (1.0,), "lora_long": (1.0,)},
    seeds=SEEDS,
    long_factor=LONG_FACTOR,  # the frozen cache then holds every batch of every arm
    grad_every=0,
    eval_validation=True,
    progress=False,
  )
  kw.update(overrides)
  return Config(**kw)


# --------------------------------------------------------------------------- the store


def git_commit() -> str:
  try:
    out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
    return out.stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


class Store:
  """``runs.jsonl``: one JSON line per finished run, keyed by (arm, lr, seed)."""

  def __init__(self, path: Path):
    self.path = Path(path)
    self.runs: list[dict] = []
    if self.path.exists():
      self.runs = [json.loads(line) for line in self.path.read_text().splitlines() if line]

  def key(self, arm: str, lr: float, seed: int) -> tuple:
    return (arm, float(f"{lr:.6g}"), int(seed))

  def has(self, arm: str, lr: float, seed: int) -> bool:
    return any(self.key(r["arm"], r["lr"], r["seed"]) == self.key(arm, lr, seed) for r in self.runs)

  def add(self, run: dict) -> None:
    self.path.parent.mkdir(parents=True, exist_ok=True)
    with self.path.open("a") as f:
      f.write(json.dumps(run) + "\n")
    self.runs.append(run)

  def of(self, arm: str, lr: float | None = None) -> list[dict]:
    return [
      r
      for r in self.runs
      if r["arm"] == arm and (lr is None or math.isclose(r["lr"], lr, rel_tol=1e-6))
    ]


_KEEP = ("method", "lr", "seed", "steps", "metrics", "fixed_eval", "final_train_loss", "losses")
_KEEP += ("probes", "trainable_params", "time_train_s")


def compact(run: dict, arm: Arm, cfg: Config, commit: str) -> dict:
  out = {k: run[k] for k in _KEEP if k in run}
  out["losses"] = [round(x, 5) for x in out.get("losses", [])]
  out.update(arm=arm.name, rank=cfg.rank, trainable=cfg.trainable, commit=commit)
  return out


# --------------------------------------------------------------------------- metrics


def final(run: dict, key: str) -> float:
  """A run's final value of ``key``: the fixed-set ``train_loss``/``val_loss``/``val_mrr``,
  or ``test_mrr``/``test_r1``. A diverged run counts as +inf loss and 0 MRR."""
  if key.startswith("test_"):
    test = run["metrics"].get("test")
    if not test:
      return 0.0
    return test["mrr" if key == "test_mrr" else "recall@1"]
  vals = run["fixed_eval"].get(key)
  if not vals or not run["metrics"]:
    return math.inf if key.endswith("loss") else 0.0
  return vals[-1]


def chosen_lr(store: Store, arm: Arm, key: str = "train_loss", seed: int = 0) -> float | None:
  """The grid lr with the lowest seed-``seed`` ``key``; None until the grid is complete."""
  runs = [r for r in store.of(arm.name) if r["seed"] == seed]
  got = {float(f"{r['lr']:.6g}"): final(r, key) for r in runs}
  if not all(float(f"{lr:.6g}") in got for lr in arm.grid):
    return None
  return min(arm.grid, key=lambda lr: got[float(f"{lr:.6g}")])


def paired(xs: Sequence[float], ys: Sequence[float]) -> dict:
  """x − y per seed: mean, sample std, mean/std, paired t and how many seeds have x < y."""
  d = np.asarray(xs, float) - np.asarray(ys, float)
  n = len(d)
  sd = float(d.std(ddof=1)) if n > 1 else float("nan")
  mean = float(d.mean())
  return {
    "mean": mean,
    "std": sd,
    "n": n,
    "mean_over_std": mean / sd if sd > 0 else float("nan"),
    "t": mean / (sd / math.sqrt(n)) if sd > 0 else float("nan"),
    "below": int((d < 0).sum()),
  }


# --------------------------------------------------------------------------- the plan


def plan(store: Store, phase: str) -> list[tuple[Arm, float, int]]:
  """The (arm, lr, seed) runs that ``phase`` still needs, given the runs so far."""
  todo: list[tuple[Arm, float, int]] = []
  lrs = {a.name: chosen_lr(store, a) for a in COMPETITORS}
  if phase == "grid":
    todo = [(a, lr, 0) for a in COMPETITORS for lr in a.grid]
  elif phase == "seeds":
    todo = [(a, lrs[a.name], s) for a in COMPETITORS if lrs[a.name] for s in SEEDS[1:]]
  elif phase == "paper" and lrs["full_ft"]:
    todo = [
      (a, lrs["full_ft"], s) for a in COMPETITORS if a.name != "full_ft" for s in PAPER_SEEDS[1:]
    ]
  elif phase == "heldout":
    for a in COMPETITORS:
      lr = chosen_lr(store, a, key="val_loss")
      if a.name in HELDOUT_ARMS and lr:
        todo += [(a, lr, s) for s in SEEDS[1:]]
  elif phase == "decomp":
    todo = [(a, lrs[parent], s) for _, a, parent in DECOMP if lrs[parent] for s in DECOMP_SEEDS]
  elif phase == "capacity" and lrs["lora"]:
    todo = [(CAPACITY, float(f"{lrs['lora'] * f:.3g}"), 0) for f in CAPACITY_LR_FACTORS]
  elif phase == "teacher" and lrs["full_ft"]:
    todo = [(a, lr, 0) for a in TEACHER for lr in a.grid]
    for a in TEACHER:
      best = chosen_lr(store, a)
      todo += [(a, best, s) for s in TEACHER_SEEDS[1:] if best]
  elif phase == "tangent":
    for r in TANGENT_RANKS:
      for m in ("lora", "lorapro_fact"):
        if lrs.get(m):
          todo.append((ARMS[f"{m}_probe_r{r}"], lrs[m], 0))
  return [(a, lr, s) for a, lr, s in todo if not store.has(a.name, lr, s)]


def run_phases(
  phases: Iterable[str],
  out: Path,
  base: Config | None = None,
  log: Callable[[str], None] = print,
  comparison: Comparison | None = None,
) -> Store:
  """Runs every missing run of ``phases`` in order, appending each to ``out/runs.jsonl``."""
  base = base or base_config()
  store = Store(Path(out) / "runs.jsonl")
  commit = git_commit()
  distill = None
  for phase in phases:
    todo = plan(store, phase)
    if phase == "teacher":  # the seeds follow the grid's choice: plan again after the grid
      todo = [t for t in todo if t[2] == 0] or todo
    log(f"phase {phase}: {len(todo)} runs to do")
    while todo:
      arm, lr, seed = todo.pop(0)
      if comparison is None:
        comparison = Comparison(base, log=log)
        log(comparison.describe())
      comp = comparison
      if arm.objective == "distill":
        if distill is None:
          distill = make_distill(comparison, base, store, Path(out), commit)
        comp = distill
      cfg = arm.config(base)
      t0 = time.perf_counter()
      run = comp.train(arm.method, lr, seed, cfg)
      store.add(compact(run, arm, cfg, commit))
      log(
        f"  {phase:8} {arm.name:20} lr={lr:<7g} seed={seed} fixed-set train "
        f"{final(run, 'train_loss'):.4f} val {final(run, 'val_loss'):.4f} "
        f"test MRR {final(run, 'test_mrr'):.3f} ({time.perf_counter() - t0:.0f} s)"
      )
      if not todo and phase == "teacher":
        todo = plan(store, phase)
    if phase == "tangent" and comparison is not None:
      spectrum_path = Path(out) / "full_ft_spectrum.json"
      lr = chosen_lr(store, ARMS["full_ft"])
      if lr and not spectrum_path.exists():
        spec = full_ft_spectrum(comparison, base, lr, seed=0, every=20)
        spectrum_path.write_text(json.dumps(spec | {"lr": lr, "commit": commit}, indent=1))
  return store


def make_distill(comp: Comparison, base: Config, store: Store, out: Path, commit: str):
  """The teacher task's comparison; the teacher comes from full FT at its chosen lr, seed 0."""
  from examples.minilm.teacher import DistillComparison, low_rank_teacher

  lr = chosen_lr(store, ARMS["full_ft"])
  state, kept = low_rank_teacher(comp, base, lr, seed=0, rank=base.rank)
  distill = DistillComparison(comp, state)
  start = distill.fixed_evaluate(None)
  info = {"full_ft_lr": lr, "seed": 0, "rank": base.rank, "kept_energy": kept}
  info |= {"student_start": start, "commit": commit}
  (out / "teacher.json").write_text(json.dumps(info, indent=1))
  return distill


# --------------------------------------------------------------------------- the spectrum


def energy_shares(x: np.ndarray, ranks: Sequence[int]) -> list[float]:
  """Share of ‖x‖_F² in its top-k singular directions, for each k in ``ranks``.

  A rank-r LoRA tangent space {B·Y + X·A} holds at most the top-2r share of x:
  with col(B) the top r left singular vectors and row(A) the next r right ones,
  only (I − P_B)·x·(I − P_A) = the components beyond 2r are left out, and no
  pair of rank-r projectors leaves out less. So read r's bound at k = 2r.
  """
  s2 = np.linalg.svd(np.asarray(x, np.float64), compute_uv=False) ** 2
  total = s2.sum()
  if total == 0:
    return [0.0 for _ in ranks]
  c = np.cumsum(s2)
  return [float(c[min(r, len(c)) - 1] / total) for r in ranks]


def full_ft_spectrum(
  comp: Comparison, base: Config, lr: float, seed: int, every: int, ranks=(1, 2, 4, 8, 16, 32, 64)
) -> dict:
  """Full FT at ``lr``: every ``every`` steps, the top-r energy share of each adapted
  kernel's step (its Adam update) and of its accumulated change W_t − W0."""
  from examples.minilm.teacher import train_top

  def kernels(p) -> dict[str, np.ndarray]:
    out = {}
    for path, x in jax.tree_util.tree_flatten_with_path(p)[0]:
      names = normalise_path(path)
      if names[-2:] == ("base", "kernel"):  # the adapted kernels, named layers/i/target
        out["/".join(map(str, names[:-2]))] = np.asarray(x)
    return out

  w0 = kernels(comp.base_state)
  rec: dict[str, list] = {"step": [], "update": [], "delta": []}
  prev = {"w": w0}

  def on_step(done, params):
    if done % every == 0 or done == 1 or (done + 1) % every == 0:
      now = kernels(params)
      if done % every == 0 or done == 1:
        rec["step"].append(done)
        rec["update"].append({k: energy_shares(now[k] - prev["w"][k], ranks) for k in now})
        rec["delta"].append({k: energy_shares(now[k] - w0[k], ranks) for k in now})
      prev["w"] = now

  train_top(comp, base, "full_ft", lr, seed, on_step)
  return {"ranks": list(ranks), "seed": seed, **rec}
