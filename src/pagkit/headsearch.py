"""``pagkit tune --heads greedy``: grow a head set on the halving's winner, as HeadHunter does.

**HeadHunter** (Ahn et al. 2025, arXiv 2506.10978, Algorithm 1): S_final ← ∅ and the pool R ← every head
(l, h); each round, for every (l, h) ∈ R, generate samples with perturbation guidance on S_final ∪ {(l, h)}
over the same prompt–seed pairs Q = {(p_j, s_j)}, score each candidate by the objective O averaged over them,
then add the top-k candidates to S_final and take them out of R; a fixed number of rounds.

**Here** it is plain greedy forward selection on that scheme, with k = 1 and two stops the paper has not: a
round whose best candidate does not improve on the current set's score ends the search, and the set holds at
most ``max_heads`` heads (and at most the rounds the plan could pay for up front: ``pagkit.tune.make_plan``).
Lower is better, as everywhere in tune (the paper maximises PickScore). The differences from the paper:

* the pool is the heads of the winner's site(s), not every head of the model: the halving chose the sites,
  scale and interval, and the head search keeps them. Where the winner holds several sites, a head index is
  perturbed at every one of them (PAG's ``heads=[...]``), so the pool is the fewest heads among them;
* the set stays a proper subset (at most H − 1 of a site's H heads): all H heads are the whole layer, which
  the halving measured already;
* the empty set is no guidance, so round 0's best head must beat no guidance to be kept.

**Same seeds.** Every candidate is measured on the last rung's samples (its seed set and sample count: the same
noise for every setting, ``pagkit.runner``), so its score is comparable with the whole-layer winner's and with no
guidance's at the last rung. The chosen set goes into the preset only if it scores strictly better than the
whole-layer winner there; otherwise the preset keeps the whole layer, and the record says so. Ties go to the
lower head index.

**Resumable and distributed.** Round t is a ``Sweep`` in ``OUT/heads<t>/`` whose units are its candidates, so a
killed tune reads every finished candidate's score back and recomputes nothing, and the candidates' shards are
dealt to ``torchrun`` ranks like a rung's; each round's choice is a deterministic function of finished results.
"""
from __future__ import annotations

from dataclasses import replace

from . import runner
from .evaluate import EvalConfig


def with_heads(config: EvalConfig, heads: list[int], num_samples: int) -> EvalConfig:
    """``config`` perturbing only ``heads`` (PAG's ``heads=[...]``, as text in the row's options)."""
    return replace(config, options=config.options + (("heads", "+".join(map(str, sorted(heads)))),),
                   num_samples=num_samples)


def greedy_heads(tune, winner: EvalConfig, plan, none: dict, whole: dict, rank: int, world: int) -> dict:
    """The greedy search on ``winner``'s sites (see the module docstring). ``none`` / ``whole``: the last rung's
    results of no guidance and of the winner itself (the whole layer). Returns the chosen ``config`` (the winner
    where no head set beats it), its ``evidence`` rows, the search's ``record`` and the ``sweep`` holding the
    chosen set's samples (None where the whole layer stays)."""
    from .tune import _rank_key, _spec
    m = plan.rungs[-1][1]
    pool = tune.site_heads(winner.layers)
    rounds = min(plan.head_rounds, tune.max_heads, pool - 1)
    chosen, current, evidence, trail, best_sweep = [], none["score"], [], [], None
    stop = (f"{rounds} rounds: " + ("--max-heads" if rounds == tune.max_heads else "a proper subset of the "
            f"{pool} heads" if rounds == pool - 1 else "the rounds the budget pays for"))
    for t in range(rounds):
        remaining = [h for h in range(pool) if h not in chosen]
        candidates = [with_heads(winner, chosen + [h], m) for h in remaining]
        sweep = tune._sweep(tune.out / f"heads{t}", candidates)
        runner.barrier(world)
        sweep.run()
        tune._keep_reference(sweep)
        runner.barrier(world)  # rank 0 has scored the round
        results = [tune._result(sweep, c) for c in candidates]
        for config, res in zip(candidates, results):
            evidence.append({"stage": "heads", "round": t, **tune._evidence(None, config, res, none, m)})
        j = min(range(len(candidates)), key=lambda j: (_rank_key(results[j]["score"]), remaining[j]))
        improved = _rank_key(results[j]["score"]) < _rank_key(current)
        trail.append({"round": t, "candidates": len(candidates), "best": sorted(chosen + [remaining[j]]),
                      "score": results[j]["score"], "kept": improved})
        if not improved:
            stop = (f"round {t}: no head improves on {'no guidance' if not chosen else f'heads {sorted(chosen)}'} "
                    f"({current:.4g})")
            break
        chosen, current, best_sweep = chosen + [remaining[j]], results[j]["score"], sweep
    beats = bool(chosen) and _rank_key(current) < _rank_key(whole["score"])
    whole_spec = _spec(winner)
    if not chosen:
        verdict = f"no head set beats no guidance: the preset keeps the whole layer ({whole_spec})"
    elif beats:
        verdict = (f"heads {sorted(chosen)} ({current:.4g}) beat the whole layer ({whole['score']:.4g}) on the same "
                   f"{m} samples: the preset takes them")
    else:
        verdict = (f"heads {sorted(chosen)} ({current:.4g}) do not beat the whole layer ({whole['score']:.4g}) on the "
                   f"same {m} samples: the preset keeps the whole layer ({whole_spec})")
    config = with_heads(winner, chosen, 0) if beats else winner
    record = {"pool": pool, "samples": m, "seed_set": winner.seed_set, "max_heads": tune.max_heads,
              "rounds": trail, "stop": stop, "heads": sorted(chosen), "score": current if chosen else None,
              "whole_layer": {"spec": whole_spec, "score": whole["score"]}, "chosen": beats, "verdict": verdict}
    return {"config": config, "evidence": evidence, "record": record, "sweep": best_sweep if beats else None}
