"""A parameter-server shard in its own process, for the recovery tests (tests/test_recovery.py).

Serves shard ``--shard`` of ``--shards`` of a center of zeros for ``--method``, resuming from
``--checkpoint`` when that file exists (as a restarted shard does), and writes its address
to ``--address-file`` once it listens. SIGTERM stops it cleanly (with a last checkpoint);
the tests SIGKILL it to inject a failure.
"""

from __future__ import annotations

import argparse
import sys

import torch

from easgd.algorithms import Hyperparams
from easgd.comm.ps import serve, shard_ranges


def main() -> int:
    torch.set_num_threads(1)
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", default="easgd")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--numel", type=int, default=1000)
    parser.add_argument("--shard", type=int, default=0)
    parser.add_argument("--shards", type=int, default=1)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--checkpoint-every", type=float, default=0.2)
    parser.add_argument("--address-file", required=True)
    parser.add_argument("--events", default=None)
    args = parser.parse_args()
    spec_tau = {"tau": 1}
    hp = Hyperparams(method=args.method, lr=0.1, workers=args.workers, **spec_tau)
    lo, hi = shard_ranges(args.numel, args.shards)[args.shard]
    serve(
        hp,
        torch.zeros(hi - lo),
        offset=lo,
        checkpoint_path=args.checkpoint,
        checkpoint_every=args.checkpoint_every,
        resume=args.checkpoint,
        address_file=args.address_file,
        events_path=args.events,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
