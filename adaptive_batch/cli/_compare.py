"""``adaptive-batch compare``: several methods on one examples budget, and a report.

Each method trains as ``adaptive-batch train`` would, into ``OUT/<method>/``; then
``OUT/report.md`` gets the comparison table and ``OUT/compare_*.png`` the overlays, and
``OUT/summary.json`` all the summaries.
"""

from __future__ import annotations

from adaptive_batch.cli import _resolve
from adaptive_batch.cli._plots import compare_plots
from adaptive_batch.cli._report import compare_table, report_markdown
from adaptive_batch.cli._train import train_one, write_json


def compare_command(args) -> int:
    options = _resolve.common(args)
    methods = _resolve.method_list(args.methods)
    target = _resolve.target(args.target)
    out = _resolve.out_dir(args.out, f"compare-{options.dataset}-{options.model}", args.overwrite)
    dataset = _resolve.dataset(options)
    options = _resolve.cap_at_dataset(options, dataset)
    _resolve.make_dir(out)
    budget = options.budget(dataset)
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
    print(compare_table(summaries, target, markdown=False))
    print(f"report: {out / 'report.md'}")
    return 0
