"""The wrapper as a torch.optim citizen: hooks, param groups, storage changes, closures."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from easgd.optim import EASGD, ElasticAveraging, LocalSGD

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def group(tmp_path: Path) -> Iterator[None]:
    """A one-rank gloo group: every step of a tau=1 wrapper is a real exchange."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _train(model: torch.nn.Linear, opt: torch.optim.Optimizer, steps: int = 1) -> None:
    for _ in range(steps):
        opt.zero_grad()
        x = torch.ones(4, model.in_features, dtype=model.weight.dtype)
        model(x).square().mean().backward()
        opt.step()


@pytest.mark.usefixtures("group")
def test_step_hooks_fire_once_per_wrapper_step_and_inner_hooks_keep_working() -> None:
    model = torch.nn.Linear(3, 2)
    local = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = EASGD(local, tau=2)
    calls: list[str] = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    handle = opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    local.register_step_post_hook(lambda o, args, kwargs: calls.append("inner"))
    _train(model, opt, steps=3)
    assert calls == ["pre", "inner", "post"] * 3
    handle.remove()
    calls.clear()
    _train(model, opt)
    assert calls == ["pre", "inner"]


@pytest.mark.usefixtures("group")
def test_state_dict_hooks_run_on_the_wrapper() -> None:
    model = torch.nn.Linear(3, 2)
    opt = LocalSGD(torch.optim.SGD(model.parameters(), lr=0.1), tau=1)
    _train(model, opt, steps=2)
    seen: list[str] = []
    opt.register_state_dict_pre_hook(lambda o: seen.append("sd-pre"))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "tag": "mine"})
    state = opt.state_dict()
    assert state["tag"] == "mine" and state["easgd"]["t"] == 2 and seen == ["sd-pre"]

    def drop_tag(o: torch.optim.Optimizer, sd: dict) -> dict:
        seen.append("load-pre")
        return {k: v for k, v in sd.items() if k != "tag"}

    other = torch.nn.Linear(3, 2)
    opt2 = LocalSGD(torch.optim.SGD(other.parameters(), lr=0.1), tau=1)
    opt2.register_load_state_dict_pre_hook(drop_tag)
    opt2.register_load_state_dict_post_hook(lambda o: seen.append("load-post"))
    opt2.load_state_dict(state)
    assert seen == ["sd-pre", "load-pre", "load-post"]
    assert opt2.worker.t == 2 and "tag" in state  # the caller's dict is left alone


def test_add_param_group_after_wrapping_is_refused() -> None:
    model = torch.nn.Linear(3, 2)
    opt = ElasticAveraging(torch.optim.SGD(model.parameters(), lr=0.1), enabled=False)
    extra = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="before wrapping it, or build a new wrapper"):
        opt.add_param_group({"params": [extra]})
    assert len(opt.param_groups) == 1


@pytest.mark.usefixtures("group")
def test_param_group_added_to_the_local_optimizer_is_caught_at_the_exchange() -> None:
    model = torch.nn.Linear(3, 2)
    local = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = EASGD(local, tau=1)
    local.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))]})
    with pytest.raises(RuntimeError, match="added to it after wrapping"):
        _train(model, opt)


@pytest.mark.usefixtures("group")
def test_converting_the_model_after_wrapping_is_caught_at_the_next_exchange() -> None:
    model = torch.nn.Linear(3, 2)
    opt = EASGD(torch.optim.SGD(model.parameters(), lr=0.1), tau=2)
    _train(model, opt, steps=2)
    model.double()
    with pytest.raises(RuntimeError, match=r"parameter 0 of shape \(2, 3\).*torch.float64.*"
                       "convert or move the model"):  # fmt: skip
        _train(model, opt, steps=2)  # the first step is local, the second exchanges


@pytest.mark.usefixtures("group")
def test_a_replaced_parameter_is_named_when_the_optimizer_knows_the_names() -> None:
    model = torch.nn.Linear(3, 2)
    opt = EASGD(torch.optim.SGD(model.named_parameters(), lr=0.1), tau=1)
    model.bias.data = torch.zeros(2)  # what load_state_dict(assign=True) does under swap
    with pytest.raises(RuntimeError, match=r"parameter 1 \('bias'\) of shape \(2,\)"):
        _train(model, opt)


@pytest.mark.usefixtures("group")
def test_load_state_dict_assign_with_swapped_tensors_is_caught() -> None:
    model = torch.nn.Linear(3, 2)
    opt = EASGD(torch.optim.SGD(model.parameters(), lr=0.1), tau=1)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        model.load_state_dict(state, assign=True)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(False)
    with pytest.raises(RuntimeError, match="no longer lives in the wrapper's flat buffer"):
        _train(model, opt)


@pytest.mark.usefixtures("group")
def test_in_place_load_state_dict_keeps_averaging() -> None:
    model = torch.nn.Linear(3, 2)
    opt = EASGD(torch.optim.SGD(model.parameters(), lr=0.1), tau=1)
    model.load_state_dict({k: torch.zeros_like(v) for k, v in model.state_dict().items()})
    _train(model, opt, steps=2)
    assert opt.worker.t == 2


def test_closure_optimizers_are_refused() -> None:
    model = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match=r"optimizer=LBFGS.*first-order optimizer"):
        EASGD(torch.optim.LBFGS(model.parameters()), enabled=False)
