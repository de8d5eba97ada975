"""Notebooks and params files agree; notebooks are committed stripped and end with checks; bad params are
caught early; the environment files pin the tested set."""

import ast
import importlib.metadata
import json
import re
import subprocess
import tomllib

import papermill
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from chemscale import paths, study
from chemscale.config import ConfigError

NOTEBOOKS = study.notebooks()
PAIRS = [(nb, p) for nb in NOTEBOOKS for p in study.PROFILES]


def test_there_are_notebooks():
    assert NOTEBOOKS, "notebooks/ holds the study"


@pytest.mark.parametrize("notebook,profile", PAIRS, ids=[f"{n.stem}-{p}" for n, p in PAIRS])
def test_params_file_matches_notebook(notebook, profile):
    path = study.params_path(notebook, profile)
    assert path.exists(), f"missing {path}"
    study.check_params(notebook, study.read_params(path), str(path))


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[n.stem for n in NOTEBOOKS])
def test_notebook_is_stripped_with_parameters_tag(notebook):
    nb = json.loads(notebook.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), "commit notebooks stripped"
    tagged = [c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, "exactly one cell tagged 'parameters'"
    assert nb["metadata"]["kernelspec"]["name"] == study.KERNEL, "the project's kernel, not whatever python3 is"
    assert not any("def " in "".join(c["source"]) or "class " in "".join(c["source"]) for c in code), \
        "notebooks hold no logic: functions live in chemscale/"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[n.stem for n in NOTEBOOKS])
def test_smoke_params_equal_notebook_defaults(notebook):
    declared = papermill.inspect_notebook(str(notebook))
    smoke = study.read_params(study.params_path(notebook, "smoke"))
    assert set(smoke) == set(declared), "smoke.yaml sets every parameter"
    for key, value in smoke.items():
        assert ast.literal_eval(declared[key]["default"]) == value, f"{key}: smoke.yaml and the parameters cell disagree"


def test_unknown_and_mistyped_params_are_rejected(tmp_path):
    nb = NOTEBOOKS[0]
    with pytest.raises(ConfigError, match="unknown parameter.*'no_such_key'"):
        study.check_params(nb, {"no_such_key": 1}, "x.yaml")
    declared = papermill.inspect_notebook(str(nb))
    int_key = next(k for k, v in declared.items() if v["inferred_type_name"] == "int")
    with pytest.raises(ConfigError, match=f"'{int_key}'.*declares it int"):
        study.check_params(nb, {int_key: "ten"}, "x.yaml")


def test_malformed_yaml_names_file_and_line(tmp_path):
    bad = tmp_path / "cpu.yaml"
    bad.write_text("seed: 1\nwidth: [16, 32\nlr: 0.1\n")
    with pytest.raises(ConfigError, match=r"cpu.yaml: line \d+"):
        study.read_params(bad)


def test_every_notebook_has_three_profiles():
    for nb in NOTEBOOKS:
        assert {p.stem for p in (paths.PARAMS / nb.stem).glob("*.yaml")} >= set(study.PROFILES)


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[n.stem for n in NOTEBOOKS])
def test_notebook_says_how_to_run_a_profile_from_lab(notebook):
    nb = json.loads(notebook.read_text())
    text = "".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")
    assert f"python -m chemscale.study --profile cpu {notebook.stem}" in text
    assert f"runs/notebooks/{notebook.stem}.cpu.ipynb" in text


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[n.stem for n in NOTEBOOKS])
def test_notebook_ends_with_the_checks(notebook):
    code = [c for c in json.loads(notebook.read_text())["cells"] if c["cell_type"] == "code"]
    assert "checks.verify(results," in "".join(code[-1]["source"]), "the last cell fails the notebook on bad results"


def test_make_test_runs_notebooks_on_a_fresh_runs_folder():
    out = subprocess.run(["make", "-n", "test"], cwd=paths.ROOT, capture_output=True, text=True, check=True).stdout
    nbmake = next(line for line in out.replace("\\\n", " ").splitlines() if "--nbmake" in line)
    assert "CHEMSCALE_RUNS=$tmp/runs" in nbmake and "tmp=$(mktemp -d)" in nbmake


