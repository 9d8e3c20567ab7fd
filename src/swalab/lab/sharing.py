"""Shared trajectories: the epochs that several runs of one seed would train identically, trained once.

The runs of one seed start from the same initialisation and see the same batches in the same order.
They train identically for as long as their recipes set the same learning rate at every step and
change the weights the same way (``Recipe.iterate_plan``); what a recipe averages or collects does
not change the iterate. Such epochs are trained once, every run following along (its recipe
averages, collects and is evaluated exactly as in a run of its own); where the plans part, the
state (model, optimizer, data order, RNG) is kept and each branch continues from it. A run shorter
than the others is finished at its own last epoch.

So in the paper's Table 1 (Izmailov et al., 2018) SWA at 1B, 1.25B and 1.5B are one trajectory (the
SWA schedule depends on ``swa_start``, not on the budget), and SGD follows it until the two
schedules start to decay differently (half of ``swa_start``); EMA, SWAG and a soup under the same
SWA schedule follow the SWA trajectory to its end.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .methods import recipe_of

__all__ = ["Branch", "plan_branches", "trained_epochs"]


@dataclass
class Branch:
    """Epochs ``start .. stop - 1`` (0-based) trained once for ``methods``, then ``children``
    continue from the state at ``stop``. A method whose run ends inside ``[start, stop]`` is
    finished there; the others go on in exactly one child."""

    methods: list[Any]  # MethodConfig
    start: int
    stop: int
    children: list[Branch] = field(default_factory=list)

    def epochs(self) -> int:
        """Epochs trained for this branch and its children."""
        return self.stop - self.start + sum(child.epochs() for child in self.children)

    def walk(self) -> list[Branch]:
        """This branch and every branch below it, parents first."""
        return [self, *(b for child in self.children for b in child.walk())]


def plan_branches(
    train: Any,
    methods: Sequence[Any],
    steps_per_epoch: int,
    starts: Mapping[str, int] | None = None,
    share: bool = True,
) -> list[Branch]:
    """The trajectories that train ``methods`` (``MethodConfig`` of one seed), as trees of branches.

    ``starts``: epochs each run has already trained (a resumed run, by label; 0 if absent). Runs
    share a root only if they resume at the same epoch and planned every epoch before it alike (so
    their checkpoints hold the same state). ``share=False`` gives every run a root of its own.
    """
    starts = starts or {}
    recipes = {m.label: recipe_of(m, train, steps_per_epoch) for m in methods}
    plans: dict[str, list[Any]] = {label: [] for label in recipes}

    def plan(method: Any, epoch: int) -> Any:
        known = plans[method.label]
        while len(known) <= epoch:
            known.append(recipes[method.label].iterate_plan(len(known)))
        return known[epoch]

    def grow(group: list[Any], start: int) -> Branch:
        epoch = start
        while True:
            going = [m for m in group if recipes[m.label].epochs > epoch]
            parts: dict[Any, list[Any]] = {}
            for m in going:
                parts.setdefault(plan(m, epoch), []).append(m)
            if len(parts) != 1:  # all finished, or the plans part here
                return Branch(group, start, epoch, [grow(p, epoch) for p in parts.values()])
            epoch += 1

    roots: dict[Any, tuple[int, list[Any]]] = {}
    for m in methods:
        start = min(starts.get(m.label, 0), recipes[m.label].epochs)
        key = (start, tuple(plan(m, e) for e in range(start))) if share else m.label
        roots.setdefault(key, (start, []))[1].append(m)
    return [grow(group, start) for start, group in roots.values()]


def trained_epochs(branches: Sequence[Branch]) -> int:
    """Epochs that training ``branches`` takes."""
    return sum(branch.epochs() for branch in branches)
