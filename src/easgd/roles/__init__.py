"""The roles of a run, one module each: worker, parameter-server shard, evaluator.

Every process of a run (started by ``easgd train`` or by ``torchrun``) runs one role; the
process plumbing they share (rank, store, run directory, where the servers are) is in
:mod:`easgd.roles.context`.
"""
