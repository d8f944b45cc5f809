"""One GPU, one command, at most 8 minutes: every experiment on the device, the queue against the nested loop, and
the §5.1 Langevin loop's throughput, with ratios side by side.

    python benchmarks/gpu.py [--device cuda] [--quick] [--budget SECONDS] [--deadline SECONDS]
        [--sections smoke queue langevin] [--out FILE.json]      (| tee benchmarks/results/gpu.txt)

Three sections, each timed, under one global deadline (``--deadline``, default 480 s): a section
that no longer fits before it is skipped, a queue run gets a shorter budget (down to 1/4 of
``--budget``) or is skipped, and the output says so.

1. **smoke** — each experiment of ``implicit-diffusion list``, and ``pretrain digits``, for a few
   steps in its own process: ``python -m implicit_diffusion run NAME --device DEVICE --no-progress
   --out TMP --set ...`` (the settings are in ``SMOKE``; a key the experiment's config lacks is
   dropped and reported). ``diffusion-finetune`` and ``pretrain`` run once more with ``--dtype
   bfloat16`` (autocast) where their config has a ``dtype`` key. Reported: pass or fail, wall
   seconds (start-up included), the last line of stderr of a failure. A failure does not stop
   the benchmark.
2. **queue** — ``benchmarks/diffusion_queue.py`` run as a subprocess once per M ∈ {50, 100}:
   nested full backprop (``nested-autograd``), ``nested-adjoint``, ``queue-sequential``,
   ``queue-pipelined`` and ``queue-pipelined-chunked`` (``--max-batch`` images per network call,
   default 512) on the shipped digits U-Net (brightness reward, path KL), 32 images per θ update
   or queue slot, ``--budget`` seconds of training each (default 20; every contender × M is its
   own process). From its JSON: time per θ update, peak CUDA memory
   (``torch.cuda.max_memory_allocated`` above the set-up state), the reward reached within the
   budget; and, against nested-autograd, the speed-up, the memory ratio and the *reach
   fraction*: when the contender first reaches nested-autograd's final reward, as a fraction of
   nested-autograd's training time. Target (the paper's O(K) sampler steps against O(KM)):
   queue-pipelined reaches it in ≤ 1/5 of the time with no more peak memory.
3. **langevin** — the §5.1 single loop (Marion et al. 2024, Algorithm 2: hexagon mixture, one ULA
   step with γ = 0.2, Γ_R of the indicator reward, SGD with η = 0.1) built from the library's
   pieces, particles and generator on the device, float32, at 10⁶ and 10⁷ particles: a warm-up,
   then a fixed number of θ updates between ``torch.cuda.synchronize()`` calls. Reported:
   particle-steps/s and peak memory; also the experiment's own ``run`` at 10⁶ particles (its loop
   time: recorders and evaluations included) when its config has a ``device`` key, and the
   speed-up over the best CPU row of ``benchmarks/results/langevin_mixture.json``.

The plan for 8 minutes on one H200: smoke ≈ 1–1.5 min (11 processes, CUDA start-up in each),
queue ≈ 5 min (10 processes × (20 s budget + ≈ 8 s start-up and evaluations)), Langevin < 1 min.

``--quick`` shrinks everything (M ∈ {3, 5}, 4 images per update, 3 s budgets, 10⁴ and 10⁵
particles, a 300 s deadline) so that ``--device cpu --quick`` checks the script end to end on a
CPU in 2–4 minutes. Its JSON goes to ``$TMPDIR/implicit-diffusion-gpu-quick.json`` unless ``--out``
says otherwise, so a CPU check never overwrites GPU results; the default output is
``benchmarks/results/gpu.json`` (the machine: GPU name, torch and CUDA versions, git commit; the
settings; every section's results; rewritten after each section). Exit status: 0; 1 when a smoke
run or a measurement failed; 2 when the device is not there.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
QUEUE_SCRIPT = HERE / "diffusion_queue.py"
CPU_LANGEVIN = HERE / "results" / "langevin_mixture.json"
QUICK_OUT = Path(tempfile.gettempdir()) / "implicit-diffusion-gpu-quick.json"
SECTIONS = ("smoke", "queue", "langevin")
QUEUE_ALGORITHMS = ("nested-autograd", "nested-adjoint", "queue-sequential", "queue-pipelined",
                    "queue-pipelined-chunked")
REFERENCE = "nested-autograd"
TARGET_REACH, TARGET_MEMORY = 0.2, 1.0  # reach fraction ≤ 1/5, peak memory ≤ 1× nested-autograd's
DEVICE_PATTERN = re.compile(r"cpu|mps|cuda(:\d+)?")

# A few steps of every experiment, as --set key=value (values in the CLI's TOML syntax).
SMOKE: dict[str, dict[str, object]] = {
    "diffusion-finetune": {"num_steps": 4, "num_sampling_steps": 3, "batch_size": 2, "eval_every": 2,
                           "eval_samples": 6, "grid_images": 4},
    "diffusion-gaussian-1d": {"num_steps": 20, "num_sampling_steps": 5, "batch_size": 16},
    "ebm": {"num_train": 300, "num_heldout": 200, "num_particles": 200, "batch_size": 100, "num_steps": 20,
            "nested_inner_steps": 5, "hidden": 16, "eval_every": 10, "fresh_steps": 10},
    "hyperparameter": {"num_updates": 20, "nested_updates": 2, "grid_points": 21},
    "langevin-mixture": {"num_particles": 10_000, "num_steps": 20, "eval_every": 10, "snapshot_steps": "[0]"},
    "rates": {"num_steps": 20, "num_particles": 8, "num_seeds": 1},
    "pretrain digits": {"num_steps": 5, "num_samples": 4, "sampling_steps": 5, "batch_size": 16},
}
GENERIC_SMOKE = {"num_steps": 4, "num_updates": 4, "eval_every": 2}  # an experiment added after this script
BFLOAT16_SMOKE = ("diffusion-finetune", "pretrain digits")


@dataclasses.dataclass(frozen=True)
class Plan:
    """Sizes and time limits of one mode (``FULL`` on a GPU, ``QUICK`` for checking the script)."""

    Ms: tuple[int, ...]
    batch: int
    budget: float  # training seconds per queue contender and M
    max_batch: int  # images per network call of queue-pipelined-chunked
    particles: tuple[int, ...]
    langevin_steps: tuple[int, ...]  # timed θ updates at each number of particles
    warmup: int
    deadline: float  # seconds for the whole run
    queue_overhead: float  # seconds per queue process besides its budget (start-up, evaluations)
    smoke_timeout: float  # seconds per smoke run
    langevin_reserve: float  # seconds the queue section leaves for the Langevin one


FULL = Plan(Ms=(50, 100), batch=32, budget=20.0, max_batch=512, particles=(10**6, 10**7), langevin_steps=(2000, 500),
            warmup=50, deadline=480.0, queue_overhead=10.0, smoke_timeout=60.0, langevin_reserve=30.0)
QUICK = Plan(Ms=(3, 5), batch=4, budget=3.0, max_batch=8, particles=(10**4, 10**5), langevin_steps=(50, 20),
             warmup=5, deadline=300.0, queue_overhead=6.0, smoke_timeout=60.0, langevin_reserve=15.0)


class Clock:
    """Seconds since the start, and what is left before the deadline."""

    def __init__(self, deadline: float):
        self.t0, self.deadline = time.perf_counter(), deadline

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.deadline - self.elapsed()


def check_device(device: str) -> str | None:
    """None if ``device`` is usable here, else the one-line reason."""
    if not DEVICE_PATTERN.fullmatch(device):
        return f"unknown device {device!r}; allowed: cpu, cuda, cuda:N, mps"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            return (f"device {device!r} asked, but CUDA is not available (torch {torch.__version__}, CUDA build: "
                    f"{torch.version.cuda or 'none'}); on a CPU, check the script with --device cpu --quick")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            return f"device {device!r} asked, but there are {torch.cuda.device_count()} CUDA devices"
    if device == "mps" and not torch.backends.mps.is_available():
        return "device 'mps' asked, but MPS is not available"
    return None


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def child_env() -> dict[str, str]:
    return {**os.environ, "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1"}


def machine_info(device: str) -> dict:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "device": device}
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        info.update(gpu=torch.cuda.get_device_name(torch.device(device)), gpu_memory_gib=props.total_memory / 2**30,
                    gpu_count=torch.cuda.device_count(), cudnn=torch.backends.cudnn.version())
    try:
        git = ["git", "-C", str(ROOT)]
        commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run([*git, "status", "--porcelain"], capture_output=True, text=True, timeout=10).stdout
        info.update(git_commit=commit or None, git_dirty=bool(dirty.strip()) if commit else None)
    except (OSError, subprocess.TimeoutExpired):  # no git on the machine: the results stand without it
        info.update(git_commit=None, git_dirty=None)
    return info


# -- 1. smoke ------------------------------------------------------------------------------------------------
def config_fields(name: str) -> set[str]:
    """The config keys of experiment ``name`` (``"pretrain DATASET"`` for pretraining)."""
    from implicit_diffusion.experiments import EXPERIMENTS, pretrain

    module = pretrain if name.startswith("pretrain ") else EXPERIMENTS[name]
    return {f.name for f in dataclasses.fields(module.Config)}


def smoke_jobs(device: str) -> list[dict]:
    """One job per experiment and ``pretrain digits`` (plus the bfloat16 ones): its name, the CLI
    arguments after ``python -m implicit_diffusion`` (without ``--out``), the ``--set`` keys its
    config lacks (dropped), and ``skip`` (a reason) for a job that cannot run."""
    from implicit_diffusion.experiments import EXPERIMENTS

    jobs = []
    for name in [*sorted(EXPERIMENTS), "pretrain digits"]:
        fields = config_fields(name)
        wanted = SMOKE.get(name, GENERIC_SMOKE)
        command = name.split() if name.startswith("pretrain ") else ["run", name]
        args = [*command, "--device", device, "--no-progress"]
        for key, value in wanted.items():
            if key in fields:
                args += ["--set", f"{key}={value}"]
        dropped = sorted(set(wanted) - fields) if name in SMOKE else []
        jobs.append({"name": name, "args": args, "dropped": dropped, "generic": name not in SMOKE})
        if name in BFLOAT16_SMOKE:
            job = {"name": f"{name} bfloat16", "args": [*args, "--dtype", "bfloat16"], "dropped": dropped,
                   "generic": False}
            if "dtype" not in fields:
                job["skip"] = "its config has no dtype key"
            jobs.append(job)
    return jobs


def run_smoke(jobs: list[dict], clock: Clock, timeout: float) -> list[dict]:
    print(f"{'run':<30} {'result':>6} {'s':>7}  last line of stderr (failures)")
    rows = []
    for job in jobs:
        row = {k: job[k] for k in ("name", "args", "dropped")}
        reason = job.get("skip") or ("deadline" if clock.left() < 10 else None)
        if reason:
            row.update(ok=None, skipped=reason)
            print(f"{job['name']:<30} {'skip':>6} {'':>7}  {reason}", flush=True)
            rows.append(row)
            continue
        with tempfile.TemporaryDirectory() as d:
            argv = [sys.executable, "-m", "implicit_diffusion", *job["args"], "--out", str(Path(d) / "run")]
            limit = max(1.0, min(timeout, clock.left()))
            t = time.perf_counter()
            try:
                p = subprocess.run(argv, capture_output=True, text=True, timeout=limit, env=child_env(), cwd=ROOT)
                rc, error = p.returncode, (last_line(p.stderr) if p.returncode else "")
            except subprocess.TimeoutExpired:
                rc, error = None, f"timed out after {limit:.0f} s"
            seconds = time.perf_counter() - t
        row.update(ok=rc == 0, rc=rc, seconds=seconds, error=error)
        if job["dropped"]:
            error = f"(dropped settings {', '.join(job['dropped'])}) {error}"
        print(f"{job['name']:<30} {'pass' if rc == 0 else 'FAIL':>6} {seconds:>7.1f}  {error}", flush=True)
        rows.append(row)
    return rows


# -- 2. queue against nested -----------------------------------------------------------------------------------
def largest_shipped_model() -> tuple[str, int]:
    """The shipped model with the most parameters, and that number."""
    from implicit_diffusion.pretrained import PRETRAINED, load_pretrained

    sizes = {name: sum(p.numel() for p in load_pretrained(name).model.parameters()) for name in PRETRAINED}
    name = max(sizes, key=sizes.get)
    return name, sizes[name]


def time_to_reach(curve: list[list[float]], level: float) -> float | None:
    """First time at which the (time, reward) curve reaches ``level`` (linear interpolation), or None."""
    if curve and curve[0][1] >= level:
        return curve[0][0]
    for (t0, r0), (t1, r1) in zip(curve, curve[1:]):
        if r1 >= level:
            return t0 + (t1 - t0) * (level - r0) / (r1 - r0)
    return None


def queue_ratios(rows: list[dict]) -> list[dict]:
    """Per M and contender: time per update, peak memory and rewards, with the ratios to
    nested-autograd (speed-up, memory ratio, reach fraction: time to reach its final reward over its
    training time) and, for the pipelined queues, whether the target is met."""
    out = []
    for M in sorted({r["M"] for r in rows}):
        by = {r["algorithm"]: r for r in rows if r["M"] == M}
        ref = by.get(REFERENCE)
        for name, r in by.items():
            e = {"M": M, "algorithm": name, "time_per_update_s": r["time_per_update_s"], "peak_mib": r["peak_mib"],
                 "updates": r["updates"], "initial_reward": r["initial_reward"], "final_reward": r["final_reward"],
                 "speedup": None, "memory_ratio": None, "reach_fraction": None}
            if ref is not None and math.isfinite(r["time_per_update_s"]):  # NaN: no update within the budget
                e["speedup"] = ref["time_per_update_s"] / r["time_per_update_s"]
            if ref is not None:
                e["memory_ratio"] = r["peak_mib"] / ref["peak_mib"] if ref["peak_mib"] > 0 else None
                reached = time_to_reach(r["curve"], ref["final_reward"])
                ref_time = ref["curve"][-1][0]
                e["reach_fraction"] = None if reached is None else reached / ref_time
                if name.startswith("queue-pipelined"):
                    e["target_met"] = (e["reach_fraction"] is not None and e["reach_fraction"] <= TARGET_REACH
                                       and e["memory_ratio"] is not None and e["memory_ratio"] <= TARGET_MEMORY)
            out.append(e)
    return out


def print_queue_table(ratios: list[dict]) -> None:
    def f(v, fmt: str, none: str = "n/a") -> str:
        return none if v is None else format(v, fmt)

    print(f"\n{'M':>4} {'contender':<24} {'ms/update':>10} {'peak MiB':>9} {'updates':>8} {'reward start → end':>20} "
          f"{'speed':>7} {'memory':>7} {'reach':>6}")
    for e in ratios:
        rewards = f"{e['initial_reward']:+.4f} → {e['final_reward']:+.4f}"
        print(f"{e['M']:>4} {e['algorithm']:<24} {e['time_per_update_s'] * 1e3:>10.1f} {e['peak_mib']:>9.1f} "
              f"{e['updates']:>8} {rewards:>20} {f(e['speedup'], '.2f'):>6}× {f(e['memory_ratio'], '.2f'):>7} "
              f"{f(e['reach_fraction'], '.2f', 'never'):>6}")
    print(f"speed, memory: against {REFERENCE}; reach: time to reach {REFERENCE}'s final reward over its training time")
    for e in ratios:
        if "target_met" in e:
            print(f"target at M={e['M']} ({e['algorithm']}: reach ≤ {TARGET_REACH:g}, memory ≤ {TARGET_MEMORY:g}×): "
                  f"{'met' if e['target_met'] else 'NOT met'}")


def stream(argv: list[str], timeout: float, env: dict[str, str]) -> tuple[int | None, str]:
    """Run ``argv``, echoing its stdout as it comes; kill its process group after ``timeout`` s.
    Returns (exit status or None when killed, last line of stderr)."""
    with tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, text=True, env=env, cwd=ROOT,
                             start_new_session=True)  # its own process group: its workers go with it
        killed = threading.Event()

        def kill() -> None:
            killed.set()
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        timer = threading.Timer(timeout, kill)
        timer.start()
        try:
            for line in p.stdout:
                print(f"    {line.rstrip()}", flush=True)
            rc = p.wait()
        finally:
            timer.cancel()
        err.seek(0)
        return (None if killed.is_set() else rc), last_line(err.read())


def run_queue(plan: Plan, device: str, clock: Clock, reserve: float) -> dict:
    model, params = largest_shipped_model()
    # diffusion_queue.py trains the shipped digits model unless it has a flag to choose one
    model_flag = '"--model"' in QUEUE_SCRIPT.read_text()
    env = child_env()
    if device.startswith("cuda:"):  # the script knows "cuda" only: show it the one GPU asked for
        env["CUDA_VISIBLE_DEVICES"] = device.partition(":")[2]
    how = f"passed as --model {model}" if model_flag else "diffusion_queue.py has no --model flag: it trains digits"
    print(f"largest shipped model: {model} ({params:,} parameters); {how}")
    section = {"model": model if model_flag else "digits", "largest_shipped": model, "largest_params": params,
               "runs": [], "rows": []}
    for M in plan.Ms:
        left = clock.left() - reserve
        # late in the run the budget shrinks to fit (the ratios compare contenders at one M only)
        budget = min(plan.budget, left / len(QUEUE_ALGORITHMS) - plan.queue_overhead)
        if budget < plan.budget / 4:
            print(f"M={M}: skipped, deadline ({left:.0f} s left for the queue, "
                  f"≈ {len(QUEUE_ALGORITHMS) * (plan.budget + plan.queue_overhead):.0f} s needed)")
            section["runs"].append({"M": M, "skipped": "deadline"})
            continue
        if budget < plan.budget:
            print(f"M={M}: budget cut to {budget:.1f} s per run to fit the deadline")
        with tempfile.TemporaryDirectory() as d:
            out = Path(d) / "queue.json"
            argv = [sys.executable, str(QUEUE_SCRIPT), "--device", "cpu" if device == "cpu" else "cuda",
                    "--Ms", str(M), "--batch", str(plan.batch), "--budget", f"{budget:.3g}",
                    "--max-batch", str(plan.max_batch), "--algorithms", *QUEUE_ALGORITHMS, "--out", str(out)]
            if model_flag:
                argv += ["--model", model]
            t = time.perf_counter()
            rc, error = stream(argv, left, env)
            seconds = time.perf_counter() - t
            run = {"M": M, "budget": budget, "rc": rc, "seconds": seconds,
                   "error": "" if rc == 0 else error or "killed at the deadline"}
            if out.is_file():
                data = json.loads(out.read_text())
                section["rows"] += data["rows"]
                section["queue_machine"] = data.get("machine")
        print(f"M={M}: {'done' if rc == 0 else 'FAILED: ' + run['error']} in {seconds:.0f} s", flush=True)
        section["runs"].append(run)
    section["ratios"] = queue_ratios(section["rows"])
    if section["ratios"]:
        print_queue_table(section["ratios"])
    return section


# -- 3. Langevin throughput ---------------------------------------------------------------------------------------
def langevin_throughput(num_particles: int, steps: int, warmup: int, device: str, seed: int = 0) -> dict:
    """The §5.1 single loop at ``num_particles`` on ``device`` (float32): ``warmup`` θ updates,
    then ``steps`` timed ones. Each step's mean reward is copied into a device buffer (no host sync).
    CPU threads as in the experiment (one for small batches: see ``runtime.threads``)."""
    from implicit_diffusion.runtime.threads import torch_threads

    with torch_threads(None, 2 * num_particles):
        return _langevin_throughput(num_particles, steps, warmup, device, seed)


def _langevin_throughput(num_particles: int, steps: int, warmup: int, device: str, seed: int) -> dict:
    from implicit_diffusion.algorithms import SingleLoop
    from implicit_diffusion.models import hexagon_mixture
    from implicit_diffusion.objectives import RewardEstimator, hexagon_reward

    dev = torch.device(device)
    potential = hexagon_mixture(dtype=torch.float32).to(dev)
    # foreach=False: θ is one 6-vector (as in the experiment)
    optimizer = torch.optim.SGD(potential.parameters(), lr=0.1, foreach=False)
    algo = SingleLoop(potential, RewardEstimator(hexagon_reward), optimizer, step_size=0.2)
    generator = torch.Generator(device=dev).manual_seed(seed)
    x = torch.randn(num_particles, 2, generator=generator, device=dev)
    rewards = torch.empty(steps, device=dev)

    def record(k: int, x: torch.Tensor, stats: dict) -> None:
        rewards[k - warmup] = stats["reward"]

    x = algo.run(x, warmup, generator=generator)
    sync(device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t = time.perf_counter()
    x = algo.run(x, steps, generator=generator, start=warmup, callbacks=[record])
    sync(device)
    seconds = time.perf_counter() - t
    weights = torch.softmax(potential.logits.detach().double().cpu(), 0)
    return {"particles": num_particles, "steps": steps, "warmup": warmup, "seconds": seconds,
            "ms_per_step": seconds / steps * 1e3, "particle_steps_per_s": num_particles * steps / seconds,
            "peak_mib": torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None,
            "reward_mean_last": float(rewards[-min(100, steps):].mean()), "finite": bool(torch.isfinite(x).all()),
            "weights_final": [float(w) for w in weights]}


def experiment_throughput(num_particles: int, steps: int, device: str) -> dict:
    """The experiment's own ``run`` (recorders, first-step checks and the final evaluation in its loop time)."""
    from implicit_diffusion.experiments.langevin_mixture import LangevinMixtureConfig, run

    cfg = LangevinMixtureConfig(num_particles=num_particles, num_steps=steps, eval_every=steps, snapshot_steps=(0,),
                                progress=False, device=device)
    r = run(cfg)
    return {"particles": num_particles, "steps": steps, "seconds": r.wall_time,
            "ms_per_step": r.wall_time / steps * 1e3, "particle_steps_per_s": num_particles * steps / r.wall_time,
            "reward_mean_last": float(r.rewards[-min(100, steps):].mean())}


