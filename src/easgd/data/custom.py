"""Your own network and data for ``easgd train``: ``MODULE:FUNCTION`` specs and ``.npz`` files.

A spec names a callable: ``MODULE:FUNCTION``, where ``MODULE`` is an importable module name
(``mypkg.nets``, imported with the current directory on the path, as ``python -m`` does) or
the path of a ``.py`` file (a name that ends in ``.py`` or holds a ``/``: ``./mynet.py``;
its folder is added to the end of ``sys.path`` so that it can import its neighbours), and
``FUNCTION`` an attribute of it (dotted for a nested one: ``Nets.small``).

- ``--model MODULE:FUNCTION``: the callable returns an ``nn.Module`` that maps a batch
  ``(B, C, H, W)`` to logits ``(B, K)`` with at least ``num_classes`` columns. It is called
  with the keyword arguments of :data:`MODEL_ARGUMENTS` that its signature names (all of
  them if it takes ``**kwargs``), under ``torch.manual_seed(seed)``: every process of a run
  builds the same initial network.
- ``--dataset MODULE:FUNCTION``: the callable returns the train and test sets (see
  :func:`load_custom_dataset` for the forms accepted); it gets ``data_dir`` when its
  signature names it. It is called in every process of the run and must return the same
  data in each (seed your own random splits).
- ``--dataset npz:PATH``: the arrays :data:`NPZ_KEYS` (and optionally ``num_classes``) of a
  file written by ``numpy.savez``; read with ``allow_pickle=False``.

Images are ``(N, C, H, W)`` or ``(N, H, W)`` (one channel), ``uint8`` (scaled to [0, 1] and
normalized per channel with the training images' statistics, as the built-in sets are) or
floating point (used as given); labels are integers ``0..K-1``, ``(N,)``.

Every problem raises :class:`SpecError` (a ``ValueError``) in one line that names the spec
and says what to do; :mod:`easgd.preflight` turns it into ``easgd train``'s error.

A spec given as a relative path is made absolute when the configuration is made
(:func:`absolute_spec`): the workers, the evaluator and ``easgd export`` load the same file
whatever their working directory.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import math
import os
import sys
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor, nn

    from easgd.data.datasets import Dataset

__all__ = [
    "DATASET_FORMS",
    "MODEL_ARGUMENTS",
    "NPZ_KEYS",
    "NPZ_PREFIX",
    "REAL_CHECK_PARAMETERS",
    "REPEAT_CHECK_SECONDS",
    "SpecError",
    "absolute_spec",
    "build_custom_model",
    "check_custom_model",
    "check_same_data",
    "is_custom",
    "load_callable",
    "load_custom_dataset",
    "model_arguments",
]

#: The prefix of an ``.npz`` data set: ``npz:PATH``.
NPZ_PREFIX = "npz:"
#: The arrays an ``.npz`` data set holds (``num_classes``, a scalar, may be added).
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
#: The keyword arguments a model function may take: the input ``(C, H, W)`` as
#: ``input_shape`` and as ``in_channels``, ``height``, ``width`` (and ``image_size`` for
#: square images), and ``num_classes``.
MODEL_ARGUMENTS = ("input_shape", "in_channels", "height", "width", "image_size", "num_classes")
#: Networks up to this many parameters are checked by a real build and batch on the CPU
#: (:func:`check_custom_model`); larger ones on the meta device.
REAL_CHECK_PARAMETERS = 20_000_000
#: The preflight calls a dataset function a second time, to check that it returns the same
#: data (:func:`check_same_data`), when its first call took less than this many seconds.
REPEAT_CHECK_SECONDS = 1.0
#: What a dataset function may return, for the error messages.
DATASET_FORMS = (
    "(train_x, train_y, test_x, test_y), ((train_x, train_y), (test_x, test_y)), "
    "(train_set, test_set) of torch.utils.data.Dataset, or a dict with keys " + ", ".join(NPZ_KEYS)
)

# Modules loaded from files, by absolute path: a process imports a file once.
_FILE_MODULES: dict[str, ModuleType] = {}


class SpecError(ValueError):
    """A ``MODULE:FUNCTION`` or ``npz:PATH`` spec that cannot be used (one line).

    ``flag``: the flag at fault when it is not the spec's own (e.g. ``--data-dir``).
    """

    def __init__(self, message: str, *, flag: str | None = None) -> None:
        super().__init__(message)
        self.flag = flag


def is_custom(spec: str | None) -> bool:
    """Whether ``spec`` names a callable or an ``.npz`` file rather than a built-in name."""
    return isinstance(spec, str) and (spec.startswith(NPZ_PREFIX) or ":" in spec)


def _is_path(module: str) -> bool:
    return module.endswith(".py") or "/" in module or os.sep in module


def _split(spec: str) -> tuple[str, str]:
    module, _, attr = spec.rpartition(":")
    return module, attr


def absolute_spec(spec: str, flag: str) -> str:
    """``spec`` with a relative path made absolute (from the current directory); checked.

    Built-in names come back unchanged. Raises :class:`SpecError` for a malformed spec.
    """
    if not is_custom(spec):
        return spec
    if spec.startswith(NPZ_PREFIX):
        if flag != "--dataset":
            raise SpecError(
                f"{flag} {spec}: npz:PATH is a data set, not a network; give --dataset {spec} "
                f"and {flag} MODULE:FUNCTION (a function returning an nn.Module)"
            )
        path = spec.removeprefix(NPZ_PREFIX)
        if not path:
            raise SpecError(f"{flag} {spec}: no path after npz:; give npz:PATH (a .npz file)")
        return NPZ_PREFIX + os.path.abspath(os.path.expanduser(path))
    module, attr = _split(spec)
    form = f"give {flag} MODULE:FUNCTION, e.g. {flag} ./mynet.py:build or mypkg.nets:build"
    if not module or not attr:
        raise SpecError(f"{flag} {spec}: {'no module' if not module else 'no function'}; {form}")
    if not all(part.isidentifier() for part in attr.split(".")):
        raise SpecError(f"{flag} {spec}: {attr!r} is not a Python name; {form}")
    if _is_path(module):
        return os.path.abspath(os.path.expanduser(module)) + ":" + attr
    if not all(part.isidentifier() for part in module.split(".")):
        raise SpecError(
            f"{flag} {spec}: {module!r} is neither a module name nor a .py file; {form}"
        )
    return spec


# ------------------------------------------------------------------------------------------
# MODULE:FUNCTION
# ------------------------------------------------------------------------------------------


def _where(exc: BaseException) -> str:
    """`` (file.py:12)``: the innermost frame of a traceback outside torch, numpy and easgd
    (the user's line), or nothing."""
    import numpy
    import torch

    libraries = tuple(
        str(Path(m.__file__).parent) + os.sep
        for m in (torch, numpy, sys.modules[__name__.split(".")[0]])
        if m.__file__
    )
    frames = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if not f.filename.startswith(libraries) and not f.filename.startswith("<frozen")
    ]
    if not frames:
        return ""
    return f" ({Path(frames[-1].filename).name}:{frames[-1].lineno})"


