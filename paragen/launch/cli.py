"""`paragen` / `python -m paragen`: the command line.

    torchrun --nproc-per-node 2 -m paragen image --mode displaced --height 1024 --width 1024
    torchrun --nproc-per-node 4 -m paragen image --model tiny-flux --ulysses 2 --ring 2
    torchrun --nproc-per-node 2 -m paragen video --frames 64 --prompt "a fox" --prompt "a forest at night"
    torchrun --nproc-per-node 2 -m paragen llm --context 16384 --kv offload
    paragen slurm --nodes 2 --gpus-per-node 8 -- image --model /models/sdxl --cfg 2
    torchrun --nproc-per-node 2 -m paragen serve image --model /models/sdxl --port 8000

Every job (`paragen.pipelines.registry.JOBS`) goes through one lifecycle: parse its arguments, `prepare` (every
check of the request, on every rank, before the process group), init, agree (the ranks' verdicts on `prepare`
gathered: one rank's refusal stops every rank with the same error), `run` (which writes the outputs and the
report). `paragen serve <job>` keeps the job's model up behind HTTP (`paragen.launch.serve`). Only the chosen
job's module is imported: `paragen slurm` and `paragen --help` import no diffusers.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import warnings

from torch.distributed import DistError
from torch.distributed.elastic.multiprocessing.errors import record

from paragen.comms import DEVICE_CHOICES, CommError, world_comm
from paragen.launch.env import LaunchError, discover, finalize_mpi
from paragen.launch.process_group import DEFAULT_INIT_TIMEOUT_S, DEFAULT_TIMEOUT_S, init, shutdown
from paragen.launch.slurm import CPU_JOB_CPUS, CPUS_PER_GPU, SLURM_PORT_BASE, sbatch_script
from paragen.log import get_logger, setup_logging
from paragen.pipelines.jobs.agree import attempt
from paragen.pipelines.jobs.batch import agree_prepared, run_job
from paragen.pipelines.registry import JOBS

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1


def _add_runtime_arguments(p: argparse.ArgumentParser) -> None:
    """The options of the process group and the rank's device, which every job takes."""
    p.add_argument("--device", choices=DEVICE_CHOICES, default="auto",
                   help="auto: cuda:LOCAL_RANK when CUDA is present, else the CPU; cuda: fail at once without CUDA")
    p.add_argument("--threads", type=int, default=None, help="CPU compute threads per rank (default: cores / local ranks)")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                   help="seconds after which a collective fails (a dead or stuck rank stops the job)")
    p.add_argument("--init-timeout", type=float, default=DEFAULT_INIT_TIMEOUT_S,
                   help="seconds to wait for every rank to join")
    p.add_argument("--verbose", action="store_true", help="debug logging")


def _run_job(args: argparse.Namespace) -> int:
    """parse → check → init → agree → run → report, for every job alike."""
    job = importlib.import_module(JOBS[args.command][0])
    answer = job.standalone(args) if hasattr(job, "standalone") else None  # e.g. `paragen llm --print-prompt`
    if answer is not None:
        print(answer)
        return 0
    launch = discover()
    prepared, verdict = attempt(lambda _: job.prepare(args, launch), None)  # every check of this rank's own
    init(device=args.device, init_timeout_s=args.init_timeout, timeout_s=args.timeout, threads=args.threads,
         verbose=args.verbose)
    agree_prepared(world_comm(), prepared, verdict)  # one rank's refusal is every rank's, before anything runs
    run_job(job, prepared)
    return 0


def _run_serve(args: argparse.Namespace) -> int:
    from paragen.launch.serve import serve

    return serve(args, importlib.import_module(JOBS[args.serve_job][0]))


