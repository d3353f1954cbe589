"""EvoPress's (1 + lambda) search with multi-stage selection (Sieberling et al., ICML'25, §3).

Each generation mutates the parent into ``offspring`` distinct children (:meth:`LevelSpace.mutate`) and
selects in stages: all children are scored on a small random minibatch of calibration samples, the best
``survivors[0]`` are scored again on a larger fresh one, and so on. The parent joins at the last stage
(elitism), and the best there is the next parent. Here the last stage scores the whole calibration pool,
so a parent is only replaced by a child that is at least as good on every sample the search holds.

Fitness is a callback (``levels, sample indices -> mean loss``, lower is better), so this module knows no
model. The space is any :class:`Space`: keep-ratio levels (:class:`~kvsqueeze.tune.levels.LevelSpace`) or
bit widths under a byte budget (:class:`~kvsqueeze.tune.bitspace.BitSpace`). Every generation draws
from its own seeded generator, and the state is written after each one, so an interrupted search resumes
where it stopped and ends as an uninterrupted one would.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

Fitness = Callable[[tuple[int, ...], Sequence[int]], float]  # (levels, sample ids) -> loss per sample, mean


class Space(Protocol):
    """What :func:`evolve` searches (a dataclass, so a saved search can tell it is the same space)."""

    def uniform(self) -> tuple[int, ...]:
        """The start candidate."""
        ...

    def mutate(self, parent: tuple[int, ...], rng: random.Random) -> tuple[int, ...]:
        """A candidate near ``parent`` (``parent`` itself when none can be made)."""
        ...


@dataclass(frozen=True)
class SearchConfig:
    """The search's size (defaults scaled down from EvoPress's 150 x 128 for a CPU).

    Args:
        generations: parents after the start.
        offspring: children per generation (EvoPress's lambda).
        stage_samples: calibration samples scored per stage before the last (the last scores them all).
        survivors: children kept after each of those stages; one more stage, the last, keeps one.
        seed: makes the search repeatable: the same seed gives the same levels.
    """

    generations: int = 40
    offspring: int = 16
    stage_samples: tuple[int, ...] = (1, 2)
    survivors: tuple[int, ...] = (4, 2)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.generations < 0 or self.offspring < 1:
            raise ValueError(
                f"generations must be >= 0 and offspring >= 1, got {self.generations}, {self.offspring}"
            )
        if len(self.stage_samples) != len(self.survivors):
            raise ValueError("stage_samples and survivors need one entry per stage before the last")
        if any(n < 1 for n in (*self.stage_samples, *self.survivors)):
            raise ValueError("every stage scores at least one sample and keeps at least one child")


@dataclass
class SearchResult:
    """The best levels found, their loss on the whole pool, and how the search went."""

    levels: tuple[int, ...]
    loss: float
    start_loss: float  # the uniform start's loss on the whole pool
    history: list[float] = field(default_factory=list)  # the parent's loss after each generation
    evaluations: int = 0  # (candidate, sample) losses computed, cached ones not counted again
    seconds: float = 0.0  # wall time, summed over resumed runs

    def record(self, config: SearchConfig, continuation_tokens: int, **found: object) -> dict:
        """How the search went, as a profile's ``search`` field: ``found`` (what was searched, the loss
        and its start) first, then the search's size and cost."""
        return {
            "algorithm": "evopress",
            **found,
            "generations": config.generations,
            "offspring": config.offspring,
            "seed": config.seed,
            "continuation_tokens": continuation_tokens,
            "evaluations": self.evaluations,
            "seconds": round(self.seconds, 1),
            "history": self.history,
        }


def describe_search(profile: dict) -> str:
    """One sentence on a saved profile's search (its ``search`` record): its size, its calibration documents
    and its wall time, as the report scripts print it."""
    search = profile["search"]
    return (
        f"Search: {search['generations']} generations x {search['offspring']} offspring (seed {search['seed']}), "
        f"{profile['num_prompts']} offline documents of {profile['prompt_tokens'][0]} tokens, KL over "
        f"{search['continuation_tokens']} teacher-forced tokens each; {search['evaluations']} (candidate, "
        f"document) evaluations in {search['seconds'] / 60:.0f} min of wall time."
    )


