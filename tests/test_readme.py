"""The README's commands stay true: .ci/run runs its test command verbatim, and every
`python -m tubevit_fast.X` it shows is a module with a command-line entry."""
import importlib.util
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(*path):
    with open(os.path.join(ROOT, *path)) as f:
        return f.read()


def test_ci_runs_the_readme_test_command():
    readme = _read("README.md")
    blocks = re.findall(r"```bash\n(.*?)```", readme, re.S)
    test_command = [line for block in blocks for line in block.splitlines() if "pytest tests/" in line]
    assert len(test_command) == 1, test_command
    assert test_command[0].strip() in [line.strip() for line in _read(".ci", "run").splitlines()]


def test_readme_modules_have_entry_points():
    names = set(re.findall(r"python -m tubevit_fast\.(\w+)", _read("README.md")))
    names |= set(re.findall(r"-m tubevit_fast\.(\w+)", _read("README.md")))
    assert {"train", "predict", "data", "viz", "profile", "audit"} <= names
    for name in names:
        spec = importlib.util.find_spec(f"tubevit_fast.{name}")
        assert spec is not None, name
        if spec.submodule_search_locations:  # a package: `python -m` runs its __main__.py
            assert importlib.util.find_spec(f"tubevit_fast.{name}.__main__") is not None, name
            continue
        with open(spec.origin) as f:
            assert 'if __name__ == "__main__":' in f.read(), name
