"""The README: its first example runs as written (with the model read from its PyPI package), the
package list is complete, and every results file it cites is in the repository."""
import os
import pathlib
import re
import subprocess

from real_models import minilm_dir

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def test_readme_example_runs(capsys):
    text = open(README).read()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    code = code.replace('"sentence-transformers/all-MiniLM-L6-v2"', repr(minilm_dir()))
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert abs(float(capsys.readouterr().out) - 0.65) < 0.01
    assert not namespace["dk"].is_patched(namespace["model"])


def test_pyproject_lists_every_subpackage():
    """A wheel holds only the packages pyproject.toml names: each folder of doe_kernels must be
    there (a missing one imports fine from the repository and breaks installs)."""
    import tomllib

    root = pathlib.Path(__file__).resolve().parent.parent
    config = tomllib.loads((root / "pyproject.toml").read_text())
    listed = set(config["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(root).parts)
             for p in (root / "doe_kernels").rglob("__init__.py")}
    assert found == listed


def test_readme_cites_only_results_files_that_exist():
    """Every figure the README quotes names its results file; each file named must be in the
    repository (a file left out of a commit leaves a figure that nothing backs)."""
    root = pathlib.Path(__file__).resolve().parent.parent
    text = (root / "README.md").read_text()
    cited = set(re.findall(r"benchmarks/results/[\w./-]*\w(?![\w*-])", text))  # not globs
    assert cited, "the README names no results file"
    if (root / ".git").exists():  # tracked, not merely on this disk (an ignored file is lost)
        tracked = subprocess.run(["git", "ls-files", "benchmarks/results"], cwd=root, check=True,
                                 capture_output=True, text=True).stdout.split()
        present = lambda path: any(t == path or t.startswith(path + "/") for t in tracked)  # noqa: E731
    else:
        present = lambda path: (root / path).exists()  # noqa: E731
    missing = sorted(path for path in cited if not present(path))
    assert not missing, f"the README cites results that are not in the repository: {missing}"
