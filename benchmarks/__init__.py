"""easgd's benchmarks against PyTorch's own tools, one module per question.

Run each from the repository root as a module, e.g. ``python -m benchmarks.exchange``
(``--quick`` for the small form the tests run, ``--help`` for its flags). The figures, the
commands that produced them and what limits each one are in ``benchmarks/RESULTS.md``.

* ``benchmarks.overhead``: ``easgd.optim`` with exchanges off against bare ``torch.optim``;
* ``benchmarks.exchange``: one exchange against raw gloo, back to back and in a loop;
* ``benchmarks.scaling``: samples/s with 2 workers against 1;
* ``benchmarks.time_to_accuracy``: EAMSGD against DDP and post-local SGD on digits;
* ``benchmarks.sim_scale``: the simulator at 64 workers, 1 and 100 Gbit/s;
* ``benchmarks.checkpoints``: training throughput with checkpoints on against off;
* ``benchmarks.startup``: ``easgd train`` to its first step against ``import torch``.

``benchmarks._common`` holds what they share (interleaving, medians, tables, JSON, load).
"""
