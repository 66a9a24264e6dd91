"""``accelerate``: every chain of Linear layers in a model becomes a ``FusedMLP`` in place."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import cast

from torch import nn

from fusedae.torch.cache import has_hooks
from fusedae.torch.lower import describe, lower
from fusedae.torch.modules import FusedMLP


@dataclass
class AccelerateReport:
    """What ``accelerate`` did, by qualified module name (``""`` is the model itself).

    ``replaced``: ``(name, layers)`` for each ``nn.Sequential`` turned into a ``FusedMLP``;
    ``already_fused``: ``FusedMLP``s found; ``kept``: ``(name, reason)`` for each
    ``nn.Sequential`` left as it was. ``str(report)`` is a readable account.
    """

    replaced: list[tuple[str, str]] = field(default_factory=list)
    already_fused: list[str] = field(default_factory=list)
    kept: list[tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        def label(name: str) -> str:
            return name or "(the model itself)"

        lines = [f"replaced {len(self.replaced)} nn.Sequential with FusedMLP"]
        lines += [f"  {label(name)}: {layers}" for name, layers in self.replaced]
        if self.already_fused:
            lines.append(f"already fused: {', '.join(map(label, self.already_fused))}")
        if self.kept:
            lines.append(f"kept {len(self.kept)} nn.Sequential unchanged")
            lines += [f"  {label(name)}: {reason}" for name, reason in self.kept]
        return "\n".join(lines)


def accelerate(model: nn.Module) -> tuple[nn.Module, AccelerateReport]:
    """Replaces, in place, every ``nn.Sequential`` in ``model`` that is a chain of ``nn.Linear``
    with ``nn.ReLU`` / ``nn.Identity`` between them by a ``FusedMLP`` holding the same child
    modules, and so the same parameter objects: an optimizer built before keeps working, and
    ``state_dict`` keys and printout do not change.

    Every other module is left alone, as is a chain with forward or backward hooks on it or its
    layers (the fused call would skip them). Calling it again changes nothing. A Sequential
    reachable from several parents is replaced by one FusedMLP everywhere; references held
    outside the module tree (plain attributes, lists) still see the old one.

    Returns the model (a new ``FusedMLP`` if ``model`` is itself such a chain: use the returned
    one) and an ``AccelerateReport``; ``print`` it for a readable account.
    """
    report = AccelerateReport()
    done: dict[int, nn.Module] = {}

    def visit(module: nn.Module, name: str) -> nn.Module:
        if id(module) in done:
            return done[id(module)]
        result = module
        if type(module) is nn.Sequential:
            lowered = lower(cast(nn.Sequential, module))
            if lowered is None:
                kinds = ", ".join(type(child).__name__ for child in module)
                report.kept.append((name, f"not a Linear/ReLU/Identity chain ({kinds})"))
            elif has_hooks(module.modules()):
                report.kept.append((name, "has hooks, which the fused call would skip"))
            else:
                result = FusedMLP.from_sequential(module)
                report.replaced.append((name, describe(lowered.layers)))
        elif isinstance(module, FusedMLP):
            report.already_fused.append(name)
        done[id(module)] = result
        if result is module:
            for key, child in list(module._modules.items()):
                if child is not None:
                    module._modules[key] = visit(child, f"{name}.{key}" if name else key)
        return result

    return visit(model, ""), report
