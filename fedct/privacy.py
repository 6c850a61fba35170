"""Differential privacy with Opacus, with one privacy budget per client for the whole run.

Each client's noise multiplier is fixed once per run, calibrated for every step that client
will take over all the rounds it is sampled for (or given with --noise-multiplier). Its
accountant lives in the client's state across rounds and is saved with the run, so epsilon
is the epsilon of the whole run, not of one round. The Opacus wrapping of the shared model
is put on for a client's local update and taken off after it, so weights leave the client
without the `_module.` prefix.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import warnings

import numpy as np
import torch
from opacus import PrivacyEngine
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch import nn

from fedct.config import batch_for
from fedct.errors import FedctError
from fedct.models import train_mode


def delta_warning(n_examples: int, config) -> str | None:
    """A note when delta is not far below 1/n: a mechanism may then leak one of the n
    examples outright with probability delta and still meet (epsilon, delta)."""
    if config.dp and n_examples and config.delta >= 1 / n_examples:
        return (f"delta {config.delta:g} is not below 1/{n_examples} (1/its examples); "
                "choose delta well below that, e.g. 1e-5")
    return None


def steps_per_round(n_examples: int, config) -> int:
    if config.local_steps > 0:
        return config.local_steps
    return config.local_epochs * max(1, math.ceil(n_examples / batch_for(n_examples, config.batch_size)))


def sample_rate(n_examples: int, batch_size: int | str) -> float:
    """Opacus's Poisson rate for a loader of ceil(n / batch) batches: 1 / len(loader); 1 with
    `batch_size: all` (every example in every step: DP gradient descent)."""
    return 1.0 / max(1, math.ceil(n_examples / batch_for(n_examples, batch_size)))


def calibrate_noise(*, n_examples: int, total_steps: int, config) -> float:
    """The noise multiplier that spends exactly the target epsilon over `total_steps`."""
    if config.noise_multiplier > 0:
        return config.noise_multiplier
    if total_steps == 0:
        return 1.0
    try:
        with warnings.catch_warnings():
            # "Optimal order is the largest alpha": the RDP bound is then loose, i.e. the
            # epsilon fedct reports is an upper bound; printed per client it would break the
            # live table, and the accountant keeps the same bound.
            warnings.simplefilter("ignore")
            return float(get_noise_multiplier(
                target_epsilon=config.target_epsilon, target_delta=config.delta,
                sample_rate=sample_rate(n_examples, config.batch_size), steps=total_steps,
                accountant=config.accountant))
    except ValueError as exc:
        raise FedctError(f"target_epsilon {config.target_epsilon}: cannot be reached ({exc})") from None


def new_accountant_state(config) -> dict:
    return create_accountant(config.accountant).state_dict()


@functools.lru_cache(maxsize=1024)
def rdp_of_one_step(noise: float, rate: float) -> np.ndarray:
    """Opacus's RDP of one sampled Gaussian step at its default orders. RDP adds up over
    steps, so this is all an epsilon needs; computing it (151 orders in Python, a large
    part of a cached head-only round) once per (noise, rate) keeps accounting cheap."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp

    return compute_rdp(q=rate, noise_multiplier=noise, steps=1,
                       orders=RDPAccountant.DEFAULT_ALPHAS)


def epsilon_of(state: dict, config, *, extra_steps: int = 0, noise: float = 0.0,
               rate: float = 0.0) -> float:
    """Epsilon spent so far, or after `extra_steps` more steps at (noise, rate).

    For RDP the sum is Opacus's own (RDPAccountant.get_privacy_spent), bit for bit, from
    the cached one-step RDP; other accountants are asked as they are."""
    if config.accountant == "rdp":
        from opacus.accountants import RDPAccountant
        from opacus.accountants.analysis.rdp import get_privacy_spent

        history = list(state.get("history") or [])
        if extra_steps:
            history.append((noise, rate, extra_steps))
        if not history:
            return 0.0
        rdp = sum([rdp_of_one_step(sigma, q) * steps for sigma, q, steps in history])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return float(get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp,
                                           delta=config.delta)[0])
    accountant = create_accountant(config.accountant)
    if state.get("history"):
        accountant.load_state_dict(copy.deepcopy(dict(state)))  # Opacus keeps the list it is given
    if extra_steps:
        accountant.history.append((noise, rate, extra_steps))
    if not accountant.history:
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(accountant.get_epsilon(delta=config.delta))


