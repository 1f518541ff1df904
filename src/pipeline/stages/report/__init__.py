"""Report stage: every run's metrics in one CSV, figures, a LaTeX table and a Markdown summary.

    pipeline report runs/sweep --x train_size --metrics pass@1 eval_reward --baseline pass@1:SFT=0.46
    pipeline report runs/a runs/b --output_dir runs/report --group_by stage,loss_type

Every `run.json` under the given folders is read (recursively; a folder that is itself a stage's output
counts too). Runs whose status is not `completed` are skipped and counted. Each run is one record: its
stage, seed and final metrics; an `eval` run is one record per model it evaluated (its metrics are stored
as `<model>/<metric>`), labelled by the model's name (an eval model named `sft`, the folder name of a
pipeline's `sft` stage, shares that stage's group: one line, one colour).

- `--x FIELD`: the swept field on the x-axis (e.g. `train_size`). It is looked up in the run's `sweep`
  mapping, its `config`, the top level of run.json (`seed`), a `FIELD=value` folder name on its path, the
  run.json of an enclosing folder, and finally the other stage folders beside it (when they agree), so an
  `eval` stage inherits the sweep values of the training stages of its pipeline run.
- `--group_by`: one line (or bar) per group: `stage` (an eval run's models are their own groups) and/or
  config fields, comma-separated (`stage,loss_type`).
- `--metrics`: default: the headline metrics found (pass@k, eval_reward, reward, win_rate,
  eval_accuracy, eval_loss).
- `--baseline NAME=VALUE` or `NAME=RUN_DIR` (the mean of that folder's runs, those of group, stage or
  model NAME where there are some; it is not collected as a run), for one metric: `pass@1:SFT=0.46` (a
  number needs the metric when several are reported). Drawn as dashed horizontal lines.

Per group, x value and metric: the mean over runs (seeds) and the half-width of the 95% Student-t interval
over seeds (n >= 2). A point of a single run shows the run's own 95% interval over its prompts where it
logged one (`eval`: Wilson's score interval for 0/1-per-prompt metrics such as greedy pass@1, else a
bootstrap over prompts), else its value alone. The `<metric>_before` point averages each seed's values
first (every size of a sweep logs the same starting model), so its n is the number of seeds. The table
caption, `summary.md` and each figure's title say which interval each point has, and over how many.
`summary.md` also says, per x, whether the groups were trained on the same prompts: each run's training
data (an eval run's: through the model folder it scored) is traced to its `pipeline subset` manifest, whose
`prompt_ids` are compared (`report.json`: `prompt_matching`).
With `--x`, each metric is drawn against x (log2 axis when the
sizes grow geometrically), one line per group with 95% error bars; x = 0 is the zero-training point: runs
at x = 0, or else the runs' `<metric>_before` values (`--before_point false` turns that off). Without
`--x`, a bar chart per metric. Writes into `--output_dir` (default `RUN_DIR/report` for one folder), each
file under a temporary name then renamed: `runs.csv` (one row per record), one PNG per metric,
`table.tex` (booktabs), `summary.md` (the same table and the figures) and `report.json` (the aggregates).

Code: collect (runs → records), tables (aggregates, Markdown/LaTeX/CSV), figures; `main` in stage.py.
"""

from pipeline.stages.report.figures import figure_name, use_log2
from pipeline.stages.report.stage import main
from pipeline.stages.report.tables import fmt_x, interval_note, latex_escape

__all__ = ["figure_name", "fmt_x", "interval_note", "latex_escape", "main", "use_log2"]
