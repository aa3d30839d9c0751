"""The documentation keeps its promises: one figure per measurement, the front page short, CI and
README in step, and the skip messages pointing at install commands the Testing page names."""

from __future__ import annotations

import re
from pathlib import Path

from tests.conftest import NODE_INSTALL, REDIS_INSTALL

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CI = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_every_dpop_cost_quoted_is_a_figure_measured_in_benchmarks() -> None:
    """A ratio to a raw ES256 signature or verify, quoted anywhere, is one benchmarks.md has."""
    pattern = re.compile(r"(\d+(?:\.\d+)?)x one raw ES256 (signature|verify)")
    measured = set(pattern.findall((ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8")))
    assert measured, "benchmarks.md quotes no DPoP figure"
    quoted = {
        (page.name, figure)
        for page in PAGES
        if page.name != "benchmarks.md"
        for figure in pattern.findall(page.read_text(encoding="utf-8"))
    }
    assert quoted, "no page quotes the DPoP cost"
    assert {(name, f) for name, f in quoted if f not in measured} == set()
    assert "about 1.5x" not in (ROOT / "docs" / "dpop.md").read_text(encoding="utf-8")


def test_the_readme_is_a_front_page() -> None:
    assert len(README.splitlines()) <= 250
    assert "OWNER" not in README
    for section in ("## Quickstart", "## Call a service", "## Protect a service", "## Test it"):
        assert section in README


def test_ci_runs_exactly_the_readmes_test_command() -> None:
    quickstart = re.search(r"## Quickstart.*?```bash\n(.*?)```", README, re.S)
    assert quickstart is not None
    first, second = quickstart[1].strip().splitlines()
    assert "m2m-client demo" in first
    assert second in CI.splitlines()


def test_ci_builds_the_docs_strictly_and_type_checks_both_ends_of_the_python_range() -> None:
    builds = [line for line in CI.splitlines() if "mkdocs build" in line]
    assert builds
    assert all("--strict" in line for line in builds)
    # --quiet silences the warnings that --strict counts: the build would pass a broken link.
    assert not [line for line in builds if "--quiet" in line.split("#")[0] or " -q" in line]
    assert "mypy --python-version 3.10 m2m_client" in CI
    assert "mypy --python-version 3.13 m2m_client" in CI
    assert ".[dev,docs]" in CI
    mkdocs = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    section = re.split(r"\n\S", mkdocs.split("\nplugins:")[1])[0]
    plugins = re.findall(r"^  - ([\w-]+)", section, re.M)
    assert "mkdocstrings" in plugins
    for networked in ("social", "privacy", "git-revision-date-localized", "git-committers"):
        assert networked not in plugins


def test_skip_messages_name_install_commands_the_testing_page_gives() -> None:
    testing = (ROOT / "docs" / "testing.md").read_text(encoding="utf-8")
    assert "`apt-get install redis-server`" in REDIS_INSTALL
    assert "`apt-get install redis-server`" in testing
    assert "`npm ci --prefix tests/interop/idp --no-audit --no-fund`" in NODE_INSTALL
    assert "npm ci --prefix tests/interop/idp --no-audit --no-fund" in testing
    assert "apt-get install nodejs npm" in NODE_INSTALL
    assert "apt-get install nodejs npm" in testing
    # .ci/run installs those same packages on a fresh machine.
    assert "apt-get install -y -q nodejs npm" in CI
    assert "apt-get install -y -q redis-server" in CI