@contextlib.contextmanager
def private_training(model: nn.Module, optimizer, loader, *, noise: float, accountant_state: dict,
                     config, loss_fn: nn.Module):
    """Wrap model, optimiser and loader with Opacus for one local update.

    Yields (loader, optimizer, result) where result["accountant"] holds the updated
    accountant state after the block.
    """
    train_mode(model)  # Opacus refuses a model in eval mode
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Secure RNG turned off": secure_mode is not offered yet
        engine = PrivacyEngine(accountant=config.accountant)
        if accountant_state.get("history"):
            engine.accountant.load_state_dict(copy.deepcopy(dict(accountant_state)))
        wrapped, dp_optimizer, dp_loader = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader, criterion=loss_fn,
            noise_multiplier=noise, max_grad_norm=config.max_grad_norm, poisson_sampling=True,
            grad_sample_mode=config.grad_sample_mode,
        )
    result: dict = {}
    try:
        with BatchMemoryManager(data_loader=dp_loader,
                                max_physical_batch_size=config.physical_batch_size,
                                optimizer=dp_optimizer) as physical_loader, \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Opacus's per-module hook warnings, every step
            yield physical_loader, dp_optimizer, result
    except RuntimeError as exc:
        if "vmap" in str(exc) and "random" in str(exc):
            raise FedctError(f"{type(model).__name__}: dropout inside layers whose per-example "
                             "gradients Opacus takes with vmap (a ViT's blocks); set drop_rate: 0 "
                             "for --dp-train full") from None
        raise
    finally:
        result["accountant"] = engine.accountant.state_dict()
        unwrap(wrapped, model)


# The few Opacus internals fedct relies on, in one place. pyproject.toml bounds the Opacus
# version; tests/test_privacy.py fails loudly when a release renames any of them.
SKIPPED_STEP_FLAG = "_is_last_step_skipped"  # DPOptimizer: a physical batch that took no step
PER_SAMPLE_ATTRIBUTES = ("grad_sample", "_forward_counter", "summed_grad")  # left on parameters


def step_was_skipped(optimizer) -> bool:
    """Whether Opacus's optimiser skipped the last step (BatchMemoryManager's physical batches
    before the end of a logical batch); False for a plain optimiser."""
    from opacus.optimizers import DPOptimizer

    if not isinstance(optimizer, DPOptimizer):
        return False
    if not hasattr(optimizer, SKIPPED_STEP_FLAG):
        raise RuntimeError(f"opacus {opacus_version()}: DPOptimizer.{SKIPPED_STEP_FLAG} is gone; "
                           "fedct.privacy needs updating for this Opacus release")
    return bool(getattr(optimizer, SKIPPED_STEP_FLAG))


def unwrap(wrapped: nn.Module, model: nn.Module) -> None:
    """Remove Opacus's hooks and per-sample attributes, so the shared model is plain again."""
    if not hasattr(wrapped, "_close"):
        raise RuntimeError(f"opacus {opacus_version()}: GradSampleModule._close is gone; "
                           "fedct.privacy needs updating for this Opacus release")
    wrapped._close()
    for param in model.parameters():
        for attribute in PER_SAMPLE_ATTRIBUTES:
            if hasattr(param, attribute):
                delattr(param, attribute)


def opacus_version() -> str:
    import opacus

    return opacus.__version__


def strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("_module."): v for k, v in state.items()}