def _a(thing: object) -> str:
    """``a list``, ``an int``: the type of ``thing`` with its article."""
    name = type(thing).__name__
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _import_file(module: str, flag: str, spec: str) -> ModuleType:
    path = Path(module)
    key = str(path)
    if key in _FILE_MODULES:
        return _FILE_MODULES[key]
    if not path.is_file():
        why = "is a folder, not a .py file" if path.is_dir() else "does not exist"
        raise SpecError(f"{flag} {spec}: {path} {why}; give the path of a .py file")
    digest = hashlib.sha1(key.encode(), usedforsecurity=False).hexdigest()[:10]
    name = f"_easgd_user_{path.stem.replace('-', '_')}_{digest}"
    loader_spec = importlib.util.spec_from_file_location(name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise SpecError(f"{flag} {spec}: {path} cannot be imported as a Python file")
    mod = importlib.util.module_from_spec(loader_spec)
    folder = str(path.parent)
    if folder not in sys.path:
        sys.path.append(folder)  # its own imports of neighbouring files
    sys.modules[name] = mod  # dataclasses and pickle look modules up there
    try:
        loader_spec.loader.exec_module(mod)
    except Exception as exc:
        del sys.modules[name]
        where = "" if isinstance(exc, SyntaxError) else _where(exc)
        fix = f"install {exc.name}" if isinstance(exc, ModuleNotFoundError) else "fix the file"
        raise SpecError(
            f"{flag} {spec}: importing {path} failed: {_describe(exc)}{where}; {fix}"
        ) from None
    _FILE_MODULES[key] = mod
    return mod


def _import_name(module: str, flag: str, spec: str) -> ModuleType:
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)  # as `python -m` has it (the `easgd` script's path does not)
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if module == missing or module.startswith(missing + "."):
            raise SpecError(
                f"{flag} {spec}: no module named {missing} (looked in {cwd} and sys.path); "
                f"install it, run from the folder that holds it, or give a file: "
                f"{flag} ./{module.replace('.', '/')}.py:{_split(spec)[1]}"
            ) from None
        raise SpecError(
            f"{flag} {spec}: importing {module} failed: {_describe(exc)}{_where(exc)}; "
            f"install {missing}"
        ) from None
    except Exception as exc:
        where = "" if isinstance(exc, SyntaxError) else _where(exc)
        raise SpecError(
            f"{flag} {spec}: importing {module} failed: {_describe(exc)}{where}; fix it"
        ) from None


