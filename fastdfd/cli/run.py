"""``fastdfd run RECIPE``, ``fastdfd recipes`` and ``fastdfd compare RUN_A RUN_B``."""

from __future__ import annotations

import argparse
import json

from ..recipes import compare_runs, list_recipes, load_recipe, run_recipe


def add_run_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run a recipe end to end: teacher (optional), generators, distillation")
    p.add_argument("recipe", help=f"a recipe file, or a bundled recipe's name ({', '.join(list_recipes())})")
    p.add_argument("--out", default=None, help="run directory (default runs/<recipe name>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set data.root=/data/cifar --set generators.steps=500 "
                        "(recorded in the run directory)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out: skip finished stages")
    p.add_argument("--check", action="store_true",
                   help="check the recipe, data and checkpoints, print the resolved recipe, run nothing")
    p.add_argument("--device", default=None)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)

    p = sub.add_parser("recipes", help="list the bundled recipes")
    p.set_defaults(func=recipes)

    p = sub.add_parser("compare", help="what differs between two run directories: recipe, environment, results")
    p.add_argument("a")
    p.add_argument("b")
    p.set_defaults(func=compare)


def run(args: argparse.Namespace) -> dict:
    recipe = load_recipe(args.recipe, args.overrides)
    if args.check:
        from ..recipes.preflight import preflight

        preflight(recipe)
        print(recipe.resolved_json())
        print(f"recipe {recipe.name}: data, models and checkpoints check out")
        return recipe.values
    results = run_recipe(recipe, args.out, device=args.device, resume=args.resume, progress=not args.no_progress)
    print(json.dumps(results, indent=2))
    return results


def recipes(_args: argparse.Namespace) -> list[str]:
    names = list_recipes()
    for name in names:
        r = load_recipe(name)
        print(f"{name:<36} {r['description']}")
    return names


def compare(args: argparse.Namespace) -> str:
    text = compare_runs(args.a, args.b)
    print(text)
    return text
