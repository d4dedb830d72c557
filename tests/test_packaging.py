"""The project's top-level import names belong to it alone. A dependency that installs a module of
the same name (transformers 5 brings Hugging Face's ``kernels``, which once clashed with ours)
shadows ours or is shadowed by it, depending on sys.path order."""
import importlib
import importlib.metadata
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def top_level_packages() -> list[str]:
    """The names in pyproject.toml's ``packages.find`` include list (``"engine*"`` -> ``engine``)."""
    text = (ROOT / "pyproject.toml").read_text()
    include = re.search(r"^include = \[(.*)\]$", text, re.M)
    assert include, "pyproject.toml: no [tool.setuptools.packages.find] include list"
    return [name.strip().strip('"').rstrip("*") for name in include[1].split(",")]


def test_no_installed_distribution_provides_our_top_level_names():
    ours = top_level_packages()
    assert "fpkernels" in ours and "engine" in ours
    provided = importlib.metadata.packages_distributions()
    clashes = {name: sorted(set(provided.get(name, [])) - {"fpengine"}) for name in ours}
    assert not any(clashes.values()), f"installed distributions that also provide our packages: {clashes}"


def test_our_top_level_names_import_from_this_tree():
    for name in top_level_packages():
        module = importlib.import_module(name)
        assert Path(module.__file__).resolve().parent == ROOT / name, (name, module.__file__)
