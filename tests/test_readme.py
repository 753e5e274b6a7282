"""The README: its first example runs as written (with the model read from its PyPI package), the
package list is complete, every results file it or docs/ cites is in the repository, and every
file they link to exists."""
import os
import pathlib
import re
import subprocess

from real_models import minilm_dir

README = os.path.join(os.path.dirname(__file__), "..", "README.md")
ROOT = pathlib.Path(__file__).resolve().parent.parent


def _documents() -> list[pathlib.Path]:
    """The README and every page under docs/ (also python/README.md)."""
    return [ROOT / "README.md", ROOT / "python" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _listed_packages(text: str) -> set[str]:
    """`[tool.setuptools] packages` of pyproject.toml: tomllib (Python 3.11+), else tomli, else the
    one list read with a regular expression (Python 3.10 without tomli)."""
    try:
        import tomllib
    except ModuleNotFoundError:
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            tomllib = None
    if tomllib is not None:
        return set(tomllib.loads(text)["tool"]["setuptools"]["packages"])
    section = re.search(r"^\[tool\.setuptools\]\s*$(.*?)(?=^\[|\Z)", text, re.S | re.M).group(1)
    listed = re.search(r"^packages\s*=\s*\[(.*?)\]", section, re.S | re.M).group(1)
    return set(re.findall(r'"([^"]+)"', listed))


def test_readme_example_runs(capsys):
    text = open(README).read()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    code = code.replace('"sentence-transformers/all-MiniLM-L6-v2"', repr(minilm_dir()))
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert abs(float(capsys.readouterr().out) - 0.65) < 0.01
    model, mask, batch = namespace["model"], namespace["mask"], namespace["batch"]
    assert not namespace["dk"].is_patched(model)
    # the expert computed it: the masked dense model's embedding, not the whole model's
    import torch
    from model_utils import masked_dense

    with torch.no_grad():
        whole = model(**batch).last_hidden_state
        expected = masked_dense(model, mask)(**batch).last_hidden_state
    torch.testing.assert_close(namespace["embedding"], expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(namespace["embedding"], whole, rtol=1e-2, atol=1e-2)


def test_pyproject_lists_every_subpackage():
    """A wheel holds only the packages pyproject.toml names: each folder of doe_kernels must be
    there (a missing one imports fine from the repository and breaks installs)."""
    listed = _listed_packages((ROOT / "pyproject.toml").read_text())
    found = {".".join(p.parent.relative_to(ROOT).parts)
             for p in (ROOT / "doe_kernels").rglob("__init__.py")}
    assert found == listed


def test_the_package_list_reads_without_tomllib(monkeypatch):
    """Python 3.10 has no tomllib: the fallback reads the same list (tomli hidden too)."""
    import builtins

    real_import = builtins.__import__

    def no_toml(name, *args, **kwargs):
        if name in ("tomllib", "tomli"):
            raise ModuleNotFoundError(name)
        return real_import(name, *args, **kwargs)

    text = (ROOT / "pyproject.toml").read_text()
    expected = _listed_packages(text)
    monkeypatch.setattr(builtins, "__import__", no_toml)
    assert _listed_packages(text) == expected


def test_docs_cite_only_results_files_that_exist():
    """Every figure the README and docs/ quote names its results file; each file named must be in
    the repository (a file left out of a commit leaves a figure that nothing backs); one named
    from git history as `COMMIT:path`, as `git show` takes it, need not be."""
    cited = {}
    for doc in _documents():
        for path in re.findall(r"(?<!:)benchmarks/results/[\w./-]*\w(?![\w*-])",  # not globs
                               doc.read_text()):
            cited.setdefault(path, doc.relative_to(ROOT).as_posix())
    assert any(doc == "README.md" for doc in cited.values()), "the README names no results file"
    if (ROOT / ".git").exists():  # tracked, not merely on this disk (an ignored file is lost)
        tracked = subprocess.run(["git", "ls-files", "benchmarks/results"], cwd=ROOT, check=True,
                                 capture_output=True, text=True).stdout.split()
        present = lambda path: any(t == path or t.startswith(path + "/") for t in tracked)  # noqa: E731
    else:
        present = lambda path: (ROOT / path).exists()  # noqa: E731
    missing = sorted(f"{path} (in {doc})" for path, doc in cited.items()
                     if not present(path) and path != "benchmarks/results/local")
    assert not missing, f"results cited that are not in the repository: {missing}"


def test_docs_link_only_to_files_that_exist():
    """Every relative link of the README and docs/ ([text](path) or ![alt](path)) names a file or
    folder of the repository."""
    broken = []
    for doc in _documents():
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue  # a URL or an anchor in the same page
            if not (doc.parent / target.split("#")[0]).exists():
                broken.append(f"{doc.relative_to(ROOT).as_posix()}: {target}")
    assert not broken, f"links to files that do not exist: {broken}"
