"""Scale-out: 2 processes (gloo, one CPU machine) against one process holding all particles."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from implicit_diffusion.cli import main
from implicit_diffusion.distributed import all_gather_rows, global_count, global_mean, world_size
from implicit_diffusion.samplers import mala_step, ula_step
from implicit_diffusion.samplers.blocks import block_generator, blockwise

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")


def torchrun(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                           *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)


GAMMA_SCRIPT = textwrap.dedent("""
    import json, os, sys, torch, torch.distributed as dist
    from implicit_diffusion.algorithms.base import apply_surrogate
    from implicit_diffusion.distributed import init_from_env, rank, world_size
    from implicit_diffusion.models import hexagon_mixture
    from implicit_diffusion.objectives import KLToReference, RewardEstimator, hexagon_reward_smooth

    assert init_from_env() and world_size() == 2
    x = torch.randn(1000, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 3
    mine = x.chunk(2)[rank()]
    V = hexagon_mixture((0.5, -0.3, 1.0, 0.2, 0.0, -1.0), dtype=torch.float64)
    kl = KLToReference(V, 0.5)
    with torch.no_grad():
        V.logits.add_(torch.linspace(-0.4, 0.6, 6, dtype=torch.float64))  # move θ away from θ₀
    est = RewardEstimator(hexagon_reward_smooth, weight=2.0) + kl
    opt = torch.optim.SGD(V.parameters(), lr=0.0)   # lr 0: only the gradient is wanted
    surrogate = est(V, mine)
    apply_surrogate(V, surrogate, opt)
    gamma = V.logits.grad.clone()
    # the wrong way: every process its own covariances (local means and counts), Γs averaged
    import implicit_diffusion.distributed as D
    D.active = lambda: False
    V.logits.grad = None
    est(V, mine).backward(V)
    D.active = lambda: True
    wrong = V.logits.grad.clone()
    dist.all_reduce(wrong)
    wrong /= 2
    if rank() == 0:
        with open(sys.argv[1], "w") as f:
            json.dump({"gamma": gamma.tolist(), "wrong": wrong.tolist(),
                       "reward": float(surrogate.stats["reward"])}, f)
    dist.barrier()  # both processes done with every collective before the group goes away
    dist.destroy_process_group()
    os._exit(0)  # no interpreter teardown, where gloo's threads can abort a finished process
""")


@pytest.mark.slow
def test_two_processes_give_the_gamma_of_one_process_holding_all_particles(tmp_path):
    """Γ_R = Cov(R, ∇θV) and Γ_KL = Cov(V_θ − V_θ₀, ∇θV) need global means and counts: the
    all-reduced Γ of two halves equals the one-process Γ to float64 rounding; averaging
    per-process covariances (the control) does not."""
    from implicit_diffusion.models import hexagon_mixture
    from implicit_diffusion.objectives import KLToReference, RewardEstimator, hexagon_reward_smooth

    (tmp_path / "gamma.py").write_text(GAMMA_SCRIPT)
    proc = torchrun(["gamma.py", str(tmp_path / "out.json")], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads((tmp_path / "out.json").read_text())

    x = torch.randn(1000, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 3
    V = hexagon_mixture((0.5, -0.3, 1.0, 0.2, 0.0, -1.0), dtype=torch.float64)
    kl = KLToReference(V, 0.5)
    with torch.no_grad():
        V.logits.add_(torch.linspace(-0.4, 0.6, 6, dtype=torch.float64))
    s = (RewardEstimator(hexagon_reward_smooth, weight=2.0) + kl)(V, x)
    s.backward(V)
    expected = V.logits.grad
    torch.testing.assert_close(torch.tensor(got["gamma"], dtype=torch.float64), expected, rtol=1e-12, atol=1e-14)
    assert abs(got["reward"] - float(s.stats["reward"])) < 1e-14
    assert (torch.tensor(got["wrong"], dtype=torch.float64) - expected).abs().max() > 1e-6


CONTRASTIVE_SCRIPT = textwrap.dedent("""
    import json, os, sys, torch, torch.distributed as dist
    from implicit_diffusion.algorithms.base import apply_surrogate
    from implicit_diffusion.distributed import init_from_env, rank, world_size
    from implicit_diffusion.models import EnergyMLP, hexagon_mixture
    from implicit_diffusion.objectives import ContrastiveKL

    assert init_from_env() and world_size() == 2
    g = torch.Generator().manual_seed(4)
    x = torch.randn(301, 2, generator=g, dtype=torch.float64) * 2       # particles, sharded 151 / 150
    ref = torch.randn(37, 2, generator=g, dtype=torch.float64) + 1.0    # reference, on every process
    mine = x.tensor_split(2)[rank()]
    out = {}
    mlp = EnergyMLP(2, hidden=8, depth=2).double().reset_parameters(torch.Generator().manual_seed(5))
    for name, V in (("mixture", hexagon_mixture((0.5, -0.3, 1.0, 0.2, 0.0, -1.0), dtype=torch.float64)),
                    ("mlp", mlp)):
        est = ContrastiveKL(ref, weight=0.7)
        surrogate = est(V, mine)
        with torch.no_grad():
            value = surrogate.loss(V).reshape(1)
        dist.all_reduce(value)  # the objective's surrogate value: the sum of the processes' shares
        apply_surrogate(V, surrogate, torch.optim.SGD(V.parameters(), lr=0.0))  # Γ, all-reduced
        out[name] = {"value": float(value), "grad": torch.cat([p.grad.flatten() for p in V.parameters()]).tolist()}
    if rank() == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(out, f)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # no interpreter teardown, where gloo's threads can abort a finished process
""")


@pytest.mark.slow
def test_contrastive_kl_sharded_over_two_processes_equals_one_process(tmp_path):
    """ContrastiveKL with 301 particles split 151 / 150 over 2 processes (each holds the whole
    reference): the all-reduced surrogate value β[mean_ref V − mean_x V] and its θ-gradient Γ_ref
    (closed-form mixture gradient and an autograd EnergyMLP) equal one process holding all
    particles, to float64 rounding (1e-10 relative). The reference weight must split over the
    processes and the particle count must be global: either mistake doubles one of the two
    terms, far outside the tolerance."""
    from implicit_diffusion.models import EnergyMLP, hexagon_mixture
    from implicit_diffusion.objectives import ContrastiveKL

    (tmp_path / "contrastive.py").write_text(CONTRASTIVE_SCRIPT)
    proc = torchrun(["contrastive.py", str(tmp_path / "out.json")], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads((tmp_path / "out.json").read_text())

    g = torch.Generator().manual_seed(4)
    x = torch.randn(301, 2, generator=g, dtype=torch.float64) * 2
    ref = torch.randn(37, 2, generator=g, dtype=torch.float64) + 1.0
    mlp = EnergyMLP(2, hidden=8, depth=2).double().reset_parameters(torch.Generator().manual_seed(5))
    for name, V in (("mixture", hexagon_mixture((0.5, -0.3, 1.0, 0.2, 0.0, -1.0), dtype=torch.float64)),
                    ("mlp", mlp)):
        s = ContrastiveKL(ref, weight=0.7)(V, x)
        with torch.no_grad():
            value = s.loss(V)
            direct = 0.7 * (V(ref).mean() - V(x).mean())  # the surrogate's value, written out
        torch.testing.assert_close(value, direct, rtol=1e-12, atol=1e-14)
        s.backward(V)
        grad = torch.cat([p.grad.flatten() for p in V.parameters()])
        assert grad.abs().max() > 1e-3  # a non-trivial gradient: the comparison is not vacuous
        torch.testing.assert_close(torch.tensor(got[name]["value"], dtype=torch.float64), value, rtol=1e-10,
                                   atol=1e-12)
        torch.testing.assert_close(torch.tensor(got[name]["grad"], dtype=torch.float64), grad, rtol=1e-10,
                                   atol=1e-12)


ARGS = ["run", "langevin-mixture", "--set", "num_particles=400", "--set", "num_steps=150", "--set", "eval_every=50",
        "--set", "snapshot_steps=[0, 150]", "--set", "dtype=float64", "--no-progress"]


@pytest.mark.slow
def test_a_two_process_run_matches_one_process_with_the_same_particle_blocks(tmp_path):
    """The same short fixed-seed run, sharded over 2 processes and in one process with the same 2
    particle blocks: final θ equal to float64 rounding (the all-reduce sums in another order);
    only rank 0 wrote files and printed; snapshots hold all particles. Control: one block (one
    random stream for all particles) gives a different θ."""
    proc = torchrun(["-m", "implicit_diffusion", *ARGS, "--set", "particle_blocks=2", "--out", "sharded"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("langevin-mixture (seed 0)") == 1  # one report, from rank 0
    assert main([*ARGS, "--set", "particle_blocks=2", "--out", str(tmp_path / "one")]) == 0
    assert main([*ARGS, "--out", str(tmp_path / "one-block")]) == 0

    theta = {d: load_file(str(tmp_path / d / "theta.safetensors"))["theta"] for d in ("sharded", "one", "one-block")}
    torch.testing.assert_close(theta["sharded"], theta["one"], rtol=1e-10, atol=1e-12)
    assert (theta["sharded"] - theta["one-block"]).abs().max() > 1e-3
    lines = (tmp_path / "sharded" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len((tmp_path / "one" / "metrics.jsonl").read_text().splitlines())
    names = {d: sorted(p.name for p in (tmp_path / d).iterdir()) for d in ("sharded", "one")}
    assert names["sharded"] == names["one"]


@pytest.mark.slow
def test_a_bad_setting_stops_every_process_with_a_one_line_error(tmp_path):
    proc = torchrun(["-m", "implicit_diffusion", *ARGS, "--set", "particle_blocks=1", "--out", "bad"], tmp_path)
    assert proc.returncode != 0
    # each process prints the one-line error (torchrun's launcher then reports its own traceback)
    assert proc.stderr.count("implicit-diffusion: error: with 2 processes, config key 'particle_blocks' must be "
                             "a multiple of 2") == 2
    assert "implicit_diffusion/" not in proc.stderr  # no traceback from inside the package


def test_single_process_helpers_are_the_identity():
    x = torch.arange(6.0).reshape(3, 2)
    assert world_size() == 1 and global_count(3) == 3
    assert torch.equal(global_mean(x[:, 0]), x[:, 0].mean()) and all_gather_rows(x) is x


@pytest.mark.parametrize("step", [ula_step, mala_step])
def test_blocks_draw_the_same_numbers_however_they_are_grouped(step):
    """Two blocks stepped together (blockwise, one process) equal each block stepped alone with
    its own generator (what two processes do); one block is the plain seeded generator."""
    from implicit_diffusion.models import GaussianPotential

    V = GaussianPotential(torch.zeros(2, dtype=torch.float64))
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    gens = (block_generator(5, 0, 2), block_generator(5, 1, 2))
    together, info = blockwise(step)(x, V, step_size=0.3, generator=gens)
    apart = [step(xb, V, step_size=0.3, generator=block_generator(5, b, 2))[0] for b, xb in enumerate(x.chunk(2))]
    assert torch.equal(together, torch.cat(apart))
    assert (info.acceptance_rate is None) == (step is ula_step)
    assert torch.equal(block_generator(5, 0, 1).get_state(), torch.Generator().manual_seed(5).get_state())
    assert not torch.equal(block_generator(5, 0, 2).get_state(), block_generator(5, 1, 2).get_state())
    with pytest.raises(ValueError, match="equal blocks"):
        blockwise(step)(x[:7], V, step_size=0.3, generator=(block_generator(5, 0, 2), block_generator(5, 1, 2)))


QUEUE_SCRIPT = textwrap.dedent("""
    import json, os, sys, torch, torch.distributed
    from implicit_diffusion.algorithms import DiffusionNestedLoop, DiffusionQueue
    from implicit_diffusion.distributed import init_from_env, rank, world_size
    from implicit_diffusion.models import ScoreMLP
    from implicit_diffusion.objectives import GirsanovKL
    from implicit_diffusion.samplers import VPSchedule, probability_flow_euler_step

    sharded = len(sys.argv) > 2 and init_from_env()
    torch.set_default_dtype(torch.float64)
    out = {}
    for name in ("queue-pipelined", "queue-sequential", "nested"):
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = ScoreMLP(2, hidden=16, depth=2)
        schedule = VPSchedule("ou", num_steps=3)
        X = torch.randn(8, 2, generator=torch.Generator().manual_seed(1))  # every batch starts here
        mine = X.chunk(world_size())[rank()] if sharded else X
        kl = GirsanovKL(model, schedule, 0.5, prediction="score")  # the net's output taken as the score
        reward = lambda x: -((x - 1.0) ** 2).sum(-1)
        kwargs = dict(init_fn=lambda g: mine.clone(), reward_fn=reward, reward_weight=2.0, running_cost=kl,
                      max_grad_norm=0.5)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        if name == "nested":
            algo = DiffusionNestedLoop(model, probability_flow_euler_step, schedule, opt, **kwargs)
        else:
            algo = DiffusionQueue(model, probability_flow_euler_step, schedule, opt, adjoint=name.split("-")[1],
                                  **kwargs)
        rewards = []
        algo.run(6, generator=torch.Generator().manual_seed(2),
                 callbacks=[lambda k, x, s: rewards.append(float(s["reward"])) if "reward" in s else None])
        out[name] = {"params": torch.cat([p.detach().flatten() for p in model.parameters()]).tolist(),
                     "rewards": rewards}
    if rank() == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(out, f)
    if sharded:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        os._exit(0)  # no interpreter teardown, where gloo's threads can abort a finished process
""")


@pytest.mark.slow
def test_queue_slots_sharded_over_two_processes_give_the_one_process_result(tmp_path):
    """The queue (pipelined and sequential adjoint) and the diffusion nested loop, with each
    batch split over 2 processes: the all-reduced mean gradient (reward and Girsanov KL, then
    clipping) and the global mean reward equal one process holding whole batches, to float64
    rounding. A deterministic sampler (probability-flow ODE) and a fixed start make the two
    runs see the same particles."""
    (tmp_path / "queue_shards.py").write_text(QUEUE_SCRIPT)  # not queue.py: it would shadow the stdlib
    proc = torchrun(["queue_shards.py", str(tmp_path / "sharded.json"), "sharded"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = subprocess.run([sys.executable, "queue_shards.py", str(tmp_path / "single.json")], cwd=tmp_path,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert single.returncode == 0, single.stderr[-3000:]
    a, b = json.loads((tmp_path / "sharded.json").read_text()), json.loads((tmp_path / "single.json").read_text())
    with torch.random.fork_rng():
        torch.manual_seed(0)
        from implicit_diffusion.models import ScoreMLP

        start = torch.cat([p.detach().flatten() for p in ScoreMLP(2, hidden=16, depth=2).double().parameters()])
    for name in a:
        pa, pb = torch.tensor(a[name]["params"]), torch.tensor(b[name]["params"])
        torch.testing.assert_close(pa, pb, rtol=1e-10, atol=1e-12)
        assert (pb - start).abs().max() > 1e-4  # θ moved: the comparison is not vacuous
        assert len(a[name]["rewards"]) == len(b[name]["rewards"]) > 0
        torch.testing.assert_close(torch.tensor(a[name]["rewards"]), torch.tensor(b[name]["rewards"]),
                                   rtol=1e-10, atol=1e-12)


@pytest.mark.slow
def test_diffusion_finetune_runs_sharded_and_only_rank_0_writes(tmp_path):
    args = ["-m", "implicit_diffusion", "run", "diffusion-finetune", "--set", "num_steps=6", "--set",
            "num_sampling_steps=3", "--set", "batch_size=4", "--set", "eval_every=6", "--set", "eval_samples=4",
            "--set", "grid_images=4", "--no-progress"]
    proc = torchrun([*args, "--out", "sharded"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("diffusion-finetune (seed 0)") == 1
    out = tmp_path / "sharded"
    assert (out / "summary.json").exists() and (out / "finetuned.safetensors").exists()
    bad = torchrun([*args[:-1], "--set", "batch_size=3", "--no-progress", "--out", "bad"], tmp_path)
    assert bad.returncode != 0 and bad.stderr.count("'batch_size' must be a multiple of 2") == 2


@pytest.mark.slow
def test_an_experiment_that_does_not_shard_is_refused_under_torchrun(tmp_path):
    proc = torchrun(["-m", "implicit_diffusion", "run", "rates", "--set", "num_steps=10", "--no-progress",
                     "--out", "r"], tmp_path)
    assert proc.returncode != 0
    assert proc.stderr.count("experiment 'rates' does not shard its work over processes") == 2
    assert not (tmp_path / "r").exists()