# --- the environment files: the tested set pinned, the ranges honest, licence and citation present ---

def _pins() -> dict:
    """{canonical name: pinned version} from requirements.txt and requirements-nodeps.txt."""
    pins = {}
    for name in ("requirements.txt", "requirements-nodeps.txt"):
        for line in (paths.ROOT / name).read_text().splitlines():
            line = line.split("#")[0].strip()
            if line:
                req = Requirement(line)
                (spec,) = req.specifier  # exactly one specifier per line ...
                assert spec.operator == "==", f"{name}: {line} is not pinned"  # ... and it is a pin
                pins[canonicalize_name(req.name)] = spec.version
    return pins


def test_requirements_pin_what_is_installed():
    for name, version in _pins().items():
        installed = Version(importlib.metadata.version(name))
        assert installed.public == version, \
            f"{name}: pinned {version}, installed {installed}"


def test_pyproject_ranges_hold_the_tested_pins():
    project = tomllib.loads((paths.ROOT / "pyproject.toml").read_text())["project"]
    pins = _pins()
    ranges = [Requirement(r) for r in project["dependencies"] + sum(project["optional-dependencies"].values(), [])]
    for req in ranges:
        name = canonicalize_name(req.name)
        assert name in pins, f"pyproject.toml: {req.name} is not in the tested set"
        assert req.specifier.contains(pins[name]), f"pyproject.toml: {req} excludes the tested {pins[name]}"
    no_deps = {"schnetpack", "molsets"}  # pip cannot install these beside the rest: --no-deps, said in pyproject
    # a pin no range names is one of those, or a package a pinned one requires (optuna's alembic, SQLAlchemy, ...)
    requires = [Requirement(r) for name in pins for r in importlib.metadata.requires(name) or []]
    required = {canonicalize_name(r.name) for r in requires if not r.marker or r.marker.evaluate()}
    assert set(pins) - {canonicalize_name(r.name) for r in ranges} - required == no_deps
    assert all(name in (paths.ROOT / "pyproject.toml").read_text() for name in no_deps)


def test_docs_cite_only_files_in_the_repository():
    for name in ("requirements.txt", "requirements-nodeps.txt", "pyproject.toml", "environment.yml", "README.md"):
        for cited in re.findall(r"(?<![\w.])([A-Za-z_-]+\.md)\b(?!\.\w)", (paths.ROOT / name).read_text()):
            assert (paths.ROOT / cited).exists(), f"{name} cites {cited}, which is not in the repository"


def test_the_package_map_names_every_module():
    """chemscale/README.md is the map of the package: a module it does not name is one a newcomer cannot find."""
    text = (paths.ROOT / "chemscale" / "README.md").read_text()
    for module in sorted((paths.ROOT / "chemscale").rglob("*.py")):
        if module.name != "__init__.py":
            assert re.search(rf"\b{module.stem}\b", text), f"chemscale/README.md does not name {module.name}"


def test_license_and_citation():
    assert "MIT License" in (paths.ROOT / "LICENSE").read_text()
    assert tomllib.loads((paths.ROOT / "pyproject.toml").read_text())["project"]["license"] == {"text": "MIT"}
    cff = study.yaml.safe_load((paths.ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0" and cff["license"] == "MIT" and cff["title"].startswith("chemscale")
    (paper,) = cff["references"]
    assert (paper["journal"], paper["volume"], paper["start"], paper["year"]) == ("Nature Machine Intelligence", 5,
                                                                                   1297, 2023)
    assert paper["authors"][0]["family-names"] == "Frey" and paper["doi"] == "10.1038/s42256-023-00740-3"


def test_readme_documents_the_conda_route_and_the_study_cli():
    readme = (paths.ROOT / "README.md").read_text()
    assert "conda env create -f environment.yml" in readme
    assert "python -m chemscale.study --params" in readme
    assert not re.search(r"papermill\s+\S+\.ipynb", readme), "custom params go through chemscale.study, not papermill"
    for name in ("CHEMSCALE_RUNS", "CHEMSCALE_FIGURES", "sweep.collect"):
        assert name in readme