def cpu_reference() -> dict | None:
    """The best particle-steps/s of the CPU benchmark in benchmarks/results/langevin_mixture.json."""
    try:
        data = json.loads(CPU_LANGEVIN.read_text())
        best = max((r for r in data["rows"] if r.get("contender") == "ours"), key=lambda r: r["particle_steps_per_s"])
    except (OSError, ValueError, KeyError):
        return None
    return {"particles": best["particles"], "particle_steps_per_s": best["particle_steps_per_s"],
            "machine": data.get("machine")}


def run_langevin(plan: Plan, device: str, clock: Clock) -> dict:
    from implicit_diffusion.experiments.langevin_mixture import LangevinMixtureConfig

    rows: list[dict] = []
    jobs = [("library loop", n, s, lambda n=n, s=s: langevin_throughput(n, s, plan.warmup, device))
            for n, s in zip(plan.particles, plan.langevin_steps)]
    if "device" in {f.name for f in dataclasses.fields(LangevinMixtureConfig)}:
        n, s = plan.particles[0], plan.langevin_steps[0]
        jobs.append(("experiment run()", n, s, lambda: experiment_throughput(n, s, device)))
    else:
        print("(the experiment's run() row is left out: LangevinMixtureConfig has no device key)")
    for label, n, s, job in jobs:
        if clock.left() < 5:
            print(f"{label} at {n:,} particles: skipped, deadline")
            rows.append({"contender": label, "particles": n, "skipped": "deadline"})
            continue
        try:
            rows.append({"contender": label, **job()})
        except Exception as e:  # noqa: BLE001 — a library refusal on the device is a result to report
            rows.append({"contender": label, "particles": n, "steps": s, "error": f"{type(e).__name__}: {e}"})
    cpu = cpu_reference()
    done = [r for r in rows if "particle_steps_per_s" in r]
    base = done[0]["particle_steps_per_s"] if done else None
    print(f"{'contender':<18} {'particles':>11} {'steps':>6} {'s':>7} {'ms/step':>8} {'particle-steps/s':>17} "
          f"{'× first':>8} {'× CPU':>7} {'peak MiB':>9} {'reward':>7}")
    for r in rows:
        if "particle_steps_per_s" not in r:
            print(f"{r['contender']:<18} {r['particles']:>11,}  {r.get('error') or r.get('skipped')}")
            continue
        rate = r["particle_steps_per_s"]
        vs_cpu = f"{rate / cpu['particle_steps_per_s']:>6.3g}×" if cpu else f"{'n/a':>7}"
        peak = f"{r['peak_mib']:>9.1f}" if r.get("peak_mib") is not None else f"{'n/a':>9}"
        print(f"{r['contender']:<18} {r['particles']:>11,} {r['steps']:>6} {r['seconds']:>7.2f} "
              f"{r['ms_per_step']:>8.3f} {rate:>17.3g} {rate / base:>7.2f}× {vs_cpu} {peak} "
              f"{r['reward_mean_last']:>7.4f}")
    if cpu:
        print(f"× CPU: against {cpu['particle_steps_per_s']:.3g} particle-steps/s at {cpu['particles']:,} particles "
              f"({CPU_LANGEVIN.relative_to(ROOT)}: {cpu['machine']})")
    return {"rows": rows, "cpu_reference": cpu}


