"""The README cannot drift: its API example runs, and its result tables are the
ones benchmarks/render_readme.py generates from benchmarks/results/."""

import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _api_example() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("```python\nimport torch\nimport ddvae_fast")
    return text[start + len("```python\n") : text.index("```", start + 10)]


def test_readme_api_example_runs():
    namespace: dict = {}
    exec(compile(_api_example(), "README.md", "exec"), namespace)
    assert namespace["loss"].ndim == 0 and namespace["z"].shape == (4, 2)


def test_readme_tables_are_generated_from_the_results_files():
    spec = importlib.util.spec_from_file_location(
        "render", ROOT / "benchmarks" / "render_readme.py"
    )
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)
    text = (ROOT / "README.md").read_text()
    assert render.rendered_readme(text) == text, "run benchmarks/render_readme.py"
