"""Where the repository is: the default data, output and MLflow locations hang off it."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
