"""``psc-worker OUT.zarr``: one worker of a running EM job, started anywhere.

The scheduler (``psc-segment ... --worker-command CMD``) starts CMD for each worker with
``DAISY_CONTEXT`` in its environment (scheduler address, port, task, worker id); CMD
may run this command on another machine that sees OUT.zarr (``ssh node
DAISY_CONTEXT={context} psc-worker {out}``, a SLURM job, a container). The worker
connects back over TCP, takes blocks until none are left, and exits.

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

from psc.app.cli import HelpFormatter
from psc.pipelines.allocator import keep_freed_memory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="psc-worker", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("out", help="the run's OUT.zarr (as this machine sees it)")
    parser.add_argument("--context", help="daisy context string (default: $DAISY_CONTEXT)")
    parser.add_argument("--serve", action="store_true", help="serve the workers of a psc-segment --spool run "
                        "until it is finished")
    args = parser.parse_args(argv)
    keep_freed_memory()
    if args.serve:
        if args.context:
            parser.error("--serve takes its contexts from the run; leave out --context")
        if not str(args.out).endswith(".zarr") or not Path(args.out).parent.is_dir():
            print(f"psc-worker: error: {args.out}: not a .zarr output in an existing folder", file=sys.stderr)
            return 2
        from psc.pipelines.em.spool import serve as serve_spool

        try:
            return serve_spool(args.out, say=lambda line: print(line, flush=True))
        except KeyboardInterrupt:
            print("psc-worker: interrupted", file=sys.stderr)
            return 130
    if args.context:
        os.environ["DAISY_CONTEXT"] = args.context
    if "DAISY_CONTEXT" not in os.environ:
        print("psc-worker: error: no DAISY_CONTEXT: start me from a psc-segment --worker-command, "
              "or use --serve", file=sys.stderr)
        return 2
    import daisy

    from psc.pipelines.em.stages import serve, stage_named

    try:
        task_id = daisy.Context.from_env()["task_id"]
    except (KeyError, ValueError) as error:
        print(f"psc-worker: error: DAISY_CONTEXT is not a daisy context ({error})", file=sys.stderr)
        return 2
    stage = stage_named(task_id)
    if stage is None or not stage.blockwise:
        print(f"psc-worker: error: unknown task {task_id!r}", file=sys.stderr)
        return 2
    serve(stage.block_function(args.out))  # connects to the scheduler
    return 0


if __name__ == "__main__":
    sys.exit(main())