class _Memo:
    """Losses per (levels, sample): a candidate met twice (the parent, a repeated child) is scored once."""

    def __init__(self, fitness: Fitness) -> None:
        self.fitness, self.losses, self.evaluations = fitness, {}, 0

    def __call__(self, levels: tuple[int, ...], samples: Sequence[int]) -> float:
        for i in samples:
            if (levels, i) not in self.losses:
                self.losses[(levels, i)] = self.fitness(levels, [i])
                self.evaluations += 1
        return statistics.fmean(self.losses[(levels, i)] for i in samples)


def _children(space: Space, parent: tuple[int, ...], count: int, rng: random.Random) -> list[tuple[int, ...]]:
    """Up to ``count`` distinct mutations of ``parent``, none equal to it (fewer if the space is small)."""
    children: list[tuple[int, ...]] = []
    for _ in range(20 * count):
        child = space.mutate(parent, rng)
        if child != parent and child not in children:
            children.append(child)
            if len(children) == count:
                break
    return children


def evolve(
    space: Space,
    fitness: Fitness,
    pool: int,
    config: SearchConfig | None = None,
    *,
    state_path: str | Path | None = None,
    fitness_key: dict | None = None,
    progress: bool = True,
) -> SearchResult:
    """Search ``space`` for the levels of least loss over a calibration pool of ``pool`` samples.

    ``state_path``: a JSON file written after every generation; if it holds a search of the same space,
    config (but perhaps fewer generations) and ``fitness_key`` (what the fitness scores: the model, the
    method, the documents; JSON-able), the search resumes from it. A state file of another search is a
    one-line ``ValueError``, never silently overwritten.
    """
    from tqdm.auto import tqdm

    config = config or SearchConfig()
    if pool < 1:
        raise ValueError(f"the calibration pool needs at least one sample, got {pool}")
    everything = list(range(pool))
    memo = _Memo(fitness)
    # what a saved search must share to be resumed (more generations may be asked for)
    search = {k: v for k, v in asdict(config).items() if k != "generations"}
    identity = {"space": asdict(space), "search": search, "pool": pool, "fitness": fitness_key or {}}
    state = _load_state(state_path, identity)
    started = time.perf_counter()
    if state is None:
        parent = space.uniform()
        start_loss = memo(parent, everything)
        state = {
            **identity,
            "generation": 0,
            "parent": list(parent),
            "loss": start_loss,
            "start_loss": start_loss,
            "history": [],
            "evaluations": memo.evaluations,
            "seconds": 0.0,
        }
        memo.evaluations = 0
    parent, loss = tuple(state["parent"]), state["loss"]
    bar = tqdm(
        total=config.generations, initial=state["generation"], desc="tune", unit="gen", disable=not progress
    )
    for generation in range(state["generation"], config.generations):
        rng = random.Random(config.seed * 1_000_003 + generation)
        candidates = _children(space, parent, config.offspring, rng)
        for samples, keep in zip(config.stage_samples, config.survivors, strict=True):
            batch = sorted(rng.sample(everything, min(samples, pool)))
            candidates = sorted(candidates, key=lambda c: memo(c, batch))[:keep]
        finalists = [(memo(c, everything), c) for c in candidates]
        best_loss, best = min(finalists, default=(loss, parent))
        if best_loss <= loss:  # elitism: the parent stays unless a child is at least as good
            parent, loss = best, best_loss
        state.update(
            generation=generation + 1,
            parent=list(parent),
            loss=loss,
            history=[*state["history"], loss],
            evaluations=state["evaluations"] + memo.evaluations,
            seconds=state["seconds"] + time.perf_counter() - started,
        )
        memo.evaluations, started = 0, time.perf_counter()
        _save_state(state_path, state)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", start=f"{state['start_loss']:.4f}")
    bar.close()
    return SearchResult(
        levels=parent,
        loss=loss,
        start_loss=state["start_loss"],
        history=list(state["history"]),
        evaluations=state["evaluations"] + memo.evaluations,
        seconds=state["seconds"] + time.perf_counter() - started,
    )


def _load_state(path: str | Path | None, identity: dict) -> dict | None:
    if path is None or not Path(path).exists():
        return None
    state = json.loads(Path(path).read_text())
    differ = [k for k in identity if json.loads(json.dumps(identity[k])) != state.get(k)]
    if differ:
        raise ValueError(
            f"{path} holds another search (its {', '.join(differ)} differ); delete it or write elsewhere"
        )
    return state


def _save_state(path: str | Path | None, state: dict) -> None:
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(path.suffix + ".partial")
    partial.write_text(json.dumps(state, indent=1))
    os.replace(partial, path)
