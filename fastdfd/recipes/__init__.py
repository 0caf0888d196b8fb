"""Recipes: one TOML file per paper setting, every hyperparameter in the file.

``fastdfd run RECIPE`` (or :func:`run_recipe`) runs teacher training (optional), generator
training and distillation end to end into a self-describing run directory. The bundled
recipes sit beside this file; docs/recipes/ has a page per recipe.
"""

from .loader import Recipe, find_recipe, list_recipes, load_recipe
from .rundir import compare_runs

__all__ = ["Recipe", "compare_runs", "find_recipe", "list_recipes", "load_recipe", "run_recipe"]


def run_recipe(*args, **kwargs):
    """See :func:`fastdfd.recipes.runner.run_recipe` (imported on use: it pulls in the trainers)."""
    from .runner import run_recipe as run

    return run(*args, **kwargs)
