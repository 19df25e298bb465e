"""Run an ablation spec: every variant x seed under one budget, tracked in MLflow, then a report.

    python run_ablation.py ablations/qknorm.yaml            # the spec's scale (a GPU)
    python run_ablation.py ablations/qknorm.yaml --quick    # CPU scale, about 5 minutes for 2 variants
    python run_ablation.py ablations/qknorm.yaml --dry-run  # the run matrix only

Exit codes: 0 done (diverged runs are results), 1 a run failed, 2 bad input, 130 interrupted.
"""

from blueberry.ablation import main
from blueberry.errors import run_cli

if __name__ == "__main__":
    run_cli(main)
