"""How a model is spread over the processes of a run, and its state gathered into one checkpoint.

    DDP (default)          every rank holds the whole model and optimizer; gradients are averaged
    FSDP2 (hardware.fsdp)  parameters, gradients and optimizer state are sharded across ranks
                           (torch.distributed.fsdp.fully_shard per transformer block, then the root)

Checkpoints always hold full, unsharded state dicts keyed like a plain model's, so a checkpoint of
an FSDP run loads in a single process (sampling, init_from, resume on another setup) and the
other way round.
"""

from __future__ import annotations

import torch

from nanogpt.parallel.distributed import DistEnv

_FULL = None  # StateDictOptions, imported when first needed (torch.distributed.checkpoint is slow to import)


def wrap(raw_model: torch.nn.Module, device: str, env: DistEnv, fsdp: bool) -> torch.nn.Module:
    """The module the training loop calls: raw_model itself on one process, its DDP wrapper, or
    raw_model sharded in place by FSDP2 (make the optimizer after this: it must see the shards)."""
    if not env.is_distributed:
        return raw_model
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(torch.device(device).type, (env.world_size,))
        for block in raw_model.transformer.h:  # one all-gather per block: only one block is whole at a time
            fully_shard(block, mesh=mesh)
        fully_shard(raw_model, mesh=mesh)  # the rest: embeddings (tied to lm_head), final LayerNorm
        return raw_model
    from torch.nn.parallel import DistributedDataParallel

    index = torch.device(device).index
    return DistributedDataParallel(raw_model, device_ids=[index] if index is not None else None)


def set_gradient_sync(model: torch.nn.Module, sync: bool) -> None:
    """Reduce gradients across ranks in the next backward (the last micro-step) or not."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(sync)
    elif hasattr(model, "require_backward_grad_sync"):  # DDP
        model.require_backward_grad_sync = sync


def local(value: torch.Tensor) -> torch.Tensor:
    """A plain tensor of a possibly distributed one (FSDP2's grad norm is a replicated DTensor)."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value


def full_state_dicts(raw_model: torch.nn.Module, optimizer: torch.optim.Optimizer, fsdp: bool) -> tuple[dict, dict]:
    """The model's and the optimizer's whole state. With FSDP2 every rank must call this (it
    gathers the shards); rank 0 receives them, on CPU, keyed by parameter name."""
    if not fsdp:
        return raw_model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    options = _options(cpu_offload=True)
    return get_model_state_dict(raw_model, options=options), get_optimizer_state_dict(raw_model, optimizer, options=options)


def load_state_dicts(raw_model: torch.nn.Module, optimizer: torch.optim.Optimizer, model_state: dict,
                     optimizer_state: dict, fsdp: bool, is_main: bool) -> None:
    """Load a checkpoint's whole state, written by any setup, into this one's model and optimizer.
    With FSDP2 every rank must call this; rank 0's state is sent to the others, shard by shard."""
    by_name = _keyed_by_name(optimizer_state)
    if not fsdp:
        raw_model.load_state_dict(model_state)
        if not by_name:
            optimizer.load_state_dict(optimizer_state)
            return
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(raw_model, optimizer, optimizer_state, options=_options())
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    if is_main and not by_name:
        optimizer_state = _name_keys(optimizer_state, raw_model, optimizer)
    options = _options(broadcast_from_rank0=True)
    set_model_state_dict(raw_model, model_state if is_main else {}, options=options)
    set_optimizer_state_dict(raw_model, optimizer, optimizer_state if is_main else {}, options=options)


def _options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def _keyed_by_name(optimizer_state: dict) -> bool:
    groups = optimizer_state.get("param_groups", [])
    return bool(groups) and bool(groups[0]["params"]) and isinstance(groups[0]["params"][0], str)


def _name_keys(optimizer_state: dict, raw_model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """A plain optimizer state dict (parameters numbered in group order) keyed by parameter names
    instead, as FSDP2's loader wants. The numbering is that of `optimizer`, built as the saved one was."""
    names = {id(p): name for name, p in raw_model.named_parameters()}
    ordered = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    groups = [{**g, "params": [ordered[i] for i in g["params"]]} for g in optimizer_state["param_groups"]]
    return {"state": {ordered[i]: s for i, s in optimizer_state["state"].items()}, "param_groups": groups}
