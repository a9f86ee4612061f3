"""``easgd export RUN_DIR --out model.pt``: a run's final center as the model's ``state_dict``.

The run's checkpoints hold the center as one flat vector (the model's parameters, in order);
this writes it as the ``state_dict`` of the run's network, a file that
``model.load_state_dict(torch.load(path, weights_only=True))`` reads back. The center has
no batch-norm statistics of its own (it is an average of parameters), so they are
re-estimated on the training set, as the run's own evaluation of the center did: the
exported model's test error is the summary's ``center_test_error``. ``--no-recalibrate``
keeps the initial statistics instead (and needs no data).
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path
from typing import Any

__all__ = ["register", "run"]


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "export",
        help="write a run's final center as the model's state_dict (torch.save)",
        description=(
            "Write the final center of the run in RUN_DIR as the state_dict of its network, "
            "loadable with torch.load(..., weights_only=True). Batch-norm statistics are "
            "re-estimated on the training set, as the run's evaluation of the center did."
        ),
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory of easgd train")
    parser.add_argument("--out", required=True, help="the file to write (e.g. model.pt)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument(
        "--no-recalibrate",
        dest="recalibrate",
        action="store_false",
        help="keep the network's initial batch-norm statistics (no data is read)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    import torch

    from easgd.config import TrainConfig
    from easgd.finalize import read_final_center
    from easgd.flat import parameters_to_flat_views
    from easgd.runlog import CONFIG_FILE, RunPaths, atomic_write_bytes

    paths = RunPaths(args.run_dir)
    out = Path(args.out)
    if not paths.holds_run():
        raise ValueError(f"RUN_DIR {paths.root}: no run there (no {CONFIG_FILE})")
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give a file name, e.g. {out / 'model.pt'}")
    if out.exists() and not args.overwrite:
        raise ValueError(f"--out {out} exists; choose another --out or pass --overwrite")
    try:
        cfg = TrainConfig.from_dict(json.loads(paths.config.read_text())).resolved()
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{paths.config}: not a config.json of easgd train ({exc})") from None
    model, train_x, transform = _model(cfg, recalibrate=args.recalibrate)
    flat = parameters_to_flat_views(model)
    final = read_final_center(cfg, paths, numel=flat.numel)
    if final.center is None:
        reasons = "; ".join(f"{s['file']}: {s['reason']}" for s in final.skipped)
        raise ValueError(f"RUN_DIR {paths.root}: no final center can be read ({reasons})")
    flat.params.copy_(final.center)
    if train_x is not None:
        from easgd.evaluation import recalibrate_batchnorm

        recalibrate_batchnorm(model, train_x, transform=transform)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    atomic_write_bytes(out, buf.getvalue(), mode=0o644)
    where = "its last verified checkpoint" if final.skipped else "its final checkpoint"
    print(f"{out}: the state_dict of --model {cfg.model} ({flat.numel} parameters): the center "
          f"of {paths.root}, from {where}")  # fmt: skip
    return 0


def _model(cfg: Any, *, recalibrate: bool) -> tuple[Any, Any, Any]:
    """The run's network (its seed) and, to recalibrate batch norm, the training images and
    their training transform."""
    from easgd.data.custom import build_custom_model, is_custom

    if recalibrate or is_custom(cfg.dataset):  # your own data: its shape is in the data
        from easgd.task import task_from_config

        task = task_from_config(cfg)
        if not recalibrate:
            return task.build(), None, None
        return task.build(), task.train[0], task.transform
    from easgd.data.datasets import dataset_info
    from easgd.models import build_model

    info = dataset_info(cfg.dataset)
    if is_custom(cfg.model):
        shape = (info.in_channels, info.image_size, info.image_size)
        return build_custom_model(cfg.model, shape, info.num_classes, seed=cfg.seed), None, None
    model = build_model(cfg.model, num_classes=info.num_classes, in_channels=info.in_channels,
                        image_size=info.image_size, seed=cfg.seed)  # fmt: skip
    return model, None, None