def load_callable(spec: str, flag: str) -> Callable[..., Any]:
    """Import ``MODULE`` of ``spec`` and return its ``FUNCTION`` (which must be callable)."""
    module_name, attr = _split(absolute_spec(spec, flag))
    if _is_path(module_name):
        obj: Any = _import_file(module_name, flag, spec)
    else:
        obj = _import_name(module_name, flag, spec)
    where = module_name
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            names = sorted(
                n for n, v in vars(obj).items() if callable(v) and not n.startswith("_")
            ) if hasattr(obj, "__dict__") else []  # fmt: skip
            shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            has = f"; it has {shown}" if names else ""
            raise SpecError(
                f"{flag} {spec}: {where} has no attribute {part}{has}; name the function "
                "after the colon"
            ) from None
        where = f"{where}.{part}" if not _is_path(where) else f"{Path(where).name}:{part}"
    if not callable(obj):
        raise SpecError(
            f"{flag} {spec}: {attr} is {_a(obj)}, not a function; name a "
            "function (or class) that returns the " + ("network" if flag == "--model" else "data")
        )
    return obj


def _call(fn: Callable[..., Any], available: Mapping[str, Any], flag: str, spec: str) -> Any:
    """``fn(**the available arguments its signature names)``; its errors as SpecError."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # no signature (a builtin): call it bare
        params = []
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        kwargs = dict(available)
    else:
        named = {
            p.name
            for p in params
            if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        }
        kwargs = {k: v for k, v in available.items() if k in named}
    missing = [
        p.name
        for p in params
        if p.default is inspect.Parameter.empty
        and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        and p.name not in kwargs
    ]
    if missing:
        offered = ", ".join(available) or "none"
        raise SpecError(
            f"{flag} {spec}: it needs {', '.join(missing)}, which easgd does not give (it "
            f"gives, by keyword, the ones it names of: {offered}); give "
            f"{'them' if len(missing) > 1 else 'it'} a default"
        )
    try:
        return fn(**kwargs)
    except SpecError:
        raise
    except Exception as exc:
        raise SpecError(
            f"{flag} {spec}: calling it raised {_describe(exc)}{_where(exc)}; fix the function"
        ) from None


# ------------------------------------------------------------------------------------------
# --model MODULE:FUNCTION
# ------------------------------------------------------------------------------------------


def model_arguments(shape: tuple[int, int, int], num_classes: int) -> dict[str, Any]:
    """The keyword arguments a model function may take (:data:`MODEL_ARGUMENTS`)."""
    c, h, w = shape
    args: dict[str, Any] = {
        "input_shape": (c, h, w), "in_channels": c, "height": h, "width": w,
        "num_classes": num_classes,
    }  # fmt: skip
    if h == w:
        args["image_size"] = h
    return args


def build_custom_model(
    spec: str,
    shape: tuple[int, int, int],
    num_classes: int,
    *,
    seed: int | None = None,
    device: str | None = None,
) -> nn.Module:
    """The network of ``--model spec`` for inputs ``shape`` and ``num_classes`` classes.

    ``seed``: the init depends on it alone (the global RNG is left as it was); ``device``
    ``"meta"`` builds it under ``torch.device("meta")`` (no memory, no init).
    """
    import torch
    from torch import nn

    fn = load_callable(spec, "--model")
    args = model_arguments(shape, num_classes)
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        if device == "meta":
            with torch.device("meta"):
                net = _call(fn, args, "--model", spec)
        else:
            net = _call(fn, args, "--model", spec)
    if not isinstance(net, nn.Module):
        raise SpecError(
            f"--model {spec}: it returned {_a(net)}, not a torch.nn.Module; "
            "return the network (e.g. nn.Sequential(...))"
        )
    params = list(net.parameters())
    if not params:
        raise SpecError(
            f"--model {spec}: the network it returned ({type(net).__name__}) has no "
            "parameters; there is nothing to train"
        )
    odd = next(((n, p.dtype) for n, p in net.named_parameters()
                if not p.dtype.is_floating_point), None)  # fmt: skip
    if odd is not None:
        raise SpecError(
            f"--model {spec}: parameter {odd[0]} is {odd[1]}; every parameter must be "
            "floating point (float32)"
        )
    if device not in (None, "meta"):
        net = net.to(device)
    return net


def check_custom_model(
    spec: str, shape: tuple[int, int, int], num_classes: int, *, dataset: str
) -> int:
    """Build ``--model spec`` and run a batch of two through it; its number of parameters.

    The network is built on the meta device first (no memory, no init) to count its
    parameters. Up to :data:`REAL_CHECK_PARAMETERS` it is then built and run for real on the
    CPU: a forward pass on the meta device imports ``torch._dynamo`` (measured: 1.3 s, where
    a small network's real build and batch take milliseconds). A larger one runs on the meta
    device, and on the CPU after all if it cannot (an operation without a meta kernel, a
    parameter made on the CPU explicitly): the CPU's error is the one reported.
    """
    import torch

    c, h, w = shape
    out: Any = None
    try:
        net = build_custom_model(spec, shape, num_classes, seed=0, device="meta")
        if sum(p.numel() for p in net.parameters()) > REAL_CHECK_PARAMETERS:
            out = _forward(net, torch.empty(2, c, h, w, device="meta"))
    except Exception:  # retried for real below, which names the problem
        out = None
    if out is None:
        net = build_custom_model(spec, shape, num_classes, seed=0)
        try:
            out = _forward(net, torch.zeros(2, c, h, w))
        except Exception as exc:
            raise SpecError(
                f"--model {spec} does not take the {c}x{h}x{w} images of --dataset "
                f"{dataset}: {_describe(exc)}{_where(exc)}; make the network take "
                f"(batch, {c}, {h}, {w}) (the function gets input_shape, in_channels, height, "
                "width, num_classes)"
            ) from None
    if not isinstance(out, torch.Tensor):
        raise SpecError(
            f"--model {spec}: the network returns {_a(out)}, not a tensor of "
            f"logits; return a (batch, {num_classes}) tensor from forward"
        )
    if out.ndim != 2 or out.shape[0] != 2 or out.shape[1] < num_classes:
        raise SpecError(
            f"--model {spec}: a batch of 2 images {c}x{h}x{w} of --dataset {dataset} gives an "
            f"output of shape {tuple(out.shape)}; it must be logits (2, {num_classes}), one "
            f"column per class ({num_classes} classes)"
        )
    if not out.dtype.is_floating_point:
        raise SpecError(f"--model {spec}: the network returns {out.dtype}; return float logits")
    return sum(p.numel() for p in net.parameters())


def _forward(net: nn.Module, batch: Tensor) -> Any:
    import torch

    net.train()  # as the workers run it (batch norm takes a batch of 2 in training mode)
    with torch.no_grad():
        return net(batch)


# ------------------------------------------------------------------------------------------
# --dataset MODULE:FUNCTION and npz:PATH
# ------------------------------------------------------------------------------------------


def load_custom_dataset(spec: str, *, data_dir: str | None = None) -> Dataset:
    """The :class:`~easgd.data.Dataset` of ``--dataset spec`` (``MODULE:FUNCTION``/``npz:``).

    The function may return ``(train_x, train_y, test_x, test_y)``, ``((train_x, train_y),
    (test_x, test_y))``, ``(train_set, test_set)`` of map-style or iterable
    ``torch.utils.data.Dataset`` yielding ``(image, label)`` (tensors, arrays or PIL images,
    which are read as ``(H, W, C)``), or a mapping with the keys of :data:`NPZ_KEYS` and
    optionally ``num_classes``. Arrays may be tensors or numpy arrays.
    """
    spec = absolute_spec(spec, "--dataset")
    if spec.startswith(NPZ_PREFIX):
        if data_dir is not None:
            raise SpecError(
                f"--data-dir {data_dir} with --dataset {spec}: an .npz file is read from its "
                "path; drop --data-dir",
                flag="--data-dir",
            )
        parts = _read_npz(spec)
    else:
        fn = load_callable(spec, "--dataset")
        if data_dir is not None and not _takes(fn, "data_dir"):
            raise SpecError(
                f"--data-dir {data_dir}: --dataset {spec} takes no data_dir argument; drop "
                "--data-dir, or give the function a data_dir parameter",
                flag="--data-dir",
            )
        available = {"data_dir": data_dir} if data_dir is not None else {}
        parts = _parts(_call(fn, available, "--dataset", spec), spec)
    return _materialize(spec, parts)


def check_same_data(spec: str, data: Dataset, *, data_dir: str | None = None) -> None:
    """Call the dataset function of ``spec`` again: it must return ``data`` again.

    Every process of a run calls it; data that differ from call to call (a random split
    drawn from the global RNG) would give each worker, and the evaluator, other data.
    """
    import torch

    again = load_custom_dataset(spec, data_dir=data_dir)
    for name in ("train_x", "train_y", "test_x", "test_y"):
        first, second = getattr(data, name), getattr(again, name)
        if first.shape != second.shape or not torch.equal(first, second):
            raise SpecError(
                f"--dataset {spec}: two calls returned different {name}: every process of "
                "the run calls it, and each would train or evaluate on other data; make it "
                "return the same data every time (draw a random split from its own "
                "torch.Generator().manual_seed(0), not from the global RNG)"
            )


def _takes(fn: Callable[..., Any], name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _read_npz(spec: str) -> dict[str, Any]:
    import zipfile

    import numpy as np

    path = Path(spec.removeprefix(NPZ_PREFIX))
    if not path.is_file():
        why = "is a folder" if path.is_dir() else "does not exist"
        raise SpecError(f"--dataset {spec}: {path} {why}; give the path of an .npz file")
    if not zipfile.is_zipfile(path):
        raise SpecError(
            f"--dataset {spec}: {path} is not an .npz file (a zip of .npy arrays); write it "
            "with np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)"
        )
    try:
        with np.load(path, allow_pickle=False) as npz:
            if not isinstance(npz, np.lib.npyio.NpzFile):
                raise SpecError(
                    f"--dataset {spec}: {path} holds one array, not the arrays "
                    f"{', '.join(NPZ_KEYS)}; write it with np.savez(path, x_train=..., "
                    "y_train=..., x_test=..., y_test=...)"
                )
            keys = list(npz.files)
            missing = [k for k in NPZ_KEYS if k not in keys]
            if missing:
                raise SpecError(
                    f"--dataset {spec}: the file has {', '.join(keys) or 'no arrays'} but no "
                    f"{', '.join(missing)}; write it with np.savez(path, x_train=..., "
                    "y_train=..., x_test=..., y_test=...)"
                )
            wanted = [*NPZ_KEYS, *(["num_classes"] if "num_classes" in keys else [])]
            return {k: npz[k] for k in wanted}
    except SpecError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise SpecError(
            f"--dataset {spec}: {path} cannot be read as an .npz file ({_describe(exc)}); "
            "write it with np.savez (arrays of numbers: object arrays are refused)"
        ) from None


def _parts(result: Any, spec: str) -> dict[str, Any]:
    """The four arrays (and maybe ``num_classes``) of what a dataset function returned."""
    if isinstance(result, Mapping):
        missing = [k for k in NPZ_KEYS if k not in result]
        if missing:
            raise SpecError(
                f"--dataset {spec}: it returned a dict with keys "
                f"{', '.join(map(str, result)) or 'none'} but no {', '.join(missing)}; return "
                f"{DATASET_FORMS}"
            )
        return {k: result[k] for k in (*NPZ_KEYS, "num_classes") if k in result}
    if isinstance(result, tuple | list):
        if len(result) == 4:
            return dict(zip(NPZ_KEYS, result, strict=True))
        if len(result) == 2:
            parts: dict[str, Any] = {}
            for split, item in zip(("train", "test"), result, strict=True):
                if isinstance(item, tuple | list) and len(item) == 2:
                    parts[f"x_{split}"], parts[f"y_{split}"] = item
                elif _is_dataset(item):
                    parts[f"x_{split}"], parts[f"y_{split}"] = _from_dataset(item, split, spec)
                else:
                    raise SpecError(
                        f"--dataset {spec}: its {split} set is {_a(item)}, "
                        f"neither an (x, y) pair nor a torch.utils.data.Dataset; return "
                        f"{DATASET_FORMS}"
                    )
            return parts
    what = _a(result)
    if isinstance(result, tuple | list):
        what += f" of {len(result)} items"
    raise SpecError(f"--dataset {spec}: it returned {what}; return {DATASET_FORMS}")


def _is_dataset(item: Any) -> bool:
    from torch.utils.data import Dataset as TorchDataset

    return isinstance(item, TorchDataset) or (
        hasattr(item, "__getitem__") and hasattr(item, "__len__")
    )


def _from_dataset(ds: Any, split: str, spec: str) -> tuple[Tensor, Tensor]:
    """A ``torch.utils.data.Dataset`` of ``(image, label)`` items stacked into two tensors."""
    import torch
    from torch.utils.data import IterableDataset

    def items() -> Any:
        if isinstance(ds, IterableDataset) or not hasattr(ds, "__len__"):
            yield from ds
        else:
            for i in range(len(ds)):
                yield ds[i]

    images: list[Tensor] = []
    labels: list[Tensor] = []
    try:
        for i, item in enumerate(items()):
            if not (isinstance(item, tuple | list) and len(item) == 2):
                raise SpecError(
                    f"--dataset {spec}: item {i} of its {split} set is {_a(item)}"
                    + (f" of {len(item)}" if isinstance(item, tuple | list) else "")
                    + "; each item must be an (image, label) pair"
                )
            image, label = item
            if hasattr(image, "getbands"):  # a PIL image: (H, W) or (H, W, C)
                import numpy as np

                array = np.asarray(image)
                image = array.transpose(2, 0, 1) if array.ndim == 3 else array
            tensor = _as_tensor(image, f"image {i} of the {split} set", spec)
            if images and tensor.shape != images[0].shape:
                raise SpecError(
                    f"--dataset {spec}: image {i} of its {split} set has shape "
                    f"{tuple(tensor.shape)} but image 0 has {tuple(images[0].shape)}; every "
                    "image must have the same shape (resize or crop them in the Dataset)"
                )
            images.append(tensor)
            labels.append(_as_tensor(label, f"label {i} of the {split} set", spec).reshape(-1))
    except SpecError:
        raise
    except Exception as exc:
        raise SpecError(
            f"--dataset {spec}: reading its {split} set raised {_describe(exc)}{_where(exc)}; "
            "fix the Dataset"
        ) from None
    if not images:
        raise SpecError(f"--dataset {spec}: its {split} set is empty; give it samples")
    bad = next((i for i, y in enumerate(labels) if y.numel() != 1), None)
    if bad is not None:
        raise SpecError(
            f"--dataset {spec}: label {bad} of its {split} set has {labels[bad].numel()} "
            "values; each label must be one integer class index"
        )
    return torch.stack(images), torch.cat(labels)


def _as_tensor(value: Any, name: str, spec: str) -> Tensor:
    import numpy as np
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    try:
        array = np.asarray(value)
    except Exception as exc:
        raise SpecError(f"--dataset {spec}: {name} cannot be read as an array ({exc})") from None
    if array.dtype == object or array.dtype.kind in "USV":
        raise SpecError(
            f"--dataset {spec}: {name} is {_a(value)} of {array.dtype}, not of "
            "numbers; give tensors or numpy arrays"
        )
    return torch.from_numpy(np.ascontiguousarray(array))


def _materialize(spec: str, parts: Mapping[str, Any]) -> Dataset:
    """Check the arrays and hold them as :class:`~easgd.data.Dataset` does (see module)."""
    import torch

    from easgd.data.datasets import Dataset
    from easgd.data.transforms import channel_stats, normalize_

    xs, ys = {}, {}
    for split in ("train", "test"):
        x = _as_tensor(parts[f"x_{split}"], f"x_{split}", spec)
        y = _as_tensor(parts[f"y_{split}"], f"y_{split}", spec)
        xs[split], ys[split] = _images(x, f"x_{split}", spec), _labels(y, f"y_{split}", spec)
        if len(xs[split]) != len(ys[split]):
            raise SpecError(
                f"--dataset {spec}: x_{split} holds {len(xs[split])} images but y_{split} "
                f"{len(ys[split])} labels; give one label per image"
            )
        if len(xs[split]) == 0:
            raise SpecError(f"--dataset {spec}: the {split} set is empty; give it samples")
    train_x, test_x = xs["train"], xs["test"]
    if train_x.shape[1:] != test_x.shape[1:]:
        raise SpecError(
            f"--dataset {spec}: the train images are {_chw(train_x)} but the test images "
            f"{_chw(test_x)}; give both splits images of one shape"
        )
    if train_x.dtype != test_x.dtype and torch.uint8 in (train_x.dtype, test_x.dtype):
        raise SpecError(
            f"--dataset {spec}: x_train is {train_x.dtype} but x_test {test_x.dtype}; give "
            "both splits the same kind (uint8 pixels, or floats used as given)"
        )
    num_classes = _num_classes(spec, parts.get("num_classes"), ys)
    channels = train_x.shape[1]
    if train_x.dtype == torch.uint8:  # pixels: [0, 1], then the training images' statistics
        train_x = train_x.to(torch.float32).div_(255.0)
        test_x = test_x.to(torch.float32).div_(255.0)
        mean, std = channel_stats(train_x)
        normalize_(train_x, mean, std)
        normalize_(test_x, mean, std)
    else:
        train_x = train_x.to(torch.float32).contiguous()
        test_x = test_x.to(torch.float32).contiguous()
        mean, std = (0.0,) * channels, (1.0,) * channels
    return Dataset(
        name=spec, train_x=train_x, train_y=ys["train"], test_x=test_x, test_y=ys["test"],
        num_classes=num_classes, in_channels=channels, image_size=int(train_x.shape[-1]),
        mean=mean, std=std,
    )  # fmt: skip


def _chw(x: Tensor) -> str:
    return "x".join(str(s) for s in x.shape[1:])


def _images(x: Tensor, name: str, spec: str) -> Tensor:
    import torch

    if x.ndim == 3:
        x = x.unsqueeze(1)  # (N, H, W): one channel
    elif x.ndim != 4:
        hint = "; reshape flat features to (N, 1, 1, D)" if x.ndim == 2 else ""
        raise SpecError(
            f"--dataset {spec}: {name} has shape {tuple(x.shape)}; images must be (N, H, W) "
            f"or (N, C, H, W){hint}"
        )
    if x.dtype != torch.uint8 and not x.dtype.is_floating_point:
        raise SpecError(
            f"--dataset {spec}: {name} is {x.dtype}; images must be uint8 (pixels 0-255, "
            "scaled and normalized as the built-in sets are) or floating point (used as given)"
        )
    if x.dtype.is_floating_point and not bool(torch.isfinite(x).all()):
        count = int((~torch.isfinite(x)).sum())
        raise SpecError(
            f"--dataset {spec}: {name} holds {count} NaN or infinite values; give finite images"
        )
    return x


def _labels(y: Tensor, name: str, spec: str) -> Tensor:
    import torch

    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise SpecError(
            f"--dataset {spec}: {name} is {y.dtype}; labels must be integer class indices "
            "0..K-1 (y.astype(int) or y.long())"
        )
    if y.ndim != 1:
        hint = " (one-hot? take y.argmax(1))" if y.ndim == 2 and y.shape[1] > 1 else ""
        raise SpecError(
            f"--dataset {spec}: {name} has shape {tuple(y.shape)}; labels must be (N,), one "
            f"class index per image{hint}"
        )
    y = y.to(torch.int64)
    if len(y) and int(y.min()) < 0:
        raise SpecError(
            f"--dataset {spec}: {name} holds label {int(y.min())}; labels must be class "
            "indices 0..K-1"
        )
    return y.contiguous()


def _num_classes(spec: str, given: Any, ys: Mapping[str, Tensor]) -> int:
    top = max(int(y.max()) for y in ys.values())
    if given is None:
        if top < 1:
            raise SpecError(
                f"--dataset {spec}: every label is 0: one class, nothing to learn; give "
                "labels of at least two classes"
            )
        return top + 1
    try:
        count = int(given)
    except (TypeError, ValueError):
        count = -1
    if count < 1 or (isinstance(given, float) and not math.isclose(given, count)):
        raise SpecError(f"--dataset {spec}: num_classes {given!r} must be a positive integer")
    for split, y in ys.items():
        if int(y.max()) >= count:
            raise SpecError(
                f"--dataset {spec}: y_{split} holds label {int(y.max())} but num_classes is "
                f"{count} (labels 0..{count - 1}); raise num_classes or fix the labels"
            )
    return count
