"""The docs a newcomer reads: the configuration page is the settings model's, and links lead somewhere."""

import re

from cli.config_docs import render
from core.settings import Settings
from tests.support import ROOT


def test_the_configuration_page_is_generated_from_the_settings_model():
    page = (ROOT / "docs" / "configuration.md").read_text()
    assert page == render(), "run: .venv/bin/python -m cli.config_docs > docs/configuration.md"
    for name, field in Settings.model_fields.items():
        assert f"`BATCHGEN_{name.upper()}`" in page and field.description, name


def test_every_relative_link_in_the_readme_and_docs_reaches_a_file_and_heading():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    checked = 0
    for page in pages:
        for target in re.findall(r"\]\(([^)]+)\)", page.read_text()):
            if target.startswith(("http://", "https://")):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            assert file.is_file(), f"{page.name}: {target}"
            if anchor and file.suffix == ".md":
                headings = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
                            for h in re.findall(r"^#+ (.+)$", file.read_text(), re.M)}
                assert anchor in headings, f"{page.name}: {target}"
            checked += 1
    assert checked > 10


def test_the_models_page_lists_every_family_convert_takes_and_which_are_tested():
    from tests.families import FAMILIES as TESTED
    from worker.convert import FAMILIES

    page = (ROOT / "docs" / "models.md").read_text()
    rows = dict(re.findall(r"^\| `(\w+)` \|.*\| (yes|no)\b.*\|$", page, re.M))
    assert set(rows) == set(FAMILIES)
    assert {name for name, tested in rows.items() if tested == "yes"} == set(TESTED)