def _add_serve_arguments(p: argparse.ArgumentParser, job: str | None) -> None:
    """`serve`'s own sub-parsers, one per job; only `job`'s gets its arguments."""
    jobs = p.add_subparsers(dest="serve_job", required=True, metavar="{" + ",".join(JOBS) + "}")
    for name, (module, help_text) in JOBS.items():
        q = jobs.add_parser(name, help=f"serve: {help_text}", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        if name == job:
            from paragen.launch.serve import add_arguments

            importlib.import_module(module).add_arguments(q)
            _add_runtime_arguments(q)
            add_arguments(q)
        q.set_defaults(handler=_run_serve)


def _add_slurm_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nodes", type=int, required=True, help="number of nodes")
    p.add_argument("--gpus-per-node", type=int, required=True, help="GPUs (ranks) per node; 0 for CPU nodes")
    p.add_argument("--job-name", default="paragen", help="SLURM job name")
    p.add_argument("--time", default="01:00:00", help="SLURM time limit")
    p.add_argument("--partition", default=None, help="SLURM partition")
    p.add_argument("--port", type=int, default=None,
                   help="rendezvous port on the head node (array task k: port + k); None: the script derives it "
                        f"from the job id, {SLURM_PORT_BASE} + SLURM_JOB_ID %% 10000, so jobs sharing a head node "
                        "do not collide")
    p.add_argument("--cpus-per-task", type=int, default=None, metavar="N",
                   help="cores of each node's task (its torchrun agent and workers), given to sbatch and srun; "
                        f"None: {CPUS_PER_GPU} per GPU of the node, {CPU_JOB_CPUS} for a CPU job")
    p.add_argument("--requeue", action="store_true",
                   help="let SLURM requeue the job after a preemption; a --requests run then skips what is done")
    p.add_argument("--array", type=int, default=None, metavar="N",
                   help="N array tasks, each running its share of the command's --requests FILE (or --requests=FILE)")
    p.add_argument("command_line", nargs=argparse.REMAINDER, metavar="command",
                   help="the paragen command to run, after `--`")
    p.set_defaults(handler=_run_slurm)


def _run_slurm(args: argparse.Namespace) -> int:
    command = args.command_line[1:] if args.command_line[:1] == ["--"] else args.command_line
    print(sbatch_script(nodes=args.nodes, gpus_per_node=args.gpus_per_node, command=command,
                        job_name=args.job_name, time=args.time, partition=args.partition, port=args.port,
                        cpus_per_task=args.cpus_per_task, requeue=args.requeue, array=args.array))
    return 0


def _add_plan_arguments(p: argparse.ArgumentParser, job: str | None) -> None:
    """`plan`'s sub-parsers, one per planned job; only `job`'s gets its arguments."""
    from paragen.pipelines.jobs import plan

    jobs = p.add_subparsers(dest="plan_job", required=True, metavar="{" + ",".join(plan.PLANNED_JOBS) + "}")
    for name in plan.PLANNED_JOBS:
        q = jobs.add_parser(name, help=f"plan: {JOBS[name][1]}", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        if name == job:
            plan.add_arguments(q, name)
        q.set_defaults(handler=plan.run)


def _run_models(args: argparse.Namespace) -> int:
    from paragen.pipelines import catalogue

    print(catalogue.as_json() if args.json else catalogue.as_markdown() if args.markdown else catalogue.as_text())
    return 0


def build_parser(command: str | None = None, serve_job: str | None = None) -> argparse.ArgumentParser:
    """The `paragen` argument parser; only `command`'s sub-parser gets its arguments (and imports its job; for
    `serve` and `plan`, `serve_job`'s)."""
    parser = argparse.ArgumentParser(prog="paragen", description="paragen: one generation request, many ranks.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join([*JOBS, "serve", "plan", "slurm",
                                                                                     "models"]) + "}")
    for name, (module, help_text) in JOBS.items():
        p = sub.add_parser(name, help=help_text, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        if name == command:
            importlib.import_module(module).add_arguments(p)
            _add_runtime_arguments(p)
        p.set_defaults(handler=_run_job)
    p = sub.add_parser("serve", help="keep a job's model up on every rank and answer HTTP requests on the output rank")
    if command == "serve":
        _add_serve_arguments(p, serve_job)
    p = sub.add_parser("slurm", help="print an sbatch script that runs a paragen command on N nodes x G GPUs",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    if command == "slurm":
        _add_slurm_arguments(p)
    p = sub.add_parser("plan", help="rank every layout of a request on N ranks by predicted step time, with memory per "
                                    "rank and bytes per step (a cost model; --layout auto runs the first)")
    if command == "plan":
        _add_plan_arguments(p, serve_job)
    p = sub.add_parser("models", help="list every supported pipeline and model class, its workload, degrees, modes, "
                                      "sharding plan and embedded models (and the families not run yet, with why)")
    output = p.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="as JSON")
    output.add_argument("--markdown", action="store_true", help="as the README's Markdown table")
    p.set_defaults(handler=_run_models)
    return parser


def _quiet_third_party() -> None:
    """Hide the libraries' notices (such as transformers' "requires torchvision" fallback lines when diffusers loads
    image processors) and deprecation chatter; errors still show. The levels go through the libraries' logging API:
    an environment variable is read once, when the library is imported, and transformers is imported with paragen.
    A TRANSFORMERS_VERBOSITY or DIFFUSERS_VERBOSITY set by the user still decides."""
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(diffusers|transformers)\b")
    from diffusers.utils import logging as diffusers_logging  # the jobs import diffusers anyway
    from transformers.utils import logging as transformers_logging

    libraries = (("TRANSFORMERS_VERBOSITY", transformers_logging), ("DIFFUSERS_VERBOSITY", diffusers_logging))
    for variable, library in libraries:
        if variable not in os.environ:
            library.set_verbosity_error()


@record
def main(argv: list[str] | None = None) -> int:
    """Entry point of `paragen` and `python -m paragen`; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv else None
    serve_job = argv[1] if command in ("serve", "plan") and len(argv) > 1 else None
    if command in JOBS or serve_job in JOBS or command == "models":
        _quiet_third_party()
    args = build_parser(command, serve_job).parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, TypeError, LaunchError, FileNotFoundError) as error:
        _report(f"error: {error}")
        return EXIT_BAD_INPUT
    except (CommError, DistError) as error:
        _report(f"communication failed in {error}\n(a rank died, hung past --timeout, or lost its connection; "
                "the whole job stops — look for the first rank that reported an error)")
        _exit_now(EXIT_FAILED)
    except RuntimeError as error:
        _report(f"failed: {error}")
        return EXIT_FAILED
    finally:
        shutdown()


def run() -> None:
    """The `paragen` console script and `python -m paragen`: `main`, then leave at once. After `main` every output is
    written and fsynced and the process group torn down; the interpreter's finalisation would only destroy the
    libraries' native threads in no set order, which once aborted a rank of a run that had succeeded (gloo's
    "terminate called without an active exception", 3 times in about 100 two-rank runs of one CI run). MPI, if rank
    discovery started it, is finalised first."""
    status = main()  # None where `--help` ended it (torch's `record` turns a SystemExit(0) into a return)
    finalize_mpi()
    _exit_now(0 if status is None else status)


def _exit_now(status: int) -> None:
    """Leave now with `status`, what is logged and printed flushed (a broken process group is not torn down: that
    can hang or abort in the backend)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _report(message: str) -> None:
    logger = get_logger()
    if not logger.handlers:
        try:
            info = discover()
            setup_logging(info.rank, info.rank == 0)
        except LaunchError:
            setup_logging(0, True)
    logger.error(message, exc_info=logger.isEnabledFor(logging.DEBUG))


if __name__ == "__main__":
    run()
