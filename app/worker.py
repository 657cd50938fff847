"""``psc-worker OUT.zarr``: one worker of a running EM job, started anywhere.

The scheduler (``psc-segment ... --worker-command CMD``) starts CMD for each worker with
``DAISY_CONTEXT`` in its environment (scheduler address, port, task, worker id); CMD
may run this command on another machine that sees OUT.zarr (``ssh node
DAISY_CONTEXT={context} psc-worker {out}``, a SLURM job, a container). The worker
connects back over TCP, takes blocks until none are left, and exits.
"""

from __future__ import annotations

import argparse
import os
import sys

from psc.app.cli import HelpFormatter


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="psc-worker", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("out", help="the run's OUT.zarr (as this machine sees it)")
    parser.add_argument("--context", help="daisy context string (default: $DAISY_CONTEXT)")
    args = parser.parse_args(argv)
    if args.context:
        os.environ["DAISY_CONTEXT"] = args.context
    if "DAISY_CONTEXT" not in os.environ:
        print("psc-worker: error: no DAISY_CONTEXT: start me from a psc-segment --worker-command", file=sys.stderr)
        return 2
    import daisy

    from psc.pipelines.em.stages import STAGES, serve

    client = daisy.Client()
    stage = STAGES.get(client.task_id)
    if stage is None:
        print(f"psc-worker: error: unknown task {client.task_id!r}", file=sys.stderr)
        return 2
    del client  # serve() opens its own connection
    serve(stage(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
