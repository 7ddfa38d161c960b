"""Command line of the example: flags -> `Config` -> `train.train_and_evaluate` -> summary.

Exit status: 0 trained, 1 failed or stopped (instability), 2 a usage or file error, 130 Ctrl-C
(after saving a checkpoint). `summary.json` is written on every exit of a run.

Several hosts (`--distributed`): start the same command on every host with
`--parallel sharded` (or `pmap`) and `--distributed`, which calls `jax.distributed.initialize()`.
On Cloud TPU, SLURM and Open MPI, JAX detects the coordinator, the process count and each
process's id by itself. Elsewhere pass them on each host:
`--coordinator-address host0:1234 --num-processes <hosts> --process-id <0..hosts-1>` (of these,
JAX reads only the address from the environment, as `JAX_COORDINATOR_ADDRESS`). Every process
reads the same data and takes its own slice of each global batch; only process 0 reads and
writes the `--run-dir`, so one directory on shared storage serves the whole job and `--resume`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `examples` and `gradxform` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from examples import config
from examples.config import Config, UsageError

_D = Config()
PROG = "python examples/train.py"
_CLUSTER = ("coordinator_address", "num_processes", "process_id")  # jax.distributed.initialize


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, like every other error of the example
        self.exit(2, f"error: {message} (see `{PROG} --help`)\n")


def _channels(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(c) for c in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 32,64, got {text!r}") from None


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="Train a Flax NNX MLP or CNN with a gradxform optimizer (defaults: a CNN on "
        "scikit-learn's 8x8 digits, AdamW with a cosine schedule, under a minute on a CPU).",
        epilog=__doc__.split("\n\n", 1)[1],
        argument_default=argparse.SUPPRESS,  # only flags given appear, so --resume can check them
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )

    def add(group, flag: str, help: str, **kw):
        field = flag.lstrip("-").replace("-", "_")
        default = getattr(_D, field, None)
        if kw.get("action") != "store_true":
            help += f" (default: {default})"
        group.add_argument(flag, help=help, **kw)

    g = p.add_argument_group("data")
    add(g, "--dataset", "data set", choices=config.DATASETS)
    add(
        g,
        "--data-dir",
        "folder with the MNIST/Fashion-MNIST IDX files or the CIFAR-10 binary batches",
    )
    add(g, "--batch-size", "global batch size, split evenly over devices", type=int)
    add(g, "--steps", "training steps", type=int)
    add(g, "--seed", "seed for initialisation, data order, dropout and noise", type=int)

    g = p.add_argument_group("model")
    add(g, "--model", "architecture", choices=config.MODELS)
    add(g, "--depth", "MLP hidden layers", type=int)
    add(g, "--width", "MLP hidden width / CNN dense width", type=int)
    add(
        g,
        "--channels",
        "CNN conv channels, e.g. 32,64",
        type=_channels,
    )
    add(g, "--activation", "activation", choices=config.ACTIVATIONS)
    add(g, "--init", "kernel initialiser (None: MLP he, CNN lecun)", choices=config.INITS)
    add(g, "--init-scale", "kernel init multiplier (< 1 provokes vanishing gradients)", type=float)
    add(g, "--batch-norm", "batch normalisation after each hidden layer", action="store_true")
    add(g, "--dropout", "dropout rate before the output layer", type=float)

    g = p.add_argument_group("optimizer")
    add(
        g,
        "--impl",
        "library building the chain (optax: to compare)",
        choices=config.IMPLS,
    )
    add(
        g,
        "--optimizer",
        "optimizer",
        choices=config.OPTIMIZERS,
    )
    add(g, "--lr", "peak learning rate", type=float)
    add(
        g,
        "--lr-schedule",
        "schedule after warm-up",
        choices=config.SCHEDULES,
    )
    add(g, "--warmup", "linear warm-up steps (None: min(50, steps // 10))", type=int)
    add(g, "--momentum", "SGD/RMSprop momentum", type=float)
    add(g, "--nesterov", "Nesterov momentum (SGD, RMSprop, Adam family)", action="store_true")
    add(g, "--b1", "Adam beta1", type=float)
    add(g, "--b2", "Adam beta2", type=float)
    add(g, "--eps", "epsilon of adaptive optimizers", type=float)
    add(g, "--rms-decay", "RMSprop decay", type=float)
    add(g, "--centered", "centered RMSprop", action="store_true")
    add(
        g, "--weight-decay", "AdamW decoupled decay, else coupled L2 (None: AdamW 1e-4)", type=float
    )
    add(g, "--l1", "L1 penalty", type=float)
    add(g, "--clip-value", "clip each gradient element to [-x, x]", type=float)
    add(g, "--clip-global-norm", "clip the global gradient norm", type=float)
    add(g, "--clip-leaf-norm", "clip each tensor's gradient norm", type=float)
    add(g, "--clip-block-rms", "clip each tensor's gradient RMS", type=float)
    add(g, "--agc", "adaptive gradient clipping ratio (NFNets)", type=float)
    add(g, "--noise-eta", "annealed gradient noise variance", type=float)
    add(g, "--noise-gamma", "gradient noise annealing exponent", type=float)
    add(
        g,
        "--stable",
        "guard the chain with gx.stable(): skip spikes, clip to the running norm, back off",
        action="store_true",
    )

    g = p.add_argument_group("parallelism")
    add(g, "--parallel", "data parallelism over all devices", choices=config.PARALLEL)
    g.add_argument(
        "--distributed",
        action="store_true",
        help="call jax.distributed.initialize() (several hosts; see below)",
    )
    g.add_argument("--coordinator-address", help="with --distributed: host:port of process 0")
    g.add_argument("--num-processes", type=int, help="with --distributed: number of processes")
    g.add_argument("--process-id", type=int, help="with --distributed: this process's id")

    g = p.add_argument_group("stability")
    add(
        g,
        "--on-instability",
        "on a non-finite loss/gradient or a norm above --max-grad-norm",
        choices=config.ON_INSTABILITY,
    )
    add(g, "--max-grad-norm", "global gradient norm counted as an explosion", type=float)
    add(
        g,
        "--check",
        "run the step under chex.chexify value assertions (slow; debugging)",
        action="store_true",
    )

    g = p.add_argument_group("run directory")
    g.add_argument(
        "--run-dir",
        help="where to write the run (default: runs/<dataset>-<model>-<optimizer>-<time>)",
    )
    g.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue RUN_DIR from its latest checkpoint with its config.json; only "
        "`--steps` (to train longer) and the logging and checkpoint flags may change",
    )
    add(g, "--log-every", "steps per metrics.jsonl line", type=int)
    add(g, "--eval-every", "steps between test evaluations (0: at the end only)", type=int)
    add(g, "--checkpoint-every", "steps between checkpoints (0: none; Ctrl-C saves one)", type=int)
    add(g, "--keep-checkpoints", "newest checkpoints kept", type=int)
    g.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar (when stderr is not a terminal: a line per tenth of the run)",
    )
    g.add_argument(
        "--no-plots", action="store_true", help="no curves.png and grad_norms.png at the end"
    )
    return p


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The namespace of the flags given (unset ones are absent); cluster flags checked."""
    args = _parser().parse_args(argv)
    cluster = [f"`--{k.replace('_', '-')}`" for k in _CLUSTER if hasattr(args, k)]
    if cluster and not getattr(args, "distributed", False):
        raise UsageError(f"{', '.join(cluster)} only apply with `--distributed`.")
    if getattr(args, "distributed", False) and getattr(args, "optimizer", None) == "lbfgs":
        raise UsageError(
            "`--distributed` does not apply to `--optimizer lbfgs`, which runs on one device; "
            "drop it."
        )
    return args


