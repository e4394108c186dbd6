"""Report of a sweep folder: tables (Markdown + LaTeX booktabs), plots, reproducibility stamp.

    python scripts/report.py runs/tweet_methods [--out=experiments/tweet_methods] [--command="..."]
        [--convergence=runs/tweet_methods_convergence]

Reads DIR/results.jsonl (written by scripts/sweep.py) and writes, to --out (default DIR):
report.md, report.tex, plots/*.{png,pdf} (score vs trainable params with the Pareto front,
memory and step-time bars, learning curves, rank ablations, AdaLoRA rank allocation) and
resolved_configs.json. Hyperparameters are chosen on validation; test is reported for the chosen
setting only (see peftjax/grid/report.py).
"""

import sys

import _bootstrap  # noqa: F401
from absl import app, flags, logging

flags.DEFINE_string("out", None, "output folder (default: the sweep folder)")
flags.DEFINE_string("title", None, "report title (default: the sweep definition's name)")
flags.DEFINE_string("command", None, "the command that produced the results, quoted in the report")
flags.DEFINE_string("convergence", None, "folder of a longer rerun of the chosen settings "
                    "(e.g. experiments/tweet_methods/convergence.py's sweep): adds the convergence check")
flags.DEFINE_string("convergence_command", None, "the command of that rerun, quoted in the report")
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) != 2:
        print("usage: python scripts/report.py DIR [--out=...]", file=sys.stderr)
        return 2
    logging.set_verbosity(logging.WARNING)
    from peftjax.grid.report import write_report

    written = write_report(argv[1], FLAGS.out, title=FLAGS.title, command=FLAGS.command,
                           convergence=FLAGS.convergence, convergence_command=FLAGS.convergence_command)
    print(f"report: {written['md']}\nlatex:  {written['tex']}\nplots:  {len(written['plots'])} files")
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
