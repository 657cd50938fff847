"""``psc-worker OUT.zarr``: one worker of a running EM job, started anywhere.

The scheduler (``psc-segment ... --worker-command CMD``) starts CMD for each worker with
``DAISY_CONTEXT`` in its environment (scheduler address, port, task, worker id); CMD
may run this command on another machine that sees OUT.zarr (``ssh node
DAISY_CONTEXT={context} psc-worker {out}``, a SLURM job, a container). The worker
connects back over TCP, takes blocks until none are left, and exits; if the scheduler
dies (its TCP stream breaks), the worker exits at once with one error line and code 1.

``psc-worker --serve OUT.zarr``: a long-running worker (one per GPU container) for a
``psc-segment ... --spool`` run. It waits for the run to start, takes the workers the
scheduler posts under OUT.zarr/.workers/ (at most one per stage at a time), runs each as
``psc-worker OUT.zarr --context ...``, and exits once the run is finished.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from psc.app.cli import HelpFormatter, add_option, run_guarded
from psc.pipelines.allocator import keep_freed_memory
from psc.utils.errors import InputError

PROG = "psc-worker"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("out", help="the run's OUT.zarr (as this machine sees it)")
    add_option(parser, "--context", help="daisy context string", default="$DAISY_CONTEXT")
    parser.add_argument("--serve", action="store_true", help="serve the workers of a psc-segment --spool run "
                        "until it is finished")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.serve and args.context:
        parser.error("--serve takes its contexts from the run; leave out --context")
    keep_freed_memory()
    return run_guarded(PROG, lambda: run(args))


def run(args: argparse.Namespace) -> int:
    if args.serve:
        if not str(args.out).endswith(".zarr") or not Path(args.out).parent.is_dir():
            raise InputError(f"{args.out}: not a .zarr output in an existing folder")
        from psc.pipelines.em.spool import serve as serve_spool

        return serve_spool(args.out, say=lambda line: print(line, flush=True))
    if args.context:
        os.environ["DAISY_CONTEXT"] = args.context
    if "DAISY_CONTEXT" not in os.environ:
        raise InputError("no DAISY_CONTEXT: start me from a psc-segment --worker-command, or use --serve")
    import daisy

    from psc.pipelines.em.stages import SchedulerLost, serve, stage_named

    try:
        task_id = daisy.Context.from_env()["task_id"]
    except (KeyError, ValueError) as error:
        raise InputError(f"DAISY_CONTEXT is not a daisy context ({error})") from None
    stage = stage_named(task_id)
    if stage is None or not stage.blockwise:
        print(f"psc-worker: error: unknown task {task_id!r}", file=sys.stderr)
        return 2
    try:
        serve(stage.block_function(args.out))  # connects to the scheduler
    except SchedulerLost as error:
        # the scheduler died (killed, its host gone): one line and a non-zero exit, never
        # a loop of failing acquisitions (stages.serve)
        print(f"{PROG}: error: {error}: exiting", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