def configure(args: argparse.Namespace) -> tuple[Config, Path, bool]:
    """`(config, run directory, resume?)`. On `--resume`, process 0 reads the run's
    `config.json`; the flags may extend `--steps` and change logging and checkpoints only."""
    given = {
        f.name: getattr(args, f.name) for f in dataclasses.fields(Config) if hasattr(args, f.name)
    }
    resume = getattr(args, "resume", None)
    if resume is None:
        cfg = Config(**given)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        default_dir = f"runs/{cfg.dataset}-{cfg.model}-{cfg.optimizer}-{stamp}"
        return cfg, Path(getattr(args, "run_dir", default_dir)), False
    from examples.runlog import from_process_0

    saved = Config.from_dict(
        from_process_0(lambda: dataclasses.asdict(Config.load(Path(resume) / "config.json")))
    )
    free = config.free_on_resume(saved)
    conflicts = {
        k: (v, getattr(saved, k))
        for k, v in given.items()
        if k not in free and getattr(saved, k) != v
    }
    if conflicts or hasattr(args, "run_dir"):
        raise UsageError(
            f"`--resume {resume}` continues with that run's config.json; these flags disagree "
            f"with it (given, saved): {conflicts or {'run_dir': args.run_dir}}. Drop them "
            "(only `--steps` and the logging and checkpoint flags may change), or start a new run."
        )
    changes = {k: v for k, v in given.items() if k in free}
    return dataclasses.replace(saved, **changes), Path(resume), True


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line `argv`; the exit status."""
    try:
        args = parse(argv)
    except SystemExit as e:  # --help, or a flag argparse rejects (one line printed)
        return e.code
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        if getattr(args, "distributed", False):
            import jax

            cluster = {k: getattr(args, k) for k in _CLUSTER if hasattr(args, k)}
            jax.distributed.initialize(**cluster)  # unset ones: JAX's cluster detection decides
        cfg, run_dir, resume = configure(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from examples import data, runlog, train  # imports jax: after argument errors are out

    try:
        summary = train.train_and_evaluate(
            cfg,
            run_dir,
            resume=resume,
            progress=not getattr(args, "no_progress", False),
            plot=not getattr(args, "no_plots", False),
        )
    except runlog.InstabilityError as e:
        print(f"\nstopped: {e}\n(see {run_dir}/metrics.jsonl and grad_norms.png)", file=sys.stderr)
        return 1
    except train.Interrupted as e:
        s = e.summary
        saved = f"checkpoint {s['checkpoint']}" if s["checkpoint"] else "no checkpoint"
        print(
            f"\ninterrupted at step {s['steps_done']} ({saved}); continue with:\n"
            f"  {PROG} --resume {run_dir}",
            file=sys.stderr,
        )
        return 130
    except KeyboardInterrupt:  # before the first step: nothing to save
        print("\ninterrupted before training started; nothing saved", file=sys.stderr)
        return 130
    except (UsageError, data.DataError, runlog.CheckpointError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _print_summary(summary)
    return 0 if summary["status"] == "completed" else 1


def _print_summary(s: dict) -> None:
    acc = "n/a" if s["test_accuracy"] is None else f"{s['test_accuracy']:.4f}"
    rate = "n/a" if s["steps_per_s"] is None else f"{s['steps_per_s']:.1f}"
    lbfgs = ""
    if "fun_evals" in s:  # --optimizer lbfgs
        lbfgs = (
            f"L-BFGS           {s['steps_done']} steps, {s['fun_evals']} loss evaluations, "
            f"{_stop_reason(s)}\n"
        )
    print(
        f"\ntest accuracy    {acc}\n{lbfgs}"
        f"steps/s          {rate} (startup {s['startup_s'] or 0:.1f} s, wall {s['wall_s']:.1f} s, "
        f"{s['devices']} device(s), --parallel {s['parallel']})\n"
        f"gradient health  {s['health']}\n"
        f"run directory    {s['run_dir']}"
    )


def _stop_reason(s: dict) -> str:
    norm = f"gradient norm {s['grad_norm']:.3g}"
    if s["converged"]:
        return f"converged ({norm} <= {s['tol']:g})"
    if s["stop_reason"] == "line search":
        return f"not converged: the line search found no lower loss ({norm})"
    return f"not converged: {norm} > {s['tol']:g} after `--steps` {s['steps']}"


if __name__ == "__main__":
    sys.exit(main())
