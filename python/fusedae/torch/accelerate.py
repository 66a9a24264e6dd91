"""``accelerate``: every ``nn.Sequential`` in a model holding a run of modules the kernels take
becomes a ``FusedMLP`` in place."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import cast

from torch import nn

from fusedae.chain import PrecisionName
from fusedae.torch.cache import has_hooks
from fusedae.torch.lower import (
    DROPOUTS,
    LoweredChain,
    describe,
    forward_assigned,
    lower,
    split,
    why_not_fused,
)
from fusedae.torch.modules import (
    AE,
    HAS_HOOKS,
    FusedMLP,
    chain_modules,
    module_precision,
    why_kept,
)


@dataclass
class AccelerateReport:
    """What ``accelerate`` did, by qualified module name (``""`` is the model itself).

    ``replaced``: ``(name, pieces)`` for each ``nn.Sequential`` turned into a ``FusedMLP``: its
    children in order, each run that is one fused call in brackets (no brackets where the whole
    Sequential is one), every other child by its type, which runs as the module it is.
    ``already_fused``: ``FusedMLP``s found; ``kept``: ``(name, reason)`` for each
    ``nn.Sequential`` left as it was; ``unfused``: ``(name, reason)`` for each child of a
    replaced Sequential that runs as a module; ``notes``: ``(name, note)`` on fused runs whose
    modules run plain PyTorch in their present mode. ``str(report)`` is a readable account.
    """

    replaced: list[tuple[str, str]] = field(default_factory=list)
    already_fused: list[str] = field(default_factory=list)
    kept: list[tuple[str, str]] = field(default_factory=list)
    unfused: list[tuple[str, str]] = field(default_factory=list)
    notes: list[tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        def label(name: str) -> str:
            return name or "(the model itself)"

        lines = [f"replaced {len(self.replaced)} nn.Sequential with FusedMLP"]
        lines += [f"  {label(name)}: {pieces}" for name, pieces in self.replaced]
        if self.unfused:
            lines.append("  ([...]: one fused call; other modules run as they are)")
            lines.append(f"not fused, in them: {len(self.unfused)}")
            lines += [f"  {name}: {reason}" for name, reason in self.unfused]
        if self.already_fused:
            lines.append(f"already fused: {', '.join(map(label, self.already_fused))}")
        if self.kept:
            lines.append(f"kept {len(self.kept)} nn.Sequential unchanged")
            lines += [f"  {label(name)}: {reason}" for name, reason in self.kept]
        if self.notes:
            lines.append("runs plain PyTorch for now")
            lines += [f"  {label(name)}: {note}" for name, note in self.notes]
        return "\n".join(lines)


def _mode_note(lowered: LoweredChain) -> str | None:
    """Why the chain runs plain PyTorch in its modules' present mode, if it does."""
    training = sorted(
        {
            type(module).__name__
            for module in lowered.mode_dependent
            if module.training and (type(module) not in DROPOUTS or cast(nn.Dropout, module).p)
        }
    )
    if not training:
        return None
    return f"{', '.join(training)} in training mode (fused in eval mode)"


def accelerate(
    model: nn.Module, precision: PrecisionName | None = None
) -> tuple[nn.Module, AccelerateReport]:
    """Replaces, in place, every ``nn.Sequential`` in ``model`` holding a run of modules the
    kernels take (Linear layers with the op table's activations, eval-mode BatchNorm1d folded
    in, Dropout, Identity, a leading Flatten and a trailing Unflatten) by a ``FusedMLP`` holding
    the same child modules, and so the same parameter objects: an optimizer built before keeps
    working, and ``state_dict`` keys and printout do not change. Each child keeps its own
    training mode, and what the Sequential itself holds (its parameters, buffers, attributes)
    goes with it. Each longest such run is one fused call; the other children (a LayerNorm
    between two runs) run as they are. A Sequential of Sequentials (``nn.Sequential(encoder,
    decoder)``) whose modules all form one chain runs as one fused call, and each inner one,
    called alone, as its own.

    Every other module is left alone, as is a Sequential with forward or backward hooks on it or
    its children (the fused call would skip them). Calling it again changes nothing. A
    Sequential reachable from several parents is replaced by one FusedMLP everywhere;
    references held outside the module tree (plain attributes, lists) still see the old one.

    ``precision="bf16"`` or ``"int8"`` makes every FusedMLP (those found too) run at that
    precision, for inference (see ``FusedMLP``); ``"fp32"`` sets them back; None leaves found
    ones as they are.

    Returns the model (a new ``FusedMLP`` if ``model`` is itself such a Sequential: use the
    returned one) and an ``AccelerateReport``; ``print`` it for a readable account.
    """
    module_precision(precision)  # an unknown precision is an error before anything changes
    report = AccelerateReport()
    done: dict[int, nn.Module] = {}

    def visit(module: nn.Module, name: str) -> nn.Module:
        if id(module) in done:
            return done[id(module)]
        result = module
        if type(module) is nn.Sequential:
            children = tuple(cast(nn.Sequential, module))
            # Sequentials of Sequentials (an encoder and a decoder) whose modules form one chain.
            leaves, containers = chain_modules(children)
            # (An inner Sequential's assigned `forward` runs instead: the fused call reads it.)
            one_chain = leaves != children and not forward_assigned(map(vars, containers))
            whole = lower(leaves) if one_chain else None
            pieces: list[tuple[int, int, LoweredChain | None]] = (
                [(0, len(children), whole)] if whole is not None else split(children)
            )
            kinds = ", ".join(type(child).__name__ for child in children)
            if not any(lowered for _, _, lowered in pieces):
                report.kept.append((name, f"no Linear chain the kernels take ({kinds})"))
            elif has_hooks(module.modules()):
                report.kept.append((name, HAS_HOOKS))
            elif (reason := why_kept(module)) is not None:
                report.kept.append((name, reason))
            else:
                result = FusedMLP.from_sequential(cast(nn.Sequential, module), precision)
                report.replaced.append((name, _describe_pieces(children, pieces)))
                keys = list(module._modules)
                for start, _, lowered in pieces:
                    if lowered is None:
                        qualified = f"{name}.{keys[start]}" if name else keys[start]
                        report.unfused.append((qualified, why_not_fused(children[start])))
                    elif (note := _mode_note(lowered)) is not None:
                        report.notes.append((name, note))
        elif isinstance(module, FusedMLP | AE):
            if isinstance(module, FusedMLP):
                report.already_fused.append(name)
            if precision is not None:
                module.set_precision(precision)
        done[id(module)] = result
        for key, child in list(result._modules.items()):
            if child is not None:
                result._modules[key] = visit(child, f"{name}.{key}" if name else key)
        if isinstance(result, FusedMLP):
            # Its inner Sequentials are FusedMLPs now: a compiled model's first call would
            # otherwise read them (a change of state its trace saw) and its second compile again.
            result.read_children()
        return result

    return visit(model, ""), report


def _describe_pieces(
    children: tuple[nn.Module, ...], pieces: list[tuple[int, int, LoweredChain | None]]
) -> str:
    """``"Linear 8->16, ReLU"`` for one chain, ``"[Linear 8->16, ReLU], LayerNorm, [...]"``
    for runs and other modules."""
    if len(pieces) == 1:
        lowered = pieces[0][2]
        assert lowered is not None
        return describe(lowered)
    return ", ".join(
        type(children[start]).__name__ if lowered is None else f"[{describe(lowered)}]"
        for start, _, lowered in pieces
    )