# -- main ---------------------------------------------------------------------------------------------------------
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cpu, cuda, cuda:N or mps (default cuda)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the script on a CPU in minutes")
    p.add_argument("--budget", type=float, help="training seconds per queue contender and M (default 20; quick 3)")
    p.add_argument("--deadline", type=float, help="seconds for the whole run (default 480; quick 300)")
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    p.add_argument("--out", help=f"JSON file (default benchmarks/results/gpu.json; quick {QUICK_OUT})")
    args = p.parse_args()
    problem = check_device(args.device)
    if problem:
        print(f"gpu.py: {problem}", file=sys.stderr)
        return 2
    plan = QUICK if args.quick else FULL
    plan = dataclasses.replace(plan, budget=args.budget or plan.budget, deadline=args.deadline or plan.deadline)
    out = Path(args.out) if args.out else QUICK_OUT if args.quick else HERE / "results" / "gpu.json"
    clock = Clock(plan.deadline)
    machine = machine_info(args.device)
    print(f"# GPU benchmark{' (quick)' if args.quick else ''} on {args.device}: "
          f"{machine.get('gpu', machine['processor'])}, torch {machine['torch']}, CUDA {machine['cuda']}; "
          f"deadline {plan.deadline:g} s")
    results: dict = {"machine": machine, "quick": args.quick, "settings": dataclasses.asdict(plan),
                     "sections": {}, "section_seconds": {}, "skipped_sections": []}
    failed = False

    def write() -> None:
        results["total_seconds"] = clock.elapsed()
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1) + "\n")

    for name in SECTIONS:
        if name not in args.sections:
            continue
        if clock.left() < 10:
            print(f"\n## {name}: skipped, deadline ({clock.elapsed():.0f} s of {plan.deadline:g} s gone)")
            results["skipped_sections"].append(name)
            continue
        t = time.perf_counter()
        if name == "smoke":
            print(f"\n## 1. smoke: every experiment for a few steps with --device {args.device}")
            rows = run_smoke(smoke_jobs(args.device), clock, plan.smoke_timeout)
            failed |= any(r["ok"] is False for r in rows)
            results["sections"]["smoke"] = {"rows": rows}
            print(f"{sum(r['ok'] is True for r in rows)} of {len(rows)} passed")
        elif name == "queue":
            print(f"\n## 2. queue vs nested loop: M ∈ {list(plan.Ms)}, batch {plan.batch}, budget {plan.budget:g} s "
                  f"per run, chunks of {plan.max_batch} for queue-pipelined-chunked")
            if args.device == "mps":
                print("skipped: diffusion_queue.py measures memory on cpu and cuda only")
                results["skipped_sections"].append(name)
                continue
            reserve = plan.langevin_reserve if "langevin" in args.sections else 0.0
            section = run_queue(plan, args.device, clock, reserve)
            failed |= any("skipped" not in r and r["rc"] != 0 for r in section["runs"])
            results["sections"]["queue"] = section
        else:
            print(f"\n## 3. §5.1 Langevin single loop, float32 on {args.device}: {plan.warmup} warm-up updates, "
                  f"then timed ones")
            section = run_langevin(plan, args.device, clock)
            failed |= any("error" in r for r in section["rows"])
            results["sections"]["langevin"] = section
        results["section_seconds"][name] = time.perf_counter() - t
        print(f"({name}: {results['section_seconds'][name]:.0f} s; {clock.elapsed():.0f} s in all)", flush=True)
        write()

    write()
    times = ", ".join(f"{k} {v:.0f} s" for k, v in results["section_seconds"].items())
    print(f"\ntotal {clock.elapsed():.0f} s ({times}); "
          + (f"skipped: {', '.join(results['skipped_sections'])}; " if results["skipped_sections"] else "")
          + f"wrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
