"""``adaptive-batch compare``: several methods on one examples budget, and a report.

Each method trains as ``adaptive-batch train`` would, into ``OUT/<method>/``; then
``OUT/report.md`` gets the comparison table and ``OUT/compare_*.png`` the overlays, and
``OUT/summary.json`` all the summaries. With ``--seeds`` (several), every method runs
once per seed into ``OUT/<method>/seed-<seed>/``, and ``report.md`` / ``report.json``
give each figure's mean and range over the seeds.
"""

from __future__ import annotations

import dataclasses

from adaptive_batch.cli import _resolve
from adaptive_batch.cli._plots import compare_plots
from adaptive_batch.cli._report import (
    aggregate,
    compare_table,
    report_markdown,
    seeds_markdown,
    seeds_table,
)
from adaptive_batch.cli._train import train_one, write_json


def compare_command(args) -> int:
    options = _resolve.common(args)
    methods = _resolve.method_list(args.methods)
    seeds = _resolve.seed_list(args.seeds)
    target = _resolve.target(args.target)
    out = _resolve.out_dir(args.out, f"compare-{options.dataset}-{options.model}", args.overwrite)
    dataset = _resolve.dataset(options)
    options = _resolve.cap_at_dataset(options, dataset)
    _resolve.make_dir(out)
    budget = options.budget(dataset)
    if seeds is not None and len(seeds) > 1:
        return _compare_seeds(args, options, methods, target, out, dataset, budget, seeds)
    if seeds is not None:
        options = dataclasses.replace(options, seed=seeds[0])
    summaries, runs = {}, {}
    for method in methods:
        run_dir = out / method.name
        run_dir.mkdir(exist_ok=True)
        summaries[method.name], runs[method.name] = train_one(
            method, options, dataset, run_dir, target=target, progress=not args.no_progress
        )
    title = f"{options.dataset} / {options.model}, {budget:,} examples each"
    plots = [p.name for p in compare_plots(runs, out, title, target, budget)]
    (out / "report.md").write_text(
        report_markdown(
            summaries,
            title=f"adaptive-batch compare: {title}",
            target=target,
            budget=budget,
            plots=plots,
        )
    )
    write_json(out / "summary.json", summaries)
    methods_json = {n: {"seeds": [s], **aggregate([s])} for n, s in summaries.items()}
    report = {"target": target, "budget": budget, "seeds": [options.seed], "methods": methods_json}
    write_json(out / "report.json", report)
    print(compare_table(summaries, target, markdown=False))
    print(f"report: {out / 'report.md'}")
    return 0


def _compare_seeds(args, options, methods, target, out, dataset, budget, seeds) -> int:
    """Every method once per seed; report.md and report.json with means and ranges."""
    per_method: dict[str, dict] = {}
    first_runs = {}
    for method in methods:
        summaries = []
        for seed in seeds:
            run_dir = out / method.name / f"seed-{seed}"
            run_dir.mkdir(parents=True, exist_ok=True)
            summary, rows = train_one(
                method, dataclasses.replace(options, seed=seed), dataset, run_dir,
                target=target, progress=not args.no_progress,
            )  # fmt: skip
            summaries.append({"seed": seed, **summary})
            if seed == seeds[0]:
                first_runs[method.name] = rows
        per_method[method.name] = {"seeds": summaries, **aggregate(summaries)}
    title = f"{options.dataset} / {options.model}, {budget:,} examples each"
    plots = [p.name for p in compare_plots(first_runs, out, title, target, budget)]
    text = seeds_markdown(
        per_method, title=f"adaptive-batch compare: {title}", target=target, budget=budget,
        seeds=seeds, plots=plots,
    )  # fmt: skip
    (out / "report.md").write_text(text)
    report = {"target": target, "budget": budget, "seeds": list(seeds), "methods": per_method}
    write_json(out / "report.json", report)
    write_json(out / "summary.json", {n: m["seeds"] for n, m in per_method.items()})
    print(seeds_table(per_method, target, markdown=False))
    print(f"report: {out / 'report.md'}")
    return 0
